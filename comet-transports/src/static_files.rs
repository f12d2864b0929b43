//! Static files beside the WebSocket endpoint: an opt-in of the [`ws`]
//! listener ([`WsOptions::with_static_files`]) so that one port serves both a web
//! page and the `/sub` endpoint it connects to (same origin, no CORS).
//!
//! The listener reads the HTTP request head itself (within the handshake
//! timeout and the pre-login read budget), answers a plain `GET` or `HEAD`
//! for a path of the map with that file and closes the connection, answers
//! other requests that are not WebSocket upgrades with 404 (or 405, 426), and
//! hands an upgrade request, bytes read so far included, to the WebSocket
//! handshake. Without the option the listener reads the head the same way
//! and answers every plain request with 404, or 426 on the endpoint's path
//! (so a health probe gets an answer, not a failed upgrade).
//!
//! [`ws`]: crate::ws
//! [`WsOptions::with_static_files`]: crate::ws::WsOptions::with_static_files

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A fixed map from request paths to file bodies, cheap to clone.
///
/// ```
/// use comet_transports::static_files::StaticFiles;
///
/// let files = StaticFiles::new()
///     .with("/", "text/html; charset=utf-8", &b"<!doctype html><title>hi</title>"[..])
///     .with("/app.js", "text/javascript; charset=utf-8", &b"console.log(1)"[..]);
/// assert_eq!(files.get("/app.js").map(|f| f.0), Some("text/javascript; charset=utf-8"));
/// assert!(files.get("/nope").is_none());
/// ```
#[derive(Clone, Debug, Default)]
pub struct StaticFiles {
    files: Arc<HashMap<String, (String, Bytes)>>,
}

impl StaticFiles {
    /// An empty map: every plain request is answered 404.
    pub fn new() -> Self {
        StaticFiles::default()
    }

    /// Adds (or replaces) the file served at `path` (e.g. `/` or
    /// `/app.js`; no query string) with its `Content-Type`.
    pub fn with(
        mut self,
        path: impl Into<String>,
        content_type: impl Into<String>,
        body: impl Into<Bytes>,
    ) -> Self {
        Arc::make_mut(&mut self.files).insert(path.into(), (content_type.into(), body.into()));
        self
    }

    /// The content type and body served at `path`, if any.
    pub fn get(&self, path: &str) -> Option<(&str, &Bytes)> {
        self.files.get(path).map(|(t, b)| (t.as_str(), b))
    }
}

/// What [`route`] made of a connection's request head.
pub(crate) enum Routed {
    /// A WebSocket upgrade: the bytes read so far, to be read again by the
    /// handshake.
    Upgrade(Bytes),
    /// A plain request, answered; the connection is done.
    Answered,
}

/// The most headers a request head may have.
const MAX_HEADERS: usize = 64;

/// Reads one request head from `stream` (at most `max_head` bytes) and
/// either answers it from `files` (none: every path is 404, but 426 on
/// `ws_path`) or, for a WebSocket upgrade, returns what was read.
pub(crate) async fn route<S>(
    stream: &mut S,
    files: Option<&StaticFiles>,
    ws_path: &str,
    max_head: usize,
) -> io::Result<Routed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Partial) if buf.len() < max_head => continue,
            Ok(httparse::Status::Partial) => {
                respond(stream, "431 Request Header Fields Too Large", None, b"").await?;
                return Ok(Routed::Answered);
            }
            Err(_) => {
                respond(stream, "400 Bad Request", None, b"bad request\n").await?;
                return Ok(Routed::Answered);
            }
            Ok(httparse::Status::Complete(_)) => {}
        }
        let upgrade = req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("upgrade")
                && String::from_utf8_lossy(h.value)
                    .to_ascii_lowercase()
                    .contains("websocket")
        });
        if upgrade {
            return Ok(Routed::Upgrade(buf.freeze()));
        }
        let path = req.path.unwrap_or("/");
        let path = path.split('?').next().unwrap_or(path);
        let method = req.method.unwrap_or("");
        match files.and_then(|files| files.get(path)) {
            Some((content_type, body)) if method == "GET" || method == "HEAD" => {
                let len = body.len();
                let body = if method == "GET" { &body[..] } else { b"" };
                respond_len(stream, "200 OK", Some(content_type), body, len).await?;
            }
            Some(_) => respond(stream, "405 Method Not Allowed", None, b"").await?,
            None if path == ws_path => {
                let text = b"this is a WebSocket endpoint\n";
                respond(stream, "426 Upgrade Required", None, text).await?;
            }
            None => respond(stream, "404 Not Found", None, b"not found\n").await?,
        }
        return Ok(Routed::Answered);
    }
}

async fn respond<S>(
    stream: &mut S,
    status: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    respond_len(stream, status, content_type, body, body.len()).await
}

/// Writes a whole response (`Connection: close`), shuts the stream down,
/// and reads what the peer still sends (at most 64 KiB, for at most a
/// second): closing with unread bytes would reset the connection, and the
/// peer could lose the response.
async fn respond_len<S>(
    stream: &mut S,
    status: &str,
    content_type: Option<&str>,
    body: &[u8],
    content_length: usize,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let content_type = content_type.unwrap_or("text/plain; charset=utf-8");
    let head = format!(
        "HTTP/1.1 {status}\r\n\
         Content-Type: {content_type}\r\n\
         Content-Length: {content_length}\r\n\
         Cache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Referrer-Policy: no-referrer\r\n\
         Content-Security-Policy: default-src 'self'; connect-src 'self'; frame-ancestors 'none'\r\n\
         Allow: GET, HEAD\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 1024];
    let linger = async {
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), linger).await;
    Ok(())
}

/// A stream whose first reads return `prefix`, then the inner stream's
/// bytes: the request head [`route`] read, given back to the handshake.
#[derive(Debug)]
pub(crate) struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // Free the head's buffer for the connection's life.
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer(request: &[u8]) -> (String, Option<Bytes>) {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(request).await.unwrap();
        // The peer's end of the request: the server's linger ends at once.
        client.shutdown().await.unwrap();
        let files = StaticFiles::new().with("/", "text/html", &b"<p>hi</p>"[..]);
        let routed = route(&mut server, Some(&files), "/sub", 16 * 1024)
            .await
            .unwrap();
        drop(server);
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        match routed {
            Routed::Upgrade(head) => (out, Some(head)),
            Routed::Answered => (out, None),
        }
    }

    #[tokio::test]
    async fn a_known_path_is_served_and_others_get_404() {
        let (out, _) = answer(b"GET /?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("Content-Type: text/html\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n<p>hi</p>"), "{out}");
        let (out, _) = answer(b"HEAD / HTTP/1.1\r\n\r\n").await;
        assert!(out.contains("Content-Length: 9\r\n") && out.ends_with("\r\n\r\n"));
        let (out, _) = answer(b"GET /etc/passwd HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
        let (out, _) = answer(b"POST / HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 405 "), "{out}");
        let (out, _) = answer(b"GET /sub HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 426 "), "{out}");
        let (out, _) = answer(b"\x00\x01garbage\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    }

    #[tokio::test]
    async fn an_upgrade_is_handed_back_with_its_bytes() {
        let req = b"GET /sub HTTP/1.1\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n";
        let (out, head) = answer(req).await;
        assert_eq!(out, "");
        assert_eq!(head.as_deref(), Some(&req[..]));
        let mut rewound = Rewind::new(head.unwrap(), tokio::io::empty());
        let mut again = Vec::new();
        rewound.read_to_end(&mut again).await.unwrap();
        assert_eq!(again, req);
    }

    #[tokio::test]
    async fn a_head_past_the_bound_is_refused() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(3000));
        client.write_all(long.as_bytes()).await.unwrap();
        client.shutdown().await.unwrap();
        let routed = route(&mut server, Some(&StaticFiles::new()), "/sub", 1024).await;
        assert!(matches!(routed, Ok(Routed::Answered)));
        drop(server);
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }
}
