//! The ceiling: a bare tokio server speaking the same protocol (TCP only)
//! with none of comet's features — no authentication backend (any op 7 is
//! accepted), no message store (only chatId counters), no middleware, no
//! limits. It shows what comet's features cost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use comet::core::codec::{self, TcpCodec};
use comet::core::frame::{op, WireMode};
use comet::core::payload::{AuthReply, Delivered, SendReply, SendRequest};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
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

/// Serves until the process ends.
pub(crate) async fn serve(addr: SocketAddr, layout: Layout) -> std::io::Result<()> {
    let listener = comet::transports::bind(addr)?;
    eprintln!("ceiling listening on {}", listener.local_addr()?);
    let state = Arc::new(State {
        groups: (0..layout.groups).map(|_| Mutex::new(0)).collect(),
        layout,
        sessions: RwLock::default(),
        direct: Mutex::default(),
    });
    let mut next = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        next += 1;
        tokio::spawn(connection(state.clone(), stream, next));
    }
}

async fn connection(state: Arc<State>, stream: tokio::net::TcpStream, id: u64) {
    let (r, mut w) = stream.into_split();
    let mut frames = FramedRead::with_capacity(r, TcpCodec::new(64 * 1024), 256);
    let Some(Ok(auth)) = frames.next().await else {
        return;
    };
    let mid = serde_json::from_slice::<serde_json::Value>(&auth.body)
        .ok()
        .and_then(|v| v["mid"].as_i64())
        .unwrap_or(0) as i32;
    if auth.op != op::AUTH || mid <= 0 {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
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
    let writer = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        while let Some(first) = rx.recv().await {
            let mut batch_start: Option<usize> = None;
            let mut item = Some(first);
            let mut n = 0;
            while let Some(out) = item.take() {
                match out {
                    Out::Frame(f) => {
                        close_batch(&mut buf, &mut batch_start);
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
            close_batch(&mut buf, &mut batch_start);
            if w.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
    });
    while let Some(Ok(frame)) = frames.next().await {
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
