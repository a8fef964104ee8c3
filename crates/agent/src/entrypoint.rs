//! Deciding what to run for a role folder: `main.py`, or a `fledge-role.toml` naming a command
//! or a built-in role.
//!
//! `fledge-role.toml` is checked first (it is explicit); a folder with neither file is an error
//! that names both, so a user who zipped the wrong folder sees why nothing ran.
//!
//! ```toml
//! # Either a command; `{config}` becomes the path of the task's config.json.
//! command = ["python3", "train.py", "--config", "{config}"]
//! # Or a role built into the `fledge` binary, run as
//! # `fledge run-task config.json --role-kind top-aggregator`.
//! builtin = "top-aggregator"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Name of the role manifest file.
pub const MANIFEST_FILE: &str = "fledge-role.toml";
/// Name of the Python entrypoint.
pub const PYTHON_MAIN: &str = "main.py";
/// Placeholder substituted with the config path in `command`.
pub const CONFIG_PLACEHOLDER: &str = "{config}";

/// Errors while resolving the entrypoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither entrypoint file is present.
    #[error(
        "role folder {dir} has no entrypoint: expected {PYTHON_MAIN} or {MANIFEST_FILE} at its top level"
    )]
    Missing {
        /// The role folder.
        dir: PathBuf,
    },
    /// The manifest could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The manifest path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not valid TOML or has unknown fields.
    #[error("invalid {MANIFEST_FILE}: {message}")]
    InvalidToml {
        /// The parser's message (with line and column).
        message: String,
    },
    /// The manifest parses but does not say what to run.
    #[error("invalid {MANIFEST_FILE}: {0}")]
    Invalid(&'static str),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The contents of `fledge-role.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    /// Program and arguments.
    command: Option<Vec<String>>,
    /// A built-in role name.
    builtin: Option<String>,
}

/// What to run, resolved against a role folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entrypoint {
    /// `python3 main.py <config>`.
    Python,
    /// A user command; `{config}` not yet substituted.
    Command(Vec<String>),
    /// A role built into the `fledge` binary (`fledge run-task <config> --role-kind <name>`).
    Builtin(String),
}

/// Tools the entrypoint may need.
#[derive(Clone, Debug)]
pub struct Tools {
    /// Python interpreter (default `python3`).
    pub python: PathBuf,
    /// The `fledge` binary for built-in roles.
    pub fledge_bin: PathBuf,
}

/// A resolved command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLine {
    /// Program to execute.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment for the child.
    pub env: Vec<(String, String)>,
    /// Whether it runs Fledge's own binary (a built-in role), not user code: only such a
    /// worker receives the registry credentials (`FLEDGE_REGISTRY_ENV`).
    pub builtin: bool,
}

impl Entrypoint {
    /// Resolves the entrypoint of the role folder `dir`.
    pub fn resolve(dir: &Path) -> Result<Entrypoint> {
        let manifest = dir.join(MANIFEST_FILE);
        if manifest.is_file() {
            let text = std::fs::read_to_string(&manifest)
                .map_err(|source| Error::Read { path: manifest.clone(), source })?;
            return Self::parse_manifest(&text);
        }
        if dir.join(PYTHON_MAIN).is_file() {
            return Ok(Entrypoint::Python);
        }
        Err(Error::Missing { dir: dir.to_owned() })
    }

    /// Parses the text of a `fledge-role.toml`.
    pub fn parse_manifest(text: &str) -> Result<Entrypoint> {
        let manifest: Manifest = toml::from_str(text).map_err(|err| Error::InvalidToml {
            message: err.to_string().trim().replace('\n', " "),
        })?;
        match (manifest.command, manifest.builtin) {
            (Some(_), Some(_)) => {
                Err(Error::Invalid("set either `command` or `builtin`, not both"))
            }
            (None, None) => Err(Error::Invalid("set `command` or `builtin`")),
            (Some(command), None) => {
                if command.first().is_none_or(|p| p.trim().is_empty()) {
                    return Err(Error::Invalid("`command` must name a program"));
                }
                Ok(Entrypoint::Command(command))
            }
            (None, Some(builtin)) => {
                let valid = !builtin.is_empty()
                    && builtin
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                if !valid {
                    return Err(Error::Invalid(
                        "`builtin` must be a role name of lowercase letters, digits and '-'",
                    ));
                }
                Ok(Entrypoint::Builtin(builtin))
            }
        }
    }

    /// The command line that runs this entrypoint with the config at `config`.
    pub fn command_line(&self, config: &Path, tools: &Tools) -> CommandLine {
        let config_arg = config.to_string_lossy().into_owned();
        match self {
            Entrypoint::Python => CommandLine {
                program: tools.python.clone(),
                args: vec![PYTHON_MAIN.to_owned(), config_arg],
                env: Vec::new(),
                builtin: false,
            },
            Entrypoint::Command(argv) => {
                let mut argv = argv.iter().map(|arg| arg.replace(CONFIG_PLACEHOLDER, &config_arg));
                let program = PathBuf::from(argv.next().unwrap_or_default());
                CommandLine { program, args: argv.collect(), env: Vec::new(), builtin: false }
            }
            Entrypoint::Builtin(name) => CommandLine {
                program: tools.fledge_bin.clone(),
                args: vec![
                    "run-task".to_owned(),
                    config_arg,
                    "--role-kind".to_owned(),
                    name.clone(),
                ],
                env: Vec::new(),
                builtin: true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Tools {
        Tools { python: "python3".into(), fledge_bin: "/opt/fledge/bin/fledge".into() }
    }

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    #[test]
    fn main_py_runs_with_python() {
        let dir = folder(&[("main.py", "print('hi')")]);
        let ep = Entrypoint::resolve(dir.path()).expect("resolve");
        assert_eq!(ep, Entrypoint::Python);
        let cl = ep.command_line(Path::new("/w/config.json"), &tools());
        assert_eq!(cl.program, PathBuf::from("python3"));
        assert_eq!(cl.args, ["main.py", "/w/config.json"]);
    }

    #[test]
    fn manifest_command_substitutes_config_and_wins_over_main_py() {
        let dir = folder(&[
            ("main.py", ""),
            (
                MANIFEST_FILE,
                "command = [\"sh\", \"run.sh\", \"--config={config}\", \"{config}\"]\n",
            ),
        ]);
        let ep = Entrypoint::resolve(dir.path()).expect("resolve");
        let cl = ep.command_line(Path::new("/w/config.json"), &tools());
        assert_eq!(cl.program, PathBuf::from("sh"));
        assert_eq!(cl.args, ["run.sh", "--config=/w/config.json", "/w/config.json"]);
        assert!(cl.env.is_empty());
    }

    #[test]
    fn builtin_runs_fledge_run_task() {
        let dir = folder(&[(MANIFEST_FILE, "builtin = \"top-aggregator\"")]);
        let ep = Entrypoint::resolve(dir.path()).expect("resolve");
        assert_eq!(ep, Entrypoint::Builtin("top-aggregator".into()));
        let cl = ep.command_line(Path::new("/w/config.json"), &tools());
        assert_eq!(cl.program, PathBuf::from("/opt/fledge/bin/fledge"));
        assert_eq!(cl.args, ["run-task", "/w/config.json", "--role-kind", "top-aggregator"]);
        assert!(cl.env.is_empty());
    }

    #[test]
    fn invalid_manifests_say_what_is_wrong() {
        let cases = [
            ("command = [\"a\"", "invalid fledge-role.toml"),
            ("builtin = \"x\"\ncolour = 1", "unknown field `colour`"),
            ("", "set `command` or `builtin`"),
            ("command = [\"a\"]\nbuiltin = \"b\"", "not both"),
            ("command = []", "must name a program"),
            ("builtin = \"../../bin/sh\"", "`builtin` must be a role name"),
            ("command = \"python3 main.py\"", "invalid type"),
        ];
        for (text, expected) in cases {
            let err = Entrypoint::parse_manifest(text).expect_err(text);
            let msg = err.to_string();
            assert!(msg.contains(expected), "{text:?}: {msg}");
            assert!(msg.contains(MANIFEST_FILE), "{text:?}: {msg}");
        }
    }

    #[test]
    fn empty_folder_names_both_entrypoints() {
        let dir = folder(&[("README.md", "")]);
        let msg = Entrypoint::resolve(dir.path()).expect_err("nothing to run").to_string();
        assert!(msg.contains("main.py") && msg.contains(MANIFEST_FILE), "{msg}");
    }
}
