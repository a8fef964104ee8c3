//! The raw command line (clap derive). `main` resolves it into a client and an output format,
//! then hands each subcommand to its module under `commands/`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Examples shown under `fledgectl --help`.
const MAIN_EXAMPLES: &str = "\
Examples:
  fledgectl run examples/mnist              # register everything, start the job, watch it
  fledgectl get jobs                        # every job, with its age
  fledgectl get tasks JOB -o wide           # the job's tasks, with heartbeat ages
  fledgectl describe job JOB                # spec, state, tasks, events, models, metrics
  fledgectl logs -f JOB TASK                # a task's log as it grows
  fledgectl config get-contexts             # the control planes this client knows
  source <(fledgectl completion bash)       # tab completion in this shell";

/// Command-line client of the Fledge federated-learning control plane.
#[derive(Debug, Parser)]
#[command(name = "fledgectl", version, about, after_help = MAIN_EXAMPLES)]
pub struct Cli {
    /// Connection flags (override the config file and environment).
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted by every subcommand.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Apiserver URL (default: $FLEDGE_ENDPOINT, the config file, or https://127.0.0.1:10100).
    #[arg(long, global = true, value_name = "URL")]
    pub endpoint: Option<String>,
    /// CA file (PEM) to trust for an https endpoint (default: $FLEDGE_CA_FILE, or the config
    /// file's `ca`, which `fledgectl login` and `fledge standalone` write).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// User token (default: $FLEDGE_TOKEN or the config file).
    #[arg(long, global = true, value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Config file (default: $FLEDGE_CONFIG or ~/.fledge/config.yaml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The config file's context to use (default: $FLEDGE_CONTEXT, or its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Output format of data written to stdout.
    #[arg(short, long, global = true, value_enum)]
    pub output: Option<Format>,
}

/// How data is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns (the default for get/list).
    Table,
    /// Pretty JSON.
    Json,
    /// YAML.
    Yaml,
    /// The table with more columns (ages, timestamps, per-channel byte counts).
    Wide,
    /// `KIND/ID`, one a line (like kubectl), for scripts.
    Name,
}

/// The command tree.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register a resource.
    #[command(subcommand)]
    Create(CreateCmd),
    /// Show one resource or list them.
    #[command(subcommand, after_help = GET_EXAMPLES)]
    Get(GetCmd),
    /// Show a job or a task in detail: spec, state, timestamps, tasks, events, metrics.
    #[command(subcommand, after_help = DESCRIBE_EXAMPLES)]
    Describe(DescribeCmd),
    /// Change a resource (a new revision for schemas and code).
    #[command(subcommand)]
    Update(UpdateCmd),
    /// Delete a resource.
    #[command(subcommand, alias = "delete")]
    Remove(RemoveCmd),
    /// Start a job.
    #[command(subcommand)]
    Start(JobRefCmd),
    /// Stop a job.
    #[command(subcommand)]
    Stop(JobRefCmd),
    /// Job tools: plan (dry-run expansion), watch.
    #[command(subcommand, after_help = JOB_EXAMPLES)]
    Job(JobCmd),
    /// Print a task's log; with -f, follow it until the task ends.
    #[command(after_help = LOGS_EXAMPLES)]
    Logs {
        /// Job id.
        job: String,
        /// Task id.
        task: String,
        /// Keep printing new log lines, each once and in order, until the task ends.
        #[arg(short, long)]
        follow: bool,
        /// Poll interval of --follow in milliseconds.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
        interval_ms: u64,
    },
    /// Register everything in a job directory, then create, start and watch the job.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Show the user the token belongs to.
    Whoami,
    /// Issue, list and revoke API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Show or change the client configuration: named contexts of endpoint, token and CA.
    #[command(subcommand, after_help = CONFIG_EXAMPLES)]
    Config(ConfigCmd),
    /// Trust a control plane and save it (endpoint, CA, token) to the config file: the CA is
    /// fetched from the server and accepted only if it has the fingerprint given.
    Login(LoginArgs),
    /// Print this client's version and the server's.
    Version {
        /// Only the client's version; do not contact the server.
        #[arg(long)]
        client: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish) to stdout.
    #[command(after_help = COMPLETION_EXAMPLES)]
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (fledgectl.1 and one per subcommand, e.g. fledgectl-get-jobs.1).
    Man {
        /// Directory to write them to (created if absent).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

const GET_EXAMPLES: &str = "\
Examples:
  fledgectl get jobs --state running
  fledgectl get jobs -o name                # job/ID lines
  fledgectl get tasks JOB -o wide
  fledgectl get metrics JOB --names loss,global.accuracy
  fledgectl get metrics JOB -o wide         # with the per-channel byte counts";

const DESCRIBE_EXAMPLES: &str = "\
Examples:
  fledgectl describe job JOB
  fledgectl describe task JOB TASK";

const JOB_EXAMPLES: &str = "\
Examples:
  fledgectl job plan examples/mnist/job.json
  fledgectl job watch JOB --timeout 30m     # exit 3 if it has not ended by then";

const WATCH_EXAMPLES: &str = "\
Examples:
  fledgectl job watch JOB
  fledgectl job watch JOB --timeout 1h30m   # exit 3 if it is still going then
  fledgectl job watch JOB -o json           # the final job as JSON on stdout";

const LOGS_EXAMPLES: &str = "\
Examples:
  fledgectl logs JOB TASK                   # the log the server holds
  fledgectl logs -f JOB TASK                # follow it until the task ends";

const RUN_EXAMPLES: &str = "\
Examples:
  fledgectl run examples/mnist
  fledgectl run examples/mnist --no-watch";

const CONFIG_EXAMPLES: &str = "\
Examples:
  fledgectl config get-contexts
  fledgectl --endpoint https://fl.example:10100 --token T --ca-file ca.pem config set-context prod
  fledgectl config use-context prod
  fledgectl --context staging get jobs      # one command against another context";

const COMPLETION_EXAMPLES: &str = "\
Examples:
  source <(fledgectl completion bash)                       # this shell
  fledgectl completion bash > /etc/bash_completion.d/fledgectl
  fledgectl completion zsh > \"${fpath[1]}/_fledgectl\"
  fledgectl completion fish > ~/.config/fish/completions/fledgectl.fish";

/// `fledgectl describe ...`
#[derive(Debug, Subcommand)]
pub enum DescribeCmd {
    /// A job: spec summary, state and timestamps, tasks, recent problems, models, metrics.
    Job {
        /// Job id.
        id: String,
    },
    /// A task: role, groups, dataset, compute, state, restarts, heartbeat, log tail.
    Task {
        /// Job id.
        job: String,
        /// Task id.
        task: String,
    },
}

/// `fledgectl login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The apiserver URL, e.g. `https://fledge.example:10100`.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The CA's fingerprint as the server printed it (sha256:...); the CA is fetched from
    /// GET /api/v1/ca.pem and refused unless it matches.
    #[arg(long, value_name = "SHA256", conflicts_with = "ca")]
    pub ca_fingerprint: Option<String>,
    /// A CA file (PEM) to trust instead of fetching one.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The token to save (default: the one already configured).
    #[arg(long = "login-token", value_name = "TOKEN", hide_env_values = true)]
    pub login_token: Option<String>,
}

/// `fledgectl config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration (token masked) and where it was read from.
    View,
    /// Write the effective configuration (e.g. from --endpoint/--token) into the selected
    /// context of the config file.
    Save,
    /// List the contexts of the config file (the current one marked `*`).
    GetContexts,
    /// Make a context the current one.
    UseContext {
        /// Context name.
        name: String,
    },
    /// Print the current context's name.
    CurrentContext,
    /// Create a context or change it from --endpoint, --token and --ca-file (the CA is
    /// embedded); fields not given are kept.
    SetContext {
        /// Context name (letters, digits, `-`, `_`, `.`, `@`, `:`; at most 64).
        name: String,
        /// Make it the current context too.
        #[arg(long)]
        current: bool,
    },
    /// Remove a context.
    DeleteContext {
        /// Context name.
        name: String,
    },
}

/// `fledgectl create ...`
#[derive(Debug, Subcommand)]
pub enum CreateCmd {
    /// A design (a named topology plus code).
    Design {
        /// Design id.
        id: String,
        /// Human-readable name (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// A schema revision of a design from a schema.json file.
    Schema(SchemaArgs),
    /// A code revision of a design from a zip file or a directory (one folder per role).
    Code(CodeArgs),
    /// A dataset from a dataset JSON file.
    Dataset {
        /// Dataset file (name, url, dataFormat, realm, ...).
        file: PathBuf,
    },
    /// A job from job.json (dataSpecPath/modelSpecPath resolved beside it).
    Job {
        /// job.json.
        file: PathBuf,
    },
    /// A compute cluster from a JSON file (computeId, region, apiKey, platform); admin only.
    Compute {
        /// Compute file.
        file: PathBuf,
    },
    /// A user (admin only); prints a first token for them.
    User {
        /// Login name.
        id: String,
        /// Make the user an admin.
        #[arg(long)]
        admin: bool,
    },
    /// A new token for a user (admin, or yourself); printed once.
    Token {
        /// Login name.
        user: String,
    },
}

/// Arguments of schema uploads.
#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// schema.json.
    pub file: PathBuf,
    /// The design it belongs to.
    #[arg(long, short = 'd')]
    pub design: String,
}

/// Arguments of code uploads.
#[derive(Debug, Args)]
pub struct CodeArgs {
    /// A .zip file or a directory (zipped on the fly, skipping __pycache__, .git, target).
    pub path: PathBuf,
    /// The design it belongs to.
    #[arg(long, short = 'd')]
    pub design: String,
}

/// `fledgectl get ...`
#[derive(Debug, Subcommand)]
pub enum GetCmd {
    /// One design.
    Design {
        /// Design id.
        id: String,
    },
    /// Every design.
    Designs,
    /// A design's schema (latest unless --version).
    Schema {
        /// Design id.
        #[arg(long, short = 'd')]
        design: String,
        /// Revision.
        #[arg(long)]
        version: Option<String>,
    },
    /// A design's code zip, written to a file (latest unless --version).
    Code {
        /// Design id.
        #[arg(long, short = 'd')]
        design: String,
        /// Revision.
        #[arg(long)]
        version: Option<String>,
        /// Output file (default: DESIGN-code.zip).
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
    /// One dataset.
    Dataset {
        /// Dataset id, or a name only one visible dataset has.
        id: String,
    },
    /// Own and public datasets.
    Datasets,
    /// One job.
    Job {
        /// Job id.
        id: String,
    },
    /// Every job.
    Jobs {
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
    },
    /// A job's tasks.
    Tasks {
        /// Job id.
        job: String,
    },
    /// One task.
    Task {
        /// Job id.
        job: String,
        /// Task id.
        task: String,
    },
    /// A job's per-round metrics.
    Metrics {
        /// Job id.
        job: String,
        /// Only records of this role.
        #[arg(long)]
        role: Option<String>,
        /// Only records of this round.
        #[arg(long)]
        round: Option<u64>,
        /// Only these metrics (comma-separated names, e.g. loss,accuracy).
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
    },
    /// A job's trained model files (per round and final), from the platform's registry or
    /// the job's MLflow server or S3 bucket.
    Models {
        /// Job id.
        job: String,
    },
    /// One trained model of a job, written to a safetensors file (the final model unless
    /// --round).
    Model {
        /// Job id.
        job: String,
        /// The global model after this round instead of the final one.
        #[arg(long)]
        round: Option<u64>,
        /// The model of these groups (as `get models` lists them), for jobs that train one
        /// model per group.
        #[arg(long)]
        group: Option<String>,
        /// Output file (default: JOB-final.safetensors or JOB-round-R.safetensors).
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
    /// A job's state and task counts.
    Status {
        /// Job id.
        job: String,
    },
    /// One compute (admin).
    Compute {
        /// Compute id.
        id: String,
    },
    /// Every compute (admin).
    Computes,
    /// Every user (admin).
    Users,
}

/// `fledgectl update ...`
#[derive(Debug, Subcommand)]
pub enum UpdateCmd {
    /// Upload a new schema revision.
    Schema(SchemaArgs),
    /// Upload a new code revision.
    Code(CodeArgs),
    /// Replace the spec of a job that has not started.
    Job {
        /// Job id.
        id: String,
        /// job.json.
        file: PathBuf,
    },
}

/// `fledgectl remove ...`
#[derive(Debug, Subcommand)]
pub enum RemoveCmd {
    /// A design.
    Design {
        /// Design id.
        id: String,
    },
    /// A dataset.
    Dataset {
        /// Dataset id, or a name only one of your datasets has.
        id: String,
    },
    /// A job (not while it runs).
    Job {
        /// Job id.
        id: String,
    },
    /// A compute (admin).
    Compute {
        /// Compute id.
        id: String,
    },
}

/// `fledgectl start|stop job ID`
#[derive(Debug, Subcommand)]
pub enum JobRefCmd {
    /// A job.
    Job {
        /// Job id.
        id: String,
    },
}

/// `fledgectl job ...`
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Show the tasks a job.json expands to; creates nothing.
    Plan {
        /// job.json.
        file: PathBuf,
    },
    /// Follow a job until it ends; exits 0 iff it completed (3 when --timeout passes first).
    #[command(after_help = WATCH_EXAMPLES)]
    Watch(WatchArgs),
    /// Mint the key of each participant-run task of a started job that has none (shown once,
    /// stored hashed) and print the command its data owner runs to join it.
    Join {
        /// Job id.
        id: String,
        /// Replace the key of this task (a lost or leaked one); repeatable.
        #[arg(long, value_name = "TASK")]
        remint: Vec<String>,
    },
    /// Revoke the key of a participant-run task: its agent is refused from its next call on.
    RevokeKey {
        /// Job id.
        id: String,
        /// Task id.
        task: String,
    },
}

/// `fledgectl token ...` (your own tokens; an admin may name another user with --user).
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Issue a token, printed once (only its hash is stored).
    Create {
        /// Whose token (default: yours).
        #[arg(long)]
        user: Option<String>,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Lifetime: seconds, or a number with s, m, h or d (e.g. 90d); default: no expiry.
        #[arg(long, value_parser = parse_duration_secs)]
        expires_in: Option<u64>,
    },
    /// List tokens: ids, descriptions, expiry (never the secrets).
    List {
        /// Whose tokens (default: yours).
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token by its id; it is refused (401) from then on.
    Revoke {
        /// Token id (from `token list`).
        id: String,
        /// Whose token (default: yours).
        #[arg(long)]
        user: Option<String>,
    },
}

/// `90`, `90s`, `15m`, `12h`, `30d` → seconds (at least 1).
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?}: use s, m, h or d (e.g. 30d)")),
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 30d"))?;
    match n.checked_mul(factor) {
        Some(0) => Err("a token must live at least 1 second".to_owned()),
        Some(secs) => Ok(secs),
        None => Err(format!("{text:?} is too long")),
    }
}

/// Arguments of `job watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Job id.
    pub id: String,
    /// Poll interval in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub interval_ms: u64,
    /// Give up (exit 3) if the job has not ended after this long: e.g. 90s, 30m, 1h30m, 2d.
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
}

/// Longest `--timeout`: 30 days.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 86_400);

/// A duration like `500ms`, `90s`, `15m`, `1h30m` or `2d` (a bare number is seconds): one or
/// more number-unit pairs, each unit at most once, largest first.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration: use e.g. 90s, 30m, 1h30m or 2d".to_owned());
    }
    if text.len() > 32 {
        return Err(format!("{text:?} is too long for a duration"));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = text.parse().map_err(|_| format!("{text:?} is too large"))?;
        return Ok(Duration::from_secs(secs));
    }
    const UNITS: [(&str, u128); 5] =
        [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];
    let mut total_ms: u128 = 0;
    let mut rest = text;
    let mut last_unit = None::<usize>;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{text:?} is not a duration like 90s, 30m, 1h30m or 2d"));
        }
        let number: u128 = rest[..digits].parse().map_err(|_| format!("{text:?} is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let Some(at) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use ms, s, m, h or d (e.g. 1h30m)"
            ));
        };
        if last_unit.is_some_and(|last| at <= last) {
            return Err(format!("{text:?}: give units once each, largest first (e.g. 1h30m)"));
        }
        last_unit = Some(at);
        total_ms = number
            .checked_mul(UNITS[at].1)
            .and_then(|ms| ms.checked_add(total_ms))
            .ok_or_else(|| format!("{text:?} is too large"))?;
    }
    let ms = u64::try_from(total_ms).map_err(|_| format!("{text:?} is too large"))?;
    Ok(Duration::from_millis(ms))
}

/// `--timeout`: a positive [`parse_duration`] of at most [`MAX_TIMEOUT`].
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("a timeout must be positive".to_owned());
    }
    if duration > MAX_TIMEOUT {
        return Err(format!("{text:?} is longer than the longest timeout, 30d"));
    }
    Ok(duration)
}

/// Arguments of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Job directory: schema.json, job.json, dataSpec.json, modelSpec.json, dataset*.json, code/ROLE/.
    pub dir: PathBuf,
    /// Create and start the job, but do not watch it.
    #[arg(long)]
    pub no_watch: bool,
    /// Poll interval of the watch in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub interval_ms: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn command_tree_is_consistent_and_parses_typical_lines() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "fledgectl",
            "get",
            "schema",
            "-d",
            "mnist",
            "--version",
            "2",
            "-o",
            "yaml",
        ])
        .unwrap();
        assert_eq!(cli.global.output, Some(Format::Yaml));
        assert!(matches!(
            cli.command,
            Command::Get(GetCmd::Schema { ref design, version: Some(ref v) }) if design == "mnist" && v == "2"
        ));
        let cli = Cli::try_parse_from(["fledgectl", "--token", "t", "start", "job", "j1"]).unwrap();
        assert_eq!(cli.global.token.as_deref(), Some("t"));
        assert!(matches!(cli.command, Command::Start(JobRefCmd::Job { ref id }) if id == "j1"));
        assert!(
            Cli::try_parse_from(["fledgectl", "job", "watch", "j", "--interval-ms", "1"]).is_err()
        );
        let cli =
            Cli::try_parse_from(["fledgectl", "job", "watch", "j", "--timeout", "1h30m"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Job(JobCmd::Watch(WatchArgs { timeout: Some(t), .. })) if t.as_secs() == 5400
        ));
        let cli =
            Cli::try_parse_from(["fledgectl", "--context", "lab", "get", "jobs", "-o", "name"])
                .unwrap();
        assert_eq!(
            (cli.global.context.as_deref(), cli.global.output),
            (Some("lab"), Some(Format::Name))
        );
    }

    #[test]
    fn durations_parse_with_units_and_bounds() {
        let ms = |text: &str| parse_duration(text).map(|d| d.as_millis());
        assert_eq!(ms("90"), Ok(90_000));
        assert_eq!(ms("90s"), Ok(90_000));
        assert_eq!(ms("15m"), Ok(900_000));
        assert_eq!(ms("1h30m"), Ok(5_400_000));
        assert_eq!(ms("2d"), Ok(172_800_000));
        assert_eq!(ms("1m500ms"), Ok(60_500));
        assert_eq!(ms(" 5s "), Ok(5_000));
        for bad in [
            "",
            "s",
            "5x",
            "1m1h",
            "1h1h",
            "-5s",
            "1.5h",
            "99999999999999999999999d",
            &"9".repeat(40),
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_timeout("0s").unwrap_err().contains("positive"));
        assert!(parse_timeout("31d").unwrap_err().contains("30d"));
        assert_eq!(parse_timeout("30d").unwrap(), MAX_TIMEOUT);
    }
}
