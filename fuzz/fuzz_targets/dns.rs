//! The DNS forwarder's question parser (`question_name`) and its REFUSED answer (`refused`),
//! which read UDP packets a sandbox sends to `10.0.2.3:53`.
//!
//! Checks, besides never panicking:
//! - arbitrary packets: a packet whose name is read gets a REFUSED answer that keeps its id, is
//!   marked as a response with code 5, is no longer than the query, and asks the same question;
//!   the name is lowercase, and every policy can judge it;
//! - queries built from labels: the name read is the labels joined with dots, lowercased.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use viv_net::fuzzing::{question_name, refused};

/// A query made of labels.
#[derive(Debug, Arbitrary)]
struct Query {
    id: u16,
    flags: u16,
    labels: Vec<Vec<u8>>,
    tail: Vec<u8>,
}

// The first byte chooses: even, the rest is a packet as received; odd, a query made of labels.
fuzz_target!(|data: &[u8]| match data.split_first() {
    None => {}
    Some((mode, packet)) if mode % 2 == 0 => {
        let Some(name) = question_name(packet) else { return };
        assert_eq!(name, name.to_ascii_lowercase());
        let answer = refused(packet);
        assert!(answer.len() >= 12 && answer.len() <= packet.len());
        assert_eq!(answer[..2], packet[..2], "the answer must keep the query's id");
        assert_eq!(answer[2] & 0x80, 0x80, "the answer must be a response");
        assert_eq!(answer[3] & 0x0f, 5, "the answer must be REFUSED");
        assert_eq!(answer[6..12], [0; 6]);
        assert_eq!(question_name(&answer).as_deref(), Some(name.as_str()));
        for policy in [
            viv_net::Policy::deny_all(),
            viv_net::Policy::from_spec(&viv_net::PolicySpec::open()).unwrap(),
        ] {
            let _ = policy.allows_lookup(&name);
        }
    }
    Some((_, rest)) => {
        let Ok(Query {
            id,
            flags,
            labels,
            tail,
        }) = Query::arbitrary_take_rest(Unstructured::new(rest))
        else {
            return;
        };
        let labels: Vec<Vec<u8>> = labels
            .into_iter()
            .filter(|l| !l.is_empty())
            .map(|mut l| {
                l.truncate(63);
                l
            })
            .collect();
        let mut packet = id.to_be_bytes().to_vec();
        packet.extend_from_slice(&flags.to_be_bytes());
        packet.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        for label in &labels {
            packet.push(label.len() as u8);
            packet.extend_from_slice(label);
        }
        packet.push(0);
        packet.extend_from_slice(&tail);
        let expected: Vec<String> = labels
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect();
        assert_eq!(question_name(&packet), Some(expected.join(".")));
        let answer = refused(&packet);
        assert_eq!(question_name(&answer), Some(expected.join(".")));
    }
});
