//! Public keys people register (`viv keys ssh-add`): lines of an OpenSSH `.pub` or
//! `authorized_keys` file, checked and reduced to what the store keeps.
//!
//! Accepted: Ed25519, ECDSA (P-256, P-384, P-521) and RSA of at least 2048 bits, the keys the
//! gateway can verify. Refused with a reason: private keys, certificates, `authorized_keys`
//! options (the gateway has nothing to apply them with), DSA and short RSA keys.

use russh::keys::ssh_key::public::KeyData;
use russh::keys::{Algorithm, HashAlg, PublicKey};
use viv_server::store::NewSshKey;

/// A line that is not a key the gateway accepts.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct KeyLineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// The SHA-256 fingerprint of a key as `ssh-keygen -l` prints it (`SHA256:...`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The one-line OpenSSH form of a key without its comment.
pub fn openssh_line(key: &PublicKey) -> String {
    let mut bare = key.clone();
    bare.set_comment("");
    bare.to_openssh().unwrap_or_default().trim_end().to_owned()
}

/// Whether the gateway verifies signatures of keys like this one (`None`) or why not.
pub fn unsupported(key: &PublicKey) -> Option<String> {
    match key.key_data() {
        KeyData::Ed25519(_) | KeyData::Ecdsa(_) => None,
        KeyData::Rsa(rsa) => {
            let bits = rsa.key_size();
            (bits < 2048).then(|| format!("RSA keys need at least 2048 bits; this one has {bits}"))
        }
        _ => Some(format!(
            "{} keys are not supported; use ed25519 (ssh-keygen -t ed25519), ecdsa or rsa",
            key.algorithm()
        )),
    }
}

/// Parses every key line of `text` (blank lines and `#` comments skipped).
pub fn parse_keys(text: &str) -> Result<Vec<NewSshKey>, KeyLineError> {
    if text.contains("PRIVATE KEY-----") {
        return Err(KeyLineError {
            line: 1,
            reason: "this is a private key; give the public one (the .pub file beside it)".into(),
        });
    }
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fail = |reason: String| KeyLineError { line: i + 1, reason };
        let first = line.split_whitespace().next().unwrap_or_default();
        if first.contains("-cert-v01@openssh.com") {
            return Err(fail("certificates are not supported; register the key itself".into()));
        }
        if first.parse::<Algorithm>().is_err() {
            return Err(fail(format!(
                "'{}' is not a key type; options before the key (as authorized_keys allows) are not supported",
                first.chars().take(40).collect::<String>()
            )));
        }
        let key = PublicKey::from_openssh(line).map_err(|e| fail(format!("not an OpenSSH public key: {e}")))?;
        if let Some(reason) = unsupported(&key) {
            return Err(fail(reason));
        }
        keys.push(NewSshKey {
            algorithm: key.algorithm().as_str().to_owned(),
            fingerprint: fingerprint(&key),
            public_key: openssh_line(&key),
            comment: key.comment().to_string(),
        });
    }
    if keys.is_empty() {
        return Err(KeyLineError {
            line: 1,
            reason: "no public key found (expected a line such as `ssh-ed25519 AAAA... you@host`)".into(),
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with `ssh-keygen -t ed25519 -C me@laptop` (public half only).
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPmBeFEFYDnKlCBxQWXkUvW1up0gC9sg+XhHN2BdGmtd me@laptop";

    #[test]
    fn reads_a_pub_file() {
        let keys = parse_keys(&format!("# mine\n\n{ED25519}\n")).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].algorithm, "ssh-ed25519");
        assert_eq!(keys[0].comment, "me@laptop");
        // As `ssh-keygen -l` prints it.
        assert_eq!(
            keys[0].fingerprint,
            "SHA256:fkoJHR76Eudb1CF2F0GSjYu/ED2BpCh17jBGvJ2hlPI"
        );
        assert_eq!(
            keys[0].public_key,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPmBeFEFYDnKlCBxQWXkUvW1up0gC9sg+XhHN2BdGmtd"
        );
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let err = |text: &str| parse_keys(text).unwrap_err().to_string();
        assert!(err("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n").contains("private key"));
        assert!(err(&format!("command=\"ls\" {ED25519}")).contains("options"));
        assert!(err("ssh-ed25519-cert-v01@openssh.com AAAA").contains("certificates"));
        assert!(err("ssh-ed25519 AAAAnotbase64!").contains("line 1"));
        assert!(err(&format!("{ED25519}\nssh-ed25519 garbage")).contains("line 2"));
        assert!(err("\n# nothing\n").contains("no public key"));
    }
}
