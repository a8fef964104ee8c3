//! The web dashboard in a real browser (issue 17, `docs/dashboard.md`): `fledge standalone`
//! runs real MNIST jobs of two users, and Debian's headless Chromium logs in with
//! `/ui/login#token=...` and renders the pages, scripts included.
//!
//! Shown: the jobs page lists the user's job and not another user's; the job page draws one
//! topology node per task and one loss point per round; the other user's job page is 404; a
//! running job's loss chart grows between two fetches, and the page's script re-fetches its
//! live part; a job named `<script>` is shown as text. Screenshots of the job page go to
//! `$FLEDGE_SHOTS_DIR` when it is set.
//!
//! Needs Chromium: set `FLEDGE_CHROMIUM` to its binary (`scripts/test-all` installs Debian's
//! `chromium` and sets it); without it the test says so and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fledge_types::{JobId, JobState, UserId};

use support::{Platform, example_with_rounds};

/// Headless Chromium against one platform.
struct Browser {
    bin: PathBuf,
    endpoint: String,
    scratch: tempfile::TempDir,
}

impl Browser {
    fn args(&self, token: &str, path: &str) -> (Command, String) {
        let profile = tempfile::tempdir_in(self.scratch.path()).unwrap().keep();
        let mut command = Command::new(&self.bin);
        command
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            // The platform's CA is made on start; the test does not install it system-wide.
            .arg("--ignore-certificate-errors")
            .arg("--no-first-run")
            .arg(format!("--user-data-dir={}", profile.display()))
            // Enough virtual time for the login redirect and one refresh of the live part
            // (every 3 s); network waits do not consume it.
            .arg("--virtual-time-budget=4000");
        let next: String = path.bytes().map(|b| format!("%{b:02X}")).collect::<Vec<_>>().concat();
        (command, format!("{}/ui/login#token={token}&next={next}", self.endpoint))
    }

    /// Logs in with `token`, opens `path` and returns the DOM after its scripts ran.
    fn dom(&self, token: &str, path: &str) -> String {
        let (mut command, url) = self.args(token, path);
        let out = command.arg("--dump-dom").arg(&url).output().unwrap();
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Logs in with `token`, opens `path` and writes a screenshot of it to `file`.
    fn screenshot(&self, token: &str, path: &str, file: &Path) {
        let (mut command, url) = self.args(token, path);
        let out = command
            .arg("--window-size=1400,2200")
            .arg("--hide-scrollbars")
            .arg(format!("--screenshot={}", file.display()))
            .arg(&url)
            .output()
            .unwrap();
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            std::fs::metadata(file).unwrap().len() > 10_000,
            "{} is a real image",
            file.display()
        );
    }
}

/// The markup of the element that starts with `<svg id="{id}"`, to its `</svg>`.
fn svg<'a>(dom: &'a str, id: &str) -> &'a str {
    let start =
        dom.find(&format!("<svg id=\"{id}\"")).unwrap_or_else(|| panic!("no svg #{id}:\n{dom}"));
    let end = dom[start..].find("</svg>").unwrap() + start;
    &dom[start..end]
}

fn loss_points(dom: &str) -> usize {
    svg(dom, "chart-loss").matches("<circle class=\"point\"").count()
}

/// Where screenshots go, if anywhere.
fn shots_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("FLEDGE_SHOTS_DIR")?);
    std::fs::create_dir_all(&dir).unwrap();
    Some(dir)
}

/// `fledgectl run --no-watch DIR` as the user of `token`; returns the job id.
fn start_job(platform: &Platform, token: &str, dir: &Path) -> JobId {
    let out = platform
        .fledgectl()
        .env("FLEDGE_TOKEN", token)
        .args(["run", "--no-watch"])
        .arg(dir)
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fledgectl run failed:\n{text}");
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("created job "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job id in:\n{text}"));
    JobId::new(id)
}

async fn wait_final(client: &fledge_client::Client, job: &JobId) -> JobState {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let state = client.get_job(job).await.unwrap().state;
        if state.is_final() {
            return state;
        }
        assert!(Instant::now() < deadline, "job {job} did not end");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A session cookie of the user of `token`, through the login form as a browser posts it.
async fn session(http: &reqwest::Client, endpoint: &str, token: &str) -> String {
    let response = http
        .post(format!("{endpoint}/ui/login"))
        .header("origin", endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}&next=%2Fui%2Fjobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && cookie.contains("Secure"),
        "{cookie}"
    );
    assert!(!cookie.contains(token), "the cookie is not the token");
    cookie.split(';').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_a_real_job_live_and_only_to_its_owner() {
    let Some(bin) = std::env::var_os("FLEDGE_CHROMIUM") else {
        eprintln!(
            "FLEDGE_CHROMIUM is not set: the dashboard browser test is skipped (scripts/test-all installs chromium and sets it)"
        );
        return;
    };
    let platform = Platform::start();
    let admin = platform.client();
    let mut tokens = Vec::new();
    for user in ["alice", "bob"] {
        let id = UserId::new(user);
        admin.create_user(&id, false).await.unwrap();
        tokens.push(admin.create_token(&id).await.unwrap());
    }
    let (alice, bob) = (&tokens[0], &tokens[1]);
    let client_of = |token: &str| {
        fledge_client::Client::new(&platform.endpoint, Some(token))
            .unwrap()
            .with_ca(Some(&platform.ca()))
            .unwrap()
    };
    let browser = Browser {
        bin: PathBuf::from(bin),
        endpoint: platform.endpoint.clone(),
        scratch: tempfile::tempdir().unwrap(),
    };

    // Bob's job, one round, named to inject a script into whoever lists it.
    let bobs_dir = example_with_rounds(&platform, "mnist", "bob-mnist", 1);
    let job_json = bobs_dir.join("job.json");
    let text = std::fs::read_to_string(&job_json).unwrap();
    std::fs::write(&job_json, text.replace("mnist two-tier", "<script>alert('bob')</script>"))
        .unwrap();
    let bobs = start_job(&platform, bob, &bobs_dir);

    // Alice's job: long enough to be watched while it runs.
    let rounds = 40;
    let alices_dir = example_with_rounds(&platform, "mnist", "alice-mnist", rounds);
    let job = start_job(&platform, alice, &alices_dir);
    let page = format!("/ui/jobs/{job}");

    // While it runs, its loss chart grows between two fetches, and the page's own script has
    // re-fetched the live part.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut first: Option<usize> = None;
    let mut grew = None;
    let alice_client = client_of(alice);
    while Instant::now() < deadline {
        let state = alice_client.get_job(&job).await.unwrap().state;
        if state.is_final() {
            break;
        }
        let dom = browser.dom(alice, &page);
        let points = loss_points(&dom);
        match first {
            None if points > 0 => {
                first = Some(points);
                assert!(dom.contains("data-refreshed="), "the script refreshed the live part");
                if let Some(dir) = shots_dir() {
                    browser.screenshot(alice, &page, &dir.join("dashboard-job-running.png"));
                }
            }
            Some(n) if points > n => {
                grew = Some((n, points));
                break;
            }
            _ => {}
        }
    }
    let (before, after) = grew.unwrap_or_else(|| {
        panic!("the loss chart did not grow while the job ran (first fetch: {first:?})")
    });
    assert!(after > before && after <= rounds as usize);

    assert_eq!(wait_final(&alice_client, &job).await, JobState::Completed);
    assert_eq!(wait_final(&client_of(bob), &bobs).await, JobState::Completed);
    let tasks = alice_client.list_tasks(&job).await.unwrap();

    // The jobs page lists Alice's job, not Bob's.
    let jobs = browser.dom(alice, "/ui/jobs");
    assert!(jobs.contains(&format!("data-job=\"{job}\"")), "{jobs}");
    assert!(!jobs.contains(bobs.as_str()), "another user's job is not listed: {jobs}");
    assert!(!jobs.contains("alert('bob')") && !jobs.contains("alert(&#39;bob"), "{jobs}");

    // The job page: one topology node per task, one loss point per round.
    let dom = browser.dom(alice, &page);
    let topology = svg(&dom, "topology");
    assert_eq!(topology.matches("<g class=\"task ").count(), tasks.len(), "{topology}");
    assert_eq!(tasks.len(), 5);
    for task in &tasks {
        assert!(topology.contains(&format!("data-task=\"{}\"", task.task_id)), "{topology}");
    }
    assert_eq!(topology.matches("class=\"task state-completed\"").count(), 5);
    assert_eq!(loss_points(&dom), rounds as usize, "{}", svg(&dom, "chart-loss"));
    let accuracy_points = svg(&dom, "chart-accuracy").matches("<circle class=\"point\"").count();
    assert_eq!(accuracy_points, rounds as usize);
    assert!(dom.contains("global.loss"), "the chart names its metric");
    assert!(dom.contains("data-final=\"true\""));
    assert!(
        dom.contains(&format!("/ui/jobs/{job}/metrics.json"))
            && dom.contains(&format!("/ui/jobs/{job}/model"))
    );
    if let Some(dir) = shots_dir() {
        browser.screenshot(alice, &page, &dir.join("dashboard-job-completed.png"));
        browser.screenshot(alice, "/ui/jobs", &dir.join("dashboard-jobs.png"));
    }

    // Bob's job is not Alice's to see: 404, in the browser and over HTTP.
    let foreign = browser.dom(alice, &format!("/ui/jobs/{bobs}"));
    assert!(foreign.contains("<h1>404</h1>"), "{foreign}");
    assert!(!foreign.contains("chart-loss"), "{foreign}");
    fledge_tls::install_default_provider();
    let pem = std::fs::read(platform.data_dir().join("tls").join("ca.pem")).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = session(&http, &platform.endpoint, alice).await;
    for path in [
        format!("/ui/jobs/{bobs}"),
        format!("/ui/jobs/{bobs}/fragment"),
        format!("/ui/jobs/{bobs}/metrics.json"),
        format!("/ui/jobs/{bobs}/model"),
    ] {
        let response = http
            .get(format!("{}{path}", platform.endpoint))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    let response = http
        .get(format!("{}/ui/jobs/{job}/metrics.json", platform.endpoint))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let records: Vec<fledge_types::MetricRecord> = response.json().await.unwrap();
    assert_eq!(records, alice_client.job_metrics(&job).await.unwrap(), "the API's records");
    let response = http
        .get(format!("{}/ui/jobs/{job}/model", platform.endpoint))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap().len() > 100_000, "the final model's weights");

    // Bob sees his job, its name as text.
    let bobs_jobs = browser.dom(bob, "/ui/jobs");
    assert!(bobs_jobs.contains(&format!("data-job=\"{bobs}\"")), "{bobs_jobs}");
    assert!(bobs_jobs.contains("&lt;script&gt;alert('bob')&lt;/script&gt;"), "{bobs_jobs}");
    assert!(!bobs_jobs.contains("<script>alert"), "{bobs_jobs}");
    assert!(!bobs_jobs.contains(job.as_str()), "{bobs_jobs}");

    // The admin sees both, and the computes with their deployer connected.
    let all = browser.dom(&platform.token, "/ui/jobs");
    assert!(all.contains(job.as_str()) && all.contains(bobs.as_str()));
    let computes = browser.dom(&platform.token, "/ui/computes");
    assert!(computes.contains(">connected<"), "{computes}");
    // Alice may not: as the API's /computes.
    assert!(browser.dom(alice, "/ui/computes").contains("admins only"));
}
