//! End-to-end tests: real `viv serve` processes booting real VMs (TCG unless `VIV_ACCEL` says
//! otherwise), exercised through the REST API and the CLI only.

mod fixture;

mod api;
mod cli;
mod cluster;
mod cluster_roles;
mod contract;
mod data_path;
mod faults;
mod isolation;
mod jail;
mod leaks;
mod memory_diff;
mod network;
mod parked;
mod pool;
mod pool_demand;
mod restarts;
mod shell;
mod snapshots;
mod ssh;
mod state_postgres;
mod storage;
mod template_versions;
mod templates;
mod vm_backup;
mod vm_boot;
mod vm_bridge;
mod vm_cloudinit;
mod vm_console;
mod vm_hotplug;
mod vm_lifecycle;
mod vm_metrics;
mod vm_migrate;
mod vm_ova;
mod vm_switches;
mod vms;
