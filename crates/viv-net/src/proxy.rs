//! The egress proxy: when a sandbox's policy names domains, its web connections (ports 80 and
//! 443) are redirected here (a listener per sandbox, bound inside its namespace). The proxy reads the name the client asks for — the TLS SNI or the
//! HTTP `Host` header — without decrypting anything, asks the policy, and then connects to the
//! original destination and relays the bytes, or refuses (an HTTP 403 for plain HTTP, a closed
//! connection for TLS).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::Shared;

/// How long a client has to say which host it wants, and a server to accept.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes read before giving up on finding a name.
const MAX_PEEK: usize = 16 * 1024;

/// Serves the sandbox whose namespace end is `sandbox` until aborted.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, sandbox: Ipv4Addr) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "egress proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(policy) = shared.policy_of(sandbox.into()) else {
            continue;
        };
        tokio::spawn(async move {
            if let Err(err) = relay(client, &policy).await {
                tracing::debug!(%sandbox, %peer, %err, "egress proxy connection ended");
            }
        });
    }
}

async fn relay(mut client: TcpStream, policy: &crate::Policy) -> std::io::Result<()> {
    let dst = original_destination(&client)?;
    let mut head = Vec::with_capacity(4096);
    let host = tokio::time::timeout(TIMEOUT, async {
        loop {
            if client.read_buf(&mut head).await? == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            match sniff(&head) {
                Sniff::NeedMore if head.len() < MAX_PEEK => continue,
                Sniff::NeedMore => return Ok(None),
                Sniff::Done(host) => return Ok(host),
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no host name in time"))??;
    if !policy.allows_connection(host.as_deref(), *dst.ip()) {
        tracing::info!(%dst, host = host.as_deref().unwrap_or("-"), "egress connection refused by policy");
        if head.first() != Some(&0x16) {
            let body = format!(
                "Vivarium: the sandbox's network policy does not allow {}\n",
                host.as_deref().unwrap_or("this destination")
            );
            let response = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(response.as_bytes()).await;
        }
        return Ok(());
    }
    let mut upstream = tokio::time::timeout(TIMEOUT, TcpStream::connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    upstream.write_all(&head).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Where a redirected connection was headed (`SO_ORIGINAL_DST`).
fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddrV4> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: sockaddr_in is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the descriptor is an open socket owned by `stream`; `addr` and `len` are valid for
    // writes of the size `len` says.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// What the first bytes of a connection say about its host.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniff {
    /// Not enough bytes yet.
    NeedMore,
    /// The name asked for, or `None` when the protocol names none.
    Done(Option<String>),
}

/// Reads the SNI of a TLS ClientHello or the `Host` of an HTTP request.
pub fn sniff(head: &[u8]) -> Sniff {
    match head.first() {
        None => Sniff::NeedMore,
        Some(0x16) => tls_server_name(head),
        Some(_) => http_host(head),
    }
}

fn http_host(head: &[u8]) -> Sniff {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Sniff::NeedMore;
    };
    let text = String::from_utf8_lossy(&head[..end]);
    let host = text.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("host").then(|| {
            let value = value.trim();
            // Strip a port (not inside an IPv6 literal).
            match value.rsplit_once(':') {
                Some((h, port)) if !h.contains(']') && port.bytes().all(|b| b.is_ascii_digit()) => h.to_owned(),
                _ => value.to_owned(),
            }
        })
    });
    Sniff::Done(host.map(|h| h.to_ascii_lowercase()))
}

/// A big-endian reader that fails instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

fn tls_server_name(head: &[u8]) -> Sniff {
    if head.len() < 5 {
        return Sniff::NeedMore;
    }
    let record_len = usize::from(u16::from_be_bytes([head[3], head[4]]));
    if head.len() < 5 + record_len {
        return Sniff::NeedMore;
    }
    Sniff::Done(client_hello_sni(&head[5..5 + record_len]))
}

fn client_hello_sni(handshake: &[u8]) -> Option<String> {
    let mut r = Reader(handshake);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    r.take(3)?; // handshake length
    r.take(2 + 32)?; // version, random
    let session = r.u8()?;
    r.take(session)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let compression = r.u8()?;
    r.take(compression)?;
    let extensions = r.u16()?;
    let mut ext = Reader(r.take(extensions.min(r.0.len()))?);
    while let (Some(kind), Some(len)) = (ext.u16(), ext.u16()) {
        let body = ext.take(len)?;
        if kind == 0 {
            let mut names = Reader(body);
            let list = names.u16()?;
            let mut names = Reader(names.take(list)?);
            while let Some(name_type) = names.u8() {
                let len = names.u16()?;
                let name = names.take(len)?;
                if name_type == 0 {
                    return Some(String::from_utf8_lossy(name).to_ascii_lowercase());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record naming `host`.
    fn client_hello(host: &str) -> Vec<u8> {
        let mut sni = Vec::new();
        let name = host.as_bytes();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut extensions = Vec::new();
        extensions.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // ec_point_formats
        extensions.extend_from_slice(&[0, 0]);
        extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        extensions.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut handshake = vec![1];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 3, 1];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn reads_sni_from_a_client_hello() {
        let hello = client_hello("PyPI.org");
        assert_eq!(sniff(&hello), Sniff::Done(Some("pypi.org".into())));
        assert_eq!(sniff(&hello[..20]), Sniff::NeedMore);
        let mut broken = hello.clone();
        broken[5] = 2; // a ServerHello
        assert_eq!(sniff(&broken), Sniff::Done(None));
    }

    #[test]
    fn reads_the_host_header() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: Example.com:8080"), Sniff::NeedMore);
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nUser-Agent: x\r\nhost: Example.com:8080\r\n\r\n"),
            Sniff::Done(Some("example.com".into()))
        );
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniff::Done(None));
    }

    #[test]
    fn never_panics_on_garbage() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let mut tls = bytes.clone();
            if let Some(b) = tls.first_mut() {
                *b = 0x16;
            }
            let _ = sniff(&bytes);
            let _ = sniff(&tls);
        }
    }
}
