//! `version [--client]`: this client's version and the server's (`GET /api/v1/version`).

use serde::Serialize;

use fledge_client::ClientConfig;

use crate::args::Format;
use crate::output;

/// This binary's version.
pub const CLIENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What `version` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Versions {
    client: Client,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<fledge_client::ServerVersion>,
    /// Why there is no server version, when it was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_error: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Client {
    version: &'static str,
}

fn render(versions: &Versions, format: Option<Format>) -> anyhow::Result<()> {
    let text = output::render(versions, format.unwrap_or(Format::Table), || {
        let mut text = format!("Client Version: {}\n", versions.client.version);
        if let Some(server) = &versions.server {
            text.push_str(&format!(
                "Server Version: {} (API {})\n",
                server.version, server.api_version
            ));
        }
        text
    })?;
    output::emit(&text)?;
    Ok(())
}

/// `version --client`.
pub fn client_only(format: Option<Format>) -> anyhow::Result<()> {
    let versions =
        Versions { client: Client { version: CLIENT_VERSION }, server: None, server_error: None };
    render(&versions, format)
}

/// `version` when the settings cannot even be read: the client's version, then the error.
pub fn without_server(format: Option<Format>, why: &str) -> anyhow::Result<()> {
    let versions = Versions {
        client: Client { version: CLIENT_VERSION },
        server: None,
        server_error: Some(why.to_owned()),
    };
    render(&versions, format)?;
    Err(anyhow::anyhow!("cannot tell the server's version: {why}"))
}

/// `version`: the client's version always; the server's, or why it could not be had (then
/// the exit code says the server part failed).
pub async fn run(config: &ClientConfig, format: Option<Format>) -> anyhow::Result<()> {
    let answer = match config.client() {
        Ok(client) => {
            client.server_version().await.map_err(|err| format!("{:#}", anyhow::Error::from(err)))
        }
        Err(err) => Err(format!("{:#}", anyhow::Error::from(err))),
    };
    let (server, server_error) = match answer {
        Ok(server) => (Some(server), None),
        Err(err) => (None, Some(err)),
    };
    let versions = Versions { client: Client { version: CLIENT_VERSION }, server, server_error };
    render(&versions, format)?;
    match versions.server_error {
        Some(err) => Err(anyhow::anyhow!(
            "server {} unreachable or unable to say its version: {err}",
            config.endpoint
        )),
        None => Ok(()),
    }
}
