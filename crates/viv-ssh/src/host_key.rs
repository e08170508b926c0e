//! The gateway's host key: an Ed25519 key kept in `DATA_DIR/ssh/host_ed25519_key` (OpenSSH
//! format), generated on first start, so clients see the same host key across restarts.
//!
//! Invariants: the file is created 0600 under a temporary name and linked into place without
//! replacing anything (two starts racing keep one key); a key file that others may read or
//! write is refused, as OpenSSH refuses one, rather than used or silently fixed.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey};

use crate::GatewayError;

/// Where the host key lives under a data directory.
pub fn host_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ssh").join("host_ed25519_key")
}

/// Loads the host key from `path`, creating it (and its directory, 0700) when it is missing.
pub fn load_or_create(path: &Path) -> Result<PrivateKey, GatewayError> {
    let io = |what: &str, err: std::io::Error| GatewayError::HostKey(format!("{what} {}: {err}", path.display()));
    if !path.exists() {
        create(path)?;
    }
    let meta = std::fs::metadata(path).map_err(|e| io("reading", e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(GatewayError::HostKey(format!(
            "{} is accessible by others (mode {mode:o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let text = std::fs::read(path).map_err(|e| io("reading", e))?;
    let key = PrivateKey::from_openssh(&text)
        .map_err(|e| GatewayError::HostKey(format!("{} is not an OpenSSH private key: {e}", path.display())))?;
    if key.is_encrypted() {
        return Err(GatewayError::HostKey(format!(
            "{} is encrypted; the gateway needs a key without a passphrase",
            path.display()
        )));
    }
    tracing::info!(
        path = %path.display(),
        fingerprint = %key.fingerprint(HashAlg::Sha256),
        "SSH host key"
    );
    Ok(key)
}

fn create(path: &Path) -> Result<(), GatewayError> {
    let io =
        |what: &str, p: &Path, err: std::io::Error| GatewayError::HostKey(format!("{what} {}: {err}", p.display()));
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io("securing", dir, e))?;
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let pair = Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::new(KeypairData::from(pair), "vivarium host key")
        .map_err(|e| GatewayError::HostKey(format!("making a host key: {e}")))?;
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| GatewayError::HostKey(format!("encoding the host key: {e}")))?;
    let temp = dir.join(format!(".host_ed25519_key.{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        // A hard link never replaces an existing file: a concurrent start's key wins.
        match std::fs::hard_link(&temp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    })();
    let _ = std::fs::remove_file(&temp);
    written.map_err(|e| io("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = host_key_path(dir.path());
        let first = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create(&path).unwrap();
        assert_eq!(first.public_key(), again.public_key());
        // Nothing else is left in the directory.
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = load_or_create(&path).unwrap_err().to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
    }
}
