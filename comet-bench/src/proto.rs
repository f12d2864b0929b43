//! Client connections of the load generator: comet's protocol over TCP,
//! WebSocket JSON and WebSocket binary, and socket.io (for the peer server),
//! split into a sending and a receiving half so a connection can send and
//! read concurrently.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use comet::core::codec::{self, json, read_batch, TcpCodec};
use comet::core::frame::{op, Frame, WireMode};
use comet::core::payload::{AuthReply, Delivered, SendReply, SendRequest, SyncReply, SyncRequest};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::codec::FramedRead;

/// How the load generator talks to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Transport {
    /// Binary frames over TCP.
    Tcp,
    /// JSON text frames over WebSocket.
    WsJson,
    /// Binary frames over WebSocket.
    WsBinary,
    /// socket.io v5 over Engine.IO v4 on WebSocket (the peer server only).
    SocketIo,
}

/// Something the server sent.
#[derive(Debug)]
pub(crate) enum Event {
    /// A reply to op 18/20.
    Ack { ret: i8 },
    /// Messages delivered in one op 9.
    Msgs(Vec<Delivered>),
    /// A sync reply (op 23).
    Synced { ret: i8, oldest: i64, head: i64 },
    /// Anything else (op 3, op 8, ...).
    Other,
}

/// Where connections come from: loopback source addresses 127.0.0.1 to
/// 127.0.0.N in turn, so 15,000+ connections do not run out of ephemeral
/// ports on one source address.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sources(pub(crate) u8);

impl Sources {
    pub(crate) async fn connect(&self, i: usize, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let n = self.0.max(1) as usize;
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % n) as u8));
        let socket = TcpSocket::new_v4()?;
        // Closed with a reset, not a FIN: back-to-back runs of 15,000
        // connections otherwise leave tens of thousands of ports in TIME_WAIT
        // on these sources, and `bind` then crawled through them: connects
        // fell from ~26k to under 1k per second. The generator closes only
        // once a run's results are in.
        socket.set_zero_linger()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

type Ws = WebSocketStream<TcpStream>;

/// The WebSocket sink of a socket.io connection, shared by both halves: the
/// receiving half answers Engine.IO pings.
type SioSink = Arc<tokio::sync::Mutex<SplitSink<Ws, Message>>>;

/// The sending half.
pub(crate) enum Tx {
    Tcp(OwnedWriteHalf),
    Ws(SplitSink<Ws, Message>, WireMode),
    SocketIo(SioSink),
}

/// The receiving half.
pub(crate) enum Rx {
    Tcp(FramedRead<OwnedReadHalf, TcpCodec>),
    Ws(SplitStream<Ws>, WireMode),
    SocketIo(SplitStream<Ws>, SioSink),
}

const MAX: usize = 1 << 20;

impl Tx {
    fn mode(&self) -> WireMode {
        match self {
            Tx::Tcp(_) => WireMode::Binary,
            Tx::Ws(_, mode) => *mode,
            Tx::SocketIo(_) => WireMode::Json,
        }
    }

    /// Sends one frame whose body is in this connection's mode.
    pub(crate) async fn send(&mut self, frame: &Frame) -> std::io::Result<()> {
        match self {
            Tx::Tcp(w) => {
                let mut buf = BytesMut::with_capacity(16 + frame.body.len());
                codec::encode_frame(frame, &mut buf);
                w.write_all(&buf).await
            }
            Tx::Ws(sink, mode) => {
                let msg = match mode {
                    WireMode::Binary => Message::Binary(codec::frame_to_bytes(frame)),
                    WireMode::Json => {
                        let text = json::frame_to_bytes(frame);
                        Message::Text(text.try_into().map_err(|_| std::io::Error::other("utf8"))?)
                    }
                };
                sink.send(msg).await.map_err(std::io::Error::other)
            }
            Tx::SocketIo(_) => Err(std::io::Error::other("no comet frames over socket.io")),
        }
    }

    /// op 18 (to a user) or op 20 (to a group).
    pub(crate) async fn send_msg(
        &mut self,
        op: u32,
        seq: u32,
        from: i32,
        to: i32,
        msg: Bytes,
    ) -> std::io::Result<()> {
        if let Tx::SocketIo(sink) = self {
            let event = if op == comet::core::op::SEND_TO_GROUP {
                "send_group"
            } else {
                "send_user"
            };
            let msg = std::str::from_utf8(&msg).map_err(std::io::Error::other)?;
            let packet = sio_event(seq, event, &SioSend { from, to, msg })?;
            return sio_send(sink, packet).await;
        }
        let body = SendRequest { from, to, msg }.encode(self.mode());
        self.send(&Frame::new(1, op, seq, body)).await
    }

    /// op 22: replay conversation `(kind, to)` after `after`, at most
    /// `limit` messages.
    pub(crate) async fn sync(
        &mut self,
        seq: u32,
        kind: u32,
        to: i32,
        after: i64,
        limit: u32,
    ) -> std::io::Result<()> {
        let body = SyncRequest {
            kind,
            to,
            after,
            limit: Some(limit),
        }
        .encode(self.mode());
        self.send(&Frame::new(1, op::SYNC, seq, body)).await
    }

    /// op 2 (nothing for socket.io: the server pings, [`Rx`] answers).
    pub(crate) async fn heartbeat(&mut self, seq: u32) -> std::io::Result<()> {
        if let Tx::SocketIo(_) = self {
            return Ok(());
        }
        self.send(&Frame::new(1, op::HEARTBEAT, seq, "")).await
    }
}

impl Rx {
    fn mode(&self) -> WireMode {
        match self {
            Rx::Tcp(_) => WireMode::Binary,
            Rx::Ws(_, mode) => *mode,
            Rx::SocketIo(..) => WireMode::Json,
        }
    }

    async fn frames(&mut self, out: &mut Vec<Frame>) -> Option<()> {
        match self {
            Rx::Tcp(r) => {
                out.push(r.next().await?.ok()?);
                Some(())
            }
            Rx::Ws(stream, mode) => loop {
                match stream.next().await? {
                    Ok(Message::Binary(data)) if *mode == WireMode::Binary => {
                        out.extend(codec::split_frames(data, MAX).ok()?);
                        return Some(());
                    }
                    Ok(Message::Text(text)) if *mode == WireMode::Json => {
                        out.push(json::decode_frame(Bytes::from(text)).ok()?);
                        return Some(());
                    }
                    Ok(Message::Close(_)) | Err(_) => return None,
                    Ok(_) => continue,
                }
            },
            Rx::SocketIo(..) => None,
        }
    }

    /// The next events, or `None` once the connection closed.
    pub(crate) async fn next(&mut self, events: &mut Vec<Event>) -> Option<()> {
        if let Rx::SocketIo(stream, sink) = self {
            let packet = sio_next(stream, sink).await?;
            events.push(sio_parse(&packet)?);
            return Some(());
        }
        let mut frames = Vec::new();
        self.frames(&mut frames).await?;
        let mode = self.mode();
        for f in frames {
            events.push(match f.op {
                op::BATCH => {
                    let inner = read_batch(mode, &f.body, MAX).ok()?;
                    Event::Msgs(
                        inner
                            .iter()
                            .filter_map(|i| Delivered::decode(mode, i).ok())
                            .collect(),
                    )
                }
                op::SEND_TO_USER_REPLY | op::SEND_TO_GROUP_REPLY => {
                    let r = SendReply::decode(mode, &f.body).ok()?;
                    Event::Ack { ret: r.ret }
                }
                op::SYNC_REPLY => {
                    let r = SyncReply::decode(mode, &f.body).ok()?;
                    Event::Synced {
                        ret: r.ret,
                        oldest: r.oldest,
                        head: r.head,
                    }
                }
                _ => Event::Other,
            });
        }
        Some(())
    }
}

/// Connects over `stream` and logs in as `mid` with mkey "k{mid}".
pub(crate) async fn login(
    stream: TcpStream,
    transport: Transport,
    addr: SocketAddr,
    mid: i32,
) -> std::io::Result<(Tx, Rx)> {
    let (mut tx, mut rx) = match transport {
        Transport::Tcp => {
            let (r, w) = stream.into_split();
            (
                Tx::Tcp(w),
                Rx::Tcp(FramedRead::with_capacity(r, TcpCodec::new(MAX), 4096)),
            )
        }
        Transport::WsJson | Transport::WsBinary => {
            let mode = if transport == Transport::WsJson {
                WireMode::Json
            } else {
                WireMode::Binary
            };
            let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/sub"), stream)
                .await
                .map_err(std::io::Error::other)?;
            let (sink, stream) = ws.split();
            (Tx::Ws(sink, mode), Rx::Ws(stream, mode))
        }
        Transport::SocketIo => {
            return tokio::time::timeout(Duration::from_secs(30), sio_login(stream, addr, mid))
                .await
                .map_err(|_| std::io::Error::other("no socket.io login within 30 s"))?;
        }
    };
    let body = format!(r#"{{"mid":{mid},"mkey":"k{mid}"}}"#);
    tx.send(&Frame::new(1, op::AUTH, 1, body)).await?;
    let mut frames = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), rx.frames(&mut frames))
        .await
        .map_err(|_| std::io::Error::other("no op 8 within 30 s"))?
        .ok_or_else(|| std::io::Error::other("closed before op 8"))?;
    let reply = frames
        .first()
        .ok_or_else(|| std::io::Error::other("no op 8"))?;
    match AuthReply::decode(&reply.body) {
        Ok(AuthReply::Ok { .. }) if reply.op == op::AUTH_REPLY => Ok((tx, rx)),
        other => Err(std::io::Error::other(format!(
            "login of {mid} failed: {other:?}"
        ))),
    }
}

// ---- socket.io (Engine.IO v4 packets over WebSocket text frames) ----
//
// Engine.IO: "0{..}" open, "1" close, "2" ping, "3" pong, "4<socket.io>"
// message. socket.io (namespace "/"): "0" connect, "1" disconnect,
// "2[id][event, data]" event, "3<id>[data]" ack, "4" connect error.

#[derive(serde::Serialize)]
struct SioSend<'a> {
    from: i32,
    to: i32,
    msg: &'a str,
}

#[derive(serde::Deserialize)]
struct SioAck {
    ret: i8,
}

#[derive(serde::Deserialize)]
struct SioMsg {
    op: u32,
    #[serde(rename = "chatId")]
    chat_id: i64,
    from: i32,
    to: i32,
    msg: String,
}

/// `42<ack id>["event",data]`.
fn sio_event<T: serde::Serialize>(ack_id: u32, event: &str, data: &T) -> std::io::Result<String> {
    let data = serde_json::to_string(data).map_err(std::io::Error::other)?;
    Ok(format!("42{ack_id}[\"{event}\",{data}]"))
}

async fn sio_send(sink: &SioSink, packet: String) -> std::io::Result<()> {
    sink.lock()
        .await
        .send(Message::Text(packet.into()))
        .await
        .map_err(std::io::Error::other)
}

/// The next socket.io packet (the text after Engine.IO's "4"), answering
/// pings on the way; `None` once the connection closed.
async fn sio_next(stream: &mut SplitStream<Ws>, sink: &SioSink) -> Option<String> {
    loop {
        match stream.next().await? {
            Ok(Message::Text(text)) => match text.as_bytes().first() {
                Some(b'4') => return Some(text.as_str()[1..].to_owned()),
                Some(b'2') => sio_send(sink, "3".to_owned()).await.ok()?,
                Some(b'1') => return None,
                _ => continue,
            },
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Skips the packet type and the ack id: the JSON array that follows.
fn sio_payload(packet: &str) -> &str {
    packet
        .get(1..)
        .unwrap_or_default()
        .trim_start_matches(|c: char| c.is_ascii_digit())
}

/// An event `msg` or an ack; `None` on anything unparsable or a disconnect.
fn sio_parse(packet: &str) -> Option<Event> {
    match packet.as_bytes().first()? {
        b'2' => match serde_json::from_str::<(String, SioMsg)>(sio_payload(packet)) {
            Ok((event, m)) if event == "msg" => Some(Event::Msgs(vec![Delivered {
                op: m.op,
                chat_id: m.chat_id,
                from: m.from,
                to: m.to,
                msg: Bytes::from(m.msg),
            }])),
            Ok(_) => Some(Event::Other),
            Err(_) => None,
        },
        b'3' => {
            let (ack,) = serde_json::from_str::<(SioAck,)>(sio_payload(packet)).ok()?;
            Some(Event::Ack { ret: ack.ret })
        }
        b'1' | b'4' => None,
        _ => Some(Event::Other),
    }
}

/// Engine.IO open, socket.io connect to "/", then `auth` with an ack.
async fn sio_login(stream: TcpStream, addr: SocketAddr, mid: i32) -> std::io::Result<(Tx, Rx)> {
    let stage = |what: &'static str| {
        move |_| std::io::Error::other(format!("socket.io login of {mid}: no {what} within 10 s"))
    };
    let wait = Duration::from_secs(10);
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (ws, _) = tokio::time::timeout(wait, tokio_tungstenite::client_async(url, stream))
        .await
        .map_err(stage("WebSocket upgrade"))?
        .map_err(std::io::Error::other)?;
    let (sink, mut stream) = ws.split();
    let sink: SioSink = Arc::new(tokio::sync::Mutex::new(sink));
    let closed = || std::io::Error::other("socket.io connection closed during login");
    match tokio::time::timeout(wait, stream.next())
        .await
        .map_err(stage("Engine.IO open packet"))?
    {
        Some(Ok(Message::Text(open))) if open.as_str().starts_with('0') => {}
        other => {
            return Err(std::io::Error::other(format!(
                "no Engine.IO open packet: {other:?}"
            )))
        }
    }
    sio_send(&sink, "40".to_owned()).await?;
    let connect = tokio::time::timeout(wait, sio_next(&mut stream, &sink))
        .await
        .map_err(stage("socket.io connect reply"))?
        .ok_or_else(closed)?;
    if !connect.starts_with('0') {
        return Err(std::io::Error::other(format!(
            "socket.io connect refused: {connect}"
        )));
    }
    let auth = serde_json::json!({"mid": mid, "mkey": format!("k{mid}")});
    sio_send(&sink, sio_event(1, "auth", &auth)?).await?;
    loop {
        let packet = sio_next(&mut stream, &sink).await.ok_or_else(closed)?;
        if !packet.starts_with('3') {
            continue;
        }
        let (reply,) = serde_json::from_str::<(serde_json::Value,)>(sio_payload(&packet))
            .map_err(std::io::Error::other)?;
        return if reply["ret"] == 0 {
            Ok((Tx::SocketIo(sink.clone()), Rx::SocketIo(stream, sink)))
        } else {
            Err(std::io::Error::other(format!(
                "login of {mid} failed: {reply}"
            )))
        };
    }
}
