//! Client connections of the load generator: comet's protocol over TCP,
//! WebSocket JSON and WebSocket binary, split into a sending and a receiving
//! half so a connection can send and read concurrently.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use comet::core::codec::{self, json, read_batch, TcpCodec};
use comet::core::frame::{op, Frame, WireMode};
use comet::core::payload::{AuthReply, Delivered, SendReply, SendRequest};
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
}

/// Something the server sent.
#[derive(Debug)]
pub(crate) enum Event {
    /// A reply to op 18/20.
    Ack { ret: i8 },
    /// Messages delivered in one op 9.
    Msgs(Vec<Delivered>),
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
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

type Ws = WebSocketStream<TcpStream>;

/// The sending half.
pub(crate) enum Tx {
    Tcp(OwnedWriteHalf),
    Ws(SplitSink<Ws, Message>, WireMode),
}

/// The receiving half.
pub(crate) enum Rx {
    Tcp(FramedRead<OwnedReadHalf, TcpCodec>),
    Ws(SplitStream<Ws>, WireMode),
}

const MAX: usize = 1 << 20;

impl Tx {
    fn mode(&self) -> WireMode {
        match self {
            Tx::Tcp(_) => WireMode::Binary,
            Tx::Ws(_, mode) => *mode,
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
        let body = SendRequest { from, to, msg }.encode(self.mode());
        self.send(&Frame::new(1, op, seq, body)).await
    }

    /// op 2.
    pub(crate) async fn heartbeat(&mut self, seq: u32) -> std::io::Result<()> {
        self.send(&Frame::new(1, op::HEARTBEAT, seq, "")).await
    }
}

impl Rx {
    fn mode(&self) -> WireMode {
        match self {
            Rx::Tcp(_) => WireMode::Binary,
            Rx::Ws(_, mode) => *mode,
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
        }
    }

    /// The next events, or `None` once the connection closed.
    pub(crate) async fn next(&mut self, events: &mut Vec<Event>) -> Option<()> {
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
