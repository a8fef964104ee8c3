//! The dashboard at `/ui` over HTTP: sessions, ownership, escaping, and the security headers
//! and origin checks a browser relies on. (`crates/fledge/tests/dashboard.rs` drives it in
//! headless Chromium against a real job.)

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::json;

use fledge_types::{JobId, MetricRecord};

use crate::api::insert_tasks;
use crate::support::{Server, hier_job, setup_hier, tls};

/// A browser-like client: trusts the test CA, follows no redirect, keeps no cookie.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls().ca.client_config().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

struct Ui {
    http: reqwest::Client,
    base: String,
}

impl Ui {
    async fn get(&self, path: &str, cookie: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        (status, headers, response.text().await.unwrap())
    }

    async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> (StatusCode, HeaderMap, String) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        (status, headers, response.text().await.unwrap())
    }

    /// Logs in with `token` as the login form does; returns the `Cookie` header value.
    async fn login(&self, token: &str) -> String {
        let origin = self.base.clone();
        let (status, headers, body) = self
            .post("/ui/login", &[("origin", &origin)], format!("token={token}&next=%2Fui%2Fjobs"))
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
        assert_eq!(headers[LOCATION], "/ui/jobs");
        let cookie = headers[SET_COOKIE].to_str().unwrap();
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
            assert!(cookie.contains(attribute), "{cookie}");
        }
        assert!(!cookie.contains(token), "the cookie is an opaque session, not the token");
        cookie.split(';').next().unwrap().to_owned()
    }
}

#[test_log::test(tokio::test)]
async fn the_dashboard_shows_each_user_their_own_jobs_escaped_behind_a_strict_policy() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let ann = server.user("ann").await;
    let bob = server.user("bob").await;
    let datasets = setup_hier(&ann, "ann").await;
    let mut spec = hier_job(&datasets);
    spec["name"] = json!("<script>alert(1)</script>");
    let (status, job) = ann.post("/users/ann/jobs", &spec).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let tasks = insert_tasks(&server, &id).await;
    let top = tasks.iter().find(|(t, _)| t.role == "top-aggregator").unwrap().0.clone();
    let records: Vec<MetricRecord> = (1..=3)
        .map(|round| MetricRecord {
            task_id: top.task_id.clone(),
            role: top.role.clone(),
            round,
            metrics: [("global.loss".to_owned(), 1.0 / round as f64)].into(),
            timestamp: None,
        })
        .collect();
    server.store.add_metrics(&JobId::new(&id), &records, u64::MAX).await.unwrap();
    let ui = Ui { http: browser(), base: server.base.clone() };

    // Without a session: pages send to the login page, fragments and downloads are 401.
    let (status, headers, _) = ui.get("/ui/jobs", None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[LOCATION], "/ui/login?next=%2Fui%2Fjobs");
    for path in ["/ui/jobs/fragment".to_owned(), format!("/ui/jobs/{id}/metrics.json")] {
        assert_eq!(ui.get(&path, None).await.0, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, headers, login) = ui.get("/ui/login?next=/ui/jobs/x", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(login.contains("value=\"/ui/jobs/x\""), "{login}");
    // Every response carries the policy: own scripts and styles only, no framing.
    let csp = headers["content-security-policy"].to_str().unwrap();
    for directive in
        ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"]
    {
        assert!(csp.contains(directive), "{csp}");
    }
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(!login.contains("<script>") && !login.contains(" style="), "{login}");
    let (status, headers, js) = ui.get("/ui/static/ui.js", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/javascript"));
    assert!(js.contains("data-live"));

    // Login refuses other origins, no origin, a bad token, an oversized form.
    let token = format!("token={}", ann.token());
    let base = server.base.clone();
    for headers in [
        vec![],
        vec![("origin", "https://evil.example")],
        vec![("origin", base.as_str()), ("sec-fetch-site", "cross-site")],
    ] {
        let (status, response, _) = ui.post("/ui/login", &headers, token.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}");
        assert!(!response.contains_key(SET_COOKIE));
    }
    let origin = [("origin", base.as_str())];
    let (status, _, body) = ui.post("/ui/login", &origin, "token=not-a-token".to_owned()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("invalid, revoked or expired token"), "{body}");
    let (status, _, _) = ui.post("/ui/login", &origin, "token=".to_owned()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = ui.post("/ui/login", &origin, "x".repeat(10_000)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // A redirect elsewhere after login is not followed.
    let (status, headers, _) =
        ui.post("/ui/login", &origin, format!("{token}&next=https%3A%2F%2Fevil.example%2F")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[LOCATION], "/ui/jobs");

    // Ann sees her job, its name as text, its tasks and its rounds.
    let ann_cookie = ui.login(ann.token()).await;
    let (status, _, jobs) = ui.get("/ui/jobs", Some(&ann_cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(jobs.contains(&format!("data-job=\"{id}\"")), "{jobs}");
    assert!(jobs.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{jobs}");
    assert!(!jobs.contains("<script>alert"), "{jobs}");
    let (status, _, page) = ui.get(&format!("/ui/jobs/{id}"), Some(&ann_cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page.matches("<g class=\"task state-ready\"").count(), tasks.len(), "{page}");
    let loss = &page[page.find("<svg id=\"chart-loss\"").unwrap()..];
    assert_eq!(loss[..loss.find("</svg>").unwrap()].matches("<circle class=\"point\"").count(), 3);
    assert!(!page.contains("<script>alert"), "{page}");
    let (status, _, fragment) = ui.get(&format!("/ui/jobs/{id}/fragment"), Some(&ann_cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(fragment.starts_with("<div class=\"fragment\" data-final=\"false\">"), "{fragment}");
    let (status, _, metrics) =
        ui.get(&format!("/ui/jobs/{id}/metrics.json"), Some(&ann_cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Vec<MetricRecord>>(&metrics).unwrap().len(), 3);
    let (status, _, _) =
        ui.get(&format!("/ui/jobs/{id}/model?group=..%2F..%2Fsecrets"), Some(&ann_cookie)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = ui.get(&format!("/ui/jobs/{id}/model?round=x"), Some(&ann_cookie)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, designs) = ui.get("/ui/designs", Some(&ann_cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(designs.contains("<code>hier</code>"), "{designs}");
    let (status, _, datasets_page) = ui.get("/ui/datasets", Some(&ann_cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(datasets_page.contains(&datasets[0]), "{datasets_page}");
    let (status, _, _) = ui.get("/ui/computes", Some(&ann_cookie)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "computes are for admins, as /computes");

    // Bob does not: not listed, and 404 wherever he asks for it.
    let bob_cookie = ui.login(bob.token()).await;
    let (_, _, bobs_jobs) = ui.get("/ui/jobs", Some(&bob_cookie)).await;
    assert!(!bobs_jobs.contains(&id), "{bobs_jobs}");
    let (_, _, bobs_designs) = ui.get("/ui/designs", Some(&bob_cookie)).await;
    assert!(!bobs_designs.contains("<code>hier</code>"), "{bobs_designs}");
    let (_, _, bobs_datasets) = ui.get("/ui/datasets", Some(&bob_cookie)).await;
    assert!(!bobs_datasets.contains(&datasets[0]), "{bobs_datasets}");
    for path in ["", "/fragment", "/metrics.json", "/model"] {
        let (status, _, body) = ui.get(&format!("/ui/jobs/{id}{path}"), Some(&bob_cookie)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert!(!body.contains("alert(1)"), "{body}");
    }
    let long = "a".repeat(10_000);
    let (status, _, _) = ui.get(&format!("/ui/jobs/{long}"), Some(&bob_cookie)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The admin sees every job and the computes.
    let admin_cookie = ui.login(server.admin.token()).await;
    let (_, _, all) = ui.get("/ui/jobs", Some(&admin_cookie)).await;
    assert!(all.contains(&format!("data-job=\"{id}\"")));
    let (status, _, computes) = ui.get("/ui/computes", Some(&admin_cookie)).await;
    assert_eq!(status, StatusCode::OK, "{computes}");

    // A revoked token ends its sessions at once.
    let (_, listed) = server.admin.get("/users/bob/tokens").await;
    let token_id = listed[0]["id"].as_str().unwrap();
    let (status, _) = server.admin.delete(&format!("/users/bob/tokens/{token_id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(ui.get("/ui/jobs", Some(&bob_cookie)).await.0, StatusCode::SEE_OTHER);

    // Logout: refused from another origin, then it ends the session.
    let logout = |headers: Vec<(&'static str, String)>| {
        let ui = &ui;
        let ann_cookie = ann_cookie.clone();
        async move {
            let mut request =
                ui.http.post(format!("{}/ui/logout", ui.base)).header("cookie", ann_cookie);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            request.send().await.unwrap()
        }
    };
    let refused = logout(vec![("origin", "https://evil.example".to_owned())]).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(ui.get("/ui/jobs", Some(&ann_cookie)).await.0, StatusCode::OK, "still logged in");
    let done = logout(vec![("origin", base.clone())]).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert!(done.headers()[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    assert_eq!(ui.get("/ui/jobs", Some(&ann_cookie)).await.0, StatusCode::SEE_OTHER);
    // Unknown dashboard paths are HTML 404s under the same policy.
    let (status, headers, _) = ui.get("/ui/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(headers.contains_key("content-security-policy"));
}
