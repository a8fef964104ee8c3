//! The check a job's MLflow registry passes before the job is created: the tracking server
//! at its `modelSpec.registry.uri` answers MLflow's REST API with this deployment's
//! credentials and proxies artifacts (`--serve-artifacts`), within a short timeout. The data
//! plane's `fledge_sdk::registry::mlflow` then writes to it; this crate does not link the sdk,
//! so the few calls are made here.
//!
//! The token is the apiserver's `FLEDGE_MLFLOW_TOKEN` (else MLflow's `MLFLOW_TRACKING_TOKEN`),
//! sent as `Authorization: Bearer …`, the same variables the workers read.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};

/// How long a job creation waits for its MLflow server.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest answer read from the server while checking it.
const MAX_ANSWER: usize = 1 << 20;

/// The token from the environment, as the workers read it.
pub fn token_from_env() -> Option<String> {
    ["FLEDGE_MLFLOW_TOKEN", "MLFLOW_TRACKING_TOKEN"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
}

/// Checks the MLflow tracking server at `uri` (see the module docs), within `timeout`. The
/// error says what is wrong; the caller names the URL.
pub async fn check(uri: &str, token: Option<&str>, timeout: Duration) -> Result<(), String> {
    let base = uri.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(base).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("not an http:// or https:// server URL".into());
    }
    fledge_tls::install_default_provider();
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let auth = match token {
        Some(token) => {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|_| "the MLflow token is not a valid header value".to_owned())?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    let with_auth = |req: reqwest::RequestBuilder| match &auth {
        Some(value) => req.header(AUTHORIZATION, value.clone()),
        None => req,
    };
    let probe = async {
        let req = http
            .post(format!("{base}/api/2.0/mlflow/experiments/search"))
            .json(&serde_json::json!({"max_results": 1}));
        let found = answer(with_auth(req)).await?;
        if !found.is_object() {
            return Err("it does not answer as an MLflow tracking server".to_owned());
        }
        let req =
            http.get(format!("{base}/api/2.0/mlflow-artifacts/artifacts")).query(&[("path", "")]);
        answer(with_auth(req)).await.map_err(|e| {
            format!("it does not proxy artifacts ({e}); start it with --serve-artifacts")
        })?;
        Ok(())
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(res) => res,
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f64())),
    }
}

/// The JSON answer to `req`, or what went wrong (no answer, an HTTP error, not JSON).
async fn answer(req: reqwest::RequestBuilder) -> Result<serde_json::Value, String> {
    let mut resp = req.send().await.map_err(|e| {
        let mut text = format!("unreachable: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    })?;
    let status = resp.status();
    if resp.content_length().is_some_and(|n| n > MAX_ANSWER as u64) {
        return Err(format!("HTTP {status} with an answer larger than {MAX_ANSWER} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("answer cut: {e}"))? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(format!("HTTP {status} with an answer larger than {MAX_ANSWER} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match status.as_u16() {
        200..=299 => serde_json::from_slice(&body)
            .map_err(|_| format!("it does not answer as an MLflow tracking server: {text:?}")),
        401 | 403 => Err(format!(
            "HTTP {status}: it refused this deployment's credentials (set FLEDGE_MLFLOW_TOKEN \
             or MLFLOW_TRACKING_TOKEN): {text}"
        )),
        _ => Err(format!("HTTP {status}: {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_or_malformed_server_is_refused_with_the_reason() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err =
            check(&format!("http://127.0.0.1:{port}"), None, CHECK_TIMEOUT).await.unwrap_err();
        assert!(err.contains("unreachable"), "{err}");
        let err = check("ftp://host", None, CHECK_TIMEOUT).await.unwrap_err();
        assert!(err.contains("http://"), "{err}");
    }
}
