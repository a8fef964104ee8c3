//! Where a user's client finds the control plane and its token.
//!
//! Layers, lowest first: the built-in default endpoint, one context of the YAML file
//! (`$FLEDGE_CONFIG`, else `~/.fledge/config.yaml`), the `FLEDGE_ENDPOINT` / `FLEDGE_TOKEN` /
//! `FLEDGE_CA_FILE` environment variables, and the `--endpoint` / `--token` / `--ca-file`
//! flags. The file holds named contexts, each an endpoint with its token and CA (`ca`, PEM
//! text, as `fledge standalone` and `fledgectl login` write it; or `caFile`, a path), and the
//! current one; `--context` or `$FLEDGE_CONTEXT` picks another. An `https://` endpoint is
//! trusted through its context's CA only.
//!
//! A file of the earlier single-endpoint layout (top-level `endpoint`, `token`, `ca`,
//! `caFile`) is read as a context named `default`, which is current unless the file names
//! another; it is written back in the contexts layout the next time anything saves it.
//! Files are written whole to a temporary file (mode 0600: they hold tokens), fsynced and
//! renamed over the old one, so a crash leaves the old file or the new one.
//!
//! [`ClientConfig::resolve`] merges the layers without any I/O so it is tested with an
//! injected environment map; [`ClientConfig::load`] adds reading the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The endpoint used when nothing else names one (`fledge standalone`'s default).
pub const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:10100";
/// Environment variable naming the config file.
pub const ENV_CONFIG: &str = "FLEDGE_CONFIG";
/// Environment variable overriding the endpoint.
pub const ENV_ENDPOINT: &str = "FLEDGE_ENDPOINT";
/// Environment variable overriding the token.
pub const ENV_TOKEN: &str = "FLEDGE_TOKEN";
/// Environment variable naming a CA file (PEM) to trust instead of the file's `ca`.
pub const ENV_CA_FILE: &str = "FLEDGE_CA_FILE";
/// Environment variable naming the context to use instead of the file's current one.
pub const ENV_CONTEXT: &str = "FLEDGE_CONTEXT";
/// The context a single-endpoint file is read as, and the one saved to when none is named.
pub const DEFAULT_CONTEXT: &str = "default";
/// Longest context name.
pub const MAX_CONTEXT_NAME: usize = 64;
/// Most contexts a file may hold.
pub const MAX_CONTEXTS: usize = 256;
/// Largest config file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// What went wrong reading or writing the config file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read or written.
    #[error("cannot access the config file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid config YAML.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (with line and column when known).
        message: String,
    },
    /// No config file location is known (no `$FLEDGE_CONFIG` and no home directory).
    #[error("no config file location: set {ENV_CONFIG} or HOME")]
    NoLocation,
    /// A context was named that the file does not have.
    #[error("no context {name:?} in {path}{}", known_list(known))]
    UnknownContext {
        /// The name asked for.
        name: String,
        /// The file (or `-` when no file was read).
        path: String,
        /// The contexts it has.
        known: Vec<String>,
    },
    /// A context name that cannot be used.
    #[error("invalid context name {name:?}: {reason}")]
    InvalidContextName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        " (it has none; create one with `fledgectl config set-context NAME`)".to_owned()
    } else {
        format!(" (it has: {})", known.join(", "))
    }
}

/// Result of config operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The resolved client settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConfig {
    /// Apiserver base URL. Default [`DEFAULT_ENDPOINT`].
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// User token; absent means unauthenticated requests (which the API rejects with 401).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The control plane's CA, PEM text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// A CA file (PEM); wins over `ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The context of the file these settings were read from, or are saved to (`None`: the
    /// file's current context, else [`DEFAULT_CONTEXT`]).
    #[serde(skip)]
    pub context: Option<String>,
}

fn default_endpoint() -> String {
    DEFAULT_ENDPOINT.to_owned()
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { endpoint: default_endpoint(), token: None, ca: None, ca_file: None, context: None }
    }
}

/// One named context of the config file: a control plane and how to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Context {
    /// Its name (see [`check_context_name`]).
    pub name: String,
    /// Apiserver base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// User token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The control plane's CA (PEM text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// A CA file (PEM) instead of `ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// The config file: named contexts and the current one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigFile {
    /// The context used when none is named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// Every context, in the order they were added.
    pub contexts: Vec<Context>,
}

/// The file as written: the contexts layout, and the earlier single-endpoint keys.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    current_context: Option<String>,
    #[serde(default)]
    contexts: Vec<Context>,
    // The single-endpoint layout.
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    ca: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
}

/// Whether `name` may name a context: 1 to [`MAX_CONTEXT_NAME`] ASCII letters, digits, `-`,
/// `_`, `.`, `@` or `:`.
pub fn check_context_name(name: &str) -> Result<()> {
    let invalid = |reason: &str| {
        Err(Error::InvalidContextName { name: name.to_owned(), reason: reason.to_owned() })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > MAX_CONTEXT_NAME {
        return invalid("it is longer than 64 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@:".contains(&b)) {
        return invalid("use letters, digits, '-', '_', '.', '@' or ':'");
    }
    Ok(())
}

/// Command-line overrides (the highest layer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--config`: the config file to read instead of the default location.
    pub config: Option<PathBuf>,
    /// `--endpoint`.
    pub endpoint: Option<String>,
    /// `--token`.
    pub token: Option<String>,
    /// `--ca-file`.
    pub ca_file: Option<PathBuf>,
    /// `--context`: the file's context to use instead of its current one.
    pub context: Option<String>,
}

/// The variable's value unless unset or empty.
fn var<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// The config file to read: `--config`, else `$FLEDGE_CONFIG`, else `$HOME/.fledge/config.yaml`.
///
/// The flag is `true` when the location was named explicitly, so a missing file is an error.
pub fn config_path(
    env: &HashMap<String, String>,
    overrides: &Overrides,
) -> Option<(PathBuf, bool)> {
    if let Some(path) = &overrides.config {
        return Some((path.clone(), true));
    }
    if let Some(path) = var(env, ENV_CONFIG) {
        return Some((PathBuf::from(path), true));
    }
    let home = var(env, "HOME").map(PathBuf::from).or_else(dirs::home_dir)?;
    Some((home.join(".fledge").join("config.yaml"), false))
}

/// The context named by `--context`, else `$FLEDGE_CONTEXT`; `None` for the file's current one.
pub fn selected_context(env: &HashMap<String, String>, overrides: &Overrides) -> Option<String> {
    overrides
        .context
        .clone()
        .filter(|c| !c.is_empty())
        .or_else(|| var(env, ENV_CONTEXT).map(str::to_owned))
}

impl ConfigFile {
    /// Parses the YAML text of a config file read from `path`; a single-endpoint file becomes
    /// the context [`DEFAULT_CONTEXT`].
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let parse_err = |message: String| Error::Parse { path: path.to_owned(), message };
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let raw: RawFile =
            serde_norway::from_str(text).map_err(|err| parse_err(err.to_string()))?;
        let mut file = Self { current_context: raw.current_context, contexts: raw.contexts };
        let legacy = raw.endpoint.is_some()
            || raw.token.is_some()
            || raw.ca.is_some()
            || raw.ca_file.is_some();
        if legacy {
            if file.context(DEFAULT_CONTEXT).is_some() {
                return Err(parse_err(format!(
                    "it has top-level endpoint/token/ca keys and a context named {DEFAULT_CONTEXT:?}; \
                     move the keys into a context"
                )));
            }
            file.contexts.insert(
                0,
                Context {
                    name: DEFAULT_CONTEXT.to_owned(),
                    endpoint: raw.endpoint,
                    token: raw.token,
                    ca: raw.ca,
                    ca_file: raw.ca_file,
                },
            );
            if file.current_context.is_none() {
                file.current_context = Some(DEFAULT_CONTEXT.to_owned());
            }
        }
        if file.contexts.len() > MAX_CONTEXTS {
            return Err(parse_err(format!("more than {MAX_CONTEXTS} contexts")));
        }
        for (i, context) in file.contexts.iter().enumerate() {
            check_context_name(&context.name)
                .map_err(|err| parse_err(format!("contexts[{i}]: {err}")))?;
            if file.contexts[..i].iter().any(|c| c.name == context.name) {
                return Err(parse_err(format!(
                    "contexts[{i}]: a second context named {:?}",
                    context.name
                )));
            }
        }
        if file.current_context.as_deref() == Some("") {
            file.current_context = None;
        }
        Ok(file)
    }

    /// Reads the file at `path`; `None` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        use std::io::Read as _;
        let io = |source| Error::Io { path: path.to_owned(), source };
        let handle = match std::fs::File::open(path) {
            Ok(handle) => handle,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io(err)),
        };
        let mut text = String::new();
        handle.take(MAX_FILE_BYTES + 1).read_to_string(&mut text).map_err(io)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(Error::Parse {
                path: path.to_owned(),
                message: format!("larger than {MAX_FILE_BYTES} bytes"),
            });
        }
        Self::parse(&text, path).map(Some)
    }

    /// The context named `name`.
    pub fn context(&self, name: &str) -> Option<&Context> {
        self.contexts.iter().find(|c| c.name == name)
    }

    /// The context named `name`, added (empty) when absent.
    pub fn context_mut(&mut self, name: &str) -> Result<&mut Context> {
        check_context_name(name)?;
        let at = match self.contexts.iter().position(|c| c.name == name) {
            Some(at) => at,
            None => {
                if self.contexts.len() >= MAX_CONTEXTS {
                    return Err(Error::InvalidContextName {
                        name: name.to_owned(),
                        reason: format!("the file already has {MAX_CONTEXTS} contexts"),
                    });
                }
                self.contexts.push(Context { name: name.to_owned(), ..Default::default() });
                self.contexts.len() - 1
            }
        };
        Ok(&mut self.contexts[at])
    }

    /// Removes the context named `name`; unsets the current context if it was that one.
    /// Returns whether it existed.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.contexts.len();
        self.contexts.retain(|c| c.name != name);
        if self.current_context.as_deref() == Some(name) {
            self.current_context = None;
        }
        self.contexts.len() != before
    }

    /// The names of every context.
    pub fn names(&self) -> Vec<String> {
        self.contexts.iter().map(|c| c.name.clone()).collect()
    }

    /// The context to use: `selected` (an error if absent), else the current one (an error if
    /// it names a missing context), else none.
    pub fn pick(&self, selected: Option<&str>, path: &Path) -> Result<Option<&Context>> {
        let unknown = |name: &str| Error::UnknownContext {
            name: name.to_owned(),
            path: path.display().to_string(),
            known: self.names(),
        };
        match selected.or(self.current_context.as_deref()) {
            Some(name) => self.context(name).map(Some).ok_or_else(|| unknown(name)),
            None => Ok(None),
        }
    }

    /// Writes the file atomically: a temporary file beside it (mode 0600 on Unix), fsynced,
    /// renamed over `path`, and the directory fsynced. Creates the directory if needed.
    pub fn write(&self, path: &Path) -> Result<()> {
        let io = |source| Error::Io { path: path.to_owned(), source };
        let text = serde_norway::to_string(self)
            .map_err(|err| Error::Parse { path: path.to_owned(), message: err.to_string() })?;
        fledge_durable::write_with(path, Some(0o600), |out| {
            std::io::Write::write_all(out, text.as_bytes())
        })
        .map_err(io)
    }
}

impl ClientConfig {
    /// Merges the layers: defaults, then the chosen context of `file` (`--context`,
    /// `$FLEDGE_CONTEXT`, else its current one), then the environment, then `overrides`.
    /// Pure; fails only for a context that `file` does not have.
    pub fn resolve(
        file: Option<&ConfigFile>,
        env: &HashMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Self> {
        Self::resolve_at(file, Path::new("-"), env, overrides)
    }

    fn resolve_at(
        file: Option<&ConfigFile>,
        path: &Path,
        env: &HashMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Self> {
        let mut config = Self::default();
        let selected = selected_context(env, overrides);
        let context = match file {
            Some(file) => file.pick(selected.as_deref(), path)?,
            None => match &selected {
                Some(name) => {
                    return Err(Error::UnknownContext {
                        name: name.clone(),
                        path: path.display().to_string(),
                        known: Vec::new(),
                    });
                }
                None => None,
            },
        };
        if let Some(context) = context {
            config.context = Some(context.name.clone());
            if let Some(endpoint) = context.endpoint.as_ref().filter(|e| !e.is_empty()) {
                config.endpoint = endpoint.clone();
            }
            if let Some(token) = context.token.as_ref().filter(|t| !t.is_empty()) {
                config.token = Some(token.clone());
            }
            config.ca = context.ca.clone().filter(|c| !c.trim().is_empty());
            config.ca_file = context.ca_file.clone().filter(|p| !p.as_os_str().is_empty());
        }
        if let Some(path) = var(env, ENV_CA_FILE) {
            config.ca_file = Some(PathBuf::from(path));
        }
        if let Some(path) = overrides.ca_file.as_ref().filter(|p| !p.as_os_str().is_empty()) {
            config.ca_file = Some(path.clone());
        }
        if let Some(endpoint) = var(env, ENV_ENDPOINT) {
            config.endpoint = endpoint.to_owned();
        }
        if let Some(token) = var(env, ENV_TOKEN) {
            config.token = Some(token.to_owned());
        }
        if let Some(endpoint) = overrides.endpoint.as_ref().filter(|e| !e.is_empty()) {
            config.endpoint = endpoint.clone();
        }
        if let Some(token) = overrides.token.as_ref().filter(|t| !t.is_empty()) {
            config.token = Some(token.clone());
        }
        if config.context.is_none() {
            config.context = selected;
        }
        Ok(config)
    }

    /// Reads the config file (if any) and resolves the layers against `env`.
    ///
    /// A missing file at the default location is fine; a missing file named by `--config` or
    /// `$FLEDGE_CONFIG` is an error, and so is a `--context` the file does not have.
    pub fn load(env: &HashMap<String, String>, overrides: &Overrides) -> Result<Self> {
        match config_path(env, overrides) {
            Some((path, explicit)) => {
                let file = ConfigFile::read(&path)?;
                if file.is_none() && explicit {
                    return Err(Error::Io {
                        path,
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    });
                }
                Self::resolve_at(file.as_ref(), &path, env, overrides)
            }
            None => Self::resolve(None, env, overrides),
        }
    }

    /// Saves these settings as their context (see [`ClientConfig::context`]) of the file at
    /// `path`, keeping its other contexts; the saved context becomes the current one when the
    /// file has none. Written atomically, readable only by the owner on Unix (it holds tokens).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut file = ConfigFile::read(path)?.unwrap_or_default();
        let name = self
            .context
            .clone()
            .or_else(|| file.current_context.clone())
            .unwrap_or_else(|| DEFAULT_CONTEXT.to_owned());
        let context = file.context_mut(&name)?;
        context.endpoint = Some(self.endpoint.clone());
        context.token = self.token.clone();
        context.ca = self.ca.clone();
        context.ca_file = self.ca_file.clone();
        if file.current_context.is_none() {
            file.current_context = Some(name);
        }
        file.write(path)
    }

    /// The default location to save to: `$FLEDGE_CONFIG`, else `~/.fledge/config.yaml`.
    pub fn default_path(env: &HashMap<String, String>) -> Result<PathBuf> {
        config_path(env, &Overrides::default()).map(|(path, _)| path).ok_or(Error::NoLocation)
    }

    /// The CA to trust: `ca_file` when set, else `ca`; `None` when neither is.
    pub fn trusted_ca(&self) -> crate::Result<Option<fledge_tls::Ca>> {
        let tls = |source| crate::Error::Tls { endpoint: self.endpoint.clone(), source };
        if let Some(path) = &self.ca_file {
            return fledge_tls::Ca::load(path).map(Some).map_err(tls);
        }
        self.ca
            .as_deref()
            .map(|pem| fledge_tls::Ca::from_pem(pem, "the config's ca"))
            .transpose()
            .map_err(tls)
    }

    /// A REST client for these settings, trusting [`ClientConfig::trusted_ca`].
    pub fn client(&self) -> crate::Result<crate::Client> {
        crate::Client::new(&self.endpoint, self.token.as_deref())?
            .with_ca(self.trusted_ca()?.as_ref())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn one_context(name: &str, endpoint: &str, token: &str) -> Context {
        Context {
            name: name.into(),
            endpoint: Some(endpoint.into()),
            token: Some(token.into()),
            ..Default::default()
        }
    }

    #[test]
    fn layers_override_in_order_file_env_flags() {
        let file = ConfigFile {
            current_context: Some("dev".into()),
            contexts: vec![one_context("dev", "http://file:1", "file-token")],
        };
        let none = Overrides::default();
        let from_file = |endpoint: &str, token: &str| ClientConfig {
            endpoint: endpoint.into(),
            token: Some(token.into()),
            context: Some("dev".into()),
            ..Default::default()
        };

        assert_eq!(ClientConfig::resolve(None, &env(&[]), &none).unwrap(), ClientConfig::default());
        assert_eq!(
            ClientConfig::resolve(Some(&file), &env(&[]), &none).unwrap(),
            from_file("http://file:1", "file-token")
        );
        let with_env = env(&[(ENV_ENDPOINT, "http://env:2"), (ENV_TOKEN, "env-token")]);
        assert_eq!(
            ClientConfig::resolve(Some(&file), &with_env, &none).unwrap(),
            from_file("http://env:2", "env-token")
        );
        let flags = Overrides { endpoint: Some("http://flag:3".into()), ..Default::default() };
        assert_eq!(
            ClientConfig::resolve(Some(&file), &with_env, &flags).unwrap(),
            from_file("http://flag:3", "env-token")
        );
        // Empty values never override.
        let empty = env(&[(ENV_ENDPOINT, ""), (ENV_TOKEN, "")]);
        let empty_flags = Overrides { token: Some(String::new()), ..Default::default() };
        assert_eq!(
            ClientConfig::resolve(Some(&file), &empty, &empty_flags).unwrap().token,
            Some("file-token".into())
        );
    }

    #[test]
    fn contexts_are_picked_by_flag_then_env_then_current() {
        let file = ConfigFile {
            current_context: Some("prod".into()),
            contexts: vec![
                one_context("prod", "https://prod:1", "p"),
                one_context("lab", "https://lab:2", "l"),
            ],
        };
        let pick = |env_pairs: &[(&str, &str)], flag: Option<&str>| {
            let overrides = Overrides { context: flag.map(Into::into), ..Default::default() };
            ClientConfig::resolve(Some(&file), &env(env_pairs), &overrides)
        };
        assert_eq!(pick(&[], None).unwrap().endpoint, "https://prod:1");
        assert_eq!(pick(&[(ENV_CONTEXT, "lab")], None).unwrap().token.as_deref(), Some("l"));
        let flagged = pick(&[(ENV_CONTEXT, "prod")], Some("lab")).unwrap();
        assert_eq!(
            (flagged.endpoint.as_str(), flagged.context.as_deref()),
            ("https://lab:2", Some("lab"))
        );
        let err = pick(&[], Some("nope")).unwrap_err().to_string();
        assert!(err.contains("\"nope\"") && err.contains("prod, lab"), "{err}");
        // A current context that names nothing is an error, not a silent default.
        let dangling = ConfigFile { current_context: Some("gone".into()), contexts: vec![] };
        assert!(ClientConfig::resolve(Some(&dangling), &env(&[]), &Overrides::default()).is_err());
    }

    #[test]
    fn single_endpoint_files_become_the_default_context_and_keep_their_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "endpoint: https://old:1\ntoken: old-secret\ncaFile: /ca.pem\n")
            .unwrap();
        let file = ConfigFile::read(&path).unwrap().unwrap();
        assert_eq!(file.current_context.as_deref(), Some(DEFAULT_CONTEXT));
        assert_eq!(
            file.contexts,
            vec![Context {
                name: "default".into(),
                endpoint: Some("https://old:1".into()),
                token: Some("old-secret".into()),
                ca: None,
                ca_file: Some("/ca.pem".into()),
            }]
        );
        let home = env(&[(ENV_CONFIG, path.to_str().unwrap())]);
        let config = ClientConfig::load(&home, &Overrides::default()).unwrap();
        assert_eq!(config.token.as_deref(), Some("old-secret"));

        // Saving another context migrates the file and keeps the old one, token included.
        let lab = ClientConfig {
            endpoint: "https://lab:2".into(),
            token: Some("lab-secret".into()),
            context: Some("lab".into()),
            ..Default::default()
        };
        lab.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("currentContext: default\ncontexts:"), "{text}");
        assert!(!text.contains("\nendpoint:"), "{text}");
        let file = ConfigFile::read(&path).unwrap().unwrap();
        assert_eq!(file.names(), ["default", "lab"]);
        assert_eq!(file.context("default").unwrap().token.as_deref(), Some("old-secret"));
        assert_eq!(file.context("lab").unwrap().token.as_deref(), Some("lab-secret"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary file is left behind.
        let left: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("config.yaml")]);
    }

    #[test]
    fn bad_context_files_and_names_are_refused_with_the_reason() {
        let path = Path::new("c.yaml");
        let parse = |text: &str| ConfigFile::parse(text, path).unwrap_err().to_string();
        let twice = "contexts:\n- name: a\n- name: a\n";
        assert!(parse(twice).contains("second context named \"a\""), "{}", parse(twice));
        let mixed = "endpoint: http://x:1\ncontexts:\n- name: default\n";
        assert!(parse(mixed).contains("top-level"), "{}", parse(mixed));
        let bad_name = "contexts:\n- name: \"a b\"\n";
        assert!(parse(bad_name).contains("contexts[0]"), "{}", parse(bad_name));
        let unknown = "contexts:\n- name: a\n  tokn: x\n";
        assert!(parse(unknown).contains("tokn"), "{}", parse(unknown));
        for name in ["", "a/b", "ok\n", &"x".repeat(65)] {
            assert!(check_context_name(name).is_err(), "{name:?}");
        }
        for name in ["prod", "alice@lab:10100", "eu-west_1.b"] {
            check_context_name(name).unwrap();
        }
        let mut file = ConfigFile::default();
        assert!(file.context_mut("no spaces").is_err());
        file.context_mut("a").unwrap().token = Some("t".into());
        file.current_context = Some("a".into());
        assert!(file.remove("a"));
        assert_eq!((file.contexts.len(), file.current_context.clone()), (0, None));
        assert!(!file.remove("a"));
    }

    #[test]
    fn config_path_prefers_flag_then_env_then_home() {
        let flag = Overrides { config: Some("/f.yaml".into()), ..Default::default() };
        let both = env(&[(ENV_CONFIG, "/e.yaml"), ("HOME", "/home/u")]);
        assert_eq!(config_path(&both, &flag), Some((PathBuf::from("/f.yaml"), true)));
        assert_eq!(
            config_path(&both, &Overrides::default()),
            Some((PathBuf::from("/e.yaml"), true))
        );
        assert_eq!(
            config_path(&env(&[("HOME", "/home/u")]), &Overrides::default()),
            Some((PathBuf::from("/home/u/.fledge/config.yaml"), false))
        );
    }

    #[test]
    fn load_reads_yaml_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        // No file at the default location: defaults.
        let config = ClientConfig::load(&env(&[("HOME", home)]), &Overrides::default()).unwrap();
        assert_eq!(config, ClientConfig::default());

        // save → load round-trips through the default location.
        let saved = ClientConfig {
            endpoint: "http://127.0.0.1:9".into(),
            token: Some("secret".into()),
            ca: Some("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into()),
            ca_file: None,
            context: Some(DEFAULT_CONTEXT.into()),
        };
        let path = ClientConfig::default_path(&env(&[("HOME", home)])).unwrap();
        saved.save(&path).unwrap();
        assert_eq!(
            ClientConfig::load(&env(&[("HOME", home)]), &Overrides::default()).unwrap(),
            saved
        );

        // An unknown key names itself.
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "endpoint: http://x:1\ntokn: oops\n").unwrap();
        let err =
            ClientConfig::load(&env(&[(ENV_CONFIG, bad.to_str().unwrap())]), &Overrides::default())
                .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("tokn") && text.contains("bad.yaml"), "{text}");

        // A file named explicitly must exist.
        let missing = dir.path().join("missing.yaml");
        let err = ClientConfig::load(
            &env(&[]),
            &Overrides { config: Some(missing), ..Default::default() },
        )
        .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }
}
