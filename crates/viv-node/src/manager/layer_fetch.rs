//! Template layers fetched from the other nodes of the cluster: a node asked to start a
//! template it has no layers of (it was built on another node) gets them, by layer key, from a
//! node that has them, over the node API (`GET /internal/layers/{key}`, authenticated by the
//! cluster's secret), then builds its own snapshot of the template as on first use.
//!
//! Invariants:
//! - a layer appears in `layers/` only complete: it is written under a dot name, checked (its
//!   length, a qcow2 header), its parent named by this node's path, sealed, then renamed;
//! - a layer's parent is fetched too when this node lacks it, down to the base image, which
//!   must be on this node already (a root file system in the image cache: the same content on
//!   every node of one version);
//! - fetches are serialized, so two creates of one template fetch it once.

use std::path::{Path, PathBuf};

use viv_api::nodes::NodeState;

use super::Manager;
use crate::error::ApiError;

/// The header carrying the cluster's secret on node-to-node requests.
pub const CLUSTER_SECRET_HEADER: &str = "x-viv-cluster-secret";

/// What a node needs to talk to the others.
#[derive(Clone)]
pub struct ClusterLink {
    /// This node's id.
    pub node_id: String,
    /// The cluster's secret.
    pub secret: String,
}

impl std::fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the secret.
        f.debug_struct("ClusterLink")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Whether a layer's parent is another layer (named beside it, or in a `layers/` directory),
/// not a base image.
fn is_layer(parent: &Path) -> bool {
    parent.extension().is_some_and(|e| e == "qcow2")
        && (parent.is_relative() || parent.parent().and_then(Path::file_name).is_some_and(|d| d == "layers"))
}

/// Whether `key` can be a layer key (and so a file name).
pub fn valid_layer_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 128 && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Manager {
    /// Joins this node to its cluster: it may fetch from the other nodes from now on.
    pub fn link_cluster(&self, link: ClusterLink) {
        let _ = self.cluster_link.set(link);
    }

    /// The cluster's secret, once this node joined its cluster.
    pub fn cluster_secret(&self) -> Option<&str> {
        self.cluster_link.get().map(|link| link.secret.as_str())
    }

    /// The file of layer `key`, when this node has it.
    pub fn layer_file(&self, key: &str) -> Option<PathBuf> {
        let path = self.layer_path(key);
        (valid_layer_key(key) && path.is_file()).then_some(path)
    }

    /// Makes `layer` (a layer of template `template` this node lacks) and its missing parents
    /// present, from the nodes that have them; the error says why none could give them. With no
    /// other node to ask, it does nothing (the start then says the layer is missing).
    pub(super) async fn fetch_template_layers(&self, template: &str, layer: &Path) -> Result<(), ApiError> {
        let Some(link) = self.cluster_link.get() else {
            return Ok(());
        };
        let Some(key) = layer
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|k| valid_layer_key(k))
        else {
            return Ok(());
        };
        let mut peers: Vec<_> = self
            .store
            .nodes()?
            .into_iter()
            .filter(|n| n.id != link.node_id && n.state != NodeState::Down)
            .collect();
        // Nodes that report the template first.
        peers.sort_by_key(|n| !n.capacity.templates.iter().any(|t| t == template));
        if peers.is_empty() {
            return Ok(());
        }
        let _one_at_a_time = self.layer_fetches.lock().await;
        let client = peer_client()?;
        let mut queue = vec![key];
        while let Some(key) = queue.pop() {
            let target = self.layer_path(&key);
            if target.is_file() {
                continue;
            }
            let mut failures = Vec::new();
            let mut fetched = None;
            for peer in &peers {
                match self.fetch_layer(&client, link, peer, &key, &target).await {
                    Ok(parent) => {
                        tracing::info!(template, layer = %key, node = %peer.name, "layer fetched from another node");
                        fetched = Some(parent);
                        break;
                    }
                    Err(err) => failures.push(format!("{}: {err}", peer.name)),
                }
            }
            let Some(parent) = fetched else {
                return Err(ApiError::Unavailable(format!(
                    "template '{template}' was built on another node and its layer {key} could not be fetched: {}",
                    failures.join("; ")
                )));
            };
            queue.extend(parent);
        }
        Ok(())
    }

    /// Fetches layer `key` from node `peer` into `target`; returns the key of its parent
    /// layer, if it has one (a base image outside `layers/` must be here already).
    async fn fetch_layer(
        &self,
        client: &reqwest::Client,
        link: &ClusterLink,
        peer: &crate::store::NodeRow,
        key: &str,
        target: &Path,
    ) -> Result<Option<String>, String> {
        let dir = target.parent().ok_or("a layer path without a directory")?;
        tokio::fs::create_dir_all(dir).await.map_err(|e| e.to_string())?;
        let staged = dir.join(format!(".{key}.fetching"));
        let result = async {
            let parent = self.fetch_staged(client, link, peer, key, &staged).await?;
            tokio::fs::rename(&staged, target)
                .await
                .map_err(|e| format!("placing {}: {e}", target.display()))?;
            Ok(parent)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&staged).await;
        }
        result
    }

    async fn fetch_staged(
        &self,
        client: &reqwest::Client,
        link: &ClusterLink,
        peer: &crate::store::NodeRow,
        key: &str,
        staged: &Path,
    ) -> Result<Option<String>, String> {
        download(client, link, &peer.internal_url(&format!("layers/{key}")), staged).await?;
        let parent = self.adopt_backing(staged)?;
        super::snapshots::seal(staged).map_err(|e| e.to_string())?;
        Ok(parent)
    }

    /// Names, in the header of `image` (a qcow2 file fetched from another node), this node's
    /// copy of its parent: a layer of `layers/` (returns its key: it may still have to be
    /// fetched) or a base image, which must be here already.
    pub(super) fn adopt_backing(&self, image: &Path) -> Result<Option<String>, String> {
        let header = viv_vmm::qcow2::header(image).map_err(|e| format!("not a qcow2 image: {e}"))?;
        match header.backing_file.map(PathBuf::from) {
            None => Ok(None),
            Some(backing) if is_layer(&backing) => {
                let parent_key = backing
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .filter(|k| valid_layer_key(k))
                    .ok_or_else(|| format!("its parent {} is not a layer", backing.display()))?;
                super::layer_cache::rename_parent(image, &self.layer_path(&parent_key)).map_err(|e| e.to_string())?;
                Ok(Some(parent_key))
            }
            Some(base) if base.is_file() => Ok(None),
            Some(base) => Err(format!("its base image {} is not on this node", base.display())),
        }
    }
}

/// An HTTP client for requests to the other nodes.
pub(super) fn peer_client() -> Result<reqwest::Client, ApiError> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| ApiError::Internal(format!("an HTTP client: {e}")))
}

/// A successful answer to `GET url` (a node API address, with the cluster's `secret`), or why
/// there is none.
pub(super) async fn get_from_node(
    client: &reqwest::Client,
    secret: &str,
    url: &str,
) -> Result<reqwest::Response, String> {
    let response = client
        .get(url)
        .header(CLUSTER_SECRET_HEADER, secret)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        let status = response.status();
        return Err(format!("{status} {}", response.text().await.unwrap_or_default()));
    }
    Ok(response)
}

/// Downloads `url` (a node API address) into the new file `staged`, synced, checked against the
/// length the node announced. Returns the answer's headers.
pub(super) async fn download(
    client: &reqwest::Client,
    link: &ClusterLink,
    url: &str,
    staged: &Path,
) -> Result<reqwest::header::HeaderMap, String> {
    use tokio::io::AsyncWriteExt as _;
    let mut response = get_from_node(client, &link.secret, url).await?;
    let headers = response.headers().clone();
    let expected = response.content_length();
    let mut file = tokio::fs::File::create(staged).await.map_err(|e| e.to_string())?;
    let mut written: u64 = 0;
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        file.write_all(&chunk).await.map_err(|e| e.to_string())?;
        written += chunk.len() as u64;
    }
    file.sync_all().await.map_err(|e| e.to_string())?;
    if expected.is_some_and(|n| n != written) {
        return Err(format!(
            "the file ended after {written} of {} bytes",
            expected.unwrap_or(0)
        ));
    }
    Ok(headers)
}
