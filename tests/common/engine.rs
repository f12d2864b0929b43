//! An in-process client of the session engine over channels: no sockets,
//! the same `Comet::serve` loop every transport uses.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use comet::core::codec::{json, read_batch, TcpCodec};
use comet::core::frame::{op, Frame, Transport, WireMode};
use comet::core::payload::{AuthReply, Delivered, SendReply, SendRequest};
use comet::core::{Comet, Config, FrameError, Outgoing, SessionEnd};
use comet::plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::codec::Decoder;
use tokio_util::sync::PollSender;

use super::within;

/// A comet on the in-memory plug-ins: users 1..=50 with mkey "k{mid}",
/// group 100 = {1, 2, 3}.
pub struct Setup {
    pub comet: Comet,
    pub auth: Arc<MemoryAuth>,
    pub store: Arc<MemoryStore>,
    pub groups: Arc<MemoryGroups>,
}

pub fn setup(config: Config) -> Setup {
    let auth = Arc::new(MemoryAuth::from_iter(
        (1..=50).map(|m| (m, format!("k{m}"))),
    ));
    let store = Arc::new(MemoryStore::default());
    let groups = Arc::new(MemoryGroups::default());
    groups.set_members(100, [1, 2, 3]);
    let comet = Comet::builder()
        .authenticator(auth.clone())
        .store(store.clone())
        .groups(groups.clone())
        .config(config)
        .build()
        .expect("build");
    Setup {
        comet,
        auth,
        store,
        groups,
    }
}

/// One connection driven by the test.
pub struct Conn {
    pub mode: WireMode,
    tx: Option<mpsc::Sender<Result<Frame, FrameError>>>,
    rx: mpsc::Receiver<Outgoing>,
    frames: VecDeque<Frame>,
    delivered: VecDeque<Delivered>,
    pub closed: Option<(u16, String)>,
    pub task: JoinHandle<SessionEnd>,
    seq: u32,
}

impl Conn {
    /// Connects with an outbound channel of `capacity` wire units.
    pub fn connect_with(comet: &Comet, mode: WireMode, capacity: usize) -> Conn {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, out_rx) = mpsc::channel(capacity);
        let info = comet.conn_info(Transport::Local, mode, "127.0.0.1:9".parse().unwrap());
        let comet = comet.clone();
        let task = tokio::spawn(async move {
            comet
                .serve(info, ReceiverStream::new(in_rx), PollSender::new(out_tx))
                .await
        });
        Conn {
            mode,
            tx: Some(in_tx),
            rx: out_rx,
            frames: VecDeque::new(),
            delivered: VecDeque::new(),
            closed: None,
            task,
            seq: 0,
        }
    }

    pub fn connect(comet: &Comet, mode: WireMode) -> Conn {
        Conn::connect_with(comet, mode, 1024)
    }

    /// Connects and logs in as `mid` (mkey "k{mid}"), asserting success.
    pub async fn login(comet: &Comet, mode: WireMode, mid: i32) -> Conn {
        let mut conn = Conn::connect(comet, mode);
        let reply = conn
            .auth(&format!(r#"{{"mid":{mid},"mkey":"k{mid}"}}"#))
            .await;
        assert_eq!(reply, AuthReply::Ok { mid });
        conn
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Sends a raw frame (or a transport error).
    pub async fn send_raw(&mut self, item: Result<Frame, FrameError>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(item).await;
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        self.send_raw(Ok(frame)).await
    }

    /// Makes every write of the server fail from now on (the transport is
    /// gone).
    pub fn break_transport(&mut self) {
        self.rx.close();
    }

    /// Closes the client's sending side (the peer hangs up).
    pub fn hang_up(&mut self) {
        self.tx = None;
    }

    /// Sends op 7 with `body` and returns the op 8 reply.
    pub async fn auth(&mut self, body: &str) -> AuthReply {
        let seq = self.next_seq();
        self.send(Frame::new(1, op::AUTH, seq, Bytes::from(body.to_owned())))
            .await;
        let reply = self.reply().await.expect("op 8");
        assert_eq!((reply.op, reply.seq), (op::AUTH_REPLY, seq));
        AuthReply::decode(&reply.body).expect("op 8 body")
    }

    fn push_unit(&mut self, unit: Bytes) {
        match self.mode {
            WireMode::Binary => {
                let mut buf = BytesMut::from(&unit[..]);
                let mut codec = TcpCodec::new(1 << 20);
                while let Some(frame) = codec.decode(&mut buf).expect("server frame") {
                    self.frames.push_back(frame);
                }
                assert!(buf.is_empty(), "a write holds whole frames");
            }
            WireMode::Json => self
                .frames
                .push_back(json::decode_frame(unit).expect("server JSON frame")),
        }
    }

    /// The next frame from the server, or `None` once it closed.
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.frames.pop_front() {
                return Some(f);
            }
            if self.closed.is_some() {
                return None;
            }
            match within("a server frame", self.rx.recv()).await {
                Some(Outgoing::Data(unit)) => self.push_unit(unit),
                Some(Outgoing::Close { code, reason }) => self.closed = Some((code, reason)),
                None => {
                    self.closed = Some((0, "channel closed".into()));
                }
            }
        }
    }

    fn unpack(&mut self, batch: &Frame) {
        assert_eq!((batch.ver, batch.seq), (1, 0), "op 9 is server-initiated");
        let max = 1 << 20;
        for inner in read_batch(self.mode, &batch.body, max).expect("op 9 body") {
            assert!(
                inner.op == op::SEND_TO_USER || inner.op == op::SEND_TO_GROUP,
                "op 9 holds only op 18 and op 20"
            );
            assert_eq!((inner.ver, inner.seq), (1, 0));
            self.delivered
                .push_back(Delivered::decode(self.mode, &inner).expect("delivered body"));
        }
    }

    /// The next frame that is not an op 9 (op 9s are unpacked for
    /// [`delivered`](Self::delivered)), or `None` once closed.
    pub async fn reply(&mut self) -> Option<Frame> {
        loop {
            let f = self.frame().await?;
            if f.op == op::BATCH {
                self.unpack(&f);
            } else {
                return Some(f);
            }
        }
    }

    /// The next delivered message.
    pub async fn delivered(&mut self) -> Delivered {
        loop {
            if let Some(d) = self.delivered.pop_front() {
                return d;
            }
            let f = self
                .frame()
                .await
                .expect("connection closed before a delivery");
            assert_eq!(f.op, op::BATCH, "expected op 9, got {f:?}");
            self.unpack(&f);
        }
    }

    /// Sends op 18/20 and returns the reply.
    pub async fn send_msg(
        &mut self,
        op: u32,
        from: i32,
        to: i32,
        msg: impl Into<Bytes>,
    ) -> SendReply {
        let req = SendRequest {
            from,
            to,
            msg: msg.into(),
        };
        let body = req.encode(self.mode);
        self.send_body(op, body).await
    }

    /// Sends op 18/20 with a raw body and returns the reply.
    pub async fn send_body(&mut self, op: u32, body: Bytes) -> SendReply {
        let seq = self.next_seq();
        self.send(Frame::new(1, op, seq, body)).await;
        let reply = self.reply().await.expect("send reply");
        assert_eq!((reply.op, reply.seq), (op + 1, seq));
        SendReply::decode(self.mode, &reply.body).expect("reply body")
    }

    /// A heartbeat round trip: everything queued for this connection before
    /// it has arrived when it returns (replies and deliveries share one
    /// ordered queue).
    pub async fn sync(&mut self) {
        let seq = self.next_seq();
        self.send(Frame::new(1, op::HEARTBEAT, seq, "")).await;
        let reply = self.reply().await.expect("op 3");
        assert_eq!(
            (reply.op, reply.seq, reply.body.len()),
            (op::HEARTBEAT_REPLY, seq, 0)
        );
    }

    /// Asserts nothing was delivered to this connection (after a sync).
    pub async fn assert_no_delivery(&mut self) {
        self.sync().await;
        assert!(
            self.delivered.is_empty(),
            "unexpected delivery: {:?}",
            self.delivered
        );
    }

    /// Waits for the session to end and returns why (and the close frame).
    pub async fn end(mut self) -> (SessionEnd, Option<(u16, String)>) {
        let end = within("the session to end", &mut self.task)
            .await
            .expect("session task");
        while self.closed.is_none() {
            match self.rx.try_recv() {
                Ok(Outgoing::Close { code, reason }) => self.closed = Some((code, reason)),
                Ok(Outgoing::Data(unit)) => self.push_unit(unit),
                Err(_) => break,
            }
        }
        (end, self.closed)
    }
}
