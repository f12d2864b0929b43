//! The ceiling: a bare tokio server speaking the same protocol (TCP, and
//! binary frames over WebSocket through tokio-tungstenite, tuned as comet
//! tunes it) with
//! none of comet's features — no authentication backend (any op 7 is
//! accepted), no message store (only chatId counters), no middleware, no
//! limits. It shows what comet's features cost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use comet::core::codec::{self, TcpCodec};
use comet::core::frame::{op, WireMode};
use comet::core::payload::{AuthReply, Delivered, SendReply, SendRequest};
use futures_util::future::ready;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::codec::FramedRead;

use crate::Layout;

enum Out {
    Frame(Bytes),
    Inner(Bytes),
}

type Sessions = RwLock<HashMap<i32, Vec<(u64, mpsc::UnboundedSender<Out>)>>>;

struct State {
    layout: Layout,
    sessions: Sessions,
    groups: Vec<Mutex<i64>>,
    direct: Mutex<HashMap<(i32, i32), i64>>,
}

impl State {
    fn push(&self, mid: i32, except: u64, inner: &Bytes) {
        if let Some(list) = self
            .sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&mid)
        {
            for (id, tx) in list {
                if *id != except {
                    let _ = tx.send(Out::Inner(inner.clone()));
                }
            }
        }
    }
}

/// Serves until the process ends: TCP on `addr`, binary WebSocket frames on
/// `ws` if given.
pub(crate) async fn serve(
    addr: SocketAddr,
    ws: Option<SocketAddr>,
    layout: Layout,
) -> std::io::Result<()> {
    let listener = comet::transports::bind(addr)?;
    let ws_listener = ws.map(comet::transports::bind).transpose()?;
    eprintln!(
        "ceiling listening on {} ws {:?}",
        listener.local_addr()?,
        ws_listener.as_ref().map(|l| l.local_addr()).transpose()?
    );
    let state = Arc::new(State {
        groups: (0..layout.groups).map(|_| Mutex::new(0)).collect(),
        layout,
        sessions: RwLock::default(),
        direct: Mutex::default(),
    });
    let ids = Arc::new(AtomicU64::new(0));
    if let Some(ws_listener) = ws_listener {
        let (state, ids) = (state.clone(), ids.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = ws_listener.accept().await {
                let _ = stream.set_nodelay(true);
                let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
                tokio::spawn(ws_connection(state.clone(), stream, id));
            }
        });
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(connection(state.clone(), stream, id));
    }
}

async fn connection(state: Arc<State>, stream: tokio::net::TcpStream, id: u64) {
    let (r, mut w) = stream.into_split();
    let frames = FramedRead::with_capacity(r, TcpCodec::new(64 * 1024), 256)
        .take_while(|r| ready(r.is_ok()))
        .filter_map(|r| ready(r.ok()));
    session(state, frames, id, move |mut rx| async move {
        let mut buf = BytesMut::new();
        while fill(&mut rx, &mut buf).await {
            if w.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
    })
    .await;
}

/// Binary frames over WebSocket: each message holds whole frames, and each
/// write is one message.
async fn ws_connection(state: Arc<State>, stream: tokio::net::TcpStream, id: u64) {
    // comet's WebSocket tuning, as comet_transports::ws sets it for a
    // max_body of 64 KiB (tungstenite's default 128 KiB read buffer would
    // make this ceiling cost 137 KB per idle connection).
    let max_message = 2 * 64 * 1024 + 1024;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut sink, source) = ws.split();
    let frames = source
        .take_while(|msg| ready(msg.is_ok()))
        .filter_map(|msg| {
            ready(match msg {
                Ok(Message::Binary(data)) => codec::split_frames(data, 64 * 1024).ok(),
                _ => None,
            })
        })
        .flat_map(futures_util::stream::iter);
    session(state, frames, id, move |mut rx| async move {
        let mut buf = BytesMut::new();
        while fill(&mut rx, &mut buf).await {
            if sink
                .send(Message::Binary(buf.split().freeze()))
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await;
}

/// Waits for the next outgoing item and writes it, and whatever else is
/// already queued (up to 256 items), into `buf`; delivered messages go into
/// op 9 batches. `false` once the session is gone.
async fn fill(rx: &mut mpsc::UnboundedReceiver<Out>, buf: &mut BytesMut) -> bool {
    let Some(first) = rx.recv().await else {
        return false;
    };
    let mut batch_start: Option<usize> = None;
    let mut item = Some(first);
    let mut n = 0;
    while let Some(out) = item.take() {
        match out {
            Out::Frame(f) => {
                close_batch(buf, &mut batch_start);
                buf.extend_from_slice(&f);
            }
            Out::Inner(inner) => {
                if batch_start.is_none() {
                    batch_start = Some(buf.len());
                    buf.extend_from_slice(&[0; 16]);
                }
                buf.extend_from_slice(&inner);
            }
        }
        n += 1;
        if n < 256 {
            item = rx.try_recv().ok();
        }
    }
    close_batch(buf, &mut batch_start);
    true
}

/// One connection: op 7 (any mid accepted), then its writer on a task of its
/// own and ops 2, 18 and 20 until the frames end.
async fn session<F, W, Fut>(state: Arc<State>, mut frames: F, id: u64, writer: W)
where
    F: futures_util::Stream<Item = comet::core::Frame> + Unpin,
    W: FnOnce(mpsc::UnboundedReceiver<Out>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(auth) = frames.next().await else {
        return;
    };
    let mid = serde_json::from_slice::<serde_json::Value>(&auth.body)
        .ok()
        .and_then(|v| v["mid"].as_i64())
        .unwrap_or(0) as i32;
    if auth.op != op::AUTH || mid <= 0 {
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(Out::Frame(codec::frame_to_bytes(
        &auth.reply(op::AUTH_REPLY, AuthReply::Ok { mid }.encode()),
    )));
    state
        .sessions
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .entry(mid)
        .or_default()
        .push((id, tx.clone()));
    let writer = tokio::spawn(writer(rx));
    while let Some(frame) = frames.next().await {
        match frame.op {
            op::HEARTBEAT => {
                let _ = tx.send(Out::Frame(codec::frame_to_bytes(
                    &frame.reply(op::HEARTBEAT_REPLY, ""),
                )));
            }
            op::SEND_TO_USER | op::SEND_TO_GROUP => {
                let Ok(req) = SendRequest::decode(WireMode::Binary, &frame.body) else {
                    continue;
                };
                let chat_id = send(&state, frame.op, &req, id);
                let reply = frame.reply(
                    frame.op + 1,
                    SendReply::ok(chat_id).encode(WireMode::Binary),
                );
                let _ = tx.send(Out::Frame(codec::frame_to_bytes(&reply)));
            }
            _ => {}
        }
    }
    if let Some(list) = state
        .sessions
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(&mid)
    {
        list.retain(|(i, _)| *i != id);
    }
    writer.abort();
}

fn close_batch(buf: &mut BytesMut, start: &mut Option<usize>) {
    if let Some(s) = start.take() {
        let body = buf.len() - s - 16;
        let mut header = &mut buf[s..s + 16];
        codec::put_header(&mut header, body, 1, op::BATCH, 0);
    }
}

fn send(state: &State, op: u32, req: &SendRequest, except: u64) -> i64 {
    let inner = |chat_id| {
        Delivered {
            op,
            chat_id,
            from: req.from,
            to: req.to,
            msg: req.msg.clone(),
        }
        .encode_frame(WireMode::Binary)
    };
    if op == op::SEND_TO_GROUP {
        let g = (req.to - 1) as usize;
        let Some(counter) = state.groups.get(g) else {
            return 0;
        };
        let mut counter = counter.lock().unwrap_or_else(|e| e.into_inner());
        *counter += 1;
        let frame = inner(*counter);
        for m in state.layout.members(req.to) {
            state.push(m, except, &frame);
        }
        *counter
    } else {
        let key = (req.from.min(req.to), req.from.max(req.to));
        let mut direct = state.direct.lock().unwrap_or_else(|e| e.into_inner());
        let counter = direct.entry(key).or_insert(0);
        *counter += 1;
        let frame = inner(*counter);
        state.push(req.to, except, &frame);
        if req.to != req.from {
            state.push(req.from, except, &frame);
        }
        *counter
    }
}
