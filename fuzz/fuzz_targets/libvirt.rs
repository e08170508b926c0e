//! libvirt domain XML of `POST /vms/import` (`viv_storage::libvirt::parse`), hostile XML.
//! Properties: a domain read is within bounds (vCPUs, memory, disk and NIC counts), and a
//! document that parses keeps parsing to the same result when surrounding whitespace is added.
#![no_main]

use libfuzzer_sys::fuzz_target;
use viv_storage::libvirt;

fuzz_target!(|data: &[u8]| {
    let Ok(domain) = libvirt::parse(data) else { return };
    assert!(domain.vcpus >= 1 && domain.vcpus <= 1024);
    assert!(domain.memory_mib <= 16 << 20);
    assert!(domain.disks.len() <= libvirt::MAX_DOMAIN_DISKS);
    assert!(domain.nics.len() <= libvirt::MAX_DOMAIN_NICS);
    if data.len() + 2 <= libvirt::MAX_DOMAIN_SIZE && !data.starts_with(b"<?xml") {
        let mut padded = b"\n".to_vec();
        padded.extend_from_slice(data);
        padded.push(b'\n');
        assert_eq!(libvirt::parse(&padded), Ok(domain));
    }
});
