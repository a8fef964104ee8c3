//! `config view|save`: the effective client configuration, without contacting the server;
//! `login`: trust a control plane by its CA fingerprint and save it.

use std::collections::HashMap;

use serde::Serialize;

use fledge_client::ClientConfig;
use fledge_client::config::{self, Overrides};

use crate::args::{ConfigCmd, Format, LoginArgs};
use crate::input::InputError;
use crate::output;

/// What `config view` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct View {
    endpoint: String,
    /// The token's first characters, or absent.
    token: Option<String>,
    /// The config file consulted, and whether it exists.
    file: Option<String>,
    file_exists: bool,
    /// The trusted CA's fingerprint, or absent (system roots).
    ca: Option<String>,
}

fn mask(token: &str) -> String {
    let shown: String = token.chars().take(4).collect();
    format!("{shown}…")
}

/// Runs a `config` subcommand.
pub fn run(
    command: &ConfigCmd,
    config: &ClientConfig,
    env: &HashMap<String, String>,
    overrides: &Overrides,
    format: Option<Format>,
) -> anyhow::Result<()> {
    let path = config::config_path(env, overrides).map(|(path, _)| path);
    match command {
        ConfigCmd::View => {
            let view = View {
                endpoint: config.endpoint.clone(),
                token: config.token.as_deref().map(mask),
                file: path.as_ref().map(|p| p.display().to_string()),
                file_exists: path.as_ref().is_some_and(|p| p.is_file()),
                ca: config.trusted_ca()?.map(|ca| ca.fingerprint().to_string()),
            };
            let text = output::render(&view, format.unwrap_or(Format::Table), || {
                output::table(
                    &["ENDPOINT", "TOKEN", "CA", "FILE"],
                    vec![vec![
                        view.endpoint.clone(),
                        view.token.clone().unwrap_or_else(|| "-".to_owned()),
                        view.ca.clone().unwrap_or_else(|| "-".to_owned()),
                        match (&view.file, view.file_exists) {
                            (Some(file), true) => file.clone(),
                            (Some(file), false) => format!("{file} (absent)"),
                            (None, _) => "-".to_owned(),
                        },
                    ]],
                )
            })?;
            output::emit(&text)?;
        }
        ConfigCmd::Save => {
            let path = path.ok_or(config::Error::NoLocation)?;
            config.save(&path)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// `fledgectl login`: fetches the server's CA (checked against `--ca-fingerprint`) or reads
/// `--ca`, checks the server with it (and the token, when one is known), then saves endpoint,
/// CA and token to the config file.
pub async fn login(
    args: &LoginArgs,
    mut config: ClientConfig,
    env: &HashMap<String, String>,
    overrides: &Overrides,
) -> anyhow::Result<()> {
    let ca = match (&args.ca_fingerprint, &args.ca) {
        (Some(fingerprint), _) => {
            let fingerprint: fledge_client::Fingerprint =
                fingerprint.parse().map_err(|err: fledge_client::trust::TlsError| {
                    InputError::Other(format!("--ca-fingerprint: {err}"))
                })?;
            Some(fledge_client::fetch_ca(&args.server, &fingerprint).await?)
        }
        (None, Some(path)) => Some(fledge_client::trust::load_ca(&args.server, path)?),
        (None, None) => None,
    };
    config.endpoint = args.server.trim().trim_end_matches('/').to_owned();
    config.ca = ca.as_ref().map(|ca| ca.pem().to_owned());
    config.ca_file = None;
    if let Some(token) = args.login_token.as_ref().filter(|t| !t.is_empty()) {
        config.token = Some(token.clone());
    }
    let client = config.client()?;
    client.health().await?;
    if config.token.is_some() {
        let user = client.whoami().await?;
        eprintln!("logged in as {}", user.id);
    }
    let path = config::config_path(env, overrides)
        .map(|(path, _)| path)
        .ok_or(config::Error::NoLocation)?;
    config.save(&path)?;
    match &ca {
        Some(ca) => eprintln!("trusting CA {} for {}", ca.fingerprint(), config.endpoint),
        None => eprintln!("no CA given: {} is trusted through the system's roots", config.endpoint),
    }
    eprintln!("wrote {}", path.display());
    Ok(())
}
