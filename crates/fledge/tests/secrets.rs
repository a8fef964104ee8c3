//! End-to-end tests of issue 12 item 6 through the real binaries (`fledge standalone` and
//! `fledgectl`): tokens are issued with an expiry, listed without their secrets, and revoked;
//! a revoked token and an expired one get 401; nothing secret is stored in plain text.
//! (Participant-run task keys are covered end to end in `non_orchestrated.rs`.)

// Helpers outside #[test] functions too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;
use std::time::Duration;

mod support;

use support::Platform;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `fledgectl --token TOKEN whoami` on `platform`.
fn whoami(platform: &Platform, token: &str) -> Output {
    platform.fledgectl().args(["--token", token, "whoami"]).output().unwrap()
}

#[test]
fn tokens_are_created_listed_revoked_and_expire_through_fledgectl() {
    let platform = Platform::start();

    // A token with a description and no expiry works until it is revoked.
    let out =
        platform.fledgectl().args(["token", "create", "--description", "ci"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let ci = stdout(&out).trim().to_owned();
    assert_eq!(ci.len(), 64, "{ci}");
    assert!(stderr(&out).contains("never expires"), "{}", stderr(&out));
    assert!(whoami(&platform, &ci).status.success());

    let out = platform.fledgectl().args(["token", "list", "--output", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Vec<fledge_types::Token> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed.len(), 2, "the standalone's token and ci: {listed:?}");
    assert!(!stdout(&out).contains(&ci), "a listing never shows a secret");
    let ci_id = listed.iter().find(|t| t.description == "ci").unwrap().id.clone();

    let out = platform.fledgectl().args(["token", "revoke", &ci_id]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = whoami(&platform, &ci);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("401"), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("invalid, revoked or expired token"), "{}", stderr(&refused));

    // A token with a 1-second lifetime is refused once that second has passed.
    let out =
        platform.fledgectl().args(["token", "create", "--expires-in", "1s"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let short = stdout(&out).trim().to_owned();
    assert!(stderr(&out).contains("expires "), "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(1500));
    let refused = whoami(&platform, &short);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("401"), "{}", stderr(&refused));
    let out = platform.fledgectl().args(["token", "list"]).output().unwrap();
    assert!(stdout(&out).contains("(expired)"), "{}", stdout(&out));

    // Bad lifetimes are refused by fledgectl before any request.
    let out =
        platform.fledgectl().args(["token", "create", "--expires-in", "3w"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown unit"), "{}", stderr(&out));

    // The standalone's own token still works, and no secret is in the database in plain text.
    assert!(whoami(&platform, &platform.token).status.success());
    let data = platform.scratch().join("data");
    for name in ["fledge.db", "fledge.db-wal"] {
        let bytes = std::fs::read(data.join(name)).unwrap_or_default();
        for secret in [&ci, &short, &platform.token] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{name}");
        }
    }
    // The task-key secret lives outside the database, readable by its owner only.
    let secret = data.join("secrets/task-keys.secret");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", secret.display());
    }
}
