//! Clients behind proxies: which peers are trusted to name the client, and
//! the PROXY protocol (v1 and v2, HAProxy's) those peers put in front of a
//! connection.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use proxy_header::{ParseConfig, ProxyHeader};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The proxies (addresses or CIDR networks) trusted to tell the client's
/// address: by a PROXY protocol header in front of a TCP or WebSocket
/// listener's connections
/// ([`TcpOptions::with_proxy_protocol`](crate::tcp::TcpOptions::with_proxy_protocol),
/// [`WsOptions::with_proxy_protocol`](crate::ws::WsOptions::with_proxy_protocol)),
/// or by `Forwarded` / `X-Forwarded-For` for
/// [`CometWs`](crate::axum::CometWs). Connections from any other peer keep
/// their TCP address, and whatever they send is read as their data.
///
/// ```
/// use comet_transports::TrustedProxies;
/// let proxies = TrustedProxies::new(["127.0.0.1", "10.0.0.0/8", "fd00::/8"]).unwrap();
/// assert!(proxies.contains("10.1.2.3".parse().unwrap()));
/// assert!(!proxies.contains("192.0.2.1".parse().unwrap()));
/// assert!(TrustedProxies::new(["10.0.0.0/33"]).is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Arc<[ipnet::IpNet]>);

/// A trusted proxy that is neither an IP address nor a network in CIDR
/// notation (e.g. `10.0.0.0/8`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadProxy(pub String);

impl fmt::Display for BadProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trusted proxy {:?} is neither an IP address nor a CIDR network (e.g. 10.0.0.0/8)",
            self.0
        )
    }
}

impl std::error::Error for BadProxy {}

impl TrustedProxies {
    /// Addresses (`"10.0.0.1"`) or networks (`"10.0.0.0/8"`, `"fd00::/8"`);
    /// an empty list trusts nobody.
    pub fn new<I, S>(proxies: I) -> Result<Self, BadProxy>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nets = proxies
            .into_iter()
            .map(|p| {
                let p = p.as_ref().trim();
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| BadProxy(p.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies(Arc::from(nets)))
    }

    /// Whether `ip` is one of the trusted proxies (an IPv4-mapped IPv6
    /// address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The 12 bytes a PROXY protocol v2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest v1 header: `PROXY TCP6` with two full IPv6 addresses and
/// ports, CRLF included (the specification's 107 bytes).
const V1_MAX: usize = 107;

/// The longest v2 header accepted: the 16-byte preamble, the addresses and
/// TLVs (a load balancer's are a few dozen bytes; the format allows 64 KiB).
const V2_MAX: usize = 16 + 2048;

/// A PROXY header that could not be read or is not one.
fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Reads one PROXY protocol header (v1 or v2) from the start of `stream`,
/// no byte more: what follows is the client's own data. Returns the
/// client's address, or `None` for a header that names none (v2 `LOCAL`,
/// a proxy's health check, or v1 `UNKNOWN`): the connection is then the
/// proxy's own.
///
/// A v2 header is read with exact reads (its length is in its preamble); a
/// v1 line is peeked at and then consumed up to its CRLF, so neither reads
/// into the data behind it, and no read spins on a partial header.
pub(crate) async fn read_header(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    let mut head = [0u8; V1_MAX];
    // Both versions are at least 15 bytes long (`PROXY UNKNOWN\r\n`), so
    // these 12 are header in either case.
    stream.read_exact(&mut head[..12]).await?;
    let header = if head[..12] == V2_SIGNATURE {
        stream.read_exact(&mut head[12..16]).await?;
        let len = 16 + usize::from(u16::from_be_bytes([head[14], head[15]]));
        if len > V2_MAX {
            return Err(bad(format!(
                "PROXY v2 header of {len} bytes (at most {V2_MAX})"
            )));
        }
        let mut buf = vec![0u8; len];
        buf[..16].copy_from_slice(&head[..16]);
        stream.read_exact(&mut buf[16..]).await?;
        parse(&buf, false)?
    } else if head.starts_with(b"PROXY ") {
        let mut len = 12;
        loop {
            if len == V1_MAX {
                return Err(bad(format!("PROXY v1 line longer than {V1_MAX} bytes")));
            }
            let n = stream.peek(&mut head[len..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = head[len..len + n]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(n, |at| at + 1);
            // Consumes exactly what was peeked (up to the line's end), so
            // the next peek waits for new bytes.
            stream.read_exact(&mut head[len..len + take]).await?;
            len += take;
            if head[len - 1] == b'\n' {
                break;
            }
        }
        parse(&head[..len], true)?
    } else {
        return Err(bad("no PROXY protocol header (v1 or v2)"));
    };
    Ok(header)
}

/// The client address of one complete header of the given version.
fn parse(buf: &[u8], v1: bool) -> io::Result<Option<SocketAddr>> {
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: v1,
        allow_v2: !v1,
    };
    match ProxyHeader::parse(buf, config) {
        Ok((header, used)) if used == buf.len() => Ok(header.proxied_address().map(|a| a.source)),
        Ok(_) => Err(bad("PROXY header shorter than its framing")),
        Err(e) => Err(bad(format!("PROXY header: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_header::ProxiedAddress;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    /// The header, then the data behind it, untouched.
    async fn read(bytes: &[&[u8]]) -> (io::Result<Option<SocketAddr>>, Vec<u8>) {
        let (mut client, mut server) = pair().await;
        let parts: Vec<Vec<u8>> = bytes.iter().map(|b| b.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for part in parts {
                client.write_all(&part).await.unwrap();
                // Separate segments: the reader sees a partial header.
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            client.shutdown().await.unwrap();
        });
        let header = read_header(&mut server).await;
        let mut rest = Vec::new();
        if header.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        writer.await.unwrap();
        (header, rest)
    }

    #[tokio::test]
    async fn v1_and_v2_headers_give_the_client_address_and_leave_the_data() {
        let (h, rest) = read(&[b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 3101\r\nDATA"]).await;
        assert_eq!(h.unwrap(), Some("192.0.2.7:5555".parse().unwrap()));
        assert_eq!(rest, b"DATA");
        // A v1 line cut in pieces.
        let (h, rest) = read(&[b"PROXY TCP6 2001:db8::1 ", b"2001:db8::2 1 2\r", b"\nX"]).await;
        assert_eq!(h.unwrap(), Some("[2001:db8::1]:1".parse().unwrap()));
        assert_eq!(rest, b"X");
        let (h, rest) = read(&[b"PROXY UNKNOWN\r\nabc"]).await;
        assert_eq!(h.unwrap(), None);
        assert_eq!(rest, b"abc");
        let mut v2 = Vec::new();
        ProxyHeader::with_address(ProxiedAddress::stream(
            "[2001:db8:1:2::5]:4000".parse().unwrap(),
            "[2001:db8::1]:3101".parse().unwrap(),
        ))
        .encode_v2(&mut v2)
        .unwrap();
        let (h, rest) = read(&[&v2[..10], &v2[10..], b"tail"]).await;
        assert_eq!(h.unwrap(), Some("[2001:db8:1:2::5]:4000".parse().unwrap()));
        assert_eq!(rest, b"tail");
        let mut local = Vec::new();
        ProxyHeader::with_local().encode_v2(&mut local).unwrap();
        let (h, rest) = read(&[&local, b"z"]).await;
        assert_eq!(h.unwrap(), None);
        assert_eq!(rest, b"z");
    }

    #[tokio::test]
    async fn malformed_headers_are_errors() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 no newline at all here, and far too long for a v1 line...........................",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff",
            b"PROXY TCP4 192.0.2.7",
        ] {
            let (h, _) = read(&[bad]).await;
            assert!(h.is_err(), "{:?} accepted", String::from_utf8_lossy(bad));
        }
    }
}
