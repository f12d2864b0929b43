//! The peer: comet's chat semantics built the idiomatic way on axum +
//! socketioxide, for a same-machine comparison.
//!
//! Events (all acknowledged): `auth` `{"mid","mkey"}` → `{"ret":0,"mid"}`;
//! `send_user` / `send_group` `{"from","to","msg"}` → `{"ret":0,"chatId"}`,
//! failures `{"ret":-1,...,"error"}`. Deliveries are the event `msg`
//! `{"op":18|20,"chatId","from","to","msg"}`, sent to room `u{mid}` (every
//! socket of a user) or `g{group}` (every socket of its members), never to
//! the sending socket. chatIds count per conversation (an unordered pair of
//! mids, or a group) from 1, and are assigned and emitted under one lock per
//! conversation, so every receiver gets them in order.
//!
//! socketioxide runs with its default settings (Engine.IO ping every 25 s
//! with a 20 s timeout, polling and WebSocket transports, the common JSON
//! parser, the in-process `LocalAdapter`, a 4 KiB WebSocket read buffer)
//! except for what a production chat server would tune:
//!
//! - `max_buffer_size(4096)` (default 128): the number of packets queued per
//!   socket for its writer. When the queue is full, socketioxide drops the
//!   packet for that socket (the emit returns an error) — a silent loss. 128
//!   is one burst: a client with more than 128 sends in flight loses acks,
//!   and a member of a busy group loses messages as soon as its writer lags
//!   128 messages behind. 4096 packets is comparable to comet's 4 MiB
//!   per-session write queue for small messages; the channel allocates
//!   lazily, so idle sockets do not pay for it.
//! - `ws_max_message_size` / `ws_max_frame_size` 64 KiB (defaults 64 MiB /
//!   16 MiB): the largest message a client may send, the same limit as
//!   comet's `max_body`, so one client cannot make the server buffer
//!   megabytes.
//! - `TCP_NODELAY` on accepted connections (`axum::serve` leaves Nagle's
//!   algorithm on): small chat packets otherwise wait for the peer's
//!   delayed ACK (up to 40 ms on Linux). comet and the ceiling set it too.
//!
//! Packet drops that still happen (a socket queue past 4096) are counted and
//! logged on stderr; the load generator reports them as lost messages.
//!
//! The listener is `comet::transports::bind` (listen backlog 4096), as for
//! comet and the ceiling: tokio's own `bind` uses 128, which drops SYNs
//! during a connection burst and makes clients wait a second to retry.

use std::collections::HashMap;

use socketioxide::handler::ConnectHandler as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::serve::ListenerExt;
use comet::core::frame::op;
use serde::{Deserialize, Serialize};
use serde_json::json;
use socketioxide::extract::{AckSender, MaybeExtension, SocketRef, State, TryData};
use socketioxide::{BroadcastError, SendError, SocketError, SocketIo, SocketIoBuilder};

use crate::Layout;

/// The authenticated mid, kept in the socket's extensions.
#[derive(Clone, Copy, Debug)]
struct Mid(i32);

#[derive(Deserialize)]
struct AuthRequest {
    mid: i32,
    mkey: String,
}

#[derive(Deserialize)]
struct SendRequest {
    from: i32,
    to: i32,
    msg: String,
}

/// The `msg` event.
#[derive(Serialize)]
struct Delivery<'a> {
    op: u32,
    #[serde(rename = "chatId")]
    chat_id: i64,
    from: i32,
    to: i32,
    msg: &'a str,
}

/// The chatId counter of one conversation; held while emitting, so
/// deliveries leave in chatId order.
type Counter = tokio::sync::Mutex<i64>;

/// Shared state: the user and group directory and the chatId counters.
struct Peer {
    layout: Layout,
    users: i32,
    /// One counter per group (index g-1); the lock is held while emitting.
    groups: Vec<Counter>,
    /// One counter per unordered pair of mids.
    direct: Mutex<HashMap<(i32, i32), Arc<Counter>>>,
    /// Packets socketioxide refused because a socket's queue was full.
    dropped: AtomicU64,
}

impl Peer {
    fn group_of(&self, mid: i32) -> Option<i32> {
        let g = (mid - 1) / self.layout.group_size.max(1) + 1;
        (g <= self.layout.groups && self.layout.members(g).contains(&mid)).then_some(g)
    }

    fn dropped(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        let after = before + n as u64;
        // Log at 1, 2, 4, 8, ... so a flood does not flood stderr too.
        if (before + 1).next_power_of_two() <= after {
            eprintln!("peer: {after} packets dropped (socket queue full)");
        }
    }

    /// Checks the sender and returns the authenticated mid.
    fn sender(mid: Option<Mid>, req: &SendRequest) -> Result<i32, &'static str> {
        let Some(Mid(mid)) = mid else {
            return Err("not authenticated");
        };
        if req.from != mid {
            return Err("from is not the authenticated mid");
        }
        Ok(mid)
    }

    /// Stores (assigns the chatId) and broadcasts one op 18 or op 20 send,
    /// returning its chatId.
    async fn send(
        &self,
        socket: &SocketRef,
        mid: Option<Mid>,
        op: u32,
        req: SendRequest,
    ) -> Result<i64, &'static str> {
        let from = Self::sender(mid, &req)?;
        let to = req.to;
        // The conversation's counter, and the rooms that get the message
        // (`to` broadcasts to every socket in them except this one).
        let direct;
        let (counter, rooms) = if op == op::SEND_TO_GROUP {
            let Some(counter) = usize::try_from(to - 1)
                .ok()
                .and_then(|g| self.groups.get(g))
            else {
                return Err("unknown group");
            };
            if !self.layout.members(to).contains(&from) {
                return Err("not a member of the group");
            }
            (counter, vec![format!("g{to}")])
        } else {
            if !(1..=self.users).contains(&to) {
                return Err("unknown recipient");
            }
            direct = self
                .direct
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((from.min(to), from.max(to)))
                .or_default()
                .clone();
            (&*direct, vec![format!("u{to}"), format!("u{from}")])
        };
        let mut chat_id = counter.lock().await;
        *chat_id += 1;
        let delivery = Delivery {
            op,
            chat_id: *chat_id,
            from,
            to,
            msg: &req.msg,
        };
        let sent = socket.to(rooms).emit("msg", &delivery).await;
        self.check(sent);
        Ok(*chat_id)
    }

    /// Counts deliveries socketioxide dropped for a full queue (a socket
    /// that is closing is no loss: its client is gone).
    fn check(&self, sent: Result<(), BroadcastError>) {
        match sent {
            Ok(()) => {}
            Err(BroadcastError::Socket(errors)) => self.dropped(
                errors
                    .iter()
                    .filter(|e| matches!(e, SocketError::InternalChannelFull))
                    .count(),
            ),
            Err(e) => {
                eprintln!("peer: broadcast failed: {e}");
                self.dropped(1);
            }
        }
    }

    /// Sends an ack, counting it if a full queue drops it.
    fn ack<T: Serialize>(&self, ack: AckSender, reply: &T) {
        if let Err(SendError::Socket(SocketError::InternalChannelFull)) = ack.send(reply) {
            self.dropped(1);
        }
    }
}

/// socketioxide's defaults plus the tuning listed at the top of this file.
fn builder() -> SocketIoBuilder {
    SocketIo::builder()
        .max_buffer_size(4096)
        .ws_max_message_size(64 * 1024)
        .ws_max_frame_size(64 * 1024)
}

/// The axum app: socketioxide's layer in front of an empty router.
fn app(builder: SocketIoBuilder, layout: Layout, users: i32) -> axum::Router {
    let peer = Arc::new(Peer {
        groups: (0..layout.groups.max(0)).map(|_| Counter::new(0)).collect(),
        layout,
        users,
        direct: Mutex::default(),
        dropped: AtomicU64::new(0),
    });
    let (layer, io) = builder.with_state(peer).build_layer();
    io.ns("/", on_connect.with(register_handlers));
    axum::Router::new().layer(layer)
}

/// Registers the event handlers in a connect *middleware*: socketioxide
/// awaits middlewares before it sends the connect packet, but spawns the
/// connect handler after sending it, so handlers registered there race a
/// fast client's first event ("auth"), which is then dropped without a word
/// (seen here about once in ten runs of 100 connections).
async fn register_handlers(socket: SocketRef) -> Result<(), std::convert::Infallible> {
    socket.on("auth", on_auth);
    socket.on("send_user", on_send_user);
    socket.on("send_group", on_send_group);
    Ok(())
}

/// Everything happens in [`register_handlers`].
async fn on_connect() {}

async fn on_auth(
    socket: SocketRef,
    State(peer): State<Arc<Peer>>,
    TryData(req): TryData<AuthRequest>,
    ack: AckSender,
) {
    let reply = match req {
        Err(e) => json!({"ret": -1, "error": format!("bad auth payload: {e}")}),
        Ok(_) if socket.extensions.get::<Mid>().is_some() => {
            json!({"ret": -1, "error": "already authenticated"})
        }
        Ok(AuthRequest { mid, mkey })
            if (1..=peer.users).contains(&mid) && mkey == format!("k{mid}") =>
        {
            socket.extensions.insert(Mid(mid));
            match peer.group_of(mid) {
                Some(g) => socket.join([format!("u{mid}"), format!("g{g}")]),
                None => socket.join(format!("u{mid}")),
            }
            json!({"ret": 0, "mid": mid})
        }
        Ok(_) => json!({"ret": -1, "error": "bad mid or mkey"}),
    };
    peer.ack(ack, &reply);
}

fn reply(result: Result<i64, &str>) -> serde_json::Value {
    match result {
        Ok(chat_id) => json!({"ret": 0, "chatId": chat_id}),
        Err(e) => json!({"ret": -1, "chatId": 0, "error": e}),
    }
}

async fn on_send_user(
    socket: SocketRef,
    State(peer): State<Arc<Peer>>,
    MaybeExtension(mid): MaybeExtension<Mid>,
    TryData(req): TryData<SendRequest>,
    ack: AckSender,
) {
    on_send(&socket, &peer, mid, op::SEND_TO_USER, req.ok(), ack).await;
}

async fn on_send_group(
    socket: SocketRef,
    State(peer): State<Arc<Peer>>,
    MaybeExtension(mid): MaybeExtension<Mid>,
    TryData(req): TryData<SendRequest>,
    ack: AckSender,
) {
    on_send(&socket, &peer, mid, op::SEND_TO_GROUP, req.ok(), ack).await;
}

async fn on_send(
    socket: &SocketRef,
    peer: &Peer,
    mid: Option<Mid>,
    op: u32,
    req: Option<SendRequest>,
    ack: AckSender,
) {
    let result = match req {
        Some(req) => peer.send(socket, mid, op, req).await,
        None => Err("bad send payload"),
    };
    peer.ack(ack, &reply(result));
}

/// Serves until the process ends: socket.io on `http://{addr}/socket.io/`
/// for users 1..=`users` (mkey "k{mid}") in the groups of `layout`.
pub(crate) async fn serve(addr: SocketAddr, layout: Layout, users: i32) -> std::io::Result<()> {
    let listener = comet::transports::bind(addr)?;
    eprintln!(
        "peer (axum + socketioxide) listening on {}",
        listener.local_addr()?
    );
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app(builder(), layout, users)).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use comet::core::frame::op;

    use super::{app, builder};
    use crate::proto::{login, Event, Rx, Sources, Transport};
    use crate::Layout;

    /// Reads events into a channel (keeping the connection answering pings).
    fn reader(mut rx: Rx) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
        let (tx, out) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut events = Vec::new();
            while rx.next(&mut events).await.is_some() {
                for e in events.drain(..) {
                    let _ = tx.send(e);
                }
            }
        });
        out
    }

    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event within 5 s")
            .expect("connection open")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chat_over_socket_io_survives_engine_io_pings() {
        let layout = Layout {
            groups: 1,
            group_size: 3,
        };
        // Pings every 100 ms: the connections below only live through many
        // of them if the load generator's client answers them.
        let io = builder()
            .ping_interval(Duration::from_millis(100))
            .ping_timeout(Duration::from_millis(100));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app(io, layout, 4)).await });
        let connect = |mid| async move {
            let stream = Sources(1).connect(0, addr).await.unwrap();
            login(stream, Transport::SocketIo, addr, mid).await
        };
        let stream = Sources(1).connect(0, addr).await.unwrap();
        assert!(login(stream, Transport::SocketIo, addr, 5).await.is_err());
        let (mut tx1, rx1) = connect(1).await.unwrap();
        let (_tx1b, rx1b) = connect(1).await.unwrap();
        let (_tx2, rx2) = connect(2).await.unwrap();
        let (_tx4, rx4) = connect(4).await.unwrap();
        let (mut rx1, mut rx1b, mut rx2, mut rx4) =
            (reader(rx1), reader(rx1b), reader(rx2), reader(rx4));
        tokio::time::sleep(Duration::from_millis(800)).await;

        for chat_id in 1..=2 {
            tx1.send_msg(op::SEND_TO_USER, 10 + chat_id, 1, 2, "hi".into())
                .await
                .unwrap();
            assert!(matches!(next(&mut rx1).await, Event::Ack { ret: 0 }));
            for rx in [&mut rx2, &mut rx1b] {
                let Event::Msgs(msgs) = next(rx).await else {
                    panic!("not a delivery")
                };
                assert_eq!(msgs.len(), 1);
                let m = &msgs[0];
                assert_eq!((m.op, m.chat_id, m.from, m.to), (18, chat_id as i64, 1, 2));
                assert_eq!(&m.msg[..], b"hi");
            }
        }
        tx1.send_msg(op::SEND_TO_GROUP, 20, 1, 1, "all".into())
            .await
            .unwrap();
        assert!(matches!(next(&mut rx1).await, Event::Ack { ret: 0 }));
        for rx in [&mut rx2, &mut rx1b] {
            let Event::Msgs(msgs) = next(rx).await else {
                panic!("not a delivery")
            };
            assert_eq!((msgs[0].op, msgs[0].chat_id, msgs[0].to), (20, 1, 1));
        }
        // Refused: a forged sender, a group the sender is not in.
        tx1.send_msg(op::SEND_TO_USER, 21, 2, 1, "x".into())
            .await
            .unwrap();
        assert!(matches!(next(&mut rx1).await, Event::Ack { ret: -1 }));
        tx1.send_msg(op::SEND_TO_GROUP, 22, 1, 2, "x".into())
            .await
            .unwrap();
        assert!(matches!(next(&mut rx1).await, Event::Ack { ret: -1 }));
        // User 4 is in no group and got nothing.
        assert!(rx4.try_recv().is_err());
    }
}
