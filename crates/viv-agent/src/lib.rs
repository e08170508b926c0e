//! The agent's modules. `main.rs` is the binary (the guest's PID 1); the fuzz targets in `fuzz/`
//! reach the request codec and the HTTP routes through [`fuzzing`].

mod build;
pub mod channel;
mod codec;
pub mod data_path;
mod deadline;
mod entry;
mod files;
pub mod init;
mod metadata;
mod metrics;
mod multipart;
mod parents;
mod process;
pub mod reaper;
pub mod server;
mod spawn;
mod sys;
mod tunnel;
mod users;
mod volume;
mod watch;

/// Entry points for the fuzz targets: the binary protobuf middleware, and what tells an upload's
/// temporary file.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::codec::protobuf;
    pub use crate::files::is_upload_temp;
}
