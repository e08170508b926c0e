//! The egress proxy's sniffer (`sniff`): the TLS SNI or HTTP `Host` a sandbox's connection names,
//! read from its first bytes before anything is relayed.
//!
//! Checks, besides never panicking:
//! - arbitrary bytes: once a verdict is reached it does not change as more bytes arrive (the
//!   proxy decides on a prefix), and feeding the bytes piece by piece reaches the verdict of the
//!   first prefix that has one; a name is lowercase;
//! - a ClientHello built around a server name (with other extensions, session id and suites of
//!   arbitrary contents) yields that name, lowercased, and every shorter prefix asks for more;
//! - an HTTP request with a `Host` header (any case, optional port) yields the host, lowercased.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use viv_net::fuzzing::{sniff, Sniff};

#[derive(Debug, Arbitrary)]
enum Built {
    Hello {
        name: Vec<u8>,
        session: Vec<u8>,
        suites: Vec<u8>,
        before: Vec<(u16, Vec<u8>)>,
        after: Vec<u8>,
    },
    Http {
        method: u8,
        host: Vec<u8>,
        port: Option<u16>,
        upper: bool,
        headers: Vec<(u8, u8)>,
    },
}

fn u16_len(len: usize) -> [u8; 2] {
    u16::try_from(len).expect("short").to_be_bytes()
}

fn client_hello(name: &[u8], session: &[u8], suites: &[u8], before: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut extensions = Vec::new();
    for (kind, body) in before {
        // Anything but server_name (0).
        extensions.extend_from_slice(&(kind | 1).to_be_bytes());
        extensions.extend_from_slice(&u16_len(body.len()));
        extensions.extend_from_slice(body);
    }
    let mut list = vec![0];
    list.extend_from_slice(&u16_len(name.len()));
    list.extend_from_slice(name);
    let mut sni = u16_len(list.len()).to_vec();
    sni.extend_from_slice(&list);
    extensions.extend_from_slice(&[0, 0]);
    extensions.extend_from_slice(&u16_len(sni.len()));
    extensions.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x5a; 32]);
    body.push(session.len() as u8);
    body.extend_from_slice(session);
    body.extend_from_slice(&u16_len(suites.len()));
    body.extend_from_slice(suites);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&u16_len(extensions.len()));
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&u16_len(handshake.len()));
    record.extend_from_slice(&handshake);
    record
}

/// Bytes a client sends: `data` is a byte saying where the first read ends (as a fraction of
/// the rest), a byte for the size of later reads, then the bytes.
fn bytes(data: &[u8]) {
    let [cut, piece, data @ ..] = data else { return };
    let (head, _) = data.split_at(usize::from(*cut) * data.len() / 256);
    let verdict = sniff(head);
    if let Sniff::Done(Some(name)) = &verdict {
        assert_eq!(*name, name.to_ascii_lowercase());
    }
    if verdict != Sniff::NeedMore {
        assert_eq!(sniff(data), verdict, "more bytes changed the verdict");
    }
    // As the proxy reads: the first read, then reads of `piece` bytes, until a verdict.
    let mut end = head.len();
    let mut first = verdict;
    while first == Sniff::NeedMore && end < data.len() {
        end = (end + usize::from(*piece) + 1).min(data.len());
        first = sniff(&data[..end]);
    }
    assert_eq!(first, sniff(data), "the verdict depends on how the bytes arrived");
}

// The first byte chooses: even, the rest is bytes as a client sends them; odd, a ClientHello or
// an HTTP request built from the rest.
fuzz_target!(|data: &[u8]| match data.split_first() {
    None => {}
    Some((mode, rest)) if mode % 2 == 0 => bytes(rest),
    Some((_, rest)) => {
        if let Ok(built) = Built::arbitrary_take_rest(Unstructured::new(rest)) {
            build(built);
        }
    }
});

fn build(built: Built) {
    match built {
        Built::Hello {
            mut name,
            mut session,
            mut suites,
            mut before,
            after,
        } => {
            name.truncate(255);
            session.truncate(32);
            suites.truncate(64);
            before.truncate(8);
            for (_, body) in &mut before {
                body.truncate(64);
            }
            let record = client_hello(&name, &session, &suites, &before);
            let expected = String::from_utf8_lossy(&name).to_ascii_lowercase();
            for cut in 0..record.len() {
                assert_eq!(sniff(&record[..cut]), Sniff::NeedMore, "a cut ClientHello at {cut}");
            }
            let mut full = record;
            full.extend_from_slice(&after);
            assert_eq!(sniff(&full), Sniff::Done(Some(expected)));
        }
        Built::Http {
            method,
            host,
            port,
            upper,
            headers,
        } => {
            // A host as clients write them: letters, digits, dots and dashes.
            let host: String = host
                .iter()
                .map(|b| {
                    char::from(
                        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-"[usize::from(*b) % 64],
                    )
                })
                .collect();
            if host.is_empty() {
                return;
            }
            let method = ["GET", "POST", "CONNECT", "PUT"][usize::from(method) % 4];
            let mut request = format!("{method} / HTTP/1.1\r\n");
            for (name, value) in headers.iter().take(8) {
                request.push_str(&format!("X-{name}: v{value}\r\n"));
            }
            let field = if upper { "HOST" } else { "Host" };
            match port {
                Some(port) => request.push_str(&format!("{field}:  {host}:{port} \r\n\r\n")),
                None => request.push_str(&format!("{field}: {host}\r\n\r\n")),
            }
            assert_eq!(sniff(request.as_bytes()), Sniff::Done(Some(host.to_ascii_lowercase())));
            assert_eq!(sniff(&request.as_bytes()[..request.len() - 1]), Sniff::NeedMore);
        }
    }
}
