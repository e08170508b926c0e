//! Facts about the host's memory that change how fast guests get theirs.
//!
//! A host that is itself a VM may hand freed memory back to its own hypervisor (virtio-balloon
//! *free page reporting*): free blocks of `2^order` pages are reported a couple of seconds
//! after they are freed, and the next process to touch them waits while that hypervisor backs
//! them again. A restore, resume or fork loads its whole saved memory into fresh pages, so on
//! such a host it pays for every page; measured here (TCG, 100 MB of state), a load took 50–75
//! ms when the freed memory had not yet been reported and 400–470 ms when it had.
//!
//! Invariants: detection only reads sysfs and never fails (a missing or unreadable file means
//! "not detected"); nothing here changes a host setting.

use std::path::Path;

/// The virtio device id of a memory balloon.
const BALLOON_DEVICE: &str = "0x0005";
/// `VIRTIO_BALLOON_F_REPORTING`: the balloon reports free pages to the hypervisor.
const FEATURE_REPORTING: usize = 5;
/// The largest buddy order on x86-64 (4 MiB blocks): an order above it reports nothing.
const MAX_ORDER: u32 = 10;

/// Free page reporting as the host's kernel does it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreePageReporting {
    /// Blocks of `2^order` pages are reported.
    pub order: u32,
}

impl FreePageReporting {
    /// The size of a reported block in bytes.
    pub fn block_bytes(&self) -> u64 {
        4096u64 << self.order
    }

    /// What an operator reads in the server's log.
    pub fn advice(&self) -> String {
        format!(
            "this host returns free memory to its own hypervisor (virtio-balloon free page \
             reporting, blocks of {} KiB): the memory a restore, resume or fork loads into is \
             backed again by that hypervisor first, which made such loads 6-8x slower on our \
             test host. Writing {MAX_ORDER} to \
             /sys/module/page_reporting/parameters/page_reporting_order reports only \
             {} KiB blocks",
            self.block_bytes() / 1024,
            FreePageReporting { order: MAX_ORDER }.block_bytes() / 1024,
        )
    }
}

/// Whether this host reports free pages, read from sysfs under `root` (`/` in production).
pub fn free_page_reporting(root: &Path) -> Option<FreePageReporting> {
    let devices = std::fs::read_dir(root.join("sys/bus/virtio/devices")).ok()?;
    let reporting = devices.flatten().any(|device| {
        let path = device.path();
        let id = std::fs::read_to_string(path.join("device")).unwrap_or_default();
        let features = std::fs::read_to_string(path.join("features")).unwrap_or_default();
        id.trim() == BALLOON_DEVICE && features.as_bytes().get(FEATURE_REPORTING) == Some(&b'1')
    });
    if !reporting {
        return None;
    }
    let order = std::fs::read_to_string(root.join("sys/module/page_reporting/parameters/page_reporting_order"))
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()?;
    (order <= MAX_ORDER).then_some(FreePageReporting { order })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(devices: &[(&str, &str)], order: Option<&str>) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (i, (id, features)) in devices.iter().enumerate() {
            let dir = root.path().join(format!("sys/bus/virtio/devices/virtio{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("device"), format!("{id}\n")).unwrap();
            std::fs::write(dir.join("features"), format!("{features}\n")).unwrap();
        }
        if let Some(order) = order {
            let dir = root.path().join("sys/module/page_reporting/parameters");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("page_reporting_order"), format!("{order}\n")).unwrap();
        }
        root
    }

    #[test]
    fn a_balloon_that_reports_free_pages_is_found_with_its_order() {
        let root = host(&[("0x0002", "0010001"), ("0x0005", "01100101000")], Some("9"));
        let found = free_page_reporting(root.path()).unwrap();
        assert_eq!(found, FreePageReporting { order: 9 });
        assert_eq!(found.block_bytes(), 2 << 20);
        assert!(found.advice().contains("2048 KiB"), "{}", found.advice());
    }

    #[test]
    fn no_balloon_no_reporting_feature_or_an_order_past_the_largest_is_not_reporting() {
        let cases = [
            host(&[("0x0002", "11111111")], Some("9")),
            host(&[("0x0005", "01100001000")], Some("9")),
            host(&[("0x0005", "01100101000")], Some("11")),
            host(&[("0x0005", "01100101000")], Some("nine")),
            host(&[("0x0005", "011")], Some("9")),
            host(&[], None),
        ];
        for root in &cases {
            assert_eq!(free_page_reporting(root.path()), None);
        }
        assert_eq!(free_page_reporting(Path::new("/nonexistent-root")), None);
    }
}
