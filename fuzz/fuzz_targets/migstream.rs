//! The reader of QEMU migration streams (`viv_vmm::migstream`) that memory diff snapshots parse
//! saved states with (a node's state file is on disk: damage or tampering must be an error).
//!
//! Checks, besides never panicking:
//! - a stream that parses is written back (prefix, setup, records, tail) into one that parses to
//!   the same blocks, the same records with the same page contents, and the same tail;
//! - every record lies inside its block and every page's bytes lie inside the input;
//! - the setup alone (`migstream::blocks`, what a restore over a base reads before QEMU starts)
//!   lists the same blocks as the whole parse, and fails whenever the setup does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use viv_vmm::migstream::{self, Content, PAGE_SIZE};

fuzz_target!(|data: &[u8]| {
    let blocks = migstream::blocks(data);
    let Ok(stream) = migstream::parse(data) else { return };
    assert_eq!(blocks.expect("a stream that parses has a setup"), stream.blocks);
    for record in &stream.records {
        assert!(record.offset < stream.blocks[record.block].length);
        if let Content::Data(at) = record.content {
            assert!(at + PAGE_SIZE <= data.len());
        }
    }
    let mut writer = migstream::Writer::new(Vec::new(), &stream).expect("writes to memory");
    migstream::copy_records(&mut writer, &stream, data).expect("writes to memory");
    let out = writer.finish(&stream.commands, stream.tail).expect("writes to memory");
    let again = migstream::parse(&out).expect("a rewritten stream parses");
    assert_eq!(again.blocks, stream.blocks);
    assert_eq!(again.tail, stream.tail);
    assert_eq!(again.commands, stream.commands);
    assert_eq!(again.records.len(), stream.records.len());
    for (a, b) in again.records.iter().zip(&stream.records) {
        assert_eq!((a.block, a.offset), (b.block, b.offset));
        match (a.content, b.content) {
            (Content::Zero, Content::Zero) => {}
            (Content::Data(x), Content::Data(y)) => assert_eq!(out[x..x + PAGE_SIZE], data[y..y + PAGE_SIZE]),
            _ => panic!("a record changed kind"),
        }
    }
});
