//! `fledge tls issue`: a server certificate from the control plane's CA (`<data_dir>/tls`,
//! created there if there is none yet) for a service of the operator's that the control
//! plane's clients reach, such as the Mosquitto of the production install
//! (`deploy/compose`): tasks trust it through the CA they already trust (`docs/tls.md`).

use std::path::PathBuf;

use anyhow::Context as _;

use super::UsageError;

/// Arguments of `fledge tls`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: TlsCommand,
}

#[derive(clap::Subcommand, Debug)]
enum TlsCommand {
    /// Issue (or keep, while the names are the same) a server certificate signed by the
    /// control plane's CA: OUT/server.pem, OUT/server.key (0600), OUT/ca.pem.
    Issue(IssueArgs),
}

/// Arguments of `fledge tls issue`.
#[derive(clap::Args, Debug)]
pub struct IssueArgs {
    /// The control plane's data directory (its CA is `<DIR>/tls/ca.pem`).
    #[arg(long, value_name = "DIR", default_value = "fledge-data")]
    data_dir: PathBuf,
    /// Where to write the certificate, its key and the CA.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A host name or IP address the certificate is for (repeat for more).
    #[arg(long = "name", value_name = "HOST", required = true)]
    names: Vec<String>,
    /// Give OUT and its files to this user and group (`UID:GID`), e.g. the service's user in
    /// its container (Mosquitto's is 1883:1883).
    #[arg(long, value_name = "UID:GID")]
    owner: Option<String>,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let TlsCommand::Issue(args) = args.command;
    let owner = args.owner.as_deref().map(parse_owner).transpose()?;
    let ca_dir = args.data_dir.join("tls");
    let issued = fledge_tls::issue_dir(&ca_dir, &args.out, &args.names, "Fledge-issued service")
        .map_err(|err| match err {
            fledge_tls::Error::Name { .. } => anyhow::Error::new(UsageError(err.to_string())),
            err => anyhow::Error::new(err).context(format!(
                "cannot issue a certificate into {} from the CA in {}",
                args.out.display(),
                ca_dir.display()
            )),
        })?;
    if let Some((uid, gid)) = owner {
        for name in ["", "ca.pem", "server.pem", "server.key", "server.names"] {
            let path = if name.is_empty() { args.out.clone() } else { args.out.join(name) };
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to {uid}:{gid}", path.display()))?;
        }
    }
    #[allow(clippy::print_stdout)]
    {
        let what = if issued { "issued" } else { "kept" };
        println!("{what} {} for {}", args.out.join("server.pem").display(), args.names.join(", "));
    }
    Ok(())
}

/// `UID:GID`, numeric.
fn parse_owner(text: &str) -> anyhow::Result<(u32, u32)> {
    let bad = || UsageError(format!("--owner {text:?}: expected UID:GID, two numbers"));
    let (uid, gid) = text.split_once(':').ok_or_else(bad)?;
    Ok((uid.trim().parse().map_err(|_| bad())?, gid.trim().parse().map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_two_numbers() {
        assert_eq!(parse_owner("1883:1883").expect("valid"), (1883, 1883));
        for bad in ["1883", "a:b", "1:", ":1", "1:2:3"] {
            let err = parse_owner(bad).expect_err(bad);
            assert!(err.to_string().contains("UID:GID"), "{err}");
        }
    }
}
