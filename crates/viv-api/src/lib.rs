//! Wire types of Vivarium's REST API.
//!
//! Sandbox lifecycle routes follow E2B's control-plane API (field names, `X-API-Key` auth,
//! `{code, message}` errors), so E2B's SDKs and Vivarium's own CLI share one shape. Vivarium adds
//! native routes to run a command with streamed output (`/sandboxes/{id}/exec`) and to move files
//! (`/sandboxes/{id}/files`). The OpenAPI document is [`OPENAPI_YAML`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod backups;
pub mod events;
pub mod nodes;
pub mod storage;
pub mod switches;
pub mod vms;
pub mod volumes;

/// The OpenAPI 3 document describing every route, with the absolute caps of VM shapes; a server
/// serves [`openapi_yaml`] with its own host's limits.
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");

/// The OpenAPI document of a server whose host runs VMs of at most `max_vcpus` vCPUs and
/// `max_memory_mib` MiB: the `maximum` of every `cpuCount` and `memoryMB` is replaced (the lines
/// marked `# host: max vCPUs` and `# host: max memory`).
pub fn openapi_yaml(max_vcpus: u32, max_memory_mib: u32) -> String {
    let mut out = String::with_capacity(OPENAPI_YAML.len());
    for line in OPENAPI_YAML.lines() {
        let limit = if line.ends_with("# host: max vCPUs") {
            Some(max_vcpus)
        } else if line.ends_with("# host: max memory") {
            Some(max_memory_mib)
        } else {
            None
        };
        match (limit, line.find("maximum: ")) {
            (Some(limit), Some(at)) => {
                let comment = &line[line.rfind('#').unwrap_or(line.len())..];
                out.push_str(&format!("{}maximum: {limit} {comment}", &line[..at]));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Header carrying the API key.
pub const API_KEY_HEADER: &str = "X-API-Key";

/// The header that names the node (name or id) an API server of a cluster sends node-local
/// work to: VM definitions, disks, ISOs, switches, template builds.
pub const NODE_HEADER: &str = "Viv-Node";

/// Template used when a create request names none.
pub const DEFAULT_TEMPLATE: &str = "base";

/// Default sandbox lifetime in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// Longest sandbox lifetime in seconds (24 hours, as E2B allows).
pub const MAX_TIMEOUT_SECS: u64 = 86_400;

/// Most vCPUs a sandbox or template may ask for (a server allows at most its host's CPUs).
pub const MAX_VCPUS: u32 = 64;

/// Least memory a sandbox or template may ask for, in MiB.
pub const MIN_MEMORY_MIB: u32 = 128;

/// Most memory a sandbox or template may ask for, in MiB (a server allows at most what its host
/// can give).
pub const MAX_MEMORY_MIB: u32 = 65_536;

/// An error response body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// The HTTP status code.
    pub code: u16,
    /// What went wrong and, where possible, what to do about it.
    pub message: String,
}

/// `POST /sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    /// The template (or image) to start from; `base` when absent.
    #[serde(rename = "templateID", default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    /// Seconds until the sandbox is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Arbitrary key/value pairs to find the sandbox by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment variables for every process in the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Require an access token for the sandbox's agent (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
    /// vCPUs (Vivarium extension; the server's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    /// Memory in MiB (Vivarium extension; the server's default when absent).
    #[serde(rename = "memoryMB", default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// Boot the kernel even when the server restores template snapshots (Vivarium extension;
    /// for comparisons and diagnosis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_boot: Option<bool>,
    /// Take an already restored, warmed VM from the server's pool when one is ready (default
    /// true; Vivarium extension, for comparisons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled: Option<bool>,
    /// Pause instead of kill when the timeout passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    /// What a pause at the timeout keeps: memory and disk (true, the default) or only the disk
    /// (false: resuming boots the saved disk afresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause_memory: Option<bool>,
    /// How many other nodes of a cluster get a copy of each pause of this sandbox, so that it
    /// resumes elsewhere when its node dies (default: the server's `--pause-replicas`; Vivarium
    /// extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_replicas: Option<u32>,
    /// Resume a paused sandbox when traffic for it arrives (E2B's `autoResume`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_or_null"
    )]
    pub auto_resume: Option<AutoResume>,
    /// Whether the sandbox may reach the internet (default true; E2B's field name).
    #[serde(
        rename = "allow_internet_access",
        alias = "allowInternetAccess",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
    /// Egress rules (E2B's `network`; needs the server's `isolated` network mode unless empty).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_or_null"
    )]
    pub network: Option<NetworkConfig>,
    /// Volumes to mount (E2B's `volumeMounts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Vec<volumes::SandboxVolumeMount>>,
}

/// E2B's `autoResume` of a create request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoResume {
    /// Whether traffic for the sandbox (an envd call or a request to one of its ports) resumes
    /// it while it is paused.
    pub enabled: bool,
}

/// A sandbox's lifecycle policy, as E2B's sandbox info shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxLifecycle {
    /// Whether traffic resumes it while it is paused.
    pub auto_resume: bool,
    /// What its timeout does: `kill` or `pause`.
    pub on_timeout: String,
}

/// `POST /sandboxes/{id}/pause`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PauseRequest {
    /// Keep the memory (true, the default: resuming continues where it stopped) or only the
    /// disk (false: resuming boots the saved disk afresh; processes are gone, files are kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
    /// With the memory kept: keep the stopped VM for the server's `--pause-keep-warm` time, so
    /// a resume within it continues the VM (true, the default), or free it now (false; a resume
    /// then restores the saved snapshot). The snapshot is saved to disk either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_warm: Option<bool>,
    /// Refuse the pause unless the sandbox's agent answers (a pause always needs it here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_healthy_guest: Option<bool>,
}

/// A nested struct that must be a JSON object or `null`: serde would also read a struct from an
/// array of its fields, which no client means.
fn object_or_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error as _;
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None => Ok(None),
        Some(value @ serde_json::Value::Object(_)) => serde_json::from_value(value).map(Some).map_err(D::Error::custom),
        Some(other) => Err(D::Error::custom(format!("expected an object or null, got {other}"))),
    }
}

/// A sandbox's egress rules, as E2B's `SandboxNetworkConfig` names them.
///
/// Entries are IPv4 addresses, CIDR blocks or domain names (`example.com`, `*.example.com`).
/// An allowed entry wins over a denied one; private, loopback, link-local (cloud metadata) and
/// other special ranges are denied unless an `allowOut` CIDR covers them; the host and other
/// sandboxes are never reachable. Domains are checked by name where a connection names its
/// host: the HTTP `Host` header on port 80, the TLS SNI on port 443, and DNS questions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// Destinations allowed even when denied otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    /// Destinations denied (`0.0.0.0/0`: everything; domains are a Vivarium extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// DNS servers reachable directly when `allowOut` names a domain (default `8.8.8.8`). The
    /// sandbox's own resolver (`10.0.2.3`) answers allowed names either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    /// `false`: requests to the sandbox's ports (other than envd's, which has its own access
    /// token) must carry `E2B-Traffic-Access-Token` with the create answer's
    /// `trafficAccessToken`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_public_traffic: Option<bool>,
    /// Accepted and ignored (host names are `PORT-ID.DOMAIN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
    /// Not supported: a SOCKS5 proxy for egress (refused when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<serde_json::Value>,
    /// Not supported: per-host request transforms (refused when not empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
}

/// `PUT /sandboxes/{id}/network`: replaces a sandbox's egress rules; omitted fields are cleared
/// (internet access on, no lists), as in E2B.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkUpdate {
    /// Destinations allowed even when denied otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    /// Destinations denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// DNS servers reachable directly when `allowOut` names a domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    /// Whether the sandbox may reach the internet (default true).
    #[serde(
        rename = "allow_internet_access",
        alias = "allowInternetAccess",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
    /// Not supported (refused when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<serde_json::Value>,
    /// Not supported (refused when not empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
}

/// `POST /sandboxes/{id}/connect` (resumes a paused sandbox) and `/resume`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectSandbox {
    /// Seconds from now until the sandbox is killed (or paused, with auto-pause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Restore the saved memory (true, the default) or boot the saved disk afresh (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForkRequest {
    /// Lifetime of each fork in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// How many forks (default 1). The source is snapshotted once; each fork restores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// One fork's outcome: exactly one of `sandbox` and `error` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForkResult {
    /// The new sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<CreatedSandbox>,
    /// Why this fork failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// `POST /sandboxes/{id}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRequest {
    /// A unique name to start sandboxes from (`templateID`) instead of the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Keep the memory (true, the default) or only the disk (false: sandboxes started from the
    /// snapshot boot its disk afresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// A snapshot node as `POST /sandboxes/{id}/snapshots` and `GET /snapshots` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    /// Its id; pass it as `templateID` to start sandboxes from it.
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// The names it can be started by (its id and its name, if given).
    pub names: Vec<String>,
    /// The node it was taken from, if any (otherwise it sits on its template).
    #[serde(rename = "parentID", default)]
    pub parent_id: Option<String>,
    /// The sandbox it was taken of.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// The template its chain starts from.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// `pause`, `fork` or `snapshot`.
    pub kind: String,
    /// Bytes on disk: its disk layer (the blocks changed since its parent) and its saved state.
    pub size_bytes: u64,
    /// How it keeps the guest's memory: `whole`, `diff` (only the pages that differ from its
    /// parent's memory; a node is saved whole and rewritten as a diff in the background when
    /// the server keeps diffs) or `none` (disk only).
    #[serde(default)]
    pub memory: String,
    /// When it was taken (RFC 3339).
    pub created_at: String,
    /// Nodes taken from it.
    #[serde(default)]
    pub children: Vec<String>,
    /// Sandboxes (running or paused) whose state descends from it.
    #[serde(default)]
    pub sandboxes: Vec<String>,
}

/// Query of `POST /templates` (the body is a tar archive of the build context) and the JSON
/// body of the same route when there is no context.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildRequest {
    /// The template's name: sandboxes start from it with `templateID` = name.
    pub name: String,
    /// The spec itself (JSON body only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<String>,
    /// Path of the spec inside the context archive (default `Dockerfile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// vCPUs of the build VM and default of the template's sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    /// Memory in MiB of the build VM and default of the template's sandboxes.
    #[serde(rename = "memoryMB", default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// Longest the build may take, in seconds (default 1800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

/// Default limit of a template build, in seconds.
pub const DEFAULT_BUILD_TIMEOUT_SECS: u64 = 1800;

/// Longest limit a template build may ask for, in seconds.
pub const MAX_BUILD_TIMEOUT_SECS: u64 = 4 * 3600;

/// One line of the NDJSON stream `POST /templates` answers with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum BuildEvent {
    /// A step begins (or is taken from the cache).
    #[serde(rename_all = "camelCase")]
    Step {
        /// 1-based step number.
        index: usize,
        /// Number of steps.
        total: usize,
        /// Line of the spec.
        line: usize,
        /// The instruction.
        instruction: String,
        /// Whether its layer came from the cache.
        cached: bool,
    },
    /// Output of a step or of the start and ready commands, or a note from the builder.
    Log {
        /// `stdout`, `stderr` or `info`.
        stream: String,
        /// The text (lossy UTF-8).
        text: String,
    },
    /// The build succeeded.
    #[serde(rename_all = "camelCase")]
    Done {
        /// The template.
        template: Box<TemplateInfo>,
        /// Wall-clock time of the build.
        build_ms: u64,
    },
    /// The build failed and everything it created was removed.
    #[serde(rename_all = "camelCase")]
    Error {
        /// What went wrong.
        message: String,
        /// The spec line of the failing step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        line: Option<usize>,
        /// The failing command's exit code.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
    },
}

/// A template sandboxes can start from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateInfo {
    /// Its id (its name).
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Names it can be started by.
    pub aliases: Vec<String>,
    /// `builtin` (`base`), `built` (from a spec) or `image` (imported root file system).
    pub kind: String,
    /// What it was built `FROM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Default vCPUs of its sandboxes.
    pub cpu_count: u32,
    /// Default memory of its sandboxes in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    /// `ready` (it can be used).
    pub build_status: String,
    /// Environment variables its sandboxes get.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// The start command (`CMD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    /// The ready command (`HEALTHCHECK CMD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_cmd: Option<String>,
    /// Number of disk layers its build steps made.
    pub layers: usize,
    /// Bytes on disk of those layers (shared layers counted for each template).
    pub size_bytes: u64,
    /// When it was built (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// How long its last build took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    /// The envd version its sandboxes speak.
    pub envd_version: String,
    /// The version this name (or tag) points at, for templates with versions.
    #[serde(default, rename = "versionID", skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// In a build's `done` event: whether the build made a new version (false: the spec's
    /// inputs matched an existing version, which the name now points at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_created: Option<bool>,
}

/// One version of a template (`GET /templates/{name}/versions`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateVersion {
    /// `NAME-<content hash>`; sandboxes can start from it.
    #[serde(rename = "versionID")]
    pub version_id: String,
    /// The template it belongs to.
    pub template: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// The tags pointing at it (`default` is the template's plain name).
    pub tags: Vec<String>,
    /// Bytes on disk of the layers it does not share with its parent.
    pub size_bytes: u64,
    /// The version the template pointed at when this one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// What it was built `FROM` (`sandbox:ID` for a commit).
    pub from: String,
    /// Number of disk layers it keeps.
    pub layers: usize,
}

/// Body of `PUT /templates/{name}/tags/{tag}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagVersion {
    /// The version the tag is to point at.
    #[serde(rename = "versionID")]
    pub version_id: String,
}

/// Body of `POST /sandboxes/{id}/commit`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitSandbox {
    /// The template the sandbox's disk becomes a new version of.
    pub template: String,
}

/// Response of `POST /sandboxes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedSandbox {
    /// The sandbox id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// The template it started from.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The node running it.
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// Version of the agent protocol.
    pub envd_version: String,
    /// Token for the sandbox's agent, when secure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    /// Domain for sandbox host names, if any.
    #[serde(default)]
    pub domain: Option<String>,
    /// With `allowPublicTraffic: false`: the `E2B-Traffic-Access-Token` its ports require.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_access_token: Option<String>,
}

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Booting or restoring.
    Starting,
    /// Running and reachable.
    Running,
    /// Saved to a snapshot node, no VM running; `connect` resumes it.
    Paused,
    /// Its VM stopped unexpectedly; see `error`.
    Failed,
}

impl SandboxState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Failed => "failed",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "starting" => Some(Self::Starting),
            "running" => Some(Self::Running),
            "paused" => Some(Self::Paused),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// A sandbox as `GET /sandboxes` and `GET /sandboxes/{id}` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxInfo {
    /// The sandbox id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// The template it started from.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The node running it.
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it will be killed (RFC 3339).
    pub end_at: String,
    /// vCPUs.
    pub cpu_count: u32,
    /// Memory in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    /// Size of the root disk in MiB.
    #[serde(rename = "diskSizeMB", default)]
    pub disk_size_mb: u64,
    /// Metadata given at creation.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Lifecycle state.
    pub state: SandboxState,
    /// Version of the agent protocol.
    pub envd_version: String,
    /// Why the sandbox failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the sandbox may reach the internet.
    #[serde(default = "default_true")]
    pub allow_internet_access: bool,
    /// Its egress rules, when it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// What its timeout does and whether traffic resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<SandboxLifecycle>,
    /// For a paused sandbox, what its pause kept: `full` (memory and disk) or `filesystem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_mode: Option<String>,
    /// Domain of its host names (`PORT-ID.DOMAIN`), as in the create answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

fn default_true() -> bool {
    true
}

/// `POST /sandboxes/{id}/exec`: run a command and stream its output as NDJSON [`ExecEvent`]s.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecRequest {
    /// Program and arguments, run directly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// A shell command, run as `/bin/bash -l -c COMMAND` (used when `argv` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (the user's home when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The user to run as (`user` when absent, if the image has it, else `root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Bytes to write to the command's stdin (base64), after which stdin is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// One line of an exec response stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExecEvent {
    /// The process started.
    Start {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Output on stdout (base64).
    Stdout {
        /// The bytes, base64.
        data: String,
    },
    /// Output on stderr (base64).
    Stderr {
        /// The bytes, base64.
        data: String,
    },
    /// The process ended.
    End {
        /// Exit code (-1 when killed by a signal).
        #[serde(rename = "exitCode")]
        exit_code: i32,
        /// `exit status N` or `signal: NAME`.
        status: String,
    },
    /// The command could not run or the stream broke.
    Error {
        /// What happened.
        message: String,
    },
}

/// An API key's public facts (the secret is shown once, at creation).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyInfo {
    /// Key id.
    pub id: String,
    /// A name for people.
    pub name: String,
    /// The first characters of the key, to recognize it.
    pub prefix: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

/// A newly created key, with its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewApiKey {
    /// Its public facts.
    #[serde(flatten)]
    pub info: ApiKeyInfo,
    /// The key itself; store it now, it cannot be shown again.
    pub key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_objects_must_be_objects() {
        let ok: NewSandbox = serde_json::from_str(r#"{"network": {"allowOut": ["1.2.3.4"]}}"#).unwrap();
        assert_eq!(ok.network.unwrap().allow_out.unwrap(), ["1.2.3.4"]);
        let null: NewSandbox = serde_json::from_str(r#"{"network": null}"#).unwrap();
        assert!(null.network.is_none());
        // serde alone reads a struct from an array of its fields.
        let err = serde_json::from_str::<NewSandbox>(r#"{"network": [null, null]}"#).unwrap_err();
        assert!(err.to_string().contains("expected an object"), "{err}");
    }

    #[test]
    fn the_served_document_states_the_hosts_limits() {
        let doc = openapi_yaml(2, 21000);
        let vcpus = doc.matches("maximum: 2 # host: max vCPUs").count();
        let memory = doc.matches("maximum: 21000 # host: max memory").count();
        // NewSandbox, TemplateBuildRequest, the query of POST /templates, SdkBuildRequest (and
        // VmDefinition for memory).
        assert_eq!((vcpus, memory), (4, 5), "{doc}");
        assert!(!doc.contains("maximum: 64 # host"));
        assert!(!doc.contains("maximum: 65536 # host"));
        assert_eq!(doc.lines().count(), OPENAPI_YAML.lines().count());
        assert_eq!(
            OPENAPI_YAML
                .matches(&format!("maximum: {MAX_VCPUS} # host: max vCPUs"))
                .count(),
            4
        );
        assert_eq!(
            OPENAPI_YAML
                .matches(&format!("maximum: {MAX_MEMORY_MIB} # host: max memory"))
                .count(),
            5
        );
    }
}
