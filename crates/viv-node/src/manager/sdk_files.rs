//! The files of the SDK's builds: one-use upload links and uploads of each `COPY` step's
//! archive (stored by the SDK's content hash under `template-files/<template>/`), their unpacking
//! and matching into a build's context, and the images `from_image` pulls.
//!
//! Invariants: an upload is taken only with the token of a link an authenticated call handed
//! out, for the template and hash it was given for; it is written under a temporary name and
//! renamed, so a file reported present is complete; archives are unpacked only inside the
//! build's context (the `tar` crate refuses entries that leave it) and matched without following
//! symlinks; a pulled image is imported once per manifest digest and its download removed.

use std::path::{Path, PathBuf};

use serde::Serialize;
use viv_template::ImageConfig;

use super::builds::{valid_template_name, BuildLog};
use super::sdk_spec::{self, StartBuild};
use super::Manager;
use crate::error::ApiError;

/// The largest upload of a `COPY` step's files.
const MAX_FILES_BYTES: usize = 1 << 30;
/// Upload links kept until used.
const MAX_UPLOAD_LINKS: usize = 4096;
/// `GET /templates/{id}/files/{hash}` answer: where to upload, and whether it is needed.
#[derive(Debug, Serialize)]
pub struct FileUpload {
    present: bool,
    url: String,
}
impl Manager {
    pub(super) fn files_dir(&self, template: &str) -> PathBuf {
        self.config.data_dir.join("template-files").join(template)
    }

    /// `GET /templates/{id}/files/{hash}`: an upload link for the files of a `COPY` step, and
    /// whether they are here already. `base_url` is how the client reaches this server.
    pub fn sdk_file_upload(&self, template: &str, hash: &str, base_url: &str) -> Result<FileUpload, ApiError> {
        if !valid_template_name(template) {
            return Err(ApiError::NotFound(format!("template '{template}' not found")));
        }
        if !valid_hash(hash) {
            return Err(ApiError::BadRequest(format!(
                "'{hash}' is not a files hash (64 hex digits of SHA-256)"
            )));
        }
        let hash = hash.to_ascii_lowercase();
        let present = self.files_dir(template).join(&hash).is_file();
        let token = super::random_id(32);
        {
            let mut uploads = self.sdk_builds.uploads.lock().expect("uploads lock");
            // Links never used do not pile up: past the bound, an arbitrary old one goes.
            if uploads.len() >= MAX_UPLOAD_LINKS {
                if let Some(stale) = uploads.keys().next().cloned() {
                    uploads.remove(&stale);
                }
            }
            uploads.insert(token.clone(), (template.to_owned(), hash.clone()));
        }
        Ok(FileUpload {
            present,
            url: format!("{base_url}/template-files/{template}/{hash}?token={token}"),
        })
    }

    /// `PUT /template-files/{template}/{hash}?token=`: stores the uploaded archive.
    pub async fn sdk_store_file(
        &self,
        template: &str,
        hash: &str,
        token: &str,
        body: axum::body::Body,
    ) -> Result<(), ApiError> {
        let known = self
            .sdk_builds
            .uploads
            .lock()
            .expect("uploads lock")
            .get(token)
            .cloned();
        if known.as_ref().map(|(t, h)| (t.as_str(), h.as_str())) != Some((template, hash)) {
            return Err(ApiError::Forbidden(
                "this upload link is not valid; ask for one with GET /templates/{id}/files/{hash}".into(),
            ));
        }
        let dir = self.files_dir(template);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
        let partial = dir.join(format!(".{hash}.{}", super::random_id(8)));
        let written = write_body(&partial, body).await;
        if let Err(err) = written {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(err);
        }
        tokio::fs::rename(&partial, dir.join(hash))
            .await
            .map_err(|e| ApiError::Internal(format!("storing the upload: {e}")))?;
        self.sdk_builds.uploads.lock().expect("uploads lock").remove(token);
        Ok(())
    }

    /// Pulls `reference` (through the mirrors) and imports it as an image template, unless an
    /// image of the same manifest is here already; returns its name and configuration.
    pub(super) async fn sdk_pull(
        &self,
        reference: &viv_oci::Reference,
        credentials: Option<viv_oci::Credentials>,
        log: &BuildLog,
    ) -> Result<(String, ImageConfig), ApiError> {
        log.info(&format!("pulling {reference}"));
        let work = self.config.data_dir.join("oci").join(super::random_id(12));
        let puller = viv_oci::Puller::new(
            self.config.registry_mirrors.clone(),
            self.config.registry_ca_certificates.as_deref(),
        )
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        let pulled = puller.pull(reference, credentials.as_ref(), &work.join("blobs")).await;
        let result = async {
            let pulled = pulled.map_err(|e| match e {
                viv_oci::OciError::Unauthorized(m) => ApiError::BadRequest(m),
                other => ApiError::BadRequest(other.to_string()),
            })?;
            let name = format!("oci-{}", &pulled.digest.trim_start_matches("sha256:")[..24]);
            log.info(&format!(
                "pulled {reference} ({}) from {}",
                pulled.digest, pulled.source
            ));
            if self.images.find_named(&name).is_err() {
                log.info(&format!(
                    "unpacking {} layers into a root file system",
                    pulled.layers.len()
                ));
                let (images, layers, tree, image) = (
                    self.images.clone(),
                    pulled.layers.clone(),
                    work.join("root"),
                    name.clone(),
                );
                tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
                    viv_oci::unpack_layers(&layers, &tree).map_err(|e| ApiError::BadRequest(e.to_string()))?;
                    images
                        .import_dir(&image, &tree, &viv_image::LogProgress)
                        .map(drop)
                        .map_err(|e| ApiError::Internal(format!("importing the image: {e}")))
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))??;
            }
            let config = ImageConfig {
                env: pulled.config.env,
                workdir: pulled.config.workdir,
                user: pulled.config.user,
            };
            Ok((name, config))
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&work).await;
        result
    }
}

fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `fromImageRegistry` as credentials (only the generic registry kind).
pub(super) fn registry_credentials(start: &StartBuild) -> Result<Option<viv_oci::Credentials>, ApiError> {
    let Some(registry) = &start.from_image_registry else {
        return Ok(None);
    };
    match (registry.kind.as_str(), &registry.username, &registry.password) {
        ("registry", Some(username), Some(password)) => Ok(Some(viv_oci::Credentials {
            username: username.clone(),
            password: password.clone(),
        })),
        ("registry", _, _) => Err(ApiError::BadRequest(
            "fromImageRegistry of type registry needs username and password".into(),
        )),
        (other, _, _) => Err(ApiError::BadRequest(format!(
            "fromImageRegistry of type '{other}' is not supported (AWS and GCP registries need their \
             cloud's credentials exchange); use type registry with a user name and password or token"
        ))),
    }
}

async fn write_body(path: &Path, body: axum::body::Body) -> Result<(), ApiError> {
    use futures::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| ApiError::Internal(format!("creating {}: {e}", path.display())))?;
    let mut stream = body.into_data_stream();
    let mut size = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the upload: {e}")))?;
        size += chunk.len();
        if size > MAX_FILES_BYTES {
            return Err(ApiError::TooLarge(format!(
                "the files are larger than {} MiB",
                MAX_FILES_BYTES >> 20
            )));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::Internal(format!("writing the upload: {e}")))?;
    }
    file.sync_all()
        .await
        .map_err(|e| ApiError::Internal(format!("writing the upload: {e}")))
}

/// Unpacks each `COPY` step's archive into `<dir>/<n>/` and matches its pattern there; returns
/// each step's sources (relative to `dir`), entries that match the pattern but not those only
/// under a matching directory.
pub(super) fn unpack_copies(
    files: &Path,
    dir: &Path,
    copies: &[sdk_spec::CopyFiles],
) -> Result<Vec<Vec<String>>, ApiError> {
    let mut all = Vec::new();
    for (n, copy) in copies.iter().enumerate() {
        let line = n + 1;
        let archive = files.join(copy.files_hash.to_ascii_lowercase());
        let bytes = std::fs::read(&archive).map_err(|_| {
            ApiError::BadRequest(format!(
                "COPY {}: its files (hash {}) were not uploaded; upload them first",
                copy.pattern, copy.files_hash
            ))
        })?;
        let target = dir.join(n.to_string());
        std::fs::create_dir_all(&target).map_err(|e| ApiError::Internal(format!("creating the context: {e}")))?;
        let unpacked = if bytes.starts_with(&[0x1f, 0x8b]) {
            unpack(flate2::read::GzDecoder::new(bytes.as_slice()), &target)
        } else {
            unpack(bytes.as_slice(), &target)
        };
        unpacked.map_err(|e| {
            ApiError::BadRequest(format!(
                "COPY {}: the uploaded files are not a usable tar archive: {e}",
                copy.pattern
            ))
        })?;
        let mut entries = Vec::new();
        walk(&target, "", &mut entries);
        let mut sources: Vec<String> = entries
            .iter()
            .filter(|(path, _)| sdk_spec::glob_match(&copy.pattern, path))
            .map(|(path, _)| path.clone())
            .collect();
        // Nothing under a match is a source of its own.
        let matched = sources.clone();
        sources.retain(|s| !matched.iter().any(|m| s.starts_with(&format!("{m}/"))));
        if sources.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "COPY {} (step {line} of the copies): no uploaded file matches",
                copy.pattern
            )));
        }
        if let Some(mode) = copy.mode {
            use std::os::unix::fs::PermissionsExt as _;
            for (path, is_link) in &entries {
                let under = sources.iter().any(|s| path == s || path.starts_with(&format!("{s}/")));
                if under && !is_link {
                    let _ = std::fs::set_permissions(target.join(path), std::fs::Permissions::from_mode(mode));
                }
            }
        }
        all.push(sources.into_iter().map(|s| format!("{n}/{s}")).collect());
    }
    Ok(all)
}

fn unpack(reader: impl std::io::Read, target: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    // `unpack` refuses entries that would land outside `target`.
    archive.unpack(target)
}

/// Every entry under `dir` (not following symlinks), as paths relative to it, with whether it
/// is a symlink.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, bool)>) {
    let Ok(read) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = read.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let kind = entry.file_type();
        let is_link = kind.as_ref().is_ok_and(|k| k.is_symlink());
        let is_dir = kind.as_ref().is_ok_and(|k| k.is_dir());
        out.push((path.clone(), is_link));
        if is_dir {
            walk(&entry.path(), &path, out);
        }
    }
}
