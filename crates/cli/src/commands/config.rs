//! `config view|save`: the effective client configuration, without contacting the server.

use std::collections::HashMap;

use serde::Serialize;

use fledge_client::ClientConfig;
use fledge_client::config::{self, Overrides};

use crate::args::{ConfigCmd, Format};
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
            };
            let text = output::render(&view, format.unwrap_or(Format::Table), || {
                output::table(
                    &["ENDPOINT", "TOKEN", "FILE"],
                    vec![vec![
                        view.endpoint.clone(),
                        view.token.clone().unwrap_or_else(|| "-".to_owned()),
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
