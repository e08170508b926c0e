//! End-to-end tests: real `viv serve` processes booting real VMs (TCG unless `VIV_ACCEL` says
//! otherwise), exercised through the REST API and the CLI only.

mod fixture;

mod api;
mod cli;
mod data_path;
mod faults;
mod isolation;
mod network;
mod pool;
mod snapshots;
mod templates;
