//! `config view|save`: the effective client configuration, without contacting the server;
//! `config get-contexts|use-context|current-context|set-context|delete-context`: the named
//! contexts of the config file; `login`: trust a control plane by its CA fingerprint and save
//! it.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

use fledge_client::ClientConfig;
use fledge_client::config::{self, ConfigFile, Overrides};

use crate::args::{ConfigCmd, Format, LoginArgs};
use crate::input::InputError;
use crate::output;

/// What `config view` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct View {
    /// The context used, if any.
    context: Option<String>,
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
                context: config.context.clone(),
                endpoint: config.endpoint.clone(),
                token: config.token.as_deref().map(mask),
                file: path.as_ref().map(|p| p.display().to_string()),
                file_exists: path.as_ref().is_some_and(|p| p.is_file()),
                ca: config.trusted_ca()?.map(|ca| ca.fingerprint().to_string()),
            };
            let text = output::render(&view, format.unwrap_or(Format::Table), || {
                output::table(
                    &["CONTEXT", "ENDPOINT", "TOKEN", "CA", "FILE"],
                    vec![vec![
                        view.context.clone().unwrap_or_else(|| "-".to_owned()),
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
            eprintln!(
                "wrote context {} of {}",
                config.context.as_deref().unwrap_or(config::DEFAULT_CONTEXT),
                path.display()
            );
        }
        other => {
            return Err(anyhow::anyhow!("config {other:?} works on the file, not the settings"));
        }
    }
    Ok(())
}

/// One line of `config get-contexts` (never the token itself).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ContextRow {
    name: String,
    current: bool,
    endpoint: Option<String>,
    /// `sha256:…` of an embedded CA, or the CA file's path.
    ca: Option<String>,
    has_token: bool,
}

fn context_row(context: &config::Context, current: Option<&str>) -> ContextRow {
    let ca = match (&context.ca_file, &context.ca) {
        (Some(path), _) => Some(path.display().to_string()),
        (None, Some(pem)) => Some(
            fledge_client::Ca::from_pem(pem, "the context's ca")
                .map(|ca| ca.fingerprint().to_string())
                .unwrap_or_else(|err| format!("invalid: {err}")),
        ),
        (None, None) => None,
    };
    ContextRow {
        name: context.name.clone(),
        current: current == Some(context.name.as_str()),
        endpoint: context.endpoint.clone(),
        ca,
        has_token: context.token.as_deref().is_some_and(|t| !t.is_empty()),
    }
}

/// The config file `--config`/`$FLEDGE_CONFIG`/`~/.fledge/config.yaml` and its content (empty
/// when it does not exist yet).
fn file_at(
    env: &HashMap<String, String>,
    overrides: &Overrides,
) -> anyhow::Result<(PathBuf, ConfigFile)> {
    let path = config::config_path(env, overrides)
        .map(|(path, _)| path)
        .ok_or(config::Error::NoLocation)?;
    let file = ConfigFile::read(&path)?.unwrap_or_default();
    Ok((path, file))
}

fn unknown(name: &str, path: &std::path::Path, file: &ConfigFile) -> config::Error {
    config::Error::UnknownContext {
        name: name.to_owned(),
        path: path.display().to_string(),
        known: file.names(),
    }
}

/// Runs the `config` subcommands that work on the file alone (whatever context it selects);
/// `None` for `view` and `save`, which need the resolved settings.
pub fn run_on_file(
    command: &ConfigCmd,
    env: &HashMap<String, String>,
    overrides: &Overrides,
    format: Option<Format>,
) -> Option<anyhow::Result<()>> {
    let run = || -> anyhow::Result<()> {
        match command {
            ConfigCmd::View | ConfigCmd::Save => return unreachable_here(),
            ConfigCmd::GetContexts => {
                let (_, file) = file_at(env, overrides)?;
                let current = file.current_context.as_deref();
                let rows: Vec<ContextRow> =
                    file.contexts.iter().map(|c| context_row(c, current)).collect();
                if format == Some(Format::Name) {
                    let names: Vec<String> =
                        rows.iter().map(|r| format!("context/{}", r.name)).collect();
                    return output::emit_lines(&names).map_err(Into::into);
                }
                let text = output::render(&rows, format.unwrap_or(Format::Table), || {
                    output::table(
                        &["CURRENT", "NAME", "ENDPOINT", "CA", "TOKEN"],
                        rows.iter()
                            .map(|r| {
                                vec![
                                    if r.current { "*" } else { "" }.to_owned(),
                                    r.name.clone(),
                                    r.endpoint.clone().unwrap_or_else(|| "-".to_owned()),
                                    r.ca.clone().unwrap_or_else(|| "-".to_owned()),
                                    if r.has_token { "set" } else { "-" }.to_owned(),
                                ]
                            })
                            .collect(),
                    )
                })?;
                output::emit(&text)?;
            }
            ConfigCmd::CurrentContext => {
                let (path, file) = file_at(env, overrides)?;
                match file.current_context {
                    Some(name) => output::emit(&name)?,
                    None => {
                        return Err(InputError::Other(format!(
                            "{} has no current context; `fledgectl config use-context NAME` sets one",
                            path.display()
                        ))
                        .into());
                    }
                }
            }
            ConfigCmd::UseContext { name } => {
                let (path, mut file) = file_at(env, overrides)?;
                if file.context(name).is_none() {
                    return Err(unknown(name, &path, &file).into());
                }
                file.current_context = Some(name.clone());
                file.write(&path)?;
                eprintln!("switched to context {name} ({})", path.display());
            }
            ConfigCmd::SetContext { name, current } => {
                let (path, mut file) = file_at(env, overrides)?;
                // Only what was given on this command line: never the environment's values.
                let ca = overrides
                    .ca_file
                    .as_ref()
                    .map(|ca_file| {
                        let endpoint = overrides.endpoint.as_deref().unwrap_or("the context");
                        fledge_client::trust::load_ca(endpoint, ca_file)
                    })
                    .transpose()?;
                let existed = file.context(name).is_some();
                let context = file.context_mut(name)?;
                if let Some(endpoint) = overrides.endpoint.as_ref().filter(|e| !e.is_empty()) {
                    fledge_client::Client::new(endpoint, None)?;
                    context.endpoint = Some(endpoint.trim().trim_end_matches('/').to_owned());
                }
                if let Some(token) = overrides.token.as_ref().filter(|t| !t.is_empty()) {
                    context.token = Some(token.clone());
                }
                if let Some(ca) = &ca {
                    context.ca = Some(ca.pem().to_owned());
                    context.ca_file = None;
                }
                if *current || file.current_context.is_none() {
                    file.current_context = Some(name.clone());
                }
                file.write(&path)?;
                let verb = if existed { "updated" } else { "created" };
                eprintln!("{verb} context {name} in {}", path.display());
            }
            ConfigCmd::DeleteContext { name } => {
                let (path, mut file) = file_at(env, overrides)?;
                let was_current = file.current_context.as_deref() == Some(name.as_str());
                if !file.remove(name) {
                    return Err(unknown(name, &path, &file).into());
                }
                file.write(&path)?;
                eprintln!("deleted context {name} from {}", path.display());
                if was_current {
                    eprintln!(
                        "it was the current context: `fledgectl config use-context NAME` picks another"
                    );
                }
            }
        }
        Ok(())
    };
    match command {
        ConfigCmd::View | ConfigCmd::Save => None,
        _ => Some(run()),
    }
}

fn unreachable_here() -> anyhow::Result<()> {
    Err(anyhow::anyhow!("config view and save need the resolved settings"))
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
    // The context logged into is the one used from now on.
    let mut file = ConfigFile::read(&path)?.unwrap_or_default();
    let name = config.context.clone().unwrap_or_else(|| config::DEFAULT_CONTEXT.to_owned());
    if file.current_context.as_deref() != Some(name.as_str()) {
        file.current_context = Some(name.clone());
        file.write(&path)?;
    }
    eprintln!("context {name} is current");
    match &ca {
        Some(ca) => eprintln!("trusting CA {} for {}", ca.fingerprint(), config.endpoint),
        None => eprintln!("no CA given: {} is trusted through the system's roots", config.endpoint),
    }
    eprintln!("wrote {}", path.display());
    Ok(())
}
