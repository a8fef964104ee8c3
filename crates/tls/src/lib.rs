//! The control plane's TLS in one place: the CA that `fledge standalone` and `fledge serve`
//! create on first start, the server identity its listeners present, the trust its clients
//! place in exactly that CA, and the CA's SHA-256 fingerprint that joins carry.
//!
//! - [`ensure_dir`] creates (first start) or reuses (later starts) `ca.pem`/`ca.key` and a
//!   server certificate `server.pem`/`server.key` for a set of host names and IP addresses,
//!   signed by that CA; keys are written with mode 0600.
//! - [`ServerIdentity`] is a certificate chain and its key (generated, or the operator's own
//!   `--tls-cert/--tls-key`), turned into a rustls [`ServerConfig`].
//! - [`Ca`] is a set of trust anchors read from PEM; [`Ca::client_config`] trusts those and
//!   nothing else (never the system roots).
//! - [`Fingerprint`] (`sha256:<64 hex digits>`) authenticates a CA fetched over a connection
//!   not yet trusted, as `kubeadm join` does.
//!
//! Only rustls with the `ring` provider: no OpenSSL, no aws-lc. This crate knows nothing of
//! HTTP, gRPC or the services; it does not rotate certificates by itself (see `docs/tls.md`).

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};

/// The CA certificate in a TLS directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key in a TLS directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// The server certificate in a TLS directory (signed by the CA).
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The server's private key in a TLS directory (mode 0600).
pub const SERVER_KEY_FILE: &str = "server.key";
/// The names the server certificate was issued for, one a line (to re-issue when they change).
pub const SERVER_NAMES_FILE: &str = "server.names";

/// Largest PEM file read (certificates and keys are a few KiB).
const MAX_PEM_BYTES: u64 = 1024 * 1024;
/// The CA's subject; also how a reloaded CA is named as the issuer of new server certificates.
const CA_COMMON_NAME: &str = "Fledge control-plane CA";

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read, written or created.
    #[error("cannot access {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM input is malformed or holds the wrong kind of object.
    #[error("{what}: {reason}")]
    Pem {
        /// Where it came from (a path, or what the text is).
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// Generating a key or certificate failed.
    #[error("cannot generate {what}")]
    Generate {
        /// The key or certificate.
        what: &'static str,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// A host name cannot go into a certificate.
    #[error("{name:?} cannot be a certificate name: {reason}")]
    Name {
        /// The name given.
        name: String,
        /// Why.
        reason: String,
    },
    /// rustls refused a certificate, key or setting.
    #[error("{what}")]
    Rustls {
        /// What was being built.
        what: String,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// A fingerprint is not `sha256:` followed by 64 hex digits.
    #[error("invalid CA fingerprint {value:?}: {reason} (expected sha256:<64 hex digits>)")]
    BadFingerprint {
        /// The text given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A CA does not have the fingerprint it was expected to have.
    #[error(
        "CA fingerprint mismatch: expected {expected}, the server's CA has {actual}; \
         check the fingerprint, or you may be talking to another server"
    )]
    FingerprintMismatch {
        /// The fingerprint given.
        expected: Fingerprint,
        /// The fingerprint of the CA received.
        actual: Fingerprint,
    },
}

/// Result of this crate's calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The crypto provider every Fledge TLS config uses: rustls's `ring`.
// rustls 0.23.48 deprecates the ring provider for lacking post-quantum key exchange; the
// project builds without cmake/aws-lc, so ring stays until its successor is pure Rust too.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config (ring provider) that trusts the system's roots, through the
/// platform's verifier: for a server whose certificate comes from a public CA, when no CA of
/// its own was given.
pub fn system_client_config() -> Result<ClientConfig> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    let rustls = |what: &str| {
        let what = what.to_owned();
        move |source| Error::Rustls { what, source }
    };
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls("cannot build the TLS client config"))?
        .with_platform_verifier()
        .map_err(rustls("cannot load the system's trust store"))?
        .with_no_client_auth())
}

/// Installs the `ring` provider as the process default (for libraries that build their
/// configs with `ServerConfig::builder()`); a no-op when one is already installed.
#[allow(deprecated)] // see `provider`
pub fn install_default_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The SHA-256 of a CA certificate's DER, written `sha256:<64 lowercase hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = Error;

    /// Parses `sha256:<hex>`; hex digits may be upper case and separated by `:`.
    fn from_str(value: &str) -> Result<Self> {
        let bad = |reason| Error::BadFingerprint { value: value.to_owned(), reason };
        if value.len() > 200 {
            return Err(bad("too long"));
        }
        let trimmed = value.trim();
        let hex_part = trimmed
            .strip_prefix("sha256:")
            .or_else(|| trimmed.strip_prefix("SHA256:"))
            .ok_or_else(|| bad("it does not start with sha256:"))?;
        let digits: String = hex_part.chars().filter(|c| *c != ':').collect();
        if digits.len() != 64 {
            return Err(bad("it does not have 64 hex digits"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(digits.to_ascii_lowercase(), &mut out)
            .map_err(|_| bad("it holds a character that is not a hex digit"))?;
        Ok(Self(out))
    }
}

/// Trust anchors: one or more CA certificates read from PEM.
///
/// Holding several lets clients trust an old and a new CA during a rotation; the
/// [`Ca::fingerprint`] is the first one's.
#[derive(Clone, PartialEq, Eq)]
pub struct Ca {
    pem: String,
    certs: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("fingerprint", &self.fingerprint()).finish()
    }
}

impl Ca {
    /// Parses PEM text holding at least one `CERTIFICATE` block; `what` names its source in
    /// errors.
    pub fn from_pem(pem: &str, what: &str) -> Result<Self> {
        let certs = parse_certs(pem.as_bytes(), what)?;
        // Every anchor must be one rustls accepts, so a bad file fails here, not at connect.
        let mut roots = RootCertStore::empty();
        for cert in &certs {
            roots.add(cert.clone()).map_err(|source| Error::Rustls {
                what: format!("{what}: a certificate is not a usable CA"),
                source,
            })?;
        }
        Ok(Self { pem: pem.to_owned(), certs })
    }

    /// Reads a PEM file of CA certificates.
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_pem_file(path)?;
        Self::from_pem(&text, &path.display().to_string())
    }

    /// The PEM text, as given.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The fingerprint of the first certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(self.certs[0].as_ref())
    }

    /// Succeeds when [`Ca::fingerprint`] is `expected`, else names both.
    pub fn verify_fingerprint(&self, expected: &Fingerprint) -> Result<()> {
        let actual = self.fingerprint();
        if &actual == expected {
            Ok(())
        } else {
            Err(Error::FingerprintMismatch { expected: *expected, actual })
        }
    }

    /// A rustls client config that trusts these certificates and nothing else.
    pub fn client_config(&self) -> Result<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in &self.certs {
            roots.add(cert.clone()).map_err(|source| Error::Rustls {
                what: "a CA certificate is not a usable trust anchor".to_owned(),
                source,
            })?;
        }
        Ok(ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| Error::Rustls {
                what: "cannot build the TLS client config".to_owned(),
                source,
            })?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }
}

/// A server's certificate chain (leaf first) and private key, both PEM.
#[derive(Clone)]
pub struct ServerIdentity {
    cert_pem: String,
    key_pem: String,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity").field("key", &"<redacted>").finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// Reads and checks a certificate chain file and its key file (the operator's own, or
    /// those [`ensure_dir`] wrote).
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let cert_pem = read_pem_file(cert)?;
        let key_pem = read_pem_file(key)?;
        let identity = Self { cert_pem, key_pem };
        // Parse now, so a wrong file is named at startup.
        identity.server_config_named(Vec::new(), &cert.display().to_string())?;
        Ok(identity)
    }

    /// The certificate chain, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A rustls server config presenting this identity, offering `alpn` protocols.
    pub fn server_config(&self, alpn: Vec<Vec<u8>>) -> Result<Arc<ServerConfig>> {
        self.server_config_named(alpn, "the server certificate")
    }

    fn server_config_named(&self, alpn: Vec<Vec<u8>>, what: &str) -> Result<Arc<ServerConfig>> {
        let chain = parse_certs(self.cert_pem.as_bytes(), what)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|err| {
            Error::Pem { what: format!("the key of {what}"), reason: err.to_string() }
        })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| Error::Rustls {
                what: "cannot build the TLS server config".to_owned(),
                source,
            })?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|source| Error::Rustls {
                what: format!("{what} and its key do not make a usable identity"),
                source,
            })?;
        config.alpn_protocols = alpn;
        Ok(Arc::new(config))
    }
}

/// What [`ensure_dir`] found or made.
#[derive(Debug)]
pub struct Generated {
    /// The CA (to give clients).
    pub ca: Ca,
    /// The server identity signed by it.
    pub identity: ServerIdentity,
    /// `<dir>/ca.pem`.
    pub ca_path: PathBuf,
    /// Whether the CA was created now (first start).
    pub created_ca: bool,
    /// Whether the server certificate was issued now (first start, or its names changed).
    pub issued_server: bool,
}

/// Makes sure `dir` holds a CA and a server certificate for `names` (host names or IP
/// addresses), signed by that CA.
///
/// The CA is created once and then reused, so clients keep trusting it. The server
/// certificate is reused while it was issued for exactly these names, and re-issued from the
/// same CA otherwise. Keys are written with mode 0600 and the directory with 0700.
pub fn ensure_dir(dir: &Path, names: &[String]) -> Result<Generated> {
    let names = clean_names(names)?;
    let created_ca = ensure_ca(dir)?;
    let ca_path = dir.join(CA_CERT_FILE);
    let ca = Ca::load(&ca_path)?;
    let issued_server = issue_into(dir, dir, &names, "Fledge control plane", created_ca)?;
    let identity = ServerIdentity::load(&dir.join(SERVER_CERT_FILE), &dir.join(SERVER_KEY_FILE))?;
    Ok(Generated { ca, identity, ca_path, created_ca, issued_server })
}

/// Makes sure `out` holds a server certificate for `names` signed by the CA of `ca_dir` (the
/// control plane's `<data_dir>/tls`, whose CA is created if there is none yet), for a service
/// of the operator's that clients reach with the control plane's CA, such as a Mosquitto:
/// `out/server.pem`, `out/server.key` (0600), `out/server.names` and a copy of the CA as
/// `out/ca.pem`. Like [`ensure_dir`], the certificate is reused while the names are the same.
/// Returns whether it was issued now.
pub fn issue_dir(ca_dir: &Path, out: &Path, names: &[String], common_name: &str) -> Result<bool> {
    let names = clean_names(names)?;
    if names.is_empty() {
        return Err(Error::Name {
            name: String::new(),
            reason: "give at least one host name or IP address".to_owned(),
        });
    }
    let created_ca = ensure_ca(ca_dir)?;
    create_private_dir(out)?;
    let ca_pem = read_pem_file(&ca_dir.join(CA_CERT_FILE))?;
    let out_ca = out.join(CA_CERT_FILE);
    // A certificate issued under another CA (the CA was replaced) is re-issued too.
    let other_ca = fs::read_to_string(&out_ca).ok().as_deref() != Some(ca_pem.as_str());
    let issued = issue_into(ca_dir, out, &names, common_name, created_ca || other_ca)?;
    if other_ca {
        write_file(&out_ca, ca_pem.as_bytes(), 0o644)?;
    }
    Ok(issued)
}

/// The names trimmed, checked, sorted and without duplicates.
fn clean_names(names: &[String]) -> Result<Vec<String>> {
    let mut names: Vec<String> = names.iter().map(|n| n.trim().to_owned()).collect();
    names.retain(|n| !n.is_empty());
    names.sort();
    names.dedup();
    for name in &names {
        check_name(name)?;
    }
    Ok(names)
}

/// Creates the CA in `dir` unless it is there; returns whether it was created now.
fn ensure_ca(dir: &Path) -> Result<bool> {
    create_private_dir(dir)?;
    let ca_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let created_ca = !ca_path.exists() || !ca_key_path.exists();
    if created_ca {
        let key = rcgen::KeyPair::generate()
            .map_err(|source| Error::Generate { what: "the CA key", source })?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|source| Error::Generate { what: "the CA certificate", source })?;
        // Key first: a CA certificate without its key would be unusable on the next start.
        write_file(&ca_key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&ca_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), "created the control-plane CA");
    }
    Ok(created_ca)
}

/// Issues into `out` a server certificate for `names` from the CA of `ca_dir`, unless one for
/// exactly these names is there and not `stale`; returns whether it issued one.
fn issue_into(
    ca_dir: &Path,
    out: &Path,
    names: &[String],
    common_name: &str,
    stale: bool,
) -> Result<bool> {
    let cert_path = out.join(SERVER_CERT_FILE);
    let key_path = out.join(SERVER_KEY_FILE);
    let names_path = out.join(SERVER_NAMES_FILE);
    let wanted_names = names.join("\n");
    let current_names = fs::read_to_string(&names_path).ok();
    let reuse = !stale
        && cert_path.exists()
        && key_path.exists()
        && current_names.as_deref().map(str::trim) == Some(wanted_names.as_str());
    if reuse {
        return Ok(false);
    }
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_key_pem = read_pem_file(&ca_key_path)?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).map_err(|err| Error::Pem {
        what: ca_key_path.display().to_string(),
        reason: err.to_string(),
    })?;
    let issuer = rcgen::Issuer::new(ca_params(), ca_key);
    let (key, cert) = issue_server_certificate(names.to_vec(), common_name, &issuer)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_file(&names_path, wanted_names.as_bytes(), 0o644)?;
    tracing::info!(
        names = wanted_names.replace('\n', ","),
        dir = %out.display(),
        "issued a server certificate"
    );
    Ok(true)
}

/// A one-off identity for a listener that no operator configures (a p2p end): a fresh CA and
/// a server certificate for `name` signed by it, in memory only.
///
/// The CA's key is dropped once the certificate is signed, so nothing can issue another
/// certificate under that CA: a client that trusts exactly the returned [`Ca`] (learnt over an
/// authenticated channel, such as the metaserver) reaches exactly this listener.
pub fn ephemeral(name: &str) -> Result<(Ca, ServerIdentity)> {
    check_name(name)?;
    let ca_key = rcgen::KeyPair::generate()
        .map_err(|source| Error::Generate { what: "a one-off CA key", source })?;
    let mut ca = ca_params();
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("Fledge one-off CA for {name}"));
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|source| Error::Generate { what: "a one-off CA certificate", source })?;
    let ca_pem = ca_cert.pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let (key, cert) = issue_server_certificate(vec![name.to_owned()], name, &issuer)?;
    drop(issuer);
    let ca = Ca::from_pem(&ca_pem, "a one-off CA")?;
    Ok((ca, ServerIdentity { cert_pem: cert.pem(), key_pem: key.serialize_pem() }))
}

/// A new key and a server certificate for `names` (host names or IP addresses) signed by
/// `issuer`, valid from a year ago for five years.
fn issue_server_certificate<S: rcgen::SigningKey>(
    names: Vec<String>,
    common_name: &str,
    issuer: &rcgen::Issuer<'_, S>,
) -> Result<(rcgen::KeyPair, rcgen::Certificate)> {
    let key = rcgen::KeyPair::generate()
        .map_err(|source| Error::Generate { what: "a server key", source })?;
    let mut params = rcgen::CertificateParams::new(names)
        .map_err(|source| Error::Generate { what: "a server certificate", source })?;
    params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 5, 1, 1);
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|source| Error::Generate { what: "a server certificate", source })?;
    Ok((key, cert))
}

/// The CA's parameters: the same on every start, so a reloaded CA key signs as the same issuer.
fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, CA_COMMON_NAME);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 20, 1, 1);
    params
}

fn this_year() -> i32 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Mean Gregorian year; only used to put validity bounds a year or more away from now.
    1970 + i32::try_from(secs / 31_556_952).unwrap_or(0)
}

fn check_name(name: &str) -> Result<()> {
    let bad = |reason: &str| Error::Name { name: name.to_owned(), reason: reason.to_owned() };
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if name.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*')) {
        return Err(bad("a host name holds only letters, digits, '-' and '.'"));
    }
    Ok(())
}

fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|err| Error::Pem { what: what.to_owned(), reason: err.to_string() })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            what: what.to_owned(),
            reason: "holds no PEM CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

fn read_pem_file(path: &Path) -> Result<String> {
    let io = |source| Error::Io { path: path.to_owned(), source };
    let len = fs::metadata(path).map_err(io)?.len();
    if len > MAX_PEM_BYTES {
        return Err(Error::Pem {
            what: path.display().to_string(),
            reason: format!("{len} bytes is more than a PEM file of {MAX_PEM_BYTES} bytes"),
        });
    }
    fs::read_to_string(path).map_err(io)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let io = |source| Error::Io { path: dir.to_owned(), source };
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io)
}

/// Writes `bytes` to `path` durably (`fledge_durable`: a crash leaves the old file or the new
/// one, never half of one), with `mode` on Unix.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    fledge_durable::write_with(path, Some(mode), |out| out.write_all(bytes))
        .map_err(|source| Error::Io { path: path.to_owned(), source })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    }

    #[test]
    fn the_ca_is_made_once_and_the_server_cert_follows_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dir(dir.path(), &names()).unwrap();
        assert!(first.created_ca && first.issued_server);
        #[cfg(unix)]
        for (file, mode) in [(CA_KEY_FILE, 0o600), (SERVER_KEY_FILE, 0o600)] {
            use std::os::unix::fs::PermissionsExt as _;
            let meta = fs::metadata(dir.path().join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }
        let again = ensure_dir(dir.path(), &names()).unwrap();
        assert!(!again.created_ca && !again.issued_server);
        assert_eq!(again.ca.fingerprint(), first.ca.fingerprint());
        assert_eq!(again.identity.cert_pem(), first.identity.cert_pem());

        let mut more = names();
        more.push("fledge.example".into());
        let reissued = ensure_dir(dir.path(), &more).unwrap();
        assert!(!reissued.created_ca && reissued.issued_server);
        assert_eq!(reissued.ca.fingerprint(), first.ca.fingerprint());
        assert_ne!(reissued.identity.cert_pem(), first.identity.cert_pem());
        reissued.identity.server_config(vec![b"h2".to_vec()]).unwrap();
        reissued.ca.client_config().unwrap();
    }

    /// Runs a TLS handshake in memory between a client trusting `ca` (for `name`) and a server
    /// presenting `identity`; the client's error, if any.
    fn handshake(ca: &Ca, name: &str, identity: &ServerIdentity) -> Option<rustls::Error> {
        let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut client =
            rustls::ClientConnection::new(Arc::new(ca.client_config().unwrap()), server_name)
                .unwrap();
        let mut server =
            rustls::ServerConnection::new(identity.server_config(Vec::new()).unwrap()).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut &wire[..]).unwrap();
            if server.process_new_packets().is_err() {
                break;
            }
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut &wire[..]).unwrap();
            if let Err(err) = client.process_new_packets() {
                return Some(err);
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return None;
            }
        }
        panic!("the handshake neither finished nor failed");
    }

    #[test]
    fn a_one_off_identity_is_trusted_through_its_own_ca_only() {
        let name = "p2p.fledge";
        let (ca, identity) = ephemeral(name).unwrap();
        let (other_ca, other) = ephemeral(name).unwrap();
        assert_ne!(ca.fingerprint(), other_ca.fingerprint());
        assert_eq!(handshake(&ca, name, &identity), None);
        assert_eq!(handshake(&other_ca, name, &other), None);
        // Another end's CA does not vouch for this end, nor for another name.
        let err = handshake(&other_ca, name, &identity).unwrap().to_string();
        assert!(err.contains("invalid peer certificate"), "{err}");
        let err = handshake(&ca, "elsewhere.fledge", &identity).unwrap().to_string();
        assert!(err.contains("invalid peer certificate"), "{err}");
        assert!(ephemeral("bad name!").unwrap_err().to_string().contains("bad name!"));
    }

    #[test]
    fn fingerprints_parse_print_and_name_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ensure_dir(dir.path(), &names()).unwrap().ca;
        let printed = ca.fingerprint().to_string();
        assert!(printed.starts_with("sha256:") && printed.len() == 7 + 64, "{printed}");
        let parsed: Fingerprint = printed.parse().unwrap();
        ca.verify_fingerprint(&parsed).unwrap();
        let upper_with_colons = format!(
            "SHA256:{}",
            hex::encode_upper(parsed.0)
                .as_bytes()
                .chunks(2)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(":")
        );
        assert_eq!(upper_with_colons.parse::<Fingerprint>().unwrap(), parsed);

        let other: Fingerprint = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let err = ca.verify_fingerprint(&other).unwrap_err().to_string();
        assert!(err.contains("mismatch") && err.contains(&printed), "{err}");

        for (bad, needle) in [
            ("md5:00", "sha256:"),
            ("sha256:abc", "64 hex digits"),
            (&format!("sha256:{}", "zz".repeat(32))[..], "not a hex digit"),
        ] {
            let err = bad.parse::<Fingerprint>().unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Ca::from_pem("not a pem", "ca.pem from the server").unwrap_err().to_string();
        assert!(err.contains("ca.pem from the server") && err.contains("no PEM"), "{err}");
        let err = ensure_dir(dir.path(), &["bad name!".to_owned()]).unwrap_err().to_string();
        assert!(err.contains("bad name!"), "{err}");
        ensure_dir(&dir.path().join("ok"), &names()).unwrap();
        // A certificate with someone else's key is refused at load, naming the certificate.
        let other = ensure_dir(&dir.path().join("other"), &names()).unwrap();
        fs::write(dir.path().join("mixed.key"), other.identity.key_pem()).unwrap();
        let err = ServerIdentity::load(
            &dir.path().join("ok").join(SERVER_CERT_FILE),
            &dir.path().join("mixed.key"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.pem"), "{err}");
    }

    #[test]
    fn issued_certificates_chain_to_the_control_planes_ca_and_follow_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("tls");
        let out = dir.path().join("mosquitto");
        let names = vec!["mosquitto".to_owned(), "10.0.0.5".to_owned()];
        // No CA yet: it is created, as the control plane's first start would.
        assert!(issue_dir(&ca_dir, &out, &names, "svc").unwrap());
        let ca = Ca::load(&ca_dir.join(CA_CERT_FILE)).unwrap();
        assert_eq!(fs::read_to_string(out.join(CA_CERT_FILE)).unwrap(), ca.pem());
        let identity =
            ServerIdentity::load(&out.join(SERVER_CERT_FILE), &out.join(SERVER_KEY_FILE)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(out.join(SERVER_KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The control plane then keeps that CA, and a client trusting it accepts the service.
        let generated = ensure_dir(&ca_dir, &["localhost".to_owned()]).unwrap();
        assert!(!generated.created_ca);
        assert_eq!(handshake(&ca, "mosquitto", &identity), None);
        assert_eq!(handshake(&ca, "10.0.0.5", &identity), None);
        // Same names: kept; other names: issued again; a new CA: issued again.
        assert!(!issue_dir(&ca_dir, &out, &names, "svc").unwrap());
        assert!(issue_dir(&ca_dir, &out, &names[..1], "svc").unwrap());
        fs::remove_file(ca_dir.join(CA_KEY_FILE)).unwrap();
        assert!(issue_dir(&ca_dir, &out, &names[..1], "svc").unwrap());
        assert_ne!(Ca::load(&out.join(CA_CERT_FILE)).unwrap().pem(), ca.pem());
        let err = issue_dir(&ca_dir, &out, &[], "svc").unwrap_err();
        assert!(err.to_string().contains("at least one"), "{err}");
    }
}
