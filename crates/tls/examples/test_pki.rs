//! Writes a fresh CA and a server certificate it signed for the given names into a directory
//! (`ca.pem`, `server.pem`, `server.key`, as `fledge serve` does in `<data_dir>/tls`), for
//! test brokers that serve TLS (`scripts/test-all`'s Mosquitto on 18832). Nothing is committed:
//! the keys are made where the tests run.
//!
//! `cargo run -q -p fledge-tls --example test_pki -- DIR NAME...`

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: test_pki DIR NAME...");
        return ExitCode::from(64);
    };
    let names: Vec<String> = args.collect();
    if names.is_empty() {
        eprintln!("test_pki: give at least one host name or IP address");
        return ExitCode::from(64);
    }
    match fledge_tls::ensure_dir(&dir, &names) {
        Ok(generated) => {
            println!("{}", generated.ca_path.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("test_pki: {err}");
            ExitCode::FAILURE
        }
    }
}
