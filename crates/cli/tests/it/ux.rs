//! What makes `fledgectl` pleasant at a shell: completion scripts and man pages, `version`,
//! named contexts, `-o name|wide` and ages, `describe`, `logs -f`, `job watch --timeout`.

use std::time::Duration;

use fledge_client::TaskClient;
use fledge_types::{JobId, TaskId, TaskState};

use crate::support::{Server, fixture, insert_ready_task, s};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bash_completion_completes_get_kinds() {
    let server = Server::start().await;
    let script = server.ctl(&["completion", "bash"]).await.ok();
    let file = server.path("fledgectl.bash");
    std::fs::write(&file, script).unwrap();
    // What bash does on `fledgectl get j<TAB>`: call the function registered for fledgectl.
    let complete = |words: &str, cword: usize| {
        let program = format!(
            "source {file}\n\
             COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE=\"{words}\"; COMP_POINT=${{#COMP_LINE}}\n\
             fn=$(complete -p fledgectl | sed -E 's/.*-F ([^ ]+) .*/\\1/')\n\
             \"$fn\" fledgectl \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"\n\
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file = file.display()
        );
        let out = std::process::Command::new("bash").arg("-c").arg(program).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let replies = complete("fledgectl get j", 2);
    let replies: Vec<&str> = replies.lines().collect();
    assert!(replies.contains(&"jobs") && replies.contains(&"job"), "{replies:?}");
    assert!(!replies.contains(&"tasks") && !replies.contains(&"designs"), "{replies:?}");
    let replies = complete("fledgectl get zz", 2);
    assert!(replies.trim().is_empty(), "{replies:?}");
    // Top-level commands and output formats complete too.
    assert!(complete("fledgectl desc", 1).lines().any(|l| l == "describe"));
    assert!(complete("fledgectl get jobs -o w", 4).lines().any(|l| l == "wide"));

    for shell in ["zsh", "fish", "powershell", "elvish"] {
        let script = server.ctl(&["completion", shell]).await.ok();
        assert!(script.contains("fledgectl"), "{shell}: {script}");
    }
    server.ctl(&["completion", "tcsh"]).await.fails(64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn man_pages_cover_every_subcommand() {
    let server = Server::start().await;
    let dir = server.path("man");
    let listed = server.ctl(&["man", "--dir", s(&dir)]).await.ok();
    for page in [
        "fledgectl.1",
        "fledgectl-get-jobs.1",
        "fledgectl-describe-job.1",
        "fledgectl-config-use-context.1",
    ] {
        let path = dir.join(page);
        assert!(listed.contains(s(&path)), "{page} not listed:\n{listed}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}: {text}");
    }
    let jobs = std::fs::read_to_string(dir.join("fledgectl-get-jobs.1")).unwrap();
    assert!(jobs.contains("\\-\\-state"), "{jobs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_shows_client_and_server_and_says_when_the_server_is_away() {
    let server = Server::start().await;
    let version = env!("CARGO_PKG_VERSION");
    let text = server.ctl(&["version"]).await.ok();
    assert_eq!(
        text,
        format!("Client Version: {version}\nServer Version: {version} (API v1)"),
        "{text}"
    );
    let json = server.ctl(&["version", "-o", "json"]).await.json();
    assert_eq!(json["server"]["apiVersion"], "v1");
    // No token needed: the version is public.
    let anonymous = server.ctl_with(&["version"], &[("FLEDGE_ENDPOINT", &server.base)]).await;
    assert!(anonymous.ok().contains("Server Version"));

    let away = server.ctl_with(&["version"], &[("FLEDGE_ENDPOINT", "http://127.0.0.1:9")]).await;
    let stderr = away.fails(2).to_owned();
    assert!(away.stdout.contains(&format!("Client Version: {version}")), "{away:?}");
    assert!(!away.stdout.contains("Server Version"), "{away:?}");
    assert!(stderr.contains("unreachable") && stderr.contains("127.0.0.1:9"), "{stderr}");
    // --client never calls out, whatever the config says.
    let client = server
        .ctl_with(&["version", "--client"], &[("FLEDGE_CONFIG", "/nonexistent/config.yaml")])
        .await;
    assert_eq!(client.ok(), format!("Client Version: {version}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_switch_control_planes_and_an_old_config_keeps_working() {
    let server = Server::start().await;
    let config = server.path("home/.fledge/config.yaml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    // A config file of the single-endpoint layout, as earlier releases wrote it.
    std::fs::write(&config, format!("endpoint: {}\ntoken: {}\n", server.base, server.token))
        .unwrap();
    assert_eq!(server.ctl_with(&["get", "jobs", "-o", "json"], &[]).await.ok(), "[]");
    let contexts = server.ctl_with(&["config", "get-contexts", "-o", "json"], &[]).await.json();
    assert_eq!(contexts[0]["name"], "default");
    assert_eq!(contexts[0]["current"], true);
    assert_eq!(contexts[0]["hasToken"], true);
    assert!(!contexts.to_string().contains(&server.token), "the token is never shown");

    // A second context pointing nowhere; --context and FLEDGE_CONTEXT pick it for one command.
    server
        .ctl_with(
            &["--endpoint", "http://127.0.0.1:9", "--token", "t", "config", "set-context", "away"],
            &[],
        )
        .await
        .ok();
    let table = server.ctl_with(&["config", "get-contexts"], &[]).await.ok();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[1].starts_with('*') && lines[1].contains("default"), "{table}");
    assert!(lines[2].contains("away") && lines[2].contains("http://127.0.0.1:9"), "{table}");
    server.ctl_with(&["--context", "away", "get", "jobs"], &[]).await.fails(2);
    server.ctl_with(&["get", "jobs"], &[("FLEDGE_CONTEXT", "away")]).await.fails(2);
    server.ctl_with(&["get", "jobs"], &[]).await.ok();

    server.ctl_with(&["config", "use-context", "away"], &[]).await.ok();
    assert_eq!(server.ctl_with(&["config", "current-context"], &[]).await.ok(), "away");
    server.ctl_with(&["get", "jobs"], &[]).await.fails(2);
    let missing = server.ctl_with(&["config", "use-context", "nope"], &[]).await;
    assert!(
        missing.fails(64).contains("away, default") || missing.stderr.contains("default, away")
    );
    let bad = server.ctl_with(&["config", "set-context", "no spaces"], &[]).await;
    assert!(bad.fails(64).contains("invalid context name"), "{}", bad.stderr);

    server.ctl_with(&["config", "delete-context", "away"], &[]).await.ok();
    let gone = server.ctl_with(&["config", "current-context"], &[]).await;
    assert!(gone.fails(64).contains("no current context"), "{}", gone.stderr);
    server.ctl_with(&["config", "use-context", "default"], &[]).await.ok();
    assert_eq!(server.ctl_with(&["get", "jobs", "-o", "json"], &[]).await.ok(), "[]");

    // The file was migrated, keeps the user's token, and is private.
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("contexts:") && text.contains(&server.token), "{text}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let view = server.ctl_with(&["config", "view", "-o", "json"], &[]).await.json();
    assert_eq!(view["context"], "default");

    // `login` into a context the file does not have yet creates it and makes it current,
    // leaving the others as they were.
    server
        .ctl_with(
            &[
                "--context",
                "lab",
                "login",
                "--server",
                &server.base,
                "--login-token",
                &server.token,
            ],
            &[],
        )
        .await
        .ok();
    assert_eq!(server.ctl_with(&["config", "current-context"], &[]).await.ok(), "lab");
    let contexts = server.ctl_with(&["config", "get-contexts", "-o", "name"], &[]).await.ok();
    assert_eq!(contexts, "context/default\ncontext/lab");
    // `config save` into a new context creates it, without switching to it.
    let save = ["--context", "ci", "--endpoint", "http://127.0.0.1:7", "config", "save"];
    server.ctl_with(&save, &[]).await.ok();
    let contexts = server.ctl_with(&["config", "get-contexts", "-o", "json"], &[]).await.json();
    assert_eq!(contexts[2]["name"], "ci");
    assert_eq!(contexts[2]["endpoint"], "http://127.0.0.1:7");
    assert_eq!(server.ctl_with(&["config", "current-context"], &[]).await.ok(), "lab");
    assert_eq!(server.ctl_with(&["get", "jobs", "-o", "json"], &[]).await.ok(), "[]");
}

/// A started job (no controller runs: it stays `starting`) with one task whose agent key is
/// `k`, `running`.
async fn job_with_running_task(server: &Server) -> (JobId, TaskId) {
    let job = JobId::new(server.ctl(&["run", s(&fixture()), "--no-watch"]).await.ok());
    let task_id = TaskId::new("t-log");
    insert_ready_task(server.store.as_ref(), &job, "t-log").await;
    server.store.set_task_state(&job, &task_id, TaskState::Running, None).await.unwrap();
    server.store.record_heartbeat(&task_id).await.unwrap();
    (job, task_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_prints_every_line_once_in_order_until_the_task_ends() {
    let server = Server::start().await;
    let (job, task) = job_with_running_task(&server).await;
    let agent = TaskClient::new(&server.base, task.clone(), "k").unwrap();
    let lines: Vec<String> = (0..60).map(|i| format!("epoch {i}: loss {}", 60 - i)).collect();

    let args = ["logs", "-f", job.as_str(), task.as_str(), "--interval-ms", "20"];
    let follow = server.ctl(&args);
    let write = async {
        for (batch, chunk) in lines.chunks(7).enumerate() {
            let offset = (batch * 7) as u64;
            agent.append_log("run-1", offset, chunk).await.unwrap();
            if batch % 3 == 0 {
                // A retried post (the agent did not see the answer): nothing doubles.
                agent.append_log("run-1", offset, chunk).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        // A restarted agent numbers its stream from 0 again: its lines follow.
        agent.append_log("run-2", 0, &["after restart".to_owned()]).await.unwrap();
        server.store.set_task_state(&job, &task, TaskState::Completed, Some("tail")).await.unwrap();
    };
    let (followed, ()) = tokio::join!(follow, write);
    let stdout = followed.ok();
    let mut expected = lines.clone();
    expected.push("after restart".to_owned());
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{}", followed.stderr);
    assert!(followed.stderr.contains("ended completed"), "{}", followed.stderr);

    // Without -f: every line held, then stop.
    let all = server.ctl(&["logs", job.as_str(), task.as_str()]).await.ok();
    assert_eq!(all.lines().count(), 61);

    // Another user cannot read them: the job is not theirs.
    let bob_token = server.ctl(&["create", "user", "bob"]).await.ok();
    let bob = [("FLEDGE_ENDPOINT", server.base.as_str()), ("FLEDGE_TOKEN", bob_token.as_str())];
    let denied = server.ctl_with(&["logs", job.as_str(), task.as_str()], &bob).await;
    assert!(denied.fails(2).contains("404"), "{}", denied.stderr);
    assert!(!denied.stdout.contains("epoch"), "{denied:?}");

    // The agent's key only: a user token cannot post lines, a wrong key neither.
    let as_user = TaskClient::new(&server.base, task.clone(), &server.token).unwrap();
    let err = as_user.append_log("x", 0, &["forged".to_owned()]).await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    let intruder = TaskClient::new(&server.base, task.clone(), "not-the-key").unwrap();
    let err = intruder.append_log("x", 0, &["forged".to_owned()]).await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    let oversized: Vec<String> = vec![String::new(); 10_001];
    let err = agent.append_log("x", 0, &oversized).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    let err = agent.append_log("", 0, &[]).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_and_output_formats_show_jobs_and_tasks() {
    let server = Server::start().await;
    let (job, task) = job_with_running_task(&server).await;

    let names = server.ctl(&["get", "jobs", "-o", "name"]).await.ok();
    assert_eq!(names, format!("job/{job}"));
    assert_eq!(server.ctl(&["get", "tasks", job.as_str(), "-o", "name"]).await.ok(), "task/t-log");
    let jobs = server.ctl(&["get", "jobs"]).await.ok();
    let header: Vec<&str> = jobs.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "NAME", "DESIGN", "STATE", "AGE", "REASON"]);
    // Columns are aligned: the age starts where its header does.
    let at = jobs.lines().next().unwrap().find("AGE").unwrap();
    let age = jobs.lines().nth(1).unwrap()[at..].split_whitespace().next().unwrap();
    assert!(age.ends_with('s') || age.ends_with('m'), "{jobs}");
    let wide = server.ctl(&["get", "tasks", job.as_str(), "-o", "wide"]).await.ok();
    assert!(wide.lines().next().unwrap().ends_with("HEARTBEAT  UPDATED"), "{wide}");
    let status = server.ctl(&["get", "status", job.as_str(), "-o", "name"]).await;
    assert!(status.fails(64).contains("-o name"), "{}", status.stderr);

    let text = server.ctl(&["describe", "job", job.as_str()]).await.ok();
    let id_line = format!("ID:               {job}");
    for expected in [
        id_line.as_str(),
        "State:            starting",
        "Design:           hier-cli (schema 1, code 1)",
        "Hyperparameters:  rounds=3",
        "Tasks (1): running 1",
        "t-log",
        "Problems:\n  none",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let json = server.ctl(&["describe", "job", job.as_str(), "-o", "json"]).await.json();
    assert_eq!(json["tasks"][0]["taskId"], "t-log");

    server
        .store
        .set_task_state(&job, &task, TaskState::Failed, Some("loading\nValueError: bad shard"))
        .await
        .unwrap();
    let text = server.ctl(&["describe", "job", job.as_str()]).await.ok();
    assert!(
        text.contains("task t-log (trainer) failed:\n    | loading\n    | ValueError: bad shard"),
        "{text}"
    );
    let text = server.ctl(&["describe", "task", job.as_str(), "t-log"]).await.ok();
    for expected in
        ["Task:             t-log", "State:            failed", "  | ValueError: bad shard"]
    {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    server.ctl(&["describe", "task", job.as_str(), "nope"]).await.fails(2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_watch_gives_up_at_its_timeout() {
    let server = Server::start().await;
    let job = server.ctl(&["run", s(&fixture()), "--no-watch"]).await.ok();
    // No controller: the job stays `starting` forever.
    let watch =
        server.ctl(&["job", "watch", &job, "--interval-ms", "20", "--timeout", "300ms"]).await;
    let stderr = watch.fails(3);
    assert!(stderr.contains("timed out") && stderr.contains("300ms"), "{stderr}");
    assert!(stderr.contains("it is starting"), "{stderr}");
    for bad in ["0s", "31d", "soon", "5x", "1m1h"] {
        let run = server.ctl(&["job", "watch", &job, "--timeout", bad]).await;
        assert!(run.fails(64).contains("--timeout"), "{bad}: {}", run.stderr);
    }
}
