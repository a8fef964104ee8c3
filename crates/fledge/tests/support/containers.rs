//! Docker helpers for the tests that run the production images (`install.rs`,
//! `multihost.rs`): the `docker` CLI, the images built from the binary under test, free ports
//! and unique names.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::repo_root;

/// `docker ARGS` output lines, or `None` when the command fails.
pub fn docker(args: &[&str]) -> Option<Vec<String>> {
    let out = Command::new("docker").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
}

/// `docker ARGS`, which must succeed; returns its stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether a daemon answers (prints why not).
pub fn docker_reachable() -> bool {
    match docker(&["info", "--format", "{{.ServerVersion}}"]) {
        Some(_) => true,
        None => {
            eprintln!("skipped: no Docker daemon reachable (`docker info` failed)");
            false
        }
    }
}

/// A name no other run uses: `prefix` with the process id and a random suffix.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

/// A port free on the host now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
}

/// `fledge image build --tag TAG` from the binary under test; returns how long it took.
pub fn build_fledge_image(tag: &str) -> Duration {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_fledge"))
        .args(["image", "build", "--tag", tag])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fledge image build failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

/// `deploy/images/build-service-images.sh` with these tags (skipped by the script when the
/// images are up to date); returns how long it took.
pub fn build_service_images(postgres: &str, mosquitto: &str) -> Duration {
    let started = Instant::now();
    let script = repo_root().join("deploy/images/build-service-images.sh");
    let out = Command::new(&script)
        .args(["--postgres-tag", postgres, "--mosquitto-tag", mosquitto])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    started.elapsed()
}

/// Waits (bounded by `limit`) until `ready` holds; panics naming `what` otherwise.
pub fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    started.elapsed()
}

/// The contents of `path` once it exists and is not empty (bounded wait).
pub fn read_when_there(path: &Path, limit: Duration) -> String {
    let mut text = String::new();
    wait_for(&format!("{} to be written", path.display()), limit, || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        !text.trim().is_empty()
    });
    text.trim().to_owned()
}
