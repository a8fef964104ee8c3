//! The README's first command, as a new user runs it: `fledge quickstart` starts the platform,
//! runs the MNIST job through its deployer (sandboxed workers included) and reports the
//! global model's accuracy. Debug build, kept files in a temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn the_quickstart_completes_and_reports_the_global_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fledge"))
        .args(["quickstart", "--rounds", "3", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fledge quickstart failed:\n{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("global model accuracy:"))
        .unwrap_or_else(|| panic!("no global model accuracy line:\n{text}"));
    let accuracy: f64 = line
        .trim_start_matches("global model accuracy:")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy figure in {line:?}"));
    assert!(accuracy > 0.8, "3 rounds of FedAvg on MNIST reach more than 0.8: {line}");
    // The files stay where the summary says, the data beside the platform's data dir.
    assert!(dir.path().join("mnist").is_dir());
    let model = text
        .lines()
        .find_map(|l| l.strip_prefix("model:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no model line:\n{text}"));
    assert!(std::path::Path::new(model).is_file(), "{model}");
    assert!(model.starts_with(&dir.path().join("platform").display().to_string()), "{model}");
}
