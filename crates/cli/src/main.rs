//! `fledgectl`: every user action against the Fledge REST API.
//!
//! A thin layer over `fledge-client`: [`args`] is the clap command tree, `commands/<noun>.rs`
//! hold the verbs, [`output`] renders tables/JSON/YAML. Data goes to stdout, progress and errors
//! to stderr. Exit codes: 0 success (also when stdout is closed early), 1 a watched job ended
//! other than `completed`, 2 a runtime failure (API error, unreachable server), 64 bad usage or
//! bad local input (a malformed file, an unknown field, a missing file).
//!
//! The endpoint, token and CA come from `--endpoint`/`--token`/`--ca-file`, then
//! `FLEDGE_ENDPOINT`/`FLEDGE_TOKEN`/`FLEDGE_CA_FILE`, then the config file (`--config`,
//! `$FLEDGE_CONFIG` or `~/.fledge/config.yaml`; its context named by `--context`,
//! `$FLEDGE_CONTEXT` or its `currentContext`). `fledgectl login --server URL
//! --ca-fingerprint sha256:...` fills the file without copying certificates by hand.

mod args;
mod bundle;
mod commands;
#[cfg(test)]
mod examples;
mod input;
mod jobfile;
mod output;

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser as _;

use fledge_client::ClientConfig;
use fledge_client::config::Overrides;

use crate::args::Cli;
use crate::commands::Ctx;

/// Exit code of bad usage or bad local input (BSD `EX_USAGE`).
const EXIT_USAGE: u8 = 64;
/// Exit code of a runtime failure.
const EXIT_RUNTIME: u8 = 2;
/// Exit code of a watched job that did not complete.
const EXIT_JOB_NOT_COMPLETED: u8 = 1;
/// Exit code of a watch that gave up at its `--timeout`.
const EXIT_TIMEOUT: u8 = 3;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let code = if err.use_stderr() { EXIT_USAGE } else { 0 };
            // Printing help to a closed pipe is not worth a panic.
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    init_tracing();
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("fledgectl: error: cannot start the async runtime: {err}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("fledgectl: error: {}", message(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Commands that need neither the config nor the server.
    match &cli.command {
        args::Command::Completion { shell } => return commands::shell::completion(*shell),
        args::Command::Man { dir } => return commands::shell::man_pages(dir),
        args::Command::Version { client: true } => {
            return commands::version::client_only(cli.global.output);
        }
        _ => {}
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let overrides = Overrides {
        config: cli.global.config.clone(),
        endpoint: cli.global.endpoint.clone(),
        token: cli.global.token.clone(),
        ca_file: cli.global.ca_file.clone(),
        context: cli.global.context.clone(),
    };
    if let args::Command::Config(command) = &cli.command {
        // The config commands work on the file even when it selects nothing usable.
        if let Some(done) =
            commands::config::run_on_file(command, &env, &overrides, cli.global.output)
        {
            return done;
        }
    }
    let config = match ClientConfig::load(&env, &overrides) {
        // `login` and `config save` create the file, or the context, they are pointed at.
        Err(
            fledge_client::config::Error::Io { .. }
            | fledge_client::config::Error::UnknownContext { .. },
        ) if matches!(
            cli.command,
            args::Command::Login(_) | args::Command::Config(args::ConfigCmd::Save)
        ) && may_create(&env, &overrides) =>
        {
            let fresh = Overrides { context: None, config: None, ..overrides.clone() };
            let mut config = ClientConfig::resolve(None, &env, &fresh)?;
            config.context = fledge_client::config::selected_context(&env, &overrides);
            config
        }
        // `version` prints the client's version whatever is wrong with the config.
        Err(err) if matches!(cli.command, args::Command::Version { .. }) => {
            return commands::version::without_server(cli.global.output, &err.to_string());
        }
        loaded => loaded?,
    };
    if let args::Command::Config(command) = &cli.command {
        return commands::config::run(command, &config, &env, &overrides, cli.global.output);
    }
    if let args::Command::Login(login) = &cli.command {
        return commands::config::login(login, config, &env, &overrides).await;
    }
    if let args::Command::Version { .. } = &cli.command {
        return commands::version::run(&config, cli.global.output).await;
    }
    let client = config.client()?;
    let ctx = Ctx { client, format: cli.global.output };
    commands::dispatch(&ctx, cli.command).await
}

/// Whether `login` or `config save` may start from nothing: the config file is absent, or
/// readable but without the context asked for (any other problem with the file is reported).
fn may_create(env: &HashMap<String, String>, overrides: &Overrides) -> bool {
    match fledge_client::config::config_path(env, overrides) {
        Some((path, _)) => fledge_client::config::ConfigFile::read(&path).is_ok(),
        None => false,
    }
}

/// The error chain, with a hint for missing credentials.
fn message(err: &anyhow::Error) -> String {
    let mut text = format!("{err:#}");
    let unauthenticated = err
        .chain()
        .filter_map(|cause| cause.downcast_ref::<fledge_client::Error>())
        .any(|client_err| client_err.status() == Some(401));
    if unauthenticated {
        text.push_str(
            "\nhint: no valid token; pass --token, set FLEDGE_TOKEN, or put `token:` in ~/.fledge/config.yaml",
        );
    }
    text
}

fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.is::<input::InputError>() || cause.is::<fledge_client::config::Error>() {
            return EXIT_USAGE;
        }
        if let Some(
            fledge_client::Error::InvalidEndpoint { .. }
            | fledge_client::Error::InvalidSecret { .. }
            | fledge_client::Error::Tls { .. },
        ) = cause.downcast_ref::<fledge_client::Error>()
        {
            return EXIT_USAGE;
        }
        if cause.is::<commands::watch::NotCompleted>() {
            return EXIT_JOB_NOT_COMPLETED;
        }
        if cause.is::<commands::watch::TimedOut>() {
            return EXIT_TIMEOUT;
        }
    }
    EXIT_RUNTIME
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Logs to stderr, filtered by `FLEDGE_LOG` (default `warn`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEDGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
