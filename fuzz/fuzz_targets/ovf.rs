//! OVF descriptors of uploaded OVA packages (`viv_storage::ovf::parse`), hostile XML. Properties:
//! a descriptor read is within bounds (vCPUs, memory, disk count and capacity), every disk's
//! file is a bare name inside the package, and writing what was read and reading it back gives
//! the same result (the writer escapes everything it copies).
#![no_main]

use libfuzzer_sys::fuzz_target;
use viv_storage::ovf;

fuzz_target!(|data: &[u8]| {
    let Ok(read) = ovf::parse(data) else { return };
    assert!(read.cpus >= 1 && read.cpus <= ovf::MAX_OVF_CPUS);
    assert!(read.memory_mib <= ovf::MAX_OVF_MEMORY_MIB);
    assert!(read.disks.len() <= ovf::MAX_OVF_DISKS && read.nics.len() <= ovf::MAX_OVF_NICS);
    for disk in &read.disks {
        assert!(!disk.file.contains('/') && !disk.file.starts_with('.') && !disk.file.is_empty());
        assert!(disk.capacity <= viv_storage::size::MAX_DISK_SIZE);
    }
    if read.memory_mib > 0 {
        let written = ovf::write(&read, &[]);
        let again = ovf::parse(written.as_bytes()).expect("a written descriptor parses");
        assert_eq!(again.cpus, read.cpus);
        assert_eq!(again.memory_mib, read.memory_mib);
        assert_eq!(again.disks, read.disks);
        assert_eq!(again.uefi, read.uefi);
        assert_eq!(again.name.trim(), read.name.trim());
    }
});
