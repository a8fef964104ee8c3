//! `fledge`: the Fledge server binary.
//!
//! - `fledge serve --services apiserver,controller,...` runs any subset of the control-plane
//!   services (and the compute-side deployer) in one process;
//! - `fledge standalone --data-dir DIR` runs every service, an embedded MQTT broker, a SQLite
//!   store and a `process` deployer: zero external services;
//! - `fledge quickstart` runs a real two-tier MNIST job end to end on `standalone`;
//! - `fledge run-task CONFIG` runs one task's built-in role (aggregators, reference trainers);
//! - `fledge roles [-o json]` lists the built-in roles;
//! - `fledge bench ...` prints the performance table;
//! - `fledge image build` builds the `docker` deployer's worker image from this executable.
//!
//! Each subcommand lives in `commands/<name>.rs`; this file only parses and dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;

/// Exit code for bad usage or configuration (`EX_USAGE`).
const EX_USAGE: u8 = 64;
/// Exit code for a runtime failure.
const EX_RUNTIME: u8 = 2;

#[derive(Parser)]
#[command(name = "fledge", version, about = "Fledge federated-learning platform server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a set of services (apiserver, controller, notifier, metaserver, broker, deployer).
    Serve(commands::serve::Args),
    /// Run every service with SQLite, an embedded broker and a process deployer in one process.
    Standalone(commands::standalone::Args),
    /// Run a real two-tier MNIST job end to end and print a summary.
    Quickstart(commands::quickstart::Args),
    /// Run the worker agent of one task (what deployers start; same as the `fledgelet` binary).
    Fledgelet(commands::fledgelet::Args),
    /// Run one task from its task config file (built-in roles and reference trainers).
    RunTask(commands::run_task::Args),
    /// List the built-in roles (`-o json` for JSON).
    Roles(commands::roles::Args),
    /// Measure performance against bounds measured in the same run and print a table.
    Bench(commands::bench::Args),
    /// Build container images (`image build`: the Docker deployer's worker image).
    Image(commands::image::Args),
    /// Check what `standalone` or `serve` would run with (files, store, TLS, ports, Docker,
    /// Python, MLflow) and say what is wrong.
    Doctor(commands::doctor::Args),
    /// TLS for the operator's own services (`tls issue`: a certificate from the control
    /// plane's CA, e.g. for Mosquitto).
    Tls(commands::tls::Args),
}

/// Pins glibc's mmap threshold at 1 MiB.
///
/// glibc serves allocations above the threshold with `mmap`, and `free` unmaps them: the
/// memory goes back to the OS at once. But its threshold is dynamic: each freed mmapped block
/// raises it to that block's size (up to 32 MiB on 64-bit), after which buffers below it
/// (message chunks, tensors of models up to that size) come from the heap and can stay
/// resident after they are freed (the heap is only trimmed from its top). An aggregator
/// allocates and frees such buffers every round; setting the threshold explicitly disables
/// the dynamic adjustment, so its resident set follows what it holds, not what it once freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn pin_mmap_threshold() {
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread
    // is started.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    debug_assert_eq!(ok, 1, "mallopt(M_MMAP_THRESHOLD) accepts 1 MiB");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn pin_mmap_threshold() {}

fn main() -> ExitCode {
    pin_mmap_threshold();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let code = if err.use_stderr() { EX_USAGE } else { 0 };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    // The quickstart shows its own progress; services log at info.
    let default_filter = match cli.command {
        Command::Quickstart(_) | Command::Doctor(_) => "warn,rumqttd=off",
        _ => "info,rumqttd=off",
    };
    let service = match &cli.command {
        Command::Serve(_) => "serve",
        Command::Standalone(_) => "standalone",
        Command::Quickstart(_) => "quickstart",
        Command::Fledgelet(_) => "fledgelet",
        Command::RunTask(_) => "run-task",
        Command::Roles(_) => "roles",
        Command::Bench(_) => "bench",
        Command::Image(_) => "image",
        Command::Doctor(_) => "doctor",
        Command::Tls(_) => "tls",
    };
    let _tracing = commands::init_tracing(default_filter, service);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EX_RUNTIME);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => commands::serve::run(args).await,
            Command::Standalone(args) => commands::standalone::run(args).await,
            Command::Quickstart(args) => commands::quickstart::run(args).await,
            Command::Fledgelet(args) => commands::fledgelet::run(args).await,
            Command::RunTask(args) => commands::run_task::run(args).await,
            Command::Roles(args) => commands::roles::run(args).await,
            Command::Bench(args) => commands::bench::run(args).await,
            Command::Image(args) => commands::image::run(args).await,
            Command::Doctor(args) => commands::doctor::run(args).await,
            Command::Tls(args) => commands::tls::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<commands::Exit>().is_some() => {
            let code = err.downcast_ref::<commands::Exit>().map_or(EX_RUNTIME, |exit| exit.0);
            ExitCode::from(code)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            // Anywhere in the chain: a usage error may be wrapped in context.
            if err.chain().any(|cause| cause.is::<commands::UsageError>()) {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::from(EX_RUNTIME)
            }
        }
    }
}
