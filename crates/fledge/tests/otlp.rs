//! The optional OTLP trace exporter (issue 17 item 2), through the real binary: `fledge serve`
//! with `OTEL_EXPORTER_OTLP_ENDPOINT` set exports its spans over OTLP/HTTP to a collector (here
//! a minimal one that records what it is sent), and flushes them on SIGTERM. The spans decode
//! as OTLP protobuf: a `request` span per REST call with its route and status, under the
//! service name `fledge-serve`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;

/// A collector that answers 200 to every request and keeps the bodies sent to `/v1/traces`.
fn collector() -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let kept = kept.clone();
            std::thread::spawn(move || serve(stream, &kept));
        }
    });
    (port, bodies)
}

/// Serves one keep-alive connection.
fn serve(stream: TcpStream, kept: &Mutex<Vec<Vec<u8>>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        if request_line.contains("/v1/traces") {
            kept.lock().unwrap().push(body);
        }
        writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn serve_exports_its_request_spans_over_otlp_and_flushes_them_on_sigterm() {
    let (collector_port, bodies) = collector();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fledge"))
        .args(["serve", "--insecure", "--services", "apiserver", "--apiserver-listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{collector_port}"))
        .env_remove("OTEL_SERVICE_NAME")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Wait for the apiserver, then make two requests.
    let deadline = Instant::now() + Duration::from_secs(60);
    let get = |path: &str| -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    };
    while get("/healthz").is_none_or(|a| !a.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "fledge serve did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = get("/metrics").unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");

    // SIGTERM: a clean shutdown flushes the exporter's queue.
    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "fledge serve exited with {exit}");

    let bodies = bodies.lock().unwrap();
    assert!(!bodies.is_empty(), "no OTLP export reached the collector");
    let mut routes = Vec::new();
    for body in bodies.iter() {
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for resource_spans in &request.resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref()?.value.clone());
            assert_eq!(service, Some(Value::StringValue("fledge-serve".to_owned())));
            for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
                if span.name != "request" {
                    continue;
                }
                let attribute = |key: &str| {
                    span.attributes
                        .iter()
                        .find(|a| a.key == key)
                        .and_then(|a| a.value.as_ref()?.value.clone())
                };
                if let Some(Value::StringValue(route)) = attribute("route") {
                    routes.push((route, attribute("status")));
                }
            }
        }
    }
    assert!(
        // tracing-opentelemetry exports the u16 field as an int or its decimal text.
        routes.iter().any(|(route, status)| route == "/metrics"
            && match status {
                Some(Value::IntValue(code)) => *code == 200,
                Some(Value::StringValue(code)) => code == "200",
                _ => false,
            }),
        "no request span for GET /metrics with status 200 in {routes:?}"
    );
    assert!(routes.iter().any(|(route, _)| route == "/healthz"), "{routes:?}");
}
