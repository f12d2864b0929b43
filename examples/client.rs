//! A command-line chat client for comet servers, built on the library's codecs
//! (`comet::core::codec`, `comet::core::payload`). It speaks all three client
//! modes of PROTOCOL.md: TCP, WebSocket text (JSON) and WebSocket binary (goim v2).
//!
//! Start the example server first (`cargo run --example chat_server`: TCP on
//! 127.0.0.1:3101, WebSocket on 127.0.0.1:3102 path `/sub`; users 1..4 with
//! mkey k1..k4; group 100 = {1, 2, 3}), then:
//!
//! ```text
//! # interactive, over TCP (default address 127.0.0.1:3101)
//! cargo run --example client -- --transport tcp --mid 1 --mkey k1
//!
//! # interactive, over WebSocket JSON or binary (default address 127.0.0.1:3102, path /sub)
//! cargo run --example client -- --transport ws-json --mid 2 --mkey k2
//! cargo run --example client -- --transport ws-binary --addr 127.0.0.1:3102 --path /sub --mid 3 --mkey k3
//!
//! # scripts: send one message, print the reply and whatever arrives within 500 ms
//! cargo run --example client -- --transport tcp --mid 1 --mkey k1 --send-to 2 --text hello
//! cargo run --example client -- --transport ws-binary --mid 3 --mkey k3 --send-group 100 --text "hi all" --wait-ms 1000
//!
//! # scripts: print incoming messages for 3 s, then exit
//! cargo run --example client -- --transport ws-json --mid 2 --mkey k2 --listen-ms 3000
//!
//! # interactive commands piped in
//! printf '/to 2 hey\n/hex 2 ff00\n/quit\n' | cargo run --example client -- --transport tcp --mid 1 --mkey k1
//! ```
//!
//! Interactive commands, one per line on stdin:
//!
//! - `/to MID text...`: send `text` to user MID (op 18);
//! - `/group GID text...`: send `text` to group GID (op 20);
//! - `/hex MID 41ff00`: send raw bytes, written in hex, to user MID (to test
//!   messages that are not UTF-8);
//! - `/sync user|group ID [AFTER]` (or `/sync 18|20 ID [AFTER]`): replay
//!   the conversation with user ID or group ID after chatId AFTER (default:
//!   the last chatId this client holds there) with op 22, page by page
//!   until its head;
//! - a line without a leading `/`: send it to the last target;
//! - `/help`; `/quit` (or end of input): wait up to 2 s for outstanding
//!   replies, close the connection and exit.
//!
//! Output, on stdout: `auth ok: mid=1`; each send's reply (`ok chatId=N`, or
//! `failed: reason`; binary replies carry no reason: `failed (ret -1)`); each
//! delivered message (`[user] chatId=7 from=1 to=2: hi`,
//! `[group 100] chatId=4 from=1: yo`, bytes that are not UTF-8 as `hex:ff00`);
//! heartbeat replies only with `--verbose`; and the close of the connection by
//! the server (WebSocket close code and reason, or TCP EOF).
//!
//! The client keeps, per conversation, the highest chatId it holds: it drops
//! a message it already has (a sync may replay what also arrived live),
//! and when a live message skips chatIds it syncs the gap. Interactive and
//! `--listen-ms` sessions reconnect when the server closes the connection
//! (backoff from 0.5 s to 10 s; `--no-reconnect` turns it off) and then ask
//! every conversation seen so far for what came after the last chatId held.
//! Sync replies print as `sync user 2: oldest=1 head=9`.
//!
//! Errors go to stderr. Exit status: 0 on a clean end (`/quit`, end of input,
//! `--listen-ms`/`--wait-ms` elapsed); 1 when authentication fails, the
//! connection fails or is closed by the server, or (with `--send-to` /
//! `--send-group`) the send fails or gets no reply.

use std::collections::{HashMap, VecDeque};
use std::process::ExitCode;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use comet::core::codec::{self, json, read_batch, TcpCodec};
use comet::core::frame::{op, Frame, WireMode};
use comet::core::payload::{AuthReply, Delivered, SendReply, SendRequest, SyncReply, SyncRequest};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::codec::{FramedRead, FramedWrite};

/// Largest body the client accepts from the server. The server enforces its own
/// `max_body`; the client only guards against nonsense lengths.
const CLIENT_MAX_BODY: usize = 16 * 1024 * 1024;
/// The `ver` the client writes.
const VER: u16 = 1;
/// How long to wait for the TCP connect / WebSocket upgrade, and for op 8.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a non-interactive send waits for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/quit` waits for replies still outstanding.
const QUIT_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    /// TCP with binary frames.
    Tcp,
    /// WebSocket, one JSON object per text frame.
    WsJson,
    /// WebSocket, goim v2 binary frames.
    WsBinary,
}

#[derive(Parser, Debug)]
#[command(about = "comet chat client (TCP, WebSocket JSON or WebSocket binary)")]
struct Args {
    /// Transport and wire mode.
    #[arg(long, value_enum, default_value = "tcp")]
    transport: TransportArg,
    /// Server address; default 127.0.0.1:3101 for tcp, 127.0.0.1:3102 for ws modes.
    #[arg(long)]
    addr: Option<String>,
    /// WebSocket path.
    #[arg(long, default_value = "/sub")]
    path: String,
    /// The user id to authenticate as.
    #[arg(long, allow_negative_numbers = true)]
    mid: i32,
    /// The user's key.
    #[arg(long)]
    mkey: String,
    /// Seconds between heartbeats (op 2).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_secs: u64,
    /// Also print heartbeat replies (op 3) and connection details.
    #[arg(long)]
    verbose: bool,
    /// Non-interactive: send one message to this user, print the reply, then wait.
    #[arg(long, value_name = "MID", allow_negative_numbers = true, requires = "text",
          conflicts_with_all = ["send_group", "listen_ms"])]
    send_to: Option<i32>,
    /// Non-interactive: send one message to this group, print the reply, then wait.
    #[arg(
        long,
        value_name = "GID",
        allow_negative_numbers = true,
        requires = "text",
        conflicts_with = "listen_ms"
    )]
    send_group: Option<i32>,
    /// The message of --send-to / --send-group.
    #[arg(long)]
    text: Option<String>,
    /// After --send-to / --send-group: print what arrives for this many ms, then exit.
    #[arg(long, default_value_t = 500)]
    wait_ms: u64,
    /// Non-interactive: print incoming messages for this many ms, then exit.
    #[arg(long, value_name = "N")]
    listen_ms: Option<u64>,
    /// Exit when the server closes the connection instead of reconnecting
    /// (and syncing every conversation seen).
    #[arg(long)]
    no_reconnect: bool,
}

/// Where a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Target {
    User(i32),
    Group(i32),
}

impl Target {
    fn op(self) -> u32 {
        match self {
            Target::User(_) => op::SEND_TO_USER,
            Target::Group(_) => op::SEND_TO_GROUP,
        }
    }

    fn id(self) -> i32 {
        match self {
            Target::User(id) | Target::Group(id) => id,
        }
    }

    /// The conversation a delivered message belongs to, seen by `me`.
    fn of(d: &Delivered, me: i32) -> Target {
        match d.op {
            op::SEND_TO_GROUP => Target::Group(d.to),
            _ if d.from == me => Target::User(d.to),
            _ => Target::User(d.from),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::User(id) => write!(f, "user {id}"),
            Target::Group(id) => write!(f, "group {id}"),
        }
    }
}

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The write half of a connection.
enum Tx {
    Tcp(FramedWrite<OwnedWriteHalf, TcpCodec>),
    Ws(SplitSink<WsStream, Message>, WireMode),
}

impl Tx {
    async fn send(&mut self, frame: Frame) -> Result<(), String> {
        match self {
            Tx::Tcp(sink) => sink
                .send(frame)
                .await
                .map_err(|e| format!("write failed: {e}")),
            Tx::Ws(sink, mode) => {
                let msg = match mode {
                    WireMode::Binary => Message::Binary(codec::frame_to_bytes(&frame)),
                    WireMode::Json => {
                        let text = String::from_utf8(json::frame_to_bytes(&frame).to_vec())
                            .map_err(|e| format!("frame is not UTF-8 JSON: {e}"))?;
                        Message::text(text)
                    }
                };
                sink.send(msg)
                    .await
                    .map_err(|e| format!("write failed: {e}"))
            }
        }
    }

    /// Starts a clean close: a WebSocket close frame, or a TCP write shutdown.
    async fn close(&mut self) {
        match self {
            Tx::Tcp(sink) => {
                let _ = SinkExt::<Frame>::close(sink).await;
            }
            Tx::Ws(sink, _) => {
                let _ = sink.send(Message::Close(None)).await;
            }
        }
    }
}

/// What the read half yields.
enum Incoming {
    Frame(Frame),
    /// The server ended the connection; the text says how.
    Closed(String),
}

/// The read half of a connection.
enum Rx {
    Tcp(FramedRead<OwnedReadHalf, TcpCodec>),
    Ws {
        stream: SplitStream<WsStream>,
        mode: WireMode,
        /// Frames of a binary message not yet handed out.
        pending: VecDeque<Frame>,
    },
}

impl Rx {
    /// The next frame or the close. Cancel-safe: the only await is a stream's
    /// `next`, and frames already read wait in `pending`.
    async fn next(&mut self) -> Result<Incoming, String> {
        match self {
            Rx::Tcp(stream) => match stream.next().await {
                Some(Ok(frame)) => Ok(Incoming::Frame(frame)),
                Some(Err(e)) => Err(format!("bad frame from server: {e}")),
                None => Ok(Incoming::Closed(
                    "connection closed by server (TCP EOF)".into(),
                )),
            },
            Rx::Ws {
                stream,
                mode,
                pending,
            } => loop {
                if let Some(frame) = pending.pop_front() {
                    return Ok(Incoming::Frame(frame));
                }
                let msg = match stream.next().await {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => return Err(format!("WebSocket error: {e}")),
                    None => {
                        return Ok(Incoming::Closed(
                            "connection closed by server (no close frame)".into(),
                        ))
                    }
                };
                match (msg, *mode) {
                    (Message::Text(text), WireMode::Json) => {
                        let frame = json::decode_frame(Bytes::from(text))
                            .map_err(|e| format!("bad JSON frame from server: {e}"))?;
                        return Ok(Incoming::Frame(frame));
                    }
                    (Message::Binary(data), WireMode::Binary) => {
                        let frames = codec::split_frames(data, CLIENT_MAX_BODY)
                            .map_err(|e| format!("bad binary frame from server: {e}"))?;
                        pending.extend(frames);
                    }
                    (Message::Text(_), WireMode::Binary) => {
                        return Err("server sent a text message in binary mode".into())
                    }
                    (Message::Binary(_), WireMode::Json) => {
                        return Err("server sent a binary message in JSON mode".into())
                    }
                    (Message::Close(Some(close)), _) => {
                        return Ok(Incoming::Closed(format!(
                            "connection closed by server: code {} reason {:?}",
                            u16::from(close.code),
                            close.reason.as_str()
                        )))
                    }
                    (Message::Close(None), _) => {
                        return Ok(Incoming::Closed(
                            "connection closed by server: no close code".into(),
                        ))
                    }
                    // Pings are answered by tungstenite itself.
                    (Message::Ping(_) | Message::Pong(_) | Message::Frame(_), _) => {}
                }
            },
        }
    }
}

/// Why [`Session::pump`] returned.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The deadline passed.
    Deadline,
    /// No reply is outstanding any more (only when asked for).
    Replied,
    /// `/quit` or end of stdin.
    Quit,
    /// The server closed the connection (already printed).
    Closed,
}

/// An authenticated connection.
struct Session {
    tx: Tx,
    rx: Rx,
    mode: WireMode,
    mid: i32,
    next_seq: u32,
    /// seq → target of sends whose reply has not arrived.
    outstanding: HashMap<u32, Target>,
    /// seq → conversation of syncs whose op 23 has not arrived.
    syncing: HashMap<u32, Target>,
    /// The highest chatId held per conversation.
    held: HashMap<Target, i64>,
    failed_sends: usize,
    last_target: Option<Target>,
    verbose: bool,
    heartbeat: tokio::time::Interval,
}

impl Session {
    fn seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    /// Sends op 18 / op 20 and remembers its seq for the reply.
    async fn send_msg(&mut self, target: Target, msg: Bytes) -> Result<(), String> {
        let body = SendRequest {
            from: self.mid,
            to: target.id(),
            msg,
        }
        .encode(self.mode);
        let seq = self.seq();
        self.outstanding.insert(seq, target);
        self.last_target = Some(target);
        self.tx.send(Frame::new(VER, target.op(), seq, body)).await
    }

    /// Sends op 22 for `target` after `after` (the server's cap as limit).
    async fn sync(&mut self, target: Target, after: i64) -> Result<(), String> {
        let body = SyncRequest {
            kind: target.op(),
            to: target.id(),
            after,
            limit: None,
        }
        .encode(self.mode);
        let seq = self.seq();
        self.syncing.insert(seq, target);
        self.tx.send(Frame::new(VER, op::SYNC, seq, body)).await
    }

    /// Asks every conversation seen for what came after the last chatId
    /// held (after a reconnect).
    async fn sync_all(&mut self) -> Result<(), String> {
        let mut seen: Vec<(Target, i64)> = self.held.iter().map(|(t, id)| (*t, *id)).collect();
        seen.sort_by_key(|(t, _)| (t.op(), t.id()));
        for (target, after) in seen {
            self.sync(target, after).await?;
        }
        Ok(())
    }

    /// Prints a delivered message unless it is already held; syncs a gap
    /// before it. Returns the sync to send, if any.
    fn on_delivered(&mut self, d: &Delivered) -> Option<(Target, i64)> {
        let target = Target::of(d, self.mid);
        let held = self.held.entry(target).or_insert(0);
        if d.chat_id <= *held {
            if self.verbose {
                println!("(dropped chatId {} of {target}: already held)", d.chat_id);
            }
            return None;
        }
        let gap = (*held > 0 && d.chat_id > *held + 1).then_some(*held);
        *held = d.chat_id;
        println!("{}", format_delivered(d));
        let syncing = self.syncing.values().any(|t| *t == target);
        match gap {
            Some(after) if !syncing => {
                println!("(gap in {target} after chatId {after}: syncing)");
                Some((target, after))
            }
            _ => None,
        }
    }

    /// Handles one frame from the server, then sends the syncs it calls
    /// for (a gap, a replay that did not reach the head yet).
    async fn on_frame(&mut self, frame: Frame) -> Result<(), String> {
        let mut syncs = Vec::new();
        self.print_frame(frame, &mut syncs);
        for (target, after) in syncs {
            self.sync(target, after).await?;
        }
        Ok(())
    }

    /// Prints one frame from the server; pushes the syncs it calls for.
    fn print_frame(&mut self, frame: Frame, syncs: &mut Vec<(Target, i64)>) {
        match frame.op {
            op::BATCH => match read_batch(self.mode, &frame.body, CLIENT_MAX_BODY) {
                Ok(inner) => {
                    for f in inner {
                        match Delivered::decode(self.mode, &f) {
                            Ok(d) => syncs.extend(self.on_delivered(&d)),
                            Err(e) => eprintln!("error: bad message in op 9: {e}"),
                        }
                    }
                }
                Err(e) => eprintln!("error: bad op 9 batch: {e}"),
            },
            op::SYNC_REPLY => {
                let target = self.syncing.remove(&frame.seq);
                match (SyncReply::decode(self.mode, &frame.body), target) {
                    (Ok(reply), Some(target)) if reply.ret == 0 => {
                        println!("sync {target}: oldest={} head={}", reply.oldest, reply.head);
                        let held = self.held.get(&target).copied().unwrap_or(0);
                        if held < reply.oldest.saturating_sub(1) {
                            println!("(chatIds before {} of {target} are gone)", reply.oldest);
                        }
                        // A page short of the head: ask for the next one.
                        if held < reply.head && held >= reply.oldest {
                            syncs.push((target, held));
                        }
                    }
                    (Ok(reply), target) => {
                        let what = target.map_or("?".to_owned(), |t| t.to_string());
                        match reply.error {
                            Some(reason) => println!("sync {what} failed: {reason}"),
                            None => println!("sync {what} failed (ret {})", reply.ret),
                        }
                    }
                    (Err(e), _) => eprintln!("error: bad sync reply: {e}"),
                }
            }
            op::SEND_TO_USER_REPLY | op::SEND_TO_GROUP_REPLY => {
                let target = self.outstanding.remove(&frame.seq);
                if target.is_none() && self.verbose {
                    println!("(reply op {} to unknown seq {})", frame.op, frame.seq);
                }
                match SendReply::decode(self.mode, &frame.body) {
                    Ok(reply) if reply.ret == 0 => {
                        // Our own message: held, as the reply comes after
                        // every earlier message of the conversation.
                        if let Some(target) = target {
                            let held = self.held.entry(target).or_insert(0);
                            *held = (*held).max(reply.chat_id);
                        }
                        println!("ok chatId={}", reply.chat_id)
                    }
                    Ok(reply) => {
                        self.failed_sends += 1;
                        match reply.error {
                            Some(reason) => println!("failed: {reason}"),
                            None => println!("failed (ret {})", reply.ret),
                        }
                    }
                    Err(e) => {
                        self.failed_sends += 1;
                        eprintln!("error: bad send reply: {e}");
                    }
                }
            }
            op::HEARTBEAT_REPLY => {
                if self.verbose {
                    println!("heartbeat reply seq={}", frame.seq);
                }
            }
            other => println!(
                "[op {other}] seq={} body={}",
                frame.seq,
                format_bytes(&frame.body)
            ),
        }
    }

    /// Runs one command line; returns `Ok(true)` on `/quit`.
    async fn on_line(&mut self, line: &str) -> Result<bool, String> {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            return Ok(false);
        }
        let Some(command) = line.strip_prefix('/') else {
            match self.last_target {
                Some(target) => {
                    self.send_msg(target, Bytes::copy_from_slice(line.as_bytes()))
                        .await?
                }
                None => eprintln!("error: no target yet: use /to MID text or /group GID text"),
            }
            return Ok(false);
        };
        let (name, rest) = command
            .split_once(char::is_whitespace)
            .unwrap_or((command, ""));
        match name {
            "quit" | "exit" => return Ok(true),
            "help" => print_help(),
            "sync" => match parse_sync(rest) {
                Ok((target, after)) => {
                    let after =
                        after.unwrap_or_else(|| self.held.get(&target).copied().unwrap_or(0));
                    self.sync(target, after).await?
                }
                Err(e) => eprintln!("error: {e} (usage: /sync user|group ID [AFTER])"),
            },
            "to" | "group" | "hex" => {
                let parsed = parse_target_and_text(rest).and_then(|(id, text)| {
                    let target = if name == "group" {
                        Target::Group(id)
                    } else {
                        Target::User(id)
                    };
                    let msg = if name == "hex" {
                        parse_hex(text)?
                    } else {
                        Bytes::copy_from_slice(text.as_bytes())
                    };
                    Ok((target, msg))
                });
                match parsed {
                    Ok((target, msg)) => self.send_msg(target, msg).await?,
                    Err(e) => eprintln!("error: {e} (usage: /{name} ID text)"),
                }
            }
            _ => eprintln!("error: unknown command /{name}; try /help"),
        }
        Ok(false)
    }

    /// Reads frames (printing them) and beats the heart until `deadline`, the
    /// server's close, a `/quit` on `stdin` (when given), or — with
    /// `until_replied` — no reply outstanding.
    async fn pump(
        &mut self,
        mut stdin: Option<&mut mpsc::UnboundedReceiver<String>>,
        deadline: Option<Instant>,
        until_replied: bool,
    ) -> Result<Stop, String> {
        loop {
            if until_replied && self.outstanding.is_empty() {
                return Ok(Stop::Replied);
            }
            tokio::select! {
                incoming = self.rx.next() => match incoming? {
                    Incoming::Frame(frame) => self.on_frame(frame).await?,
                    Incoming::Closed(why) => {
                        println!("{why}");
                        return Ok(Stop::Closed);
                    }
                },
                _ = self.heartbeat.tick() => {
                    let seq = self.seq();
                    self.tx.send(Frame::new(VER, op::HEARTBEAT, seq, Bytes::new())).await?;
                }
                line = recv_line(&mut stdin), if stdin.is_some() => match line {
                    Some(line) => {
                        if self.on_line(&line).await? {
                            return Ok(Stop::Quit);
                        }
                    }
                    None => return Ok(Stop::Quit),
                },
                _ = sleep_until_opt(deadline) => return Ok(Stop::Deadline),
            }
        }
    }

    /// Connects and logs in again after the server closed the connection
    /// (backoff from 0.5 s to 10 s, until `deadline`), then syncs every
    /// conversation seen. `Ok(false)`: the deadline passed or the login was
    /// refused.
    async fn reconnect(&mut self, args: &Args, deadline: Option<Instant>) -> Result<bool, String> {
        let mut backoff = Duration::from_millis(500);
        loop {
            if deadline.is_some_and(|d| Instant::now() + backoff >= d) {
                return Ok(false);
            }
            println!("reconnecting in {} ms", backoff.as_millis());
            tokio::time::sleep(backoff).await;
            match connect(args).await {
                Ok((mut tx, mut rx, mode)) => {
                    match authenticate(&mut tx, &mut rx, args.mid, &args.mkey).await {
                        Ok(true) => {
                            (self.tx, self.rx, self.mode) = (tx, rx, mode);
                            if !self.outstanding.is_empty() {
                                println!(
                                    "({} sends got no reply: a sync shows those that were stored)",
                                    self.outstanding.len()
                                );
                            }
                            self.outstanding.clear();
                            self.syncing.clear();
                            self.sync_all().await?;
                            return Ok(true);
                        }
                        Ok(false) => return Ok(false),
                        Err(e) => eprintln!("error: {e}"),
                    }
                }
                Err(e) => eprintln!("error: {e}"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Pumps until a stop other than the server's close, reconnecting when
    /// `reconnect` is set. `Ok(Stop::Closed)`: closed and not reconnected.
    async fn pump_reconnecting(
        &mut self,
        args: &Args,
        mut stdin: Option<&mut mpsc::UnboundedReceiver<String>>,
        deadline: Option<Instant>,
    ) -> Result<Stop, String> {
        loop {
            let stop = match self.pump(stdin.as_deref_mut(), deadline, false).await {
                Err(e) if !args.no_reconnect => {
                    eprintln!("error: {e}");
                    Stop::Closed
                }
                other => other?,
            };
            if stop != Stop::Closed || args.no_reconnect {
                return Ok(stop);
            }
            if !self.reconnect(args, deadline).await? {
                return Ok(Stop::Closed);
            }
        }
    }

    /// Closes cleanly and waits (briefly) for the server to finish, printing
    /// whatever still arrives.
    async fn close(&mut self) {
        self.tx.close().await;
        let drain = async {
            while let Ok(Incoming::Frame(frame)) = self.rx.next().await {
                self.print_frame(frame, &mut Vec::new());
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
}

async fn recv_line(stdin: &mut Option<&mut mpsc::UnboundedReceiver<String>>) -> Option<String> {
    match stdin {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn print_help() {
    println!(
        "commands: /to MID text | /group GID text | /hex MID 41ff00 | /sync user|group ID [AFTER] | text (to the last target) | /quit"
    );
}

/// `"2 hello world"` → `(2, "hello world")`.
fn parse_target_and_text(rest: &str) -> Result<(i32, &str), String> {
    let rest = rest.trim_start();
    let (id, text) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let id = id
        .parse::<i32>()
        .map_err(|_| format!("bad id {id:?}, expected an integer"))?;
    let text = text.trim_start();
    if text.is_empty() {
        return Err("missing message".into());
    }
    Ok((id, text))
}

/// `"41ff00"` (spaces allowed) → bytes.
/// `user 2`, `group 100 41`, `18 2`, `20 100 41` → the conversation and
/// the optional chatId to sync after.
fn parse_sync(rest: &str) -> Result<(Target, Option<i64>), String> {
    let mut words = rest.split_whitespace();
    let kind = words.next().ok_or("missing kind")?;
    let id: i32 = words
        .next()
        .ok_or("missing ID")?
        .parse()
        .map_err(|_| "ID must be a number")?;
    let target = match kind {
        "user" | "18" => Target::User(id),
        "group" | "20" => Target::Group(id),
        other => return Err(format!("kind {other:?} is neither user nor group")),
    };
    let after = match words.next() {
        Some(a) => Some(a.parse().map_err(|_| "AFTER must be a number")?),
        None => None,
    };
    Ok((target, after))
}

fn parse_hex(text: &str) -> Result<Bytes, String> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    let nibble = |c: u8| -> Result<u8, String> {
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| format!("{:?} is not a hex digit", c as char))
    };
    let mut out = BytesMut::with_capacity(digits.len() / 2);
    for pair in digits.chunks(2) {
        out.extend_from_slice(&[nibble(pair[0])? << 4 | nibble(pair[1])?]);
    }
    Ok(out.freeze())
}

/// Bytes a person can read: the text when it is UTF-8 (control characters
/// escaped, so one message stays one line), `hex:...` otherwise.
fn format_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if text.chars().any(char::is_control) => text.escape_debug().to_string(),
        Ok(text) => text.to_owned(),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("hex:{hex}")
        }
    }
}

fn format_delivered(d: &Delivered) -> String {
    let msg = format_bytes(&d.msg);
    match d.op {
        op::SEND_TO_GROUP => format!(
            "[group {}] chatId={} from={}: {msg}",
            d.to, d.chat_id, d.from
        ),
        _ => format!(
            "[user] chatId={} from={} to={}: {msg}",
            d.chat_id, d.from, d.to
        ),
    }
}

/// Connects in the chosen mode and splits the connection.
async fn connect(args: &Args) -> Result<(Tx, Rx, WireMode), String> {
    let addr = args.addr.clone().unwrap_or_else(|| {
        match args.transport {
            TransportArg::Tcp => "127.0.0.1:3101",
            TransportArg::WsJson | TransportArg::WsBinary => "127.0.0.1:3102",
        }
        .to_owned()
    });
    match args.transport {
        TransportArg::Tcp => {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
                .await
                .map_err(|_| format!("connecting to {addr} timed out"))?
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (read, write) = stream.into_split();
            let codec = TcpCodec::new(CLIENT_MAX_BODY);
            if args.verbose {
                println!("connected: tcp {addr}");
            }
            Ok((
                Tx::Tcp(FramedWrite::new(write, codec)),
                Rx::Tcp(FramedRead::new(read, codec)),
                WireMode::Binary,
            ))
        }
        TransportArg::WsJson | TransportArg::WsBinary => {
            let mode = if args.transport == TransportArg::WsJson {
                WireMode::Json
            } else {
                WireMode::Binary
            };
            let path = if args.path.starts_with('/') {
                args.path.clone()
            } else {
                format!("/{}", args.path)
            };
            let url = format!("ws://{addr}{path}");
            let (ws, _response) =
                tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(&url))
                    .await
                    .map_err(|_| format!("connecting to {url} timed out"))?
                    .map_err(|e| format!("cannot connect to {url}: {e}"))?;
            if args.verbose {
                println!("connected: {url} ({mode:?} mode)");
            }
            let (sink, stream) = ws.split();
            Ok((
                Tx::Ws(sink, mode),
                Rx::Ws {
                    stream,
                    mode,
                    pending: VecDeque::new(),
                },
                mode,
            ))
        }
    }
}

/// Sends op 7 and waits for op 8. `Ok(false)` when the server refused (the
/// reason is printed).
async fn authenticate(tx: &mut Tx, rx: &mut Rx, mid: i32, mkey: &str) -> Result<bool, String> {
    let body = auth_body(mid, mkey);
    tx.send(Frame::new(VER, op::AUTH, 1, body)).await?;
    let wait = async {
        loop {
            match rx.next().await? {
                Incoming::Frame(frame) if frame.op == op::AUTH_REPLY => {
                    return AuthReply::decode(&frame.body)
                        .map_err(|e| format!("bad op 8 reply: {e}"));
                }
                Incoming::Frame(frame) => {
                    eprintln!("warning: ignoring op {} before op 8", frame.op);
                }
                Incoming::Closed(why) => return Err(format!("{why} before op 8")),
            }
        }
    };
    let reply = tokio::time::timeout(CONNECT_TIMEOUT, wait)
        .await
        .map_err(|_| "no op 8 reply within 10 s".to_owned())??;
    match reply {
        AuthReply::Ok { mid } => {
            println!("auth ok: mid={mid}");
            Ok(true)
        }
        AuthReply::Failed { error } => {
            eprintln!("auth failed: {error}");
            Ok(false)
        }
    }
}

/// `{"mid":1,"mkey":"k1"}`: the op 7 body in both wire modes.
fn auth_body(mid: i32, mkey: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "mid": mid, "mkey": mkey }).to_string())
}

/// Reads stdin on a plain thread (a blocked read must not hold up exit).
fn spawn_stdin_reader() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match stdin.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => {
                    if tx.send(line.clone()).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    eprintln!("error: reading stdin: {e}");
                    break;
                }
            }
        }
    });
    rx
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let (mut tx, mut rx, mode) = connect(&args).await?;
    if !authenticate(&mut tx, &mut rx, args.mid, &args.mkey).await? {
        return Ok(ExitCode::FAILURE);
    }
    let period = Duration::from_secs(args.heartbeat_secs);
    let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut session = Session {
        tx,
        rx,
        mode,
        mid: args.mid,
        next_seq: 1,
        outstanding: HashMap::new(),
        syncing: HashMap::new(),
        held: HashMap::new(),
        failed_sends: 0,
        last_target: None,
        verbose: args.verbose,
        heartbeat,
    };

    let one_shot = match (args.send_to, args.send_group) {
        (Some(mid), _) => Some(Target::User(mid)),
        (None, Some(gid)) => Some(Target::Group(gid)),
        (None, None) => None,
    };

    if let Some(target) = one_shot {
        let text = args.text.clone().unwrap_or_default();
        session.send_msg(target, Bytes::from(text)).await?;
        let stop = session
            .pump(None, Some(Instant::now() + REPLY_TIMEOUT), true)
            .await?;
        match stop {
            Stop::Replied => {}
            Stop::Closed => return Ok(ExitCode::FAILURE),
            Stop::Deadline | Stop::Quit => {
                eprintln!("error: no reply within {} s", REPLY_TIMEOUT.as_secs());
                return Ok(ExitCode::FAILURE);
            }
        }
        let wait = Duration::from_millis(args.wait_ms);
        if session
            .pump(None, Some(Instant::now() + wait), false)
            .await?
            == Stop::Closed
        {
            return Ok(ExitCode::FAILURE);
        }
        session.close().await;
        return Ok(if session.failed_sends == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }

    if let Some(ms) = args.listen_ms {
        let deadline = Instant::now() + Duration::from_millis(ms);
        if session
            .pump_reconnecting(&args, None, Some(deadline))
            .await?
            == Stop::Closed
        {
            return Ok(ExitCode::FAILURE);
        }
        session.close().await;
        return Ok(ExitCode::SUCCESS);
    }

    let mut stdin = spawn_stdin_reader();
    match session
        .pump_reconnecting(&args, Some(&mut stdin), None)
        .await?
    {
        Stop::Closed => return Ok(ExitCode::FAILURE),
        Stop::Quit | Stop::Deadline | Stop::Replied => {}
    }
    // Let the replies to what was just sent arrive before leaving.
    if session
        .pump(None, Some(Instant::now() + QUIT_GRACE), true)
        .await?
        == Stop::Closed
    {
        return Ok(ExitCode::FAILURE);
    }
    session.close().await;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    };
    // The stdin thread may sit in a blocking read; don't wait for it.
    runtime.shutdown_background();
    code
}
