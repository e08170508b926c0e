//! Image references as Docker reads them: `[registry/]repository[:tag][@digest]`.
//!
//! Invariant: parsing is pure; a reference without a registry host names Docker Hub
//! (`docker.io`, whose API is at `registry-1.docker.io`), and a one-part repository there is
//! under `library/`.

use crate::OciError;

/// Docker Hub's name in references.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host (and port), `docker.io` for Docker Hub.
    pub registry: String,
    /// Repository path, e.g. `library/debian`.
    pub repository: String,
    /// Tag, `latest` when neither a tag nor a digest is given.
    pub tag: Option<String>,
    /// Digest (`sha256:...`), which wins over the tag.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Self, OciError> {
        let bad = |why: &str| OciError::Reference(format!("'{text}' is not an image reference: {why}"));
        if text.is_empty() || text.len() > 512 || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("empty, too long or with spaces"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                let hex = digest
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("digests are sha256:<64 hex>"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("digests are sha256:<64 hex>"));
                }
                (rest, Some(digest.to_ascii_lowercase()))
            }
            None => (text, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => (first.to_owned(), path),
            _ => (DOCKER_HUB.to_owned(), rest),
        };
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo.to_owned(), Some(tag.to_owned())),
            _ => (path.to_owned(), None),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
                && c.chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-'))
        };
        if !repository.split('/').all(component_ok) {
            return Err(bad("repository names are lowercase letters, digits, '.', '_' and '-'"));
        }
        if let Some(tag) = &tag {
            let ok = tag.len() <= 128
                && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(bad("tags are up to 128 letters, digits, '.', '_' and '-'"));
            }
        }
        let port_ok = registry
            .rsplit_once(':')
            .is_none_or(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
        if registry.contains(['/', '@', '?', '#']) || !port_ok {
            return Err(bad("the registry is a host name with an optional port"));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the manifests endpoint for: the digest, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// Whether the registry may be reached over plain HTTP when it does not speak TLS: loopback
    /// hosts, as Docker's default insecure registries.
    pub fn plain_http(&self) -> bool {
        let host = self
            .registry
            .rsplit_once(':')
            .map_or(self.registry.as_str(), |(h, _)| h);
        host == "localhost" || host.starts_with("127.") || host == "[::1]"
    }

    /// The registry's API base URL (always HTTPS; see [`Reference::plain_fallback`]).
    pub fn base_url(&self) -> String {
        if self.registry == DOCKER_HUB {
            "https://registry-1.docker.io".to_owned()
        } else {
            format!("https://{}", self.registry)
        }
    }

    /// The plain HTTP base URL tried when [`Reference::base_url`] does not answer TLS: only
    /// for loopback registries.
    pub fn plain_fallback(&self) -> Option<String> {
        self.plain_http().then(|| format!("http://{}", self.registry))
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_reads_them() {
        let r = Reference::parse("debian").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/debian")
        );
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.base_url(), "https://registry-1.docker.io");
        let r = Reference::parse("e2bdev/base:v1").unwrap();
        assert_eq!((r.repository.as_str(), r.manifest_ref()), ("e2bdev/base", "v1"));
        let r = Reference::parse("127.0.0.1:5000/team/app:1.0").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert!(r.plain_http());
        assert_eq!(r.base_url(), "https://127.0.0.1:5000");
        assert_eq!(r.plain_fallback().as_deref(), Some("http://127.0.0.1:5000"));
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/o/app@{digest}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.manifest_ref()), (None, digest.as_str()));
        assert!(!r.plain_http());
        assert_eq!(r.plain_fallback(), None);
        assert_eq!(r.to_string(), format!("ghcr.io/o/app@{digest}"));
        for bad in ["", "UPPER", "a b", "x@sha256:12", "x:bad/tag", "host.io/", "x:-tag"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
