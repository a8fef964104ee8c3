//! One module per `fledge` subcommand.

pub mod bench;
pub mod chaos;
pub mod fledgelet;
pub mod image;
pub mod privacy_bench;
pub mod quickstart;
pub mod roles;
pub mod run_task;
pub mod serve;
pub mod standalone;

/// Ends the process with this exit code and no further message (the command has said why).
#[derive(Debug, thiserror::Error)]
#[error("exit code {0}")]
pub struct Exit(pub u8);

/// An error in the user's arguments or configuration: exits with code 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Initialises logging from `FLEDGE_LOG` (filter) and `FLEDGE_LOG_FORMAT` (`plain` or `json`).
///
/// Without `FLEDGE_LOG`, `default_filter` applies. The embedded broker (rumqttd) logs every
/// ordinary disconnect as an error, so it is silenced unless `FLEDGE_LOG` asks for it.
pub fn init_tracing(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("FLEDGE_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("FLEDGE_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
