//! The raw command line (clap derive). `main` resolves it into a client and an output format,
//! then hands each subcommand to its module under `commands/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Command-line client of the Fledge federated-learning control plane.
#[derive(Debug, Parser)]
#[command(name = "fledgectl", version, about)]
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
}

/// The command tree.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register a resource.
    #[command(subcommand)]
    Create(CreateCmd),
    /// Show one resource or list them.
    #[command(subcommand)]
    Get(GetCmd),
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
    #[command(subcommand)]
    Job(JobCmd),
    /// Print a task's log tail.
    Logs {
        /// Job id.
        job: String,
        /// Task id.
        task: String,
        /// Keep printing new log lines until the task ends.
        #[arg(short, long)]
        follow: bool,
        /// Poll interval of --follow in milliseconds.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
        interval_ms: u64,
    },
    /// Register everything in a job directory, then create, start and watch the job.
    Run(RunArgs),
    /// Show the user the token belongs to.
    Whoami,
    /// Issue, list and revoke API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Show or save the client configuration (endpoint, token and CA).
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Trust a control plane and save it (endpoint, CA, token) to the config file: the CA is
    /// fetched from the server and accepted only if it has the fingerprint given.
    Login(LoginArgs),
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
    /// Write the effective configuration (e.g. from --endpoint/--token) to the config file.
    Save,
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
    /// A job's trained model files in the platform's registry (per round and final).
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
    /// Follow a job until it ends; exits 0 iff it completed.
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
    }
}
