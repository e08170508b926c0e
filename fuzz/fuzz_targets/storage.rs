//! VM storage parsers (`viv_storage`) of client- and image-controlled bytes. The first byte picks
//! the parser, the rest is its input:
//! - 0: disk sizes (`parse_size`, `check_disk_size`): an accepted disk size is non-zero, whole
//!   sectors and at most the maximum; its decimal and (when whole) `G`/`M` forms parse back to it;
//! - 1: `qemu-img info` JSON (`parse_info`, `check_foreign`): an image that passes the check has
//!   no backing file, no data file, no extent but itself and a possible size;
//! - 2: names (`name::check`): an accepted name is one normal path component without a leading dot;
//! - 3: qcow2 headers (`backing_name_location`): a location found is in bounds of the format;
//! - 4: `qemu-img convert -p` output (`parse_progress`): a figure is a percentage.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use viv_storage::{backing, name, qemu_img, size};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(input);
    match mode % 5 {
        0 => {
            let Ok(bytes) = size::parse_size(&text) else { return };
            assert_eq!(size::parse_size(&bytes.to_string()), Ok(bytes));
            if bytes % (1 << 30) == 0 {
                assert_eq!(size::parse_size(&format!("{}G", bytes >> 30)), Ok(bytes));
            } else if bytes % (1 << 20) == 0 {
                assert_eq!(size::parse_size(&format!("{}MiB", bytes >> 20)), Ok(bytes));
            }
            if let Ok(disk) = size::check_disk_size(bytes) {
                assert!(disk > 0 && disk % 512 == 0 && disk <= size::MAX_DISK_SIZE);
            }
        }
        1 => {
            let Ok(info) = qemu_img::parse_info(input) else { return };
            let path = Path::new("/pool/disks/.tmp-upload");
            if qemu_img::check_foreign(&info, path).is_ok() {
                assert!(info.backing_filename.is_none() && info.data_file.is_none());
                assert!(info.extents.iter().all(|e| Path::new(e) == path));
                assert!(info.virtual_size > 0 && info.virtual_size <= size::MAX_DISK_SIZE);
                assert!(qemu_img::FOREIGN_FORMATS.contains(&info.format.as_str()));
            }
        }
        2 => {
            if name::check(&text).is_ok() {
                let mut components = Path::new(text.as_ref()).components();
                assert!(matches!(components.next(), Some(Component::Normal(_))));
                assert!(components.next().is_none());
                assert!(!text.starts_with('.') && text.len() <= name::MAX_LEN);
            }
        }
        3 => {
            if let Some((offset, length)) = backing::backing_name_location(input) {
                assert!(offset != 0 && (1..=backing::MAX_BACKING_NAME).contains(&length));
            }
        }
        _ => {
            if let Some(percent) = qemu_img::parse_progress(&text) {
                assert!((0.0..=100.0).contains(&percent));
            }
        }
    }
});
