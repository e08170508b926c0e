//! Messages of the `filesystem.Filesystem` service: inspect and change the guest's files.

use serde::{Deserialize, Serialize};

/// The service's path prefix.
pub const SERVICE: &str = "/filesystem.Filesystem";

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    /// Anything that is neither a regular file nor a directory.
    #[serde(rename = "FILE_TYPE_UNSPECIFIED")]
    Unspecified,
    /// A regular file.
    #[serde(rename = "FILE_TYPE_FILE")]
    File,
    /// A directory.
    #[serde(rename = "FILE_TYPE_DIRECTORY")]
    Directory,
    /// A symbolic link whose target does not exist.
    #[serde(rename = "FILE_TYPE_SYMLINK")]
    Symlink,
}

/// Facts about one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    /// The base name.
    pub name: String,
    /// Its kind (a symlink reports the kind of its target).
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// The absolute path.
    pub path: String,
    /// Size in bytes, as a decimal string (protobuf JSON writes int64 that way).
    #[serde(with = "int64_string")]
    pub size: i64,
    /// The mode bits (permissions and file type).
    pub mode: u32,
    /// Permissions as `ls -l` shows them, such as `-rw-r--r--`.
    pub permissions: String,
    /// The owning user's name.
    pub owner: String,
    /// The owning group's name.
    pub group: String,
    /// Last modification time, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub modified_time: Option<String>,
    /// Where a symlink points.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub symlink_target: Option<String>,
    /// User metadata: the file's `user.e2b.*` extended attributes, without that prefix.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty", default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Whether the path itself is a symbolic link.
    #[serde(default)]
    pub is_symlink: bool,
}

/// A request naming one path (`Stat`, `MakeDir`, `Remove`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PathRequest {
    /// The path; relative paths are taken from the user's home.
    pub path: String,
}

/// A response carrying one entry (`Stat`, `MakeDir`, `Move`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryResponse {
    /// The entry.
    pub entry: EntryInfo,
}

/// `Move`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MoveRequest {
    /// What to move.
    pub source: String,
    /// Where to.
    pub destination: String,
}

/// `ListDir`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListDirRequest {
    /// The directory.
    pub path: String,
    /// How many levels to descend; 0 and 1 both mean the directory's own entries.
    pub depth: u32,
}

/// `ListDir` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListDirResponse {
    /// The entries, sorted by path.
    pub entries: Vec<EntryInfo>,
}

/// (De)serializes an `i64` as protobuf JSON does, as a string, accepting numbers too.
mod int64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&value.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            Number(i64),
        }
        match Either::deserialize(d)? {
            Either::Text(text) => text.parse().map_err(serde::de::Error::custom),
            Either::Number(n) => Ok(n),
        }
    }
}

/// What happened to a watched entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    /// Created (or moved in).
    #[serde(rename = "EVENT_TYPE_CREATE")]
    Create,
    /// Written to.
    #[serde(rename = "EVENT_TYPE_WRITE")]
    Write,
    /// Removed.
    #[serde(rename = "EVENT_TYPE_REMOVE")]
    Remove,
    /// Renamed (or moved out; the new name gets a create event).
    #[serde(rename = "EVENT_TYPE_RENAME")]
    Rename,
    /// Its permissions or other metadata changed.
    #[serde(rename = "EVENT_TYPE_CHMOD")]
    Chmod,
}

/// One change in a watched directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesystemEvent {
    /// The path relative to the watched directory.
    pub name: String,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// The entry as it is after the event, when the watch asked for it and it still exists.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entry: Option<Box<EntryInfo>>,
}

/// `WatchDir` and `CreateWatcher`: watch a directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WatchRequest {
    /// The directory.
    pub path: String,
    /// Also watch its subdirectories (and those created later).
    pub recursive: bool,
    /// Attach the entry's description to each event (envd 0.6.3).
    pub include_entry: bool,
    /// Allow watching a directory on a network file system (envd 0.6.4).
    pub allow_network_mounts: bool,
}

/// A watcher's id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WatcherId {
    /// The id `CreateWatcher` returned.
    pub watcher_id: String,
}

/// `GetWatcherEvents`: the events since the previous call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatcherEvents {
    /// Events, oldest first.
    pub events: Vec<FilesystemEvent>,
}

/// One message of a `WatchDir` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WatchDirResponse {
    /// The watch is in place.
    Start(crate::process::Empty),
    /// A change.
    Filesystem(FilesystemEvent),
    /// Sent when nothing happened for a while.
    Keepalive(crate::process::Empty),
}
