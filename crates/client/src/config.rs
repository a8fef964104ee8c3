//! Where a user's client finds the control plane and its token.
//!
//! Layers, lowest first: the built-in default endpoint, the YAML file (`$FLEDGE_CONFIG`, else
//! `~/.fledge/config.yaml`), the `FLEDGE_ENDPOINT` / `FLEDGE_TOKEN` / `FLEDGE_CA_FILE`
//! environment variables, and the `--endpoint` / `--token` / `--ca-file` flags. The file
//! keeps the control plane's CA beside the endpoint (`ca`, PEM text, as `fledge standalone`
//! and `fledgectl login` write it; or `caFile`, a path): an `https://` endpoint is trusted
//! through that CA only. [`ClientConfig::resolve`] merges the layers without any
//! I/O so it is tested with an injected environment map; [`ClientConfig::load`] adds reading
//! the file.

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
}

fn default_endpoint() -> String {
    DEFAULT_ENDPOINT.to_owned()
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { endpoint: default_endpoint(), token: None, ca: None, ca_file: None }
    }
}

/// The settings of the config file; every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    /// Apiserver base URL.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// User token.
    #[serde(default)]
    pub token: Option<String>,
    /// The control plane's CA (PEM text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// A CA file (PEM) instead of `ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
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

impl ConfigFile {
    /// Parses the YAML text of a config file read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_norway::from_str(text)
            .map_err(|err| Error::Parse { path: path.to_owned(), message: err.to_string() })
    }
}

impl ClientConfig {
    /// Merges the layers: defaults, then `file`, then the environment, then `overrides`. Pure.
    pub fn resolve(
        file: Option<&ConfigFile>,
        env: &HashMap<String, String>,
        overrides: &Overrides,
    ) -> Self {
        let mut config = Self::default();
        if let Some(file) = file {
            if let Some(endpoint) = file.endpoint.as_ref().filter(|e| !e.is_empty()) {
                config.endpoint = endpoint.clone();
            }
            if let Some(token) = file.token.as_ref().filter(|t| !t.is_empty()) {
                config.token = Some(token.clone());
            }
            config.ca = file.ca.clone().filter(|c| !c.trim().is_empty());
            config.ca_file = file.ca_file.clone().filter(|p| !p.as_os_str().is_empty());
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
        config
    }

    /// Reads the config file (if any) and resolves the layers against `env`.
    ///
    /// A missing file at the default location is fine; a missing file named by `--config` or
    /// `$FLEDGE_CONFIG` is an error.
    pub fn load(env: &HashMap<String, String>, overrides: &Overrides) -> Result<Self> {
        let file = match config_path(env, overrides) {
            Some((path, explicit)) => match std::fs::read_to_string(&path) {
                Ok(text) => Some(ConfigFile::parse(&text, &path)?),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => None,
                Err(source) => return Err(Error::Io { path, source }),
            },
            None => None,
        };
        Ok(Self::resolve(file.as_ref(), env, overrides))
    }

    /// Writes this config as YAML to `path` (creating its directory), readable only by the
    /// owner on Unix since it holds a token.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| Error::Io { path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = ConfigFile {
            endpoint: Some(self.endpoint.clone()),
            token: self.token.clone(),
            ca: self.ca.clone(),
            ca_file: self.ca_file.clone(),
        };
        let text = serde_norway::to_string(&file)
            .map_err(|err| Error::Parse { path: path.to_owned(), message: err.to_string() })?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut handle = options.open(path).map_err(io)?;
        std::io::Write::write_all(&mut handle, text.as_bytes()).map_err(io)
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

    #[test]
    fn layers_override_in_order_file_env_flags() {
        let file = ConfigFile {
            endpoint: Some("http://file:1".into()),
            token: Some("file-token".into()),
            ..Default::default()
        };
        let none = Overrides::default();

        assert_eq!(ClientConfig::resolve(None, &env(&[]), &none), ClientConfig::default());
        assert_eq!(
            ClientConfig::resolve(Some(&file), &env(&[]), &none),
            ClientConfig {
                endpoint: "http://file:1".into(),
                token: Some("file-token".into()),
                ..Default::default()
            }
        );
        let with_env = env(&[(ENV_ENDPOINT, "http://env:2"), (ENV_TOKEN, "env-token")]);
        assert_eq!(
            ClientConfig::resolve(Some(&file), &with_env, &none),
            ClientConfig {
                endpoint: "http://env:2".into(),
                token: Some("env-token".into()),
                ..Default::default()
            }
        );
        let flags = Overrides { endpoint: Some("http://flag:3".into()), ..Default::default() };
        assert_eq!(
            ClientConfig::resolve(Some(&file), &with_env, &flags),
            ClientConfig {
                endpoint: "http://flag:3".into(),
                token: Some("env-token".into()),
                ..Default::default()
            }
        );
        // Empty values never override.
        let empty = env(&[(ENV_ENDPOINT, ""), (ENV_TOKEN, "")]);
        let empty_flags = Overrides { token: Some(String::new()), ..Default::default() };
        assert_eq!(
            ClientConfig::resolve(Some(&file), &empty, &empty_flags).token,
            Some("file-token".into())
        );
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
