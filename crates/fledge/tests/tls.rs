//! End-to-end tests of issue 12 item 1 (TLS of the control plane) through the real binaries:
//! a default `fledge standalone` serves HTTPS only (plain HTTP gets no answer), with a CA it
//! created in its data directory and reuses on restart; `fledgectl login` trusts a server only
//! through the CA fingerprint it was given and names a mismatch; `fledgectl` works over https
//! end to end; `--insecure` is refused on a non-loopback address. The embedded MQTT broker
//! serves mqtts only, with the same identity: plain MQTT gets no CONNACK, and a job's tasks
//! reach it over TLS, verified with the CA their config carries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::Duration;

mod support;

use support::{Platform, example_with_rounds};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `host:port` of an `https://host:port` endpoint.
fn authority(endpoint: &str) -> &str {
    endpoint.strip_prefix("https://").unwrap_or_else(|| panic!("not https: {endpoint}"))
}

/// What a plain-text HTTP/1.1 request to `addr` gets back (empty when the server hangs up).
fn plain_http_get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A TLS server answers a plain request with a TLS alert or by closing the connection, which
    // it may do before the whole request is written (a broken pipe or a reset here); either way
    // there is no HTTP response in what comes back.
    let _ = write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_default_standalone_serves_https_only_with_the_ca_it_created() {
    let platform = Platform::start();
    assert!(platform.endpoint.starts_with("https://"), "{}", platform.endpoint);

    // Plain HTTP (what `curl http://...` sends) gets no HTTP answer from the API.
    let answer = plain_http_get(authority(&platform.endpoint), "/healthz");
    assert!(!answer.starts_with("HTTP/"), "plain HTTP was answered: {answer:?}");

    // Over TLS, trusting the CA of the data directory, the API answers.
    platform.client().health().await.unwrap();
    let whoami = platform.client().whoami().await.unwrap();
    assert!(whoami.is_admin, "{whoami:?}");

    // The CA's key and the server key are private to the operator.
    #[cfg(unix)]
    for key in ["ca.key", "server.key"] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(platform.data_dir().join("tls").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }

    // A client that trusts another CA is refused, naming TLS and the certificate as the reason
    // (every generated CA has the same name, so rustls reports the other CA's signature).
    let other = tempfile::tempdir().unwrap();
    let stranger = fledge_tls::ensure_dir(other.path(), &["localhost".to_owned()]).unwrap().ca;
    let err = fledge_client::Client::new(&platform.endpoint, Some(&platform.token))
        .unwrap()
        .with_ca(Some(&stranger))
        .unwrap()
        .health()
        .await
        .unwrap_err();
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        chain.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    assert!(chain.contains("TLS with") && chain.contains("invalid peer certificate"), "{chain}");

    // The login command the platform wrote carries the fingerprint of that CA.
    let login = std::fs::read_to_string(platform.data_dir().join("login.txt")).unwrap();
    assert!(login.contains(&platform.ca().fingerprint().to_string()), "{login}");
}

#[test]
fn fledgectl_login_trusts_only_the_fingerprinted_ca_and_then_works_over_https() {
    let platform = Platform::start();
    let fingerprint = platform.ca().fingerprint().to_string();
    let config = platform.scratch().join("elsewhere.yaml");
    let login = |fingerprint: &str| {
        platform
            .fledgectl()
            .env("FLEDGE_CONFIG", &config)
            .args(["login", "--server", &platform.endpoint, "--ca-fingerprint", fingerprint])
            .args(["--login-token", &platform.token])
            .output()
            .unwrap()
    };

    // A wrong fingerprint: refused, naming both fingerprints; nothing is saved.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let out = login(&wrong);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("CA fingerprint mismatch"), "{err}");
    assert!(err.contains(&wrong) && err.contains(&fingerprint), "{err}");
    assert!(!config.exists(), "a refused login must not write the config");

    // The right one: the CA is fetched, checked and stored with the endpoint and token.
    let out = login(&fingerprint);
    assert!(out.status.success(), "{}", stderr(&out));
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains("BEGIN CERTIFICATE") && saved.contains(&platform.endpoint), "{saved}");

    // fledgectl then works over https with nothing else given.
    let out = Command::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_fledge")).with_file_name("fledgectl"),
    )
    .env("FLEDGE_CONFIG", &config)
    .args(["-o", "json", "whoami"])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("admin"), "{out:?}");
}

#[test]
fn insecure_is_refused_on_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |listen: &str| {
        Command::new(env!("CARGO_BIN_EXE_fledge"))
            .args(["serve", "--insecure", "--dump-config", "--apiserver-listen", listen])
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let out = serve("0.0.0.0:0");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("--insecure") && err.contains("not a loopback address"), "{err}");
    assert!(err.contains("0.0.0.0:0"), "{err}");

    // The embedded broker falls under the same rule: plain MQTT only on loopback.
    let out = Command::new(env!("CARGO_BIN_EXE_fledge"))
        .args(["serve", "--insecure", "--dump-config", "--broker-listen", "0.0.0.0:1883"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("the broker listens on 0.0.0.0:1883"), "{err}");

    // On loopback plain text stays an explicit opt-out.
    let out = serve("127.0.0.1:0");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("insecure = true"), "{out:?}");
}

/// What the broker at `port` answers a plain MQTT CONNECT with (empty when it hangs up).
fn plain_mqtt_connect(port: u16) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // CONNECT: protocol "MQTT" level 4, clean session, keep-alive 10 s, client id "plain".
    let connect = [
        0x10, 0x11, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x0a, 0x00, 0x05, b'p',
        b'l', b'a', b'i', b'n',
    ];
    stream.write_all(&connect).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn a_default_standalone_runs_jobs_over_mqtts_only() {
    let platform = Platform::start();
    let port = platform.broker_port();

    // Plain MQTT gets no CONNACK (0x20): the broker speaks TLS first, so a login sent in clear
    // would never reach it.
    let answer = plain_mqtt_connect(port);
    assert!(answer.first() != Some(&0x20), "plain MQTT was answered: {answer:02x?}");

    // Over TLS, trusting the platform's CA, the broker answers (and refuses this client, which
    // has no login): the certificate names 127.0.0.1 and chains to the CA tasks are given.
    let mut options = rumqttc::MqttOptions::new("probe", "127.0.0.1", port);
    let mut transport = fledge_channel::MqttConfig::new("127.0.0.1", port);
    transport.tls = Some(fledge_channel::MqttTls { ca: Some(platform.ca()) });
    transport.apply_transport(&mut options).unwrap();
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 10);
    let outcome = loop {
        match events.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => break Ok(ack.code),
            Ok(_) => continue,
            Err(err) => break Err(err.to_string()),
        }
    };
    // rumqttd drops an unauthenticated client without a CONNACK; either way, no TLS error.
    match outcome {
        Ok(code) => assert_ne!(code, rumqttc::ConnectReturnCode::Success, "anonymous admitted"),
        Err(err) => assert!(!err.contains("TLS"), "the TLS handshake failed: {err}"),
    }

    // A FedAvg job over the embedded broker completes: its tasks connected over mqtts.
    let dir = example_with_rounds(&platform, "mnist", "mnist-mqtts", 2);
    let outcome = tokio::task::block_in_place(|| platform.run_dir(&dir));
    assert!(outcome.success, "the job must complete over mqtts:\n{}", outcome.output);
    let (job, _, _) = platform.job(&outcome.job).await;
    assert_eq!(job.state, fledge_types::JobState::Completed, "{job:?}");
}
