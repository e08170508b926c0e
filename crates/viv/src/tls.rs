//! HTTPS for sandbox host names (`https://PORT-SANDBOXID.DOMAIN`), beside the plain HTTP
//! listener and serving the same routes: `--tls-listen ADDR` with either the operator's
//! certificate (`--tls-cert`/`--tls-key`, a wildcard `*.DOMAIN` one as E2B's) or, without one, a
//! certificate for `*.DOMAIN` and `DOMAIN` issued by a CA Vivarium makes at its first start and
//! keeps in `DATA_DIR/tls/` (`ca.pem` to trust, `ca-key.pem` 0600).
//!
//! Invariants: the CA's key never leaves the data directory and is made once (a later start
//! reuses it, so a client that trusts `ca.pem` keeps trusting the server); the leaf key is new at
//! every start and lives only in memory; a client that does not finish its handshake within
//! [`HANDSHAKE`] is dropped, so it holds no task.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Longest a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(15);

/// `viv serve` options for HTTPS.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// Also serve HTTPS on this address (sandbox host names over TLS).
    #[arg(long, env = "VIV_TLS_LISTEN")]
    pub tls_listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain for `*.DOMAIN` (default: one issued by Vivarium's own CA, made at
    /// the first start in DATA_DIR/tls/ca.pem).
    #[arg(long, env = "VIV_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "VIV_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// The TLS configuration, and the CA certificate clients must trust when Vivarium made it.
pub fn server_config(args: &TlsArgs, data_dir: &Path, domain: &str) -> Result<(Arc<ServerConfig>, Option<PathBuf>)> {
    let (chain, key, ca) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let (chain, key) = load(cert, key)?;
            (chain, key, None)
        }
        _ => {
            let (chain, key, ca) = own_ca_certificate(&data_dir.join("tls"), domain)?;
            (chain, key, Some(ca))
        }
    };
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not fit together")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), ca))
}

fn load(cert: &Path, key: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate in it", cert.display());
    }
    let pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("{}: not a PEM private key", key.display()))?
        .with_context(|| format!("{}: no private key in it", key.display()))?;
    Ok((chain, key))
}

/// The CA's parameters: the same at every start, so a certificate issued by the CA made from
/// them and the stored key chains to the stored `ca.pem`.
fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Vivarium sandbox host names CA");
    name.push(DnType::OrganizationName, "Vivarium");
    params.distinguished_name = name;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2049, 12, 31);
    Ok(params)
}

/// A certificate for `*.DOMAIN` and `DOMAIN` issued by Vivarium's CA in `dir` (made if missing);
/// returns the chain, its key and the CA certificate's path.
fn own_ca_certificate(
    dir: &Path,
    domain: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let (ca_pem, key_pem) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let ca_key = if key_pem.exists() {
        let text = std::fs::read_to_string(&key_pem).with_context(|| format!("reading {}", key_pem.display()))?;
        KeyPair::from_pem(&text).with_context(|| format!("{}: not a key Vivarium made", key_pem.display()))?
    } else {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate()?;
        let ca = ca_params()?.self_signed(&key)?;
        // Written under temporary names and renamed, the key first: a start interrupted
        // half-way leaves either nothing or a key from which the CA is made again.
        let write = |path: &Path, text: &str, mode: u32| -> Result<()> {
            let temp = path.with_extension("tmp");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&temp)
                .with_context(|| format!("creating {}", temp.display()))?;
            std::io::Write::write_all(&mut file, text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temp, path).with_context(|| format!("creating {}", path.display()))
        };
        write(&key_pem, &key.serialize_pem(), 0o600)?;
        write(&ca_pem, &ca.pem(), 0o644)?;
        key
    };
    let ca = ca_params()?.self_signed(&ca_key)?;
    if !ca_pem.exists() {
        std::fs::write(&ca_pem, ca.pem()).with_context(|| format!("writing {}", ca_pem.display()))?;
    }
    let mut params = CertificateParams::new(vec![format!("*.{domain}"), domain.to_owned()])
        .with_context(|| format!("--domain {domain:?} is not a DNS name"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("*.{domain}"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2049, 12, 31);
    let leaf_key = KeyPair::generate()?;
    let leaf = params.signed_by(&leaf_key, &ca, &ca_key)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    Ok((vec![leaf.der().clone()], key, ca_pem))
}

/// Serves `app` over TLS on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, config: Arc<ServerConfig>, app: axum::Router) {
    let acceptor = TlsAcceptor::from(config);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => {
                // No Nagle, as on the plain listener (see `serve`).
                let _ = tcp.set_nodelay(true);
                tcp
            }
            Err(err) => {
                // Out of descriptors and the like: wait a moment rather than spin.
                tracing::warn!(error = %err, "accepting a TLS connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_the_ca_once_and_reuses_it() {
        let dir = std::env::temp_dir().join(format!("viv-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (chain, _, ca) = own_ca_certificate(&dir, "viv.test").unwrap();
        assert_eq!(chain.len(), 1);
        let first = std::fs::read(&ca).unwrap();
        let key_mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.join("ca-key.pem")).unwrap().permissions());
        assert_eq!(key_mode & 0o777, 0o600);
        let (_, _, again) = own_ca_certificate(&dir, "viv.test").unwrap();
        assert_eq!(std::fs::read(again).unwrap(), first, "a later start keeps the CA");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
