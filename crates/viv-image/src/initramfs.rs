//! The initramfs: the agent as `/init`, plus the kernel modules and their load order.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::kernel::Kernel;
use crate::store::publish;
use crate::{cpio, ImageError, ImageStore};

impl ImageStore {
    /// Returns the initramfs for `kernel` and the agent binary at `agent`, building it if no
    /// archive with the same content exists yet.
    pub fn initramfs(&self, kernel: &Kernel, agent: &Path) -> Result<PathBuf, ImageError> {
        let agent_bytes = fs::read(agent).map_err(ImageError::io(format!(
            "reading the agent binary {} (build it with scripts/build)",
            agent.display()
        )))?;
        if !agent_bytes.starts_with(b"\x7fELF") {
            return Err(ImageError::Invalid(format!(
                "{} is not an ELF executable",
                agent.display()
            )));
        }
        if has_interpreter(&agent_bytes) {
            return Err(ImageError::Invalid(format!(
                "{} is dynamically linked; the guest's /init must be static (build it with scripts/build)",
                agent.display()
            )));
        }
        let order = fs::read_to_string(kernel.modules.join("order")).map_err(ImageError::io("reading module order"))?;
        let mut modules = Vec::new();
        for name in order.lines().filter(|l| !l.is_empty()) {
            let bytes =
                fs::read(kernel.modules.join(name)).map_err(ImageError::io(format!("reading module {name}")))?;
            modules.push((name.to_owned(), bytes));
        }
        let mut hash = Sha256::new();
        hash.update(&agent_bytes);
        hash.update(order.as_bytes());
        for (name, bytes) in &modules {
            hash.update(name.as_bytes());
            hash.update(bytes);
        }
        let digest = hex::encode(&hash.finalize()[..12]);
        let dest = self.dir("initramfs").join(format!("{digest}.cpio"));
        if dest.is_file() {
            return Ok(dest);
        }
        let lock_name = format!("initramfs-{digest}");
        let _lock = self.lock(&lock_name)?;
        if dest.is_file() {
            return Ok(dest);
        }
        let temp = self.temp_path(&lock_name, "cpio");
        let file = fs::File::create(&temp).map_err(ImageError::io("creating initramfs"))?;
        let write = || -> std::io::Result<()> {
            let mut w = cpio::Writer::new(BufWriter::new(file));
            w.file("init", 0o755, &agent_bytes)?;
            w.dir("modules", 0o755)?;
            w.file("modules/order", 0o644, order.as_bytes())?;
            for (name, bytes) in &modules {
                w.file(&format!("modules/{name}"), 0o644, bytes)?;
            }
            w.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()
        };
        write().map_err(ImageError::io("writing initramfs"))?;
        publish(&temp, &dest)?;
        Ok(dest)
    }
}

/// Whether a 64-bit ELF file has a `PT_INTERP` program header, i.e. needs a dynamic loader.
fn has_interpreter(elf: &[u8]) -> bool {
    let read = |at: usize, len: usize| elf.get(at..at + len);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (read(0x20, 8), read(0x36, 2), read(0x38, 2)) else {
        return false;
    };
    let phoff = u64::from_le_bytes(phoff.try_into().expect("8 bytes")) as usize;
    let phentsize = u16::from_le_bytes(phentsize.try_into().expect("2 bytes")) as usize;
    let phnum = u16::from_le_bytes(phnum.try_into().expect("2 bytes")) as usize;
    (0..phnum).any(|i| read(phoff + i * phentsize, 4) == Some(&3u32.to_le_bytes()[..]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tells_static_from_dynamic_executables() {
        let this = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are ordinary dynamically linked executables.
        assert!(super::has_interpreter(&this));
        assert!(!super::has_interpreter(b"\x7fELF"));
    }
}
