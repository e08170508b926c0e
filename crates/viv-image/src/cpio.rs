//! A writer for the `newc` cpio format, which the kernel unpacks as the initramfs.

use std::io::{self, Write};

/// Writes `newc` archive entries; call [`Writer::finish`] to append the trailer.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str, mode: u32) -> io::Result<()> {
        self.entry(name, libc::S_IFDIR | mode, 2, &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, libc::S_IFREG | mode, 1, data)
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let namesize = name.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {z:08x}{z:08x}{z:08x}{z:08x}{namesize:08x}{z:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            size = data.len(),
            z = 0,
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0u8; 3][..rem])
    }

    /// Appends the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::Writer;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut w = Writer::new(Vec::new());
        w.dir("modules", 0o755).unwrap();
        w.file("init", 0o755, b"abc").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // 110-byte header + "init\0" padded to 116, then the 3 data bytes padded to 4.
        let init_at = text.find("070701").and_then(|_| text[6..].find("070701")).unwrap() + 6;
        assert_eq!(&out[init_at + 116..init_at + 119], b"abc");
    }
}
