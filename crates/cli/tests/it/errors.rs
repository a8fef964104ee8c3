//! Bad input gets a clear message naming what is wrong, and the right exit code:
//! 64 for local files and usage, 2 for what the server rejects or an unreachable server.

use crate::support::{Server, s};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_local_input_exits_64_naming_the_file_and_field() {
    let server = Server::start().await;

    let malformed = server.path("schema.json");
    std::fs::write(&malformed, "{\n  \"roles\": [\n").unwrap();
    let run = server.ctl(&["create", "schema", s(&malformed), "-d", "x"]).await;
    let stderr = run.fails(64);
    assert!(
        stderr.contains(s(&malformed)) && stderr.contains("malformed JSON at line"),
        "{stderr}"
    );

    let dataset = server.path("dataset.json");
    std::fs::write(&dataset, r#"{"name": "d", "url": "file:///d", "colour": "red", "realm": 7}"#)
        .unwrap();
    let run = server.ctl(&["create", "dataset", s(&dataset)]).await;
    let stderr = run.fails(64);
    assert!(stderr.contains("colour: unknown field"), "{stderr}");
    assert!(stderr.contains("realm"), "{stderr}");

    let missing = server.path("nope.json");
    let stderr = server.ctl(&["create", "job", s(&missing)]).await.fails(64).to_owned();
    assert!(stderr.contains("nope.json"), "{stderr}");

    let not_zip = server.path("code.zip");
    std::fs::write(&not_zip, "not a zip").unwrap();
    let stderr = server.ctl(&["create", "code", s(&not_zip), "-d", "x"]).await.fails(64).to_owned();
    assert!(stderr.contains("not a zip"), "{stderr}");

    // Usage errors are 64 too; help is 0.
    server.ctl(&["get"]).await.fails(64);
    server.ctl(&["frobnicate"]).await.fails(64);
    server.ctl(&["get", "jobs", "-o", "xml"]).await.fails(64);
    assert!(server.ctl(&["--help"]).await.ok().contains("Usage"));
    let stderr = server.ctl(&["get", "jobs", "--state", "sleeping"]).await.fails(64).to_owned();
    assert!(stderr.contains("sleeping"), "{stderr}");
    let stderr = server
        .ctl_with(&["get", "jobs", "--endpoint", "localhost:1"], &[])
        .await
        .fails(64)
        .to_owned();
    assert!(stderr.contains("http://"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_rejections_and_connection_failures_exit_2_with_the_reason() {
    let server = Server::start().await;

    // No token at all: a clear 401 with a hint.
    let run = server.ctl_with(&["get", "jobs"], &[("FLEDGE_ENDPOINT", &server.base)]).await;
    let stderr = run.fails(2);
    assert!(stderr.contains("401") && stderr.contains("hint: no valid token"), "{stderr}");
    // A wrong token, from a config file.
    let config = server.path("config.yaml");
    std::fs::write(&config, format!("endpoint: {}\ntoken: wrong\n", server.base)).unwrap();
    let stderr =
        server.ctl_with(&["get", "designs", "--config", s(&config)], &[]).await.fails(2).to_owned();
    assert!(stderr.contains("401"), "{stderr}");
    // The right token from the default config file works.
    let home_config = server.path("home/.fledge/config.yaml");
    std::fs::create_dir_all(home_config.parent().unwrap()).unwrap();
    std::fs::write(&home_config, format!("endpoint: {}\ntoken: {}\n", server.base, server.token))
        .unwrap();
    assert_eq!(server.ctl_with(&["get", "designs", "-o", "json"], &[]).await.ok(), "[]");
    let who = server.ctl_with(&["whoami", "-o", "json"], &[]).await.json();
    assert_eq!(who["isAdmin"], true);

    // Unknown ids.
    let stderr = server.ctl(&["get", "job", "no-such-job"]).await.fails(2).to_owned();
    assert!(stderr.contains("404"), "{stderr}");
    let stderr = server.ctl(&["logs", "no-such-job", "t"]).await.fails(2).to_owned();
    assert!(stderr.contains("404"), "{stderr}");

    // Server-side validation lists every problem with its path.
    server.ctl(&["create", "design", "d"]).await.ok();
    let schema = server.path("schema.json");
    std::fs::write(
        &schema,
        r#"{"roles": [{"name": "trainer", "isDataConsumer": true}],
            "channels": [{"name": "c", "pair": ["trainer", "ghost"]}]}"#,
    )
    .unwrap();
    let stderr = server.ctl(&["create", "schema", s(&schema), "-d", "d"]).await.fails(2).to_owned();
    assert!(stderr.contains("400") && stderr.contains("channels[0].pair"), "{stderr}");
    // A job on a design without datasets names the problem too.
    let job = server.path("job.json");
    std::fs::write(
        &job,
        r#"{"name": "j", "designId": "d", "dataSpec": [{"role": "trainer", "datasetGroups": {"default": ["missing-ds"]}}]}"#,
    )
    .unwrap();
    let stderr = server.ctl(&["create", "job", s(&job)]).await.fails(2).to_owned();
    assert!(stderr.contains("failed ("), "{stderr}");

    // Nobody listening.
    let stderr = server
        .ctl_with(
            &["get", "jobs"],
            &[("FLEDGE_ENDPOINT", "http://127.0.0.1:1"), ("FLEDGE_TOKEN", "t")],
        )
        .await
        .fails(2)
        .to_owned();
    assert!(stderr.contains("cannot reach the control plane at http://127.0.0.1:1"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_is_not_an_error() {
    let server = Server::start().await;
    server.ctl(&["create", "design", "d"]).await.ok();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fledgectl"))
        .args(["get", "designs", "-o", "json"])
        .env_clear()
        .env("HOME", server.path("home"))
        .env("FLEDGE_ENDPOINT", &server.base)
        .env("FLEDGE_TOKEN", &server.token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before fledgectl has its answer, like `fledgectl ... | head -0`.
    drop(child.stdout.take());
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_save_then_view_without_flags() {
    let server = Server::start().await;
    let flags = ["--endpoint", server.base.as_str(), "--token", server.token.as_str()];
    let mut save = flags.to_vec();
    save.extend(["config", "save"]);
    let run = server.ctl_with(&save, &[]).await;
    run.ok();
    assert!(run.stderr.contains(".fledge/config.yaml"), "{}", run.stderr);
    let view = server.ctl_with(&["config", "view", "-o", "json"], &[]).await.json();
    assert_eq!(view["endpoint"], server.base.as_str());
    assert_eq!(view["fileExists"], true);
    assert!(!view["token"].as_str().unwrap().contains(&server.token), "{view}");
    // The saved file is what later commands use.
    assert_eq!(server.ctl_with(&["get", "jobs", "-o", "json"], &[]).await.ok(), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_only_their_own_resources() {
    let server = Server::start().await;
    let bob_token = server.ctl(&["create", "user", "bob"]).await.ok();
    let bob = [("FLEDGE_ENDPOINT", server.base.as_str()), ("FLEDGE_TOKEN", bob_token.as_str())];
    let users = server.ctl(&["get", "users"]).await.ok();
    assert!(users.contains("bob") && users.contains("admin"), "{users}");

    server.ctl(&["create", "design", "admins-design"]).await.ok();
    assert_eq!(server.ctl_with(&["get", "designs", "-o", "json"], &bob).await.ok(), "[]");
    let stderr =
        server.ctl_with(&["get", "design", "admins-design"], &bob).await.fails(2).to_owned();
    assert!(stderr.contains("404"), "{stderr}");
    // Only admins manage users; a user may mint their own tokens.
    let stderr = server.ctl_with(&["create", "user", "eve"], &bob).await.fails(2).to_owned();
    assert!(stderr.contains("403"), "{stderr}");
    let second = server.ctl_with(&["create", "token", "bob"], &bob).await.ok();
    assert_ne!(second, bob_token);
    let who = server
        .ctl_with(
            &["whoami", "-o", "json"],
            &[("FLEDGE_ENDPOINT", server.base.as_str()), ("FLEDGE_TOKEN", second.as_str())],
        )
        .await
        .json();
    assert_eq!(who["id"], "bob");
}
