//! cloud-init for VMs: the `cloudInit` field of a definition becomes a NoCloud seed image
//! (`STORAGE/seeds/<VM id>.iso`, volume id `cidata`) that the VM's QEMU gets as an extra,
//! read-only, non-bootable CD-ROM after its own drives.
//!
//! Invariants:
//! - a stored definition's cloud-init documents are text of at most
//!   [`MAX_CLOUD_INIT_DOCUMENT`] bytes each, its user-data starts with a header cloud-init acts
//!   on, and its machine is q35 (microvm has no CD-ROM drive: 409);
//! - the meta-data the guest reads always names an `instance-id` (the VM's id when the user's
//!   names none) and a `local-hostname` (the VM's name, when it is a DNS label and the user's
//!   names none);
//! - a seed is rebuilt at a start only when the documents it would hold changed: the SHA-256
//!   of the last built documents is kept in `DATA_DIR/vms/ID/seed.sha256`, written after the
//!   image is renamed into place, so a crash in between only costs a rebuild;
//! - a VM's seed is deleted with the VM.

use std::path::PathBuf;

use sha2::{Digest as _, Sha256};
use viv_api::vms::{CloudInit, MachineType, VmDefinition, MAX_CLOUD_INIT_DOCUMENT};
use viv_storage::{SeedDocuments, SeedError};

use super::Manager;
use crate::error::ApiError;

/// Checks a definition's cloud-init data (see the module invariants).
pub(super) fn check_cloud_init(def: &VmDefinition) -> Result<(), ApiError> {
    let Some(ci) = &def.cloud_init else {
        return Ok(());
    };
    if def.machine == MachineType::Microvm {
        return Err(ApiError::Conflict(
            "machine microvm conflicts with cloudInit: the seed is a CD-ROM drive and microvm has none; use machine q35"
                .into(),
        ));
    }
    for (what, doc) in [
        ("userData", Some(&ci.user_data)),
        ("metaData", ci.meta_data.as_ref()),
        ("networkConfig", ci.network_config.as_ref()),
    ] {
        let len = doc.map_or(0, String::len);
        if len > MAX_CLOUD_INIT_DOCUMENT {
            return Err(ApiError::BadRequest(format!(
                "cloudInit.{what} is {len} bytes; at most {MAX_CLOUD_INIT_DOCUMENT} are accepted"
            )));
        }
    }
    // The id and name added to the meta-data are checked with the VM; these stand in for them.
    documents("vm-x", "x", ci)
        .check()
        .map_err(|e| ApiError::BadRequest(format!("cloudInit: {e}")))
}

/// The documents of VM `id` named `name`'s seed.
fn documents(id: &str, name: &str, ci: &CloudInit) -> SeedDocuments {
    SeedDocuments {
        user_data: ci.user_data.clone(),
        meta_data: meta_data(id, name, ci.meta_data.as_deref().unwrap_or_default()),
        network_config: ci.network_config.clone(),
    }
}

/// The user's meta-data with `instance-id` and `local-hostname` added when it has no such
/// top-level key. A flow mapping (`{...}`) is taken as it is.
fn meta_data(id: &str, name: &str, given: &str) -> String {
    if given.trim_start().starts_with('{') {
        return given.to_owned();
    }
    let has = |key: &str| {
        given.lines().any(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
    };
    let mut out = String::new();
    if !has("instance-id") {
        out.push_str(&format!("instance-id: {id}\n"));
    }
    let dns_label = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !has("local-hostname") && dns_label {
        out.push_str(&format!("local-hostname: {name}\n"));
    }
    out.push_str(given);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn seed_error(vm: &str, e: SeedError) -> ApiError {
    super::storage::api(e.kind(), format!("cloud-init seed of VM '{vm}': {e}"))
}

impl Manager {
    /// The seed image VM `id` named `name` starts with, built when its documents changed;
    /// none without cloud-init data.
    pub(super) async fn cloud_init_seed(
        &self,
        id: &str,
        name: &str,
        def: &VmDefinition,
    ) -> Result<Option<PathBuf>, ApiError> {
        let Some(ci) = &def.cloud_init else {
            return Ok(None);
        };
        let docs = documents(id, name, ci);
        let mut hash = Sha256::new();
        for doc in [&docs.user_data, &docs.meta_data] {
            hash.update((doc.len() as u64).to_le_bytes());
            hash.update(doc);
        }
        if let Some(network) = &docs.network_config {
            hash.update([1]);
            hash.update(network);
        }
        let digest = hex::encode(hash.finalize());
        let stamp = self.vm_dir(id).join("seed.sha256");
        let path = self.storage.seed_path(id).map_err(|e| seed_error(name, e))?;
        if path.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == digest) {
            return Ok(Some(path));
        }
        let _ = std::fs::remove_file(&stamp);
        let path = self
            .storage
            .create_seed_documents(id, &docs)
            .await
            .map_err(|e| seed_error(name, e))?;
        std::fs::write(&stamp, &digest).map_err(|e| ApiError::Internal(format!("writing {}: {e}", stamp.display())))?;
        tracing::info!(vm = %id, name = %name, "cloud-init seed built");
        Ok(Some(path))
    }

    /// Deletes VM `id`'s seed, if it has one.
    pub(super) fn remove_cloud_init_seed(&self, id: &str) {
        match self.storage.delete_seed(id) {
            Ok(()) | Err(SeedError::NotFound(_)) => {}
            Err(e) => tracing::warn!(vm = %id, error = %e, "deleting a cloud-init seed failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_data_gets_an_instance_id_and_a_host_name() {
        assert_eq!(meta_data("vm-1", "web", ""), "instance-id: vm-1\nlocal-hostname: web\n");
        assert_eq!(
            meta_data("vm-1", "web", "instance-id: mine\nlocal-hostname: db"),
            "instance-id: mine\nlocal-hostname: db\n"
        );
        assert_eq!(
            meta_data("vm-1", "web_1", "local-hostname : db\n"),
            "instance-id: vm-1\nlocal-hostname : db\n"
        );
        assert_eq!(meta_data("vm-1", "web_1", ""), "instance-id: vm-1\n");
        assert_eq!(
            meta_data("vm-1", "web", "{\"instance-id\": \"a\"}"),
            "{\"instance-id\": \"a\"}"
        );
    }

    #[test]
    fn cloud_init_is_checked() {
        let mut def = VmDefinition {
            cloud_init: Some(CloudInit {
                user_data: "#cloud-config\nhostname: a\n".into(),
                ..CloudInit::default()
            }),
            ..VmDefinition::default()
        };
        assert!(check_cloud_init(&def).is_ok());
        def.cloud_init.as_mut().unwrap().user_data = "hostname: a".into();
        assert!(matches!(check_cloud_init(&def), Err(ApiError::BadRequest(_))));
        def.cloud_init.as_mut().unwrap().user_data = format!("#!/bin/sh\n{}", "x".repeat(MAX_CLOUD_INIT_DOCUMENT));
        assert!(matches!(check_cloud_init(&def), Err(ApiError::BadRequest(m)) if m.contains("userData")));
        def.cloud_init.as_mut().unwrap().user_data = "#!/bin/sh\n".into();
        def.cloud_init.as_mut().unwrap().network_config = Some("version: 2\n\u{1b}[0m".into());
        assert!(matches!(check_cloud_init(&def), Err(ApiError::BadRequest(_))));
        def.cloud_init.as_mut().unwrap().network_config = None;
        def.machine = MachineType::Microvm;
        assert!(matches!(check_cloud_init(&def), Err(ApiError::Conflict(m)) if m.contains("microvm")));
    }
}
