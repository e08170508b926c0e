//! QEMU's migration stream, read up to the end of its RAM section: what memory diff snapshots
//! need to drop unchanged pages from a saved state and to chain several states into one stream.
//!
//! A stream (QEMU's precopy format, as written to a file by `migrate`) is: the file header
//! (`QEVM`, version 3), a configuration section and possibly early device sections (kept as an
//! opaque *prefix*), the iterative `ram` section's start (its setup: total size with the
//! `MEM_SIZE` flag, the block list, `EOS`), its `PART` and `END` sections of page records, each
//! section followed by a footer (`0x7e` + section id), then the device sections (not
//! self-delimiting: kept as an opaque *tail*). A page record is a big-endian u64 holding the
//! page's offset in its block and flags; without `CONTINUE` the block's name follows (u8 length
//! + bytes; the block carries over from section to section); `ZERO` carries one fill byte (0), `PAGE` the page's 4096 bytes; `EOS` ends a section.
//!
//! Invariants: [`parse`] never panics and never reads outside its input; anything it does not
//! understand (another iterative section, compressed or XBZRLE pages, a record outside its
//! block, a zero page with a non-zero fill) is an error, never a guess. [`Writer`] emits records
//! that name their block whenever it changes and at the start of every section, so records of
//! different streams can be concatenated; records later in a stream overwrite earlier ones in
//! guest memory when QEMU loads it.

use std::io::Write;

/// The size of a guest page (x86).
pub const PAGE_SIZE: usize = 4096;

const MAGIC: u32 = 0x5145_564d;
const VERSION: u32 = 3;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FOOTER: u8 = 0x7e;
const COMMAND: u8 = 0x08;

const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAG_MULTIFD_FLUSH: u64 = 0x200;
const FLAG_MASK: u64 = (PAGE_SIZE as u64) - 1;

/// Why a stream could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// The input ended inside a structure.
    #[error("the stream ends early (at byte {0})")]
    Truncated(usize),
    /// Not a QEMU migration stream of the version QEMU writes.
    #[error("not a QEMU migration stream (bad magic or version)")]
    NotAStream,
    /// No `ram` section start was found after the header.
    #[error("no RAM section in the stream")]
    NoRam,
    /// Something the reader does not handle or that is inconsistent.
    #[error("unexpected content at byte {at}: {what}")]
    Unexpected {
        /// Where.
        at: usize,
        /// What.
        what: String,
    },
}

/// A RAM block as the stream's setup lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Its id (`mem` for the guest's memory backend).
    pub name: String,
    /// Its length in bytes.
    pub length: u64,
}

/// What a page record sets a page to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// All zeros.
    Zero,
    /// The 4096 bytes at this offset of the parsed input.
    Data(usize),
}

/// One page record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Index into [`Stream::blocks`].
    pub block: usize,
    /// The page's byte offset in its block (a multiple of [`PAGE_SIZE`]).
    pub offset: u64,
    /// Its content.
    pub content: Content,
}

/// A parsed stream: slices of the input plus the page records.
#[derive(Debug)]
pub struct Stream<'a> {
    /// Header, configuration and anything before the RAM section's start.
    pub prefix: &'a [u8],
    /// The RAM section's start, setup and footer, verbatim.
    pub setup: &'a [u8],
    /// The RAM section's id (its `PART` and `END` sections carry it).
    pub section_id: u32,
    /// Whether sections carry footers.
    pub footers: bool,
    /// The RAM blocks, in the setup's order.
    pub blocks: Vec<Block>,
    /// Every page record of the `PART` and `END` sections, in stream order.
    pub records: Vec<Record>,
    /// Commands between the RAM sections (QEMU 10 announces the switchover before the END
    /// section), verbatim, in order.
    pub commands: Vec<&'a [u8]>,
    /// The device sections after the RAM section's end, verbatim.
    pub tail: &'a [u8],
}

impl Stream<'_> {
    /// The index of block `name`.
    pub fn block(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.name == name)
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StreamError> {
        let end = self.at.checked_add(n).ok_or(StreamError::Truncated(self.at))?;
        let bytes = self.buf.get(self.at..end).ok_or(StreamError::Truncated(self.at))?;
        self.at = end;
        Ok(bytes)
    }
    fn u8(&mut self) -> Result<u8, StreamError> {
        Ok(self.take(1)?[0])
    }
    fn be32(&mut self) -> Result<u32, StreamError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn be64(&mut self) -> Result<u64, StreamError> {
        let mut v = [0u8; 8];
        v.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(v))
    }
    fn name(&mut self) -> Result<&'a [u8], StreamError> {
        let len = self.u8()? as usize;
        self.take(len)
    }
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.at).copied()
    }
    fn unexpected(&self, what: impl Into<String>) -> StreamError {
        StreamError::Unexpected {
            at: self.at,
            what: what.into(),
        }
    }
}

/// The start of the RAM section: `START`, a section id, `\x03ram`, instance 0, version 4.
fn find_ram_start(buf: &[u8]) -> Option<usize> {
    let pattern = |i: usize| -> bool {
        buf.get(i) == Some(&SECTION_START)
            && buf.get(i + 5..i + 17) == Some(&[3, b'r', b'a', b'm', 0, 0, 0, 0, 0, 0, 0, 4][..])
    };
    (8..buf.len()).find(|&i| pattern(i))
}

/// The start of a stream up to the end of its RAM section's setup.
struct Setup {
    /// Where the RAM section starts.
    start: usize,
    /// Where its setup ends.
    end: usize,
    section_id: u32,
    footers: bool,
    blocks: Vec<Block>,
}

fn parse_setup(buf: &[u8]) -> Result<Setup, StreamError> {
    let mut c = Cursor { buf, at: 0 };
    if c.be32()? != MAGIC || c.be32()? != VERSION {
        return Err(StreamError::NotAStream);
    }
    let start = find_ram_start(buf).ok_or(StreamError::NoRam)?;
    c.at = start + 1;
    let section_id = c.be32()?;
    c.take(12)?;
    let total = c.be64()?;
    if total & FLAG_MASK != FLAG_MEM_SIZE {
        return Err(c.unexpected("the RAM setup does not start with its size"));
    }
    let total = total & !FLAG_MASK;
    let mut blocks = Vec::new();
    let mut listed: u64 = 0;
    while listed < total {
        let name = String::from_utf8(c.name()?.to_vec()).map_err(|_| c.unexpected("a block name is not UTF-8"))?;
        let length = c.be64()?;
        if length == 0 || length % PAGE_SIZE as u64 != 0 {
            return Err(c.unexpected(format!("block {name} has length {length}")));
        }
        listed = listed
            .checked_add(length)
            .ok_or_else(|| c.unexpected("block sizes overflow"))?;
        blocks.push(Block { name, length });
    }
    if listed != total {
        return Err(c.unexpected("the block sizes do not add up to the RAM size"));
    }
    if c.be64()? != FLAG_EOS {
        return Err(c.unexpected("the RAM setup does not end with EOS (postcopy or ignore-shared on?)"));
    }
    let footers = c.peek() == Some(SECTION_FOOTER);
    footer(&mut c, footers, section_id)?;
    Ok(Setup {
        start,
        end: c.at,
        section_id,
        footers,
        blocks,
    })
}

/// The RAM blocks a stream's setup lists, without reading its page records (which
/// [`parse`] checks).
pub fn blocks(buf: &[u8]) -> Result<Vec<Block>, StreamError> {
    parse_setup(buf).map(|setup| setup.blocks)
}

/// Reads `buf` as a QEMU migration stream up to the end of its RAM section.
pub fn parse(buf: &[u8]) -> Result<Stream<'_>, StreamError> {
    let Setup {
        start,
        end,
        section_id,
        footers,
        blocks,
    } = parse_setup(buf)?;
    let mut c = Cursor { buf, at: end };
    let setup = &buf[start..end];
    let mut records = Vec::new();
    // QEMU's last block carries over from one section to the next (`CONTINUE` may start one).
    let mut block = None;
    let mut commands = Vec::new();
    loop {
        let kind = c.u8()?;
        if kind == COMMAND {
            // u8 type, be16 command, be16 length, the command's data.
            let start = c.at - 1;
            c.take(2)?;
            let len = c.take(2)?;
            c.take(usize::from(u16::from_be_bytes([len[0], len[1]])))?;
            commands.push(&buf[start..c.at]);
            continue;
        }
        if kind != SECTION_PART && kind != SECTION_END {
            return Err(c.unexpected(format!("section type {kind} inside the RAM section")));
        }
        if c.be32()? != section_id {
            return Err(c.unexpected("a section of another iterative device"));
        }
        read_records(&mut c, &blocks, &mut block, &mut records)?;
        footer(&mut c, footers, section_id)?;
        if kind == SECTION_END {
            break;
        }
    }
    Ok(Stream {
        prefix: &buf[..start],
        setup,
        section_id,
        footers,
        blocks,
        records,
        commands,
        tail: &buf[c.at..],
    })
}

fn footer(c: &mut Cursor<'_>, footers: bool, section_id: u32) -> Result<(), StreamError> {
    if footers && (c.u8()? != SECTION_FOOTER || c.be32()? != section_id) {
        return Err(c.unexpected("missing or wrong section footer"));
    }
    Ok(())
}

fn read_records(
    c: &mut Cursor<'_>,
    blocks: &[Block],
    block: &mut Option<usize>,
    records: &mut Vec<Record>,
) -> Result<(), StreamError> {
    loop {
        let header = c.be64()?;
        let flags = header & FLAG_MASK;
        let offset = header & !FLAG_MASK;
        if flags & FLAG_EOS != 0 {
            if flags != FLAG_EOS {
                return Err(c.unexpected(format!("EOS with flags {flags:#x}")));
            }
            return Ok(());
        }
        if flags == FLAG_MULTIFD_FLUSH {
            continue;
        }
        let kind = flags & !FLAG_CONTINUE;
        if kind != FLAG_ZERO && kind != FLAG_PAGE {
            return Err(c.unexpected(format!("page record flags {flags:#x} are not handled")));
        }
        if flags & FLAG_CONTINUE == 0 {
            let name = c.name()?;
            *block = Some(
                blocks
                    .iter()
                    .position(|b| b.name.as_bytes() == name)
                    .ok_or_else(|| c.unexpected("a record names an unknown block"))?,
            );
        }
        let index = block.ok_or_else(|| c.unexpected("CONTINUE without a previous block"))?;
        if offset >= blocks[index].length {
            return Err(c.unexpected("a page outside its block"));
        }
        let content = if kind == FLAG_ZERO {
            if c.u8()? != 0 {
                return Err(c.unexpected("a zero page with a non-zero fill"));
            }
            Content::Zero
        } else {
            let at = c.at;
            c.take(PAGE_SIZE)?;
            Content::Data(at)
        };
        records.push(Record {
            block: index,
            offset,
            content,
        });
    }
}

/// Writes a stream: a prefix and RAM setup, sections of page records, the RAM end and a tail.
pub struct Writer<W: Write> {
    out: W,
    section_id: u32,
    footers: bool,
    last_block: Option<String>,
    in_section: bool,
}

impl<W: Write> Writer<W> {
    /// Starts a stream with `stream`'s prefix and setup.
    pub fn new(mut out: W, stream: &Stream<'_>) -> std::io::Result<Self> {
        out.write_all(stream.prefix)?;
        out.write_all(stream.setup)?;
        Ok(Self {
            out,
            section_id: stream.section_id,
            footers: stream.footers,
            last_block: None,
            in_section: false,
        })
    }

    fn open(&mut self, kind: u8) -> std::io::Result<()> {
        self.out.write_all(&[kind])?;
        self.out.write_all(&self.section_id.to_be_bytes())?;
        self.last_block = None;
        self.in_section = true;
        Ok(())
    }

    fn close(&mut self) -> std::io::Result<()> {
        self.out.write_all(&FLAG_EOS.to_be_bytes())?;
        if self.footers {
            self.out.write_all(&[SECTION_FOOTER])?;
            self.out.write_all(&self.section_id.to_be_bytes())?;
        }
        self.in_section = false;
        Ok(())
    }

    /// Writes one page record of block `block`: zero, or `data` (exactly [`PAGE_SIZE`] bytes).
    pub fn page(&mut self, block: &str, offset: u64, data: Option<&[u8]>) -> std::io::Result<()> {
        if !self.in_section {
            self.open(SECTION_PART)?;
        }
        let same = self.last_block.as_deref() == Some(block);
        let mut header = offset | if data.is_some() { FLAG_PAGE } else { FLAG_ZERO };
        if same {
            header |= FLAG_CONTINUE;
        }
        self.out.write_all(&header.to_be_bytes())?;
        if !same {
            self.out.write_all(&[block.len() as u8])?;
            self.out.write_all(block.as_bytes())?;
            self.last_block = Some(block.to_owned());
        }
        match data {
            Some(data) => self.out.write_all(data),
            None => self.out.write_all(&[0]),
        }
    }

    /// Ends the current section of records (the next record starts a new one).
    pub fn end_section(&mut self) -> std::io::Result<()> {
        if self.in_section {
            self.close()?;
        }
        Ok(())
    }

    /// Writes `commands` (a stream's [`Stream::commands`]), ends the RAM section and writes
    /// `tail`; returns the output.
    pub fn finish(mut self, commands: &[&[u8]], tail: &[u8]) -> std::io::Result<W> {
        self.end_section()?;
        for command in commands {
            self.out.write_all(command)?;
        }
        self.open(SECTION_END)?;
        self.close()?;
        self.out.write_all(tail)?;
        Ok(self.out)
    }
}

/// Writes every record of `stream` (read from `buf`) through `writer`, in one section.
pub fn copy_records<W: Write>(writer: &mut Writer<W>, stream: &Stream<'_>, buf: &[u8]) -> std::io::Result<()> {
    for record in &stream.records {
        let block = &stream.blocks[record.block].name;
        let data = match record.content {
            Content::Zero => None,
            Content::Data(at) => Some(&buf[at..at + PAGE_SIZE]),
        };
        writer.page(block, record.offset, data)?;
    }
    writer.end_section()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream as QEMU writes it: header, a configuration section, RAM with two blocks.
    fn sample() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(MAGIC.to_be_bytes());
        s.extend(VERSION.to_be_bytes());
        s.extend([7, 0, 0, 0, 7]);
        s.extend(b"microvm");
        s.extend([SECTION_START, 0, 0, 0, 2, 3, b'r', b'a', b'm', 0, 0, 0, 0, 0, 0, 0, 4]);
        s.extend(((3 * PAGE_SIZE as u64) | FLAG_MEM_SIZE).to_be_bytes());
        s.extend([3, b'm', b'e', b'm']);
        s.extend((2 * PAGE_SIZE as u64).to_be_bytes());
        s.extend([3, b'r', b'o', b'm']);
        s.extend((PAGE_SIZE as u64).to_be_bytes());
        s.extend(FLAG_EOS.to_be_bytes());
        s.extend([SECTION_FOOTER, 0, 0, 0, 2]);
        s.extend([SECTION_PART, 0, 0, 0, 2]);
        s.extend(FLAG_ZERO.to_be_bytes());
        s.extend([3, b'm', b'e', b'm', 0]);
        s.extend((PAGE_SIZE as u64 | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes());
        s.extend([0xab; PAGE_SIZE]);
        s.extend(FLAG_EOS.to_be_bytes());
        s.extend([SECTION_FOOTER, 0, 0, 0, 2]);
        s.extend([COMMAND, 0, 9, 0, 0]);
        s.extend([SECTION_END, 0, 0, 0, 2]);
        s.extend(FLAG_PAGE.to_be_bytes());
        s.extend([3, b'r', b'o', b'm']);
        s.extend([0xcd; PAGE_SIZE]);
        s.extend(FLAG_EOS.to_be_bytes());
        s.extend([SECTION_FOOTER, 0, 0, 0, 2]);
        s.extend([4, 0, 0, 0, 3, 0xff]);
        s
    }

    #[test]
    fn parses_and_rewrites_a_stream() {
        let buf = sample();
        let stream = parse(&buf).unwrap();
        assert_eq!(stream.blocks.len(), 2);
        assert_eq!(stream.records.len(), 3);
        assert_eq!(stream.records[0].content, Content::Zero);
        assert_eq!(stream.records[1].offset, PAGE_SIZE as u64);
        assert_eq!(stream.tail, &[4, 0, 0, 0, 3, 0xff]);
        let mut writer = Writer::new(Vec::new(), &stream).unwrap();
        copy_records(&mut writer, &stream, &buf).unwrap();
        let out = writer.finish(&stream.commands, stream.tail).unwrap();
        let again = parse(&out).unwrap();
        assert_eq!(again.records.len(), 3);
        assert_eq!(again.tail, stream.tail);
        assert_eq!(again.commands, [&[COMMAND, 0, 9, 0, 0][..]]);
        let Content::Data(at) = again.records[2].content else {
            panic!("a page")
        };
        assert_eq!(out[at], 0xcd);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let buf = sample();
        let end = parse(&buf).unwrap().tail.as_ptr() as usize - buf.as_ptr() as usize;
        for len in 0..end {
            assert!(parse(&buf[..len]).is_err(), "a stream cut at {len} parsed");
        }
    }

    #[test]
    fn pages_outside_their_block_are_refused() {
        let mut buf = sample();
        // The ZERO record's offset (at the start of the first PART section's records).
        let at = buf.windows(9).position(|w| w == [0, 0, 0, 0, 0, 0, 0, 2, 3]).unwrap();
        buf[at..at + 8].copy_from_slice(&((8 * PAGE_SIZE as u64) | FLAG_ZERO).to_be_bytes());
        assert!(matches!(parse(&buf), Err(StreamError::Unexpected { .. })));
    }
}
