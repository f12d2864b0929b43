//! An independent minimal protocol client for end-to-end tests.
//!
//! It packs and parses frames by hand from PROTOCOL.md (big-endian fields,
//! JSON objects built with `serde_json::json!`), using none of comet's own
//! encoders or decoders, so a bug shared by comet's encoder and decoder
//! cannot hide behind a symmetric round trip.

use std::collections::VecDeque;
use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::within;

/// How the client talks to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    WsJson,
    WsBinary,
}

pub const KINDS: [Kind; 3] = [Kind::Tcp, Kind::WsJson, Kind::WsBinary];

/// A frame as received.
#[derive(Clone, Debug)]
pub struct Got {
    pub ver: u16,
    pub op: u32,
    pub seq: u32,
    /// Binary body (TCP, WS binary).
    pub bytes: Vec<u8>,
    /// JSON body (WS text); `Value::Null` when absent.
    pub json: Value,
}

/// A delivered message, unpacked from op 9.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub op: u32,
    pub chat_id: i64,
    pub from: i32,
    pub to: i32,
    pub msg: Vec<u8>,
}

/// A send reply (op 19 / 21).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub ret: i64,
    pub chat_id: i64,
    pub error: Option<String>,
}

/// A sync reply (op 23).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncAck {
    pub ret: i64,
    pub oldest: i64,
    pub head: i64,
    pub error: Option<String>,
}

/// How the server ended the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// TCP end of stream (or reset).
    Eof,
    /// A WebSocket close frame with this code and reason.
    Ws(u16, String),
}

/// Any byte stream: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Stream = Box<dyn Io>;

type Ws = WebSocketStream<Stream>;

pub struct Client {
    pub kind: Kind,
    tcp: Option<Stream>,
    ws: Option<Ws>,
    buf: Vec<u8>,
    frames: VecDeque<Got>,
    msgs: VecDeque<Msg>,
    seq: u32,
}

/// Packs one binary frame by hand (PROTOCOL.md 1.1).
pub fn pack(ver: u16, op: u32, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&((16 + body.len()) as u32).to_be_bytes());
    out.extend_from_slice(&16u16.to_be_bytes());
    out.extend_from_slice(&ver.to_be_bytes());
    out.extend_from_slice(&op.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Parses one binary frame at the start of `buf`: (frame, its length).
fn unpack(buf: &[u8]) -> Option<(Got, usize)> {
    if buf.len() < 16 {
        return None;
    }
    let pack_len = u32::from_be_bytes(buf[0..4].try_into().unwrap()) as usize;
    let header_len = u16::from_be_bytes(buf[4..6].try_into().unwrap());
    assert_eq!(header_len, 16, "server wrote headerLen {header_len}");
    assert!(pack_len >= 16);
    if buf.len() < pack_len {
        return None;
    }
    Some((
        Got {
            ver: u16::from_be_bytes(buf[6..8].try_into().unwrap()),
            op: u32::from_be_bytes(buf[8..12].try_into().unwrap()),
            seq: u32::from_be_bytes(buf[12..16].try_into().unwrap()),
            bytes: buf[16..pack_len].to_vec(),
            json: Value::Null,
        },
        pack_len,
    ))
}

fn json_frame(v: &Value) -> Got {
    let obj = v.as_object().expect("a JSON frame is an object");
    for key in ["ver", "op", "seq"] {
        assert!(
            obj.get(key).is_some_and(Value::is_u64),
            "frame {v} lacks integer {key}"
        );
    }
    Got {
        ver: v["ver"].as_u64().unwrap() as u16,
        op: v["op"].as_u64().unwrap() as u32,
        seq: v["seq"].as_u64().unwrap() as u32,
        bytes: Vec::new(),
        json: obj.get("body").cloned().unwrap_or(Value::Null),
    }
}

fn json_msg(v: &Value) -> Vec<u8> {
    let text = v["msg"].as_str().expect("msg is a string");
    match v.get("enc").and_then(Value::as_str) {
        Some("base64") => {
            let bytes = B64.decode(text).expect("valid base64");
            assert!(
                std::str::from_utf8(&bytes).is_err(),
                "UTF-8 bytes must never be sent base64"
            );
            bytes
        }
        None => text.as_bytes().to_vec(),
        Some(other) => panic!("unknown enc {other}"),
    }
}

impl Client {
    /// Connects (WebSocket at `path`).
    pub async fn connect_path(kind: Kind, addr: SocketAddr, path: &str) -> Client {
        let tcp = within("tcp connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        Client::over(kind, Box::new(tcp), &format!("ws://{addr}{path}")).await
    }

    /// A client over an established stream (e.g. TLS); `url` is used for
    /// the WebSocket upgrade.
    pub async fn over(kind: Kind, stream: Stream, url: &str) -> Client {
        Client::over_with_headers(kind, stream, url, &[]).await
    }

    /// Connects (WebSocket at `path`), the upgrade request carrying
    /// `headers` (a cookie, an `Authorization` header, ...).
    pub async fn connect_with_headers(
        kind: Kind,
        addr: SocketAddr,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Client {
        let tcp = within("tcp connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let url = format!("ws://{addr}{path}");
        Client::over_with_headers(kind, Box::new(tcp), &url, headers).await
    }

    /// As [`Client::over`], the upgrade request carrying `headers`.
    pub async fn over_with_headers(
        kind: Kind,
        stream: Stream,
        url: &str,
        headers: &[(&'static str, &str)],
    ) -> Client {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let (tcp, ws) = match kind {
            Kind::Tcp => (Some(stream), None),
            _ => {
                let mut req = url.into_client_request().expect("a ws:// URL");
                for (name, value) in headers {
                    req.headers_mut()
                        .insert(*name, value.parse().expect("a header value"));
                }
                let (ws, _) = within("ws upgrade", tokio_tungstenite::client_async(req, stream))
                    .await
                    .expect("ws upgrade");
                (None, Some(ws))
            }
        };
        Client {
            kind,
            tcp,
            ws,
            buf: Vec::new(),
            frames: VecDeque::new(),
            msgs: VecDeque::new(),
            seq: 0,
        }
    }

    /// A TCP client over an already connected stream.
    pub fn from_tcp(tcp: TcpStream) -> Client {
        Client {
            kind: Kind::Tcp,
            tcp: Some(Box::new(tcp)),
            ws: None,
            buf: Vec::new(),
            frames: VecDeque::new(),
            msgs: VecDeque::new(),
            seq: 0,
        }
    }

    /// The TCP stream itself, for a test that writes and reads raw bytes
    /// (what was already read but not consumed is dropped).
    pub fn into_tcp(self) -> Stream {
        self.tcp.expect("a TCP client")
    }

    pub async fn connect(kind: Kind, addr: SocketAddr) -> Client {
        Client::connect_path(kind, addr, "/sub").await
    }

    /// Connects and logs in, asserting success.
    pub async fn login(kind: Kind, addr: SocketAddr, mid: i32, mkey: &str) -> Client {
        let mut c = Client::connect(kind, addr).await;
        let (ret, body) = c.auth(json!({"mid": mid, "mkey": mkey})).await;
        assert_eq!(ret, 0, "login of {mid} failed: {body}");
        assert_eq!(body["mid"], json!(mid));
        c
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Writes raw bytes (TCP) or one raw binary message (WS).
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        match (&mut self.tcp, &mut self.ws) {
            (Some(tcp), _) => {
                let _ = tcp.write_all(bytes).await;
            }
            (_, Some(ws)) => {
                let _ = ws.send(Message::Binary(bytes.to_vec().into())).await;
            }
            _ => unreachable!(),
        }
    }

    /// Sends one text message (WS only).
    pub async fn write_text(&mut self, text: &str) {
        let ws = self.ws.as_mut().expect("text needs WebSocket");
        let _ = ws.send(Message::Text(text.to_owned().into())).await;
    }

    /// Sends a frame; `body` is JSON for WS text mode and its serialization
    /// (or `raw` bytes when given) for binary modes.
    pub async fn send_frame(&mut self, op: u32, seq: u32, body: Option<Value>, raw: Option<&[u8]>) {
        match self.kind {
            Kind::WsJson => {
                let mut frame = json!({"ver": 1, "op": op, "seq": seq});
                if let Some(body) = body {
                    frame["body"] = body;
                }
                self.write_text(&frame.to_string()).await;
            }
            _ => {
                let bytes = match (raw, body) {
                    (Some(raw), _) => raw.to_vec(),
                    (None, Some(body)) => body.to_string().into_bytes(),
                    (None, None) => Vec::new(),
                };
                self.write_raw(&pack(1, op, seq, &bytes)).await;
            }
        }
    }

    /// op 7 → (ret, op 8 body as JSON).
    pub async fn auth(&mut self, body: Value) -> (i64, Value) {
        let seq = self.next_seq();
        self.send_frame(7, seq, Some(body), None).await;
        let reply = self.reply().await.expect("op 8 before close");
        assert_eq!((reply.op, reply.seq), (8, seq));
        let body = self.json_body(&reply);
        (body["ret"].as_i64().expect("ret"), body)
    }

    fn json_body(&self, got: &Got) -> Value {
        match self.kind {
            Kind::WsJson => got.json.clone(),
            _ => serde_json::from_slice(&got.bytes).expect("op 8 body is JSON"),
        }
    }

    /// op 18/20 with `msg` bytes; returns the reply.
    pub async fn send_msg(&mut self, op: u32, from: i32, to: i32, msg: &[u8]) -> Ack {
        let seq = self.next_seq();
        match self.kind {
            Kind::WsJson => {
                let body = match std::str::from_utf8(msg) {
                    Ok(text) => json!({"from": from, "to": to, "msg": text}),
                    Err(_) => {
                        json!({"from": from, "to": to, "msg": B64.encode(msg), "enc": "base64"})
                    }
                };
                self.send_frame(op, seq, Some(body), None).await;
            }
            _ => {
                let mut body = Vec::new();
                body.extend_from_slice(&from.to_be_bytes());
                body.extend_from_slice(&to.to_be_bytes());
                body.extend_from_slice(msg);
                self.send_frame(op, seq, None, Some(&body)).await;
            }
        }
        self.ack(op + 1, seq).await
    }

    /// Reads the reply with `op` and `seq`.
    pub async fn ack(&mut self, op: u32, seq: u32) -> Ack {
        let reply = self.reply().await.expect("send reply before close");
        assert_eq!((reply.op, reply.seq), (op, seq), "reply {reply:?}");
        match self.kind {
            Kind::WsJson => {
                let b = &reply.json;
                let ret = b["ret"].as_i64().expect("integer ret");
                let chat_id = b["chatId"].as_i64().expect("integer chatId");
                let error = b.get("error").and_then(Value::as_str).map(str::to_owned);
                if ret != 0 {
                    assert!(
                        error.as_deref().is_some_and(|e| !e.is_empty()),
                        "failure without reason: {b}"
                    );
                }
                Ack {
                    ret,
                    chat_id,
                    error,
                }
            }
            _ => {
                assert_eq!(reply.bytes.len(), 9, "op 19/21 is exactly 9 bytes");
                Ack {
                    ret: reply.bytes[0] as i8 as i64,
                    chat_id: i64::from_be_bytes(reply.bytes[1..9].try_into().unwrap()),
                    error: None,
                }
            }
        }
    }

    /// An op 22 body for this client's mode, packed by hand (PROTOCOL.md
    /// 2.7); `limit: None` leaves it out in JSON and sends `i32::MAX` in
    /// binary.
    pub fn sync_body(
        &self,
        kind: i8,
        to: i32,
        after: i64,
        limit: Option<i32>,
    ) -> (Option<Value>, Vec<u8>) {
        match self.kind {
            Kind::WsJson => {
                let mut body = json!({"kind": kind, "to": to, "after": after});
                if let Some(limit) = limit {
                    body["limit"] = json!(limit);
                }
                (Some(body), Vec::new())
            }
            _ => {
                let mut body = vec![kind as u8];
                body.extend_from_slice(&to.to_be_bytes());
                body.extend_from_slice(&after.to_be_bytes());
                body.extend_from_slice(&limit.unwrap_or(i32::MAX).to_be_bytes());
                (None, body)
            }
        }
    }

    /// op 22; returns its op 23 and every message that arrived before it
    /// (the replay, after whatever was already delivered and not read).
    pub async fn sync(
        &mut self,
        kind: i8,
        to: i32,
        after: i64,
        limit: Option<i32>,
    ) -> (SyncAck, Vec<Msg>) {
        let seq = self.next_seq();
        let (json_body, raw) = self.sync_body(kind, to, after, limit);
        self.send_frame(
            22,
            seq,
            json_body,
            Some(&raw).filter(|r| !r.is_empty()).map(|r| &r[..]),
        )
        .await;
        let ack = self.sync_ack(seq).await;
        (ack, self.msgs.drain(..).collect())
    }

    /// Reads the op 23 with `seq`, checking its shape.
    pub async fn sync_ack(&mut self, seq: u32) -> SyncAck {
        let reply = self.reply().await.expect("op 23 before close");
        assert_eq!((reply.op, reply.seq), (23, seq), "reply {reply:?}");
        let ack = match self.kind {
            Kind::WsJson => {
                let b = &reply.json;
                SyncAck {
                    ret: b["ret"].as_i64().expect("integer ret"),
                    oldest: b["oldest"].as_i64().expect("integer oldest"),
                    head: b["head"].as_i64().expect("integer head"),
                    error: b.get("error").and_then(Value::as_str).map(str::to_owned),
                }
            }
            _ => {
                assert_eq!(reply.bytes.len(), 17, "op 23 is exactly 17 bytes");
                SyncAck {
                    ret: reply.bytes[0] as i8 as i64,
                    oldest: i64::from_be_bytes(reply.bytes[1..9].try_into().unwrap()),
                    head: i64::from_be_bytes(reply.bytes[9..17].try_into().unwrap()),
                    error: None,
                }
            }
        };
        if ack.ret != 0 {
            assert_eq!((ack.oldest, ack.head), (0, 0), "a failed sync reports 0, 0");
            if self.kind == Kind::WsJson {
                assert!(
                    ack.error.as_deref().is_some_and(|e| !e.is_empty()),
                    "failure without reason: {ack:?}"
                );
            }
        }
        ack
    }

    /// Messages delivered and not yet taken with [`msg`](Self::msg).
    pub fn take_msgs(&mut self) -> Vec<Msg> {
        self.msgs.drain(..).collect()
    }

    /// A heartbeat round trip (everything queued before it has arrived).
    pub async fn heartbeat(&mut self) {
        let seq = self.next_seq();
        self.send_frame(2, seq, None, None).await;
        let reply = self.reply().await.expect("op 3 before close");
        assert_eq!((reply.op, reply.seq), (3, seq));
        assert!(
            reply.bytes.is_empty() && reply.json.is_null(),
            "op 3 has an empty body"
        );
    }

    /// Reads more from the server; `Err` once it closed.
    async fn fill(&mut self) -> Result<(), Closed> {
        match (&mut self.tcp, &mut self.ws) {
            (Some(tcp), _) => {
                let mut chunk = [0u8; 16 * 1024];
                let n = within("tcp read", tcp.read(&mut chunk)).await.unwrap_or(0);
                if n == 0 {
                    return Err(Closed::Eof);
                }
                self.buf.extend_from_slice(&chunk[..n]);
                while let Some((got, len)) = unpack(&self.buf) {
                    self.frames.push_back(got);
                    self.buf.drain(..len);
                }
                Ok(())
            }
            (_, Some(ws)) => loop {
                match within("ws read", ws.next()).await {
                    Some(Ok(Message::Text(text))) => {
                        assert_eq!(self.kind, Kind::WsJson, "text frame in binary mode");
                        let v: Value = serde_json::from_str(&text).expect("server text is JSON");
                        self.frames.push_back(json_frame(&v));
                        return Ok(());
                    }
                    Some(Ok(Message::Binary(data))) => {
                        assert_eq!(self.kind, Kind::WsBinary, "binary frame in text mode");
                        let mut rest = &data[..];
                        while !rest.is_empty() {
                            let (got, len) =
                                unpack(rest).expect("binary message holds whole frames");
                            self.frames.push_back(got);
                            rest = &rest[len..];
                        }
                        return Ok(());
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return Err(match frame {
                            Some(f) => Closed::Ws(u16::from(f.code), f.reason.to_string()),
                            None => Closed::Ws(1005, String::new()),
                        })
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return Err(Closed::Eof),
                }
            },
            _ => unreachable!(),
        }
    }

    /// The next frame, or how the connection closed.
    pub async fn recv(&mut self) -> Result<Got, Closed> {
        loop {
            if let Some(f) = self.frames.pop_front() {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    fn unpack_batch(&mut self, batch: &Got) {
        assert_eq!((batch.ver, batch.seq), (1, 0));
        match self.kind {
            Kind::WsJson => {
                for inner in batch.json.as_array().expect("op 9 body is an array") {
                    let f = json_frame(inner);
                    assert!(f.op == 18 || f.op == 20);
                    assert_eq!((f.ver, f.seq), (1, 0));
                    let b = &f.json;
                    self.msgs.push_back(Msg {
                        op: f.op,
                        chat_id: b["chatId"].as_i64().expect("chatId"),
                        from: b["from"].as_i64().expect("from") as i32,
                        to: b["to"].as_i64().expect("to") as i32,
                        msg: json_msg(b),
                    });
                }
            }
            _ => {
                let mut rest = &batch.bytes[..];
                while !rest.is_empty() {
                    let (f, len) = unpack(rest).expect("op 9 body holds whole frames");
                    assert!(f.op == 18 || f.op == 20);
                    assert_eq!((f.ver, f.seq), (1, 0));
                    let b = &f.bytes;
                    assert!(b.len() >= 16);
                    self.msgs.push_back(Msg {
                        op: f.op,
                        chat_id: i64::from_be_bytes(b[0..8].try_into().unwrap()),
                        from: i32::from_be_bytes(b[8..12].try_into().unwrap()),
                        to: i32::from_be_bytes(b[12..16].try_into().unwrap()),
                        msg: b[16..].to_vec(),
                    });
                    rest = &rest[len..];
                }
            }
        }
    }

    /// The next frame that is not op 9 (op 9s are unpacked for `msg`).
    pub async fn reply(&mut self) -> Result<Got, Closed> {
        loop {
            let f = self.recv().await?;
            if f.op == 9 {
                self.unpack_batch(&f);
            } else {
                return Ok(f);
            }
        }
    }

    /// A delivered message already received, if any (no waiting).
    pub fn try_msg(&mut self) -> Option<Msg> {
        self.msgs.pop_front()
    }

    /// The next delivered message.
    pub async fn msg(&mut self) -> Msg {
        loop {
            if let Some(m) = self.msgs.pop_front() {
                return m;
            }
            let f = self.recv().await.expect("closed before a delivery");
            assert_eq!(f.op, 9, "expected op 9, got {f:?}");
            self.unpack_batch(&f);
        }
    }

    /// The next delivered message, skipping heartbeat replies (op 3) that
    /// arrive among the batches.
    pub async fn msg_skipping_beats(&mut self) -> Msg {
        loop {
            if let Some(m) = self.msgs.pop_front() {
                return m;
            }
            let f = self.recv().await.expect("closed before a delivery");
            match f.op {
                9 => self.unpack_batch(&f),
                3 => continue,
                _ => panic!("expected op 9 or op 3, got {f:?}"),
            }
        }
    }

    /// Asserts nothing was delivered (after a heartbeat round trip).
    pub async fn no_msg(&mut self) {
        self.heartbeat().await;
        assert!(
            self.msgs.is_empty(),
            "unexpected deliveries: {:?}",
            self.msgs
        );
    }

    /// Every message delivered until the server closes the connection (a
    /// frame cut short by the close is dropped, as a real client would).
    pub async fn msgs_until_closed(&mut self) -> (Vec<Msg>, Closed) {
        loop {
            match self.recv().await {
                Ok(f) if f.op == 9 => self.unpack_batch(&f),
                Ok(_) => continue,
                Err(closed) => return (self.msgs.drain(..).collect(), closed),
            }
        }
    }

    /// Waits for the server to close the connection, skipping frames.
    pub async fn closed(&mut self) -> Closed {
        loop {
            match self.recv().await {
                Ok(_) => continue,
                Err(closed) => return closed,
            }
        }
    }

    /// Closes the client side.
    pub async fn close(mut self) {
        if let Some(ws) = &mut self.ws {
            let _ = ws.close(None).await;
        }
        if let Some(tcp) = &mut self.tcp {
            let _ = tcp.shutdown().await;
        }
    }
}
