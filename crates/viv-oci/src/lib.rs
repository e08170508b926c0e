//! Pulls images from registries that speak the distribution API v2 (Docker Hub, the Debian
//! `docker-registry`, GHCR, ...) into root file system trees.
//!
//! [`Puller::pull`] resolves a [`Reference`] (through the configured mirrors first for Docker
//! Hub images, as Docker's `registry-mirrors`), follows an image index to its linux/amd64
//! manifest, authenticates as the registry asks (anonymous or with credentials, `Basic` or a
//! `Bearer` token from the realm the registry names), downloads the config and layers, and
//! [`unpack_layers`] applies the layers in order onto a directory, whiteouts included.
//!
//! Invariants: every blob's SHA-256 is checked against its digest before it is used; layer
//! entries are unpacked only inside the target (the `tar` crate refuses `..` and paths through
//! symlinks that leave it) and whiteouts remove only paths inside it; registries are reached over
//! HTTPS (rustls with the ring provider) verified against the host's CA store plus the extra CA
//! bundle given to [`Puller::new`], never with verification off; plain HTTP is used only for
//! mirrors given with `http://` and for loopback registries whose HTTPS port does not speak TLS
//! (as Docker treats them) — a certificate that fails verification is an error, never a reason
//! to fall back.

mod reference;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use reference::Reference;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference does not parse.
    #[error("{0}")]
    Reference(String),
    /// The registry answered with an error or something unusable.
    #[error("{0}")]
    Registry(String),
    /// The registry asks for credentials that were not given or were refused.
    #[error("{0}")]
    Unauthorized(String),
    /// The puller's own configuration (the extra CA bundle) is unusable.
    #[error("{0}")]
    Config(String),
    /// The image has no manifest for this platform, or a layer format this puller lacks.
    #[error("{0}")]
    Unsupported(String),
    /// Local files.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
    let context = context.into();
    move |source| OciError::Io { context, source }
}

/// Registry credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

/// What an image's config hands down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Env`, as name → value.
    pub env: BTreeMap<String, String>,
    /// `WorkingDir`, if set.
    pub workdir: Option<String>,
    /// `User`, if set.
    pub user: Option<String>,
}

/// A pulled image: its manifest digest, config and the downloaded layer files, in order.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// `sha256:...` of the manifest the layers came from.
    pub digest: String,
    /// The config.
    pub config: ImageConfig,
    /// Layer blobs (verified), bottom first, with whether each is gzip-compressed.
    pub layers: Vec<(PathBuf, bool)>,
    /// Where the image came from (a mirror or the registry itself).
    pub source: String,
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Pulls images, through mirrors for Docker Hub's.
#[derive(Debug, Clone)]
pub struct Puller {
    client: reqwest::Client,
    mirrors: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize, Default)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<ConfigInner>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ConfigInner {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

/// One registry endpoint and the authorization it granted.
struct Session<'a> {
    client: &'a reqwest::Client,
    base: String,
    repository: String,
    credentials: Option<&'a Credentials>,
    authorization: Option<String>,
    /// The plain HTTP base tried once if the first request over `base` fails for a reason other
    /// than an untrusted certificate (a loopback registry without TLS).
    fallback: Option<String>,
}

impl Session<'_> {
    async fn get(&mut self, path: &str, accept: Option<&str>) -> Result<reqwest::Response, OciError> {
        let mut attempt = 0;
        loop {
            let url = format!("{}/v2/{}/{path}", self.base, self.repository);
            let mut request = self.client.get(&url);
            if let Some(accept) = accept {
                request = request.header("Accept", accept);
            }
            if let Some(auth) = &self.authorization {
                request = request.header("Authorization", auth);
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(err) => {
                    let fallback = self.fallback.take();
                    if let Some(plain) = fallback.filter(|_| untrusted_certificate(&err).is_none()) {
                        tracing::info!(base = %self.base, error = %describe(&err), fallback = %plain, "no TLS; trying plain HTTP");
                        self.base = plain;
                        continue;
                    }
                    return Err(send_error(&url, &err));
                }
            };
            self.fallback = None;
            if response.status() == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                attempt += 1;
                let challenge = response
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                self.authorization = Some(self.authorize(&challenge).await?);
                continue;
            }
            if response.status() == reqwest::StatusCode::UNAUTHORIZED {
                return Err(OciError::Unauthorized(format!(
                    "{} refused the credentials for {}",
                    self.base, self.repository
                )));
            }
            if !response.status().is_success() {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                return Err(OciError::Registry(format!(
                    "GET {url}: {status}: {}",
                    body.chars().take(300).collect::<String>()
                )));
            }
            return Ok(response);
        }
    }

    /// The `Authorization` header a challenge asks for.
    async fn authorize(&self, challenge: &str) -> Result<String, OciError> {
        let basic = self.credentials.map(|c| {
            use base64::Engine as _;
            let pair = format!("{}:{}", c.username, c.password);
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
        });
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return basic.ok_or_else(|| {
                OciError::Unauthorized(format!(
                    "{} needs credentials for {} (from_image's username and password)",
                    self.base, self.repository
                ))
            });
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(OciError::Unauthorized(format!(
                "{} asks for authentication '{scheme}', which is not supported",
                self.base
            )));
        }
        let params = challenge_params(params);
        let realm = params
            .get("realm")
            .ok_or_else(|| OciError::Registry(format!("{}: a Bearer challenge without a realm", self.base)))?;
        let mut request = self.client.get(realm);
        let mut query = Vec::new();
        if let Some(service) = params.get("service") {
            query.push(("service", service.clone()));
        }
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        query.push(("scope", scope));
        request = request.query(&query);
        if let Some(basic) = &basic {
            request = request.header("Authorization", basic);
        }
        let response = request
            .send()
            .await
            .map_err(|e| OciError::Registry(format!("getting a token: {}", send_error(realm, &e))))?;
        if !response.status().is_success() {
            return Err(OciError::Unauthorized(format!(
                "{realm} refused a token for {}: {}",
                self.repository,
                response.status()
            )));
        }
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let token: Token = response
            .json()
            .await
            .map_err(|e| OciError::Registry(format!("the token from {realm}: {e}")))?;
        let token = token
            .token
            .or(token.access_token)
            .ok_or_else(|| OciError::Registry(format!("{realm} answered without a token")))?;
        Ok(format!("Bearer {token}"))
    }

    /// Downloads a blob into `dir`, checking its digest.
    async fn blob(&mut self, digest: &str, dir: &Path) -> Result<PathBuf, OciError> {
        use futures::StreamExt as _;
        use std::io::Write as _;
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| OciError::Unsupported(format!("blob digest '{digest}' is not sha256")))?;
        let path = dir.join(hex);
        if path.is_file() {
            return Ok(path);
        }
        let response = self.get(&format!("blobs/{digest}"), None).await?;
        let partial = dir.join(format!("{hex}.partial"));
        let mut file = std::fs::File::create(&partial).map_err(io(format!("creating {}", partial.display())))?;
        let mut hash = Sha256::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| OciError::Registry(format!("downloading {digest}: {e}")))?;
            hash.update(&chunk);
            file.write_all(&chunk).map_err(io("writing a blob"))?;
        }
        if hex::encode(hash.finalize()) != hex.to_ascii_lowercase() {
            let _ = std::fs::remove_file(&partial);
            return Err(OciError::Registry(format!("blob {digest} arrived with another digest")));
        }
        std::fs::rename(&partial, &path).map_err(io("storing a blob"))?;
        Ok(path)
    }
}

/// The certificate problem behind a failed request, if verifying the peer's certificate is what
/// failed.
fn untrusted_certificate(err: &reqwest::Error) -> Option<&rustls::CertificateError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(rustls::Error::InvalidCertificate(cert)) = e.downcast_ref::<rustls::Error>() {
            return Some(cert);
        }
        // An I/O error's `source` skips the error it wraps (rustls' among them, sometimes inside
        // another I/O error), so step into it instead.
        source = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// An error and its causes, outermost first (reqwest's own message hides the cause).
fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        let cause = e.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = e.source();
    }
    text
}

/// The error for a request to `url` that got no response.
fn send_error(url: &str, err: &reqwest::Error) -> OciError {
    match untrusted_certificate(err) {
        Some(cert) => OciError::Registry(format!(
            "this server does not trust the TLS certificate of {} ({cert}); it trusts the host's \
             CA store and `viv serve --registry-ca`: give the latter the CA that signed it",
            url.split("/v2/").next().unwrap_or(url)
        )),
        None => OciError::Registry(format!("GET {url}: {}", describe(err))),
    }
}

/// `key="value"` pairs of a challenge.
fn challenge_params(text: &str) -> BTreeMap<String, String> {
    let mut params = BTreeMap::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((value, next)) => (value.to_owned(), next),
                None => (quoted.to_owned(), ""),
            }
        } else {
            match after.split_once(',') {
                Some((value, next)) => (value.trim().to_owned(), next),
                None => (after.trim().to_owned(), ""),
            }
        };
        params.insert(key, value);
        rest = next.trim_start_matches(',').trim();
    }
    params
}

impl Puller {
    /// A puller that tries `mirrors` (base URLs such as `http://10.0.0.5:5000`) first for Docker
    /// Hub images, and trusts the host's CA store plus the certificates of `extra_ca` (PEM) for
    /// HTTPS registries and mirrors.
    pub fn new(mirrors: Vec<String>, extra_ca: Option<&str>) -> Result<Self, OciError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(std::time::Duration::from_secs(15));
        if let Some(pem) = extra_ca {
            let certificates = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| OciError::Config(format!("the registry CA bundle: {e}")))?;
            if certificates.is_empty() {
                return Err(OciError::Config(
                    "the registry CA bundle holds no PEM certificate".to_owned(),
                ));
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .build()
            .map_err(|e| OciError::Config(format!("the HTTPS client: {}", describe(&e))))?;
        Ok(Self {
            client,
            mirrors: mirrors
                .into_iter()
                .map(|m| m.trim_end_matches('/').to_owned())
                .collect(),
        })
    }

    /// Resolves and downloads `reference` into `blobs` (a directory that may hold blobs of earlier
    /// pulls). Mirrors are tried in order for Docker Hub images, then the registry.
    pub async fn pull(
        &self,
        reference: &Reference,
        credentials: Option<&Credentials>,
        blobs: &Path,
    ) -> Result<Pulled, OciError> {
        std::fs::create_dir_all(blobs).map_err(io(format!("creating {}", blobs.display())))?;
        let mut bases = Vec::new();
        if reference.registry == reference::DOCKER_HUB {
            bases.extend(self.mirrors.iter().cloned());
        }
        let registry = reference.base_url();
        bases.push(registry.clone());
        let mut errors = Vec::new();
        let mut unauthorized = false;
        for base in bases {
            let mut session = Session {
                client: &self.client,
                base: base.clone(),
                repository: reference.repository.clone(),
                credentials,
                authorization: None,
                fallback: if base == registry {
                    reference.plain_fallback()
                } else {
                    None
                },
            };
            match self.pull_from(&mut session, reference, blobs).await {
                Ok(pulled) => return Ok(pulled),
                Err(OciError::Unauthorized(message)) => {
                    tracing::info!(image = %reference, source = %base, error = %message, "pull refused");
                    unauthorized = true;
                    errors.push(format!("{base}: {message}"));
                }
                Err(err) => {
                    tracing::info!(image = %reference, source = %base, error = %err, "pull failed");
                    errors.push(format!("{base}: {err}"));
                }
            }
        }
        let message = format!("cannot pull {reference}: {}", errors.join("; "));
        Err(if unauthorized {
            OciError::Unauthorized(message)
        } else {
            OciError::Registry(message)
        })
    }

    async fn pull_from(
        &self,
        session: &mut Session<'_>,
        reference: &Reference,
        blobs: &Path,
    ) -> Result<Pulled, OciError> {
        let mut target = reference.manifest_ref().to_owned();
        for _ in 0..2 {
            let response = session
                .get(&format!("manifests/{target}"), Some(MANIFEST_TYPES))
                .await?;
            let header_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned());
            let body = response
                .bytes()
                .await
                .map_err(|e| OciError::Registry(format!("reading the manifest: {e}")))?;
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
            if target.starts_with("sha256:") && target != digest {
                return Err(OciError::Registry(format!(
                    "manifest {target} arrived with digest {digest}"
                )));
            }
            let manifest: Manifest = serde_json::from_slice(&body)
                .map_err(|e| OciError::Registry(format!("the manifest of {reference} is not JSON: {e}")))?;
            let media_type = manifest.media_type.clone().or(header_type).unwrap_or_default();
            if media_type.contains("index") || media_type.contains("manifest.list") || !manifest.manifests.is_empty() {
                let chosen = manifest
                    .manifests
                    .iter()
                    .find(|m| {
                        m.platform
                            .as_ref()
                            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                    })
                    .ok_or_else(|| OciError::Unsupported(format!("{reference} has no linux/amd64 image")))?;
                target = chosen.digest.clone();
                continue;
            }
            let config = manifest.config.as_ref().ok_or_else(|| {
                OciError::Unsupported(format!("{reference}: a manifest without a config ({media_type})"))
            })?;
            let config_path = session.blob(&config.digest, blobs).await?;
            let config_blob: ConfigBlob =
                serde_json::from_slice(&std::fs::read(&config_path).map_err(io("reading the image config"))?)
                    .unwrap_or_default();
            let mut layers = Vec::new();
            for layer in &manifest.layers {
                let gzip = if layer.media_type.ends_with("gzip") {
                    true
                } else if layer.media_type.ends_with(".tar") || layer.media_type.ends_with("tar") {
                    false
                } else {
                    return Err(OciError::Unsupported(format!(
                        "{reference}: layer type '{}' is not supported (gzip or plain tar layers are)",
                        layer.media_type
                    )));
                };
                layers.push((session.blob(&layer.digest, blobs).await?, gzip));
            }
            let inner = config_blob.config.unwrap_or_default();
            let env = inner
                .env
                .unwrap_or_default()
                .iter()
                .filter_map(|pair| pair.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect();
            return Ok(Pulled {
                digest,
                config: ImageConfig {
                    env,
                    workdir: inner.working_dir.filter(|w| w.starts_with('/')),
                    user: inner.user.filter(|u| !u.is_empty()),
                },
                layers,
                source: session.base.clone(),
            });
        }
        Err(OciError::Unsupported(format!(
            "{reference}: an index that points at another index"
        )))
    }
}

/// Applies layers (bottom first) onto `root`: entries are unpacked with their owners and modes,
/// `.wh.NAME` removes `NAME` from the layers below, `.wh..wh..opq` empties its directory.
pub fn unpack_layers(layers: &[(PathBuf, bool)], root: &Path) -> Result<(), OciError> {
    std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    let root = root.canonicalize().map_err(io("resolving the root"))?;
    for (path, gzip) in layers {
        let file = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
        let reader: Box<dyn Read> = if *gzip {
            Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
        } else {
            Box::new(std::io::BufReader::new(file))
        };
        apply_layer(reader, &root).map_err(|e| match e {
            OciError::Io { context, source } => OciError::Io {
                context: format!("layer {}: {context}", path.display()),
                source,
            },
            other => other,
        })?;
    }
    Ok(())
}

fn apply_layer(reader: impl Read, root: &Path) -> Result<(), OciError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(io("reading the layer"))? {
        let mut entry = entry.map_err(io("reading the layer"))?;
        let path = entry.path().map_err(io("reading an entry's path"))?.into_owned();
        let Some(relative) = clean(&path) else {
            return Err(OciError::Unsupported(format!(
                "a layer entry '{}' leaves the root",
                path.display()
            )));
        };
        let name = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let parent = root.join(relative.parent().unwrap_or(Path::new("")));
            // The directory itself, symlinks resolved, must be inside the root.
            let Some(dir) = parent.canonicalize().ok().filter(|d| d.starts_with(root)) else {
                continue;
            };
            if hidden == ".wh..opq" {
                for child in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    remove(&child.path());
                }
            } else {
                remove(&dir.join(hidden));
            }
            continue;
        }
        // An existing entry of another kind gives way (a directory replaces a file and back).
        if let Some(existing) = inside(root, &relative) {
            if let Ok(meta) = std::fs::symlink_metadata(&existing) {
                let is_dir = entry.header().entry_type().is_dir();
                if meta.is_dir() != is_dir || meta.file_type().is_symlink() {
                    remove(&existing);
                }
            }
        }
        entry
            .unpack_in(root)
            .map_err(io(format!("unpacking {}", relative.display())))?;
    }
    Ok(())
}

/// `path` without `.`, a leading `/` or `..` (None if it has `..`).
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `root/relative` if no symlink on the way leads out of `root` (the last part may be a link).
fn inside(root: &Path, relative: &Path) -> Option<PathBuf> {
    let joined = root.join(relative);
    let parent = joined.parent()?;
    let real = parent.canonicalize().ok()?;
    real.starts_with(root).then(|| match joined.file_name() {
        Some(name) => real.join(name),
        None => real,
    })
}

fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_ca_bundle_must_hold_certificates() {
        assert!(Puller::new(vec!["http://m:5000/".into()], None).is_ok());
        for bad in [
            "",
            "not a certificate",
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        ] {
            assert!(
                matches!(Puller::new(Vec::new(), Some(bad)), Err(OciError::Config(_))),
                "{bad}"
            );
        }
    }

    fn layer(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, content) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            match content {
                Some(text) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(text.len() as u64);
                    header.set_mode(0o644);
                    builder.append_data(&mut header, name, text.as_bytes()).unwrap();
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    builder.append_data(&mut header, name, std::io::empty()).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("blobs");
        std::fs::create_dir_all(&files).unwrap();
        let bottom = layer(&[
            ("etc", None),
            ("etc/keep", Some("keep")),
            ("etc/gone", Some("gone")),
            ("opaque", None),
            ("opaque/old", Some("old")),
        ]);
        let top = layer(&[
            ("etc/.wh.gone", Some("")),
            ("etc/new", Some("new")),
            ("opaque", None),
            ("opaque/.wh..wh..opq", Some("")),
            ("opaque/fresh", Some("fresh")),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &top).unwrap();
        std::fs::write(files.join("bottom"), bottom).unwrap();
        std::fs::write(files.join("top"), gz.finish().unwrap()).unwrap();
        let root = dir.path().join("root");
        unpack_layers(&[(files.join("bottom"), false), (files.join("top"), true)], &root).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
        assert_eq!(read("etc/keep").as_deref(), Some("keep"));
        assert_eq!(read("etc/new").as_deref(), Some("new"));
        assert_eq!(read("etc/gone"), None);
        assert_eq!(read("opaque/old"), None);
        assert_eq!(read("opaque/fresh").as_deref(), Some("fresh"));
        assert!(!root.join("etc/.wh.gone").exists());
    }

    #[test]
    fn entries_and_whiteouts_stay_inside_the_root() {
        assert_eq!(clean(Path::new("/a/./b")), Some(PathBuf::from("a/b")));
        assert_eq!(clean(Path::new("a/../../b")), None);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(dir.path().join("outside"), "x").unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("link")).unwrap();
        let root = root.canonicalize().unwrap();
        // A whiteout through a symlink that leaves the root removes nothing.
        assert_eq!(inside(&root, Path::new("link/outside")), None);
        let evil = layer(&[("link/.wh.outside", Some(""))]);
        apply_layer(evil.as_slice(), &root).unwrap();
        assert!(dir.path().join("outside").exists());
    }

    #[test]
    fn challenges_parse() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
    }
}
