//! The DNS forwarder sandboxes reach as `10.0.2.3`: relays questions to the host's name servers
//! and answers REFUSED for names the sandbox's policy denies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::Shared;

/// How long an upstream server has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// Serves until aborted.
pub(crate) async fn serve(socket: Arc<UdpSocket>, upstreams: Vec<SocketAddr>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(err) => {
                tracing::warn!(%err, "DNS forwarder receive failed");
                continue;
            }
        };
        // Only sandboxes with a slot are answered.
        let Some(policy) = shared.policy_of(from.ip()) else {
            continue;
        };
        let query = buf[..n].to_vec();
        let Some(name) = question_name(&query) else { continue };
        if !policy.allows_lookup(&name) {
            tracing::info!(sandbox = %from.ip(), %name, "DNS question refused by policy");
            let _ = socket.send_to(&refused(&query), from).await;
            continue;
        }
        let (socket, upstreams) = (socket.clone(), upstreams.clone());
        tokio::spawn(async move {
            if let Some(answer) = ask(&query, &upstreams).await {
                let _ = socket.send_to(&answer, from).await;
            }
        });
    }
}

/// The first answer of the upstream servers, tried in order.
async fn ask(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let Ok(socket) = UdpSocket::bind(("0.0.0.0", 0)).await else {
            continue;
        };
        if socket.send_to(query, upstream).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, from))) = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv_from(&mut buf)).await {
            if from == *upstream && n >= 2 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

/// The name a query with exactly one question asks about (lowercase, no trailing dot).
pub fn question_name(packet: &[u8]) -> Option<String> {
    if packet.len() < 12 || u16::from_be_bytes([packet[4], packet[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*packet.get(at)?);
        if len == 0 {
            break;
        }
        // Compression pointers do not occur in a question.
        if len & 0xc0 != 0 {
            return None;
        }
        let label = packet.get(at + 1..at + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += 1 + len;
    }
    Some(labels.join("."))
}

/// A REFUSED answer to `query`, with its question.
pub fn refused(query: &[u8]) -> Vec<u8> {
    // End of the question: the name, then type and class.
    let mut end = 12;
    while let Some(&len) = query.get(end) {
        end += 1 + usize::from(len);
        if len == 0 {
            break;
        }
    }
    let end = (end + 4).min(query.len());
    let mut answer = query[..end].to_vec();
    answer[2] = 0x80 | (query[2] & 0x79); // a response, same opcode and RD
    answer[3] = 0x80 | 5; // recursion available, REFUSED
    answer[6..12].fill(0); // no answer, authority or additional records
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `example.COM` type A.
    fn query() -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        for label in ["example", "COM"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        // An EDNS record in the additional section.
        q.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]);
        q
    }

    #[test]
    fn reads_the_question() {
        assert_eq!(question_name(&query()).as_deref(), Some("example.com"));
        assert_eq!(question_name(&[0; 5]), None);
    }

    #[test]
    fn refuses_with_the_question_only() {
        let r = refused(&query());
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(r[3] & 0x0f, 5);
        assert_eq!(r.len(), 12 + 13 + 4);
        assert_eq!(question_name(&r).as_deref(), Some("example.com"));
    }
}
