//! The session-level fuzz property, shared with the regression tests: an
//! arbitrary byte stream fed to a session (after a valid login, or not)
//! never panics the engine (not even a panic it catches and counts),
//! ends the session with a reason the input explains, accepts a valid
//! login and writes nothing before its op 8 ret 0, and leaves no session
//! registered.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use comet_core::codec::{self, TcpCodec};
use comet_core::{
    Comet, CometBuilder, Config, Frame, FrameError, Outgoing, SessionEnd, Transport, WireMode,
};
use comet_plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
use tokio_util::codec::Decoder;

/// Runs one session over `data`: the first byte picks the mode and whether
/// a valid op 7 comes first; the rest is cut into frames as a transport
/// would (binary: the TCP decoder; JSON: newline-separated text frames).
pub fn session(data: &[u8]) {
    session_with(data, |builder| builder);
}

/// [`session`] on a comet `customize` adds to (layers, handlers): how the
/// regression tests show that the check fails on a panic the engine
/// catches.
pub fn session_with(data: &[u8], customize: impl FnOnce(CometBuilder) -> CometBuilder) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mode = if flags & 1 == 0 {
        WireMode::Binary
    } else {
        WireMode::Json
    };
    let login = flags & 2 != 0;
    let mut frames: Vec<Result<Frame, FrameError>> = Vec::new();
    if login {
        frames.push(Ok(Frame::new(1, 7, 1, r#"{"mid":1,"mkey":"k1"}"#)));
    }
    match mode {
        WireMode::Binary => {
            let mut codec = TcpCodec::new(1024);
            let mut buf = BytesMut::from(rest);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(f)) => frames.push(Ok(f)),
                    Ok(None) => break,
                    Err(e) => {
                        frames.push(Err(e));
                        break;
                    }
                }
            }
        }
        WireMode::Json => {
            for line in rest.split(|b| *b == b'\n') {
                frames.push(comet_core::codec::json::decode_frame(
                    bytes::Bytes::copy_from_slice(line),
                ));
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let auth = Arc::new(MemoryAuth::from_iter([(1, "k1"), (2, "k2")]));
        let groups = Arc::new(MemoryGroups::default());
        groups.set_members(100, [1, 2]);
        let builder = Comet::builder()
            .authenticator(auth)
            .store(Arc::new(MemoryStore::new(16, 16)))
            .groups(groups)
            .config(
                Config::default()
                    .with_max_body(1024)
                    .with_max_outbound_bytes(64 * 1024)
                    .with_heartbeat_timeout(Duration::from_secs(5))
                    .with_handshake_timeout(Duration::from_secs(5)),
            );
        let comet = customize(builder).build().expect("comet");
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Outgoing>(1024);
        // Whether the first data unit written (if any) is op 8 ret 0.
        let drain = tokio::spawn(async move {
            let mut first = None;
            while let Some(unit) = out_rx.recv().await {
                if first.is_none() && matches!(unit, Outgoing::Data(_)) {
                    first = Some(logged_in(mode, unit));
                }
            }
            first
        });
        let info = comet.conn_info(Transport::Local, mode, "127.0.0.1:1".parse().expect("addr"));
        let inbound = tokio_stream::iter(frames);
        let sink = tokio_util::sync::PollSender::new(out_tx);
        let end = comet.serve(info, inbound, sink).await;
        assert!(
            !matches!(
                end,
                SessionEnd::Panic(_) | SessionEnd::Handler(_) | SessionEnd::Transport(_)
            ),
            "the session ended with {end:?}"
        );
        if !login {
            assert!(
                !matches!(end, SessionEnd::HeartbeatTimeout | SessionEnd::Replaced),
                "a session that never logged in ended with {end:?}"
            );
        }
        let stats = comet.stats();
        assert_eq!(stats.panics, 0, "the engine caught a panic");
        assert_eq!(stats.handler_errors, 0);
        assert_eq!(
            comet.session_count(),
            0,
            "a finished session leaves the registry"
        );
        assert_eq!(comet.connection_count(), 0);
        let first_is_op8_ok = drain.await.expect("drain task");
        if login {
            // A session closed for a protocol error right after op 7 may
            // end before op 8 is written; nothing may come before it.
            assert_ne!(
                first_is_op8_ok,
                Some(false),
                "a valid op 7 is answered op 8 ret 0 before anything else"
            );
            assert_eq!(stats.authenticated, 1, "a valid op 7 logs in");
        }
    });
}

/// Whether `unit` (the first data unit written) starts with op 8 ret 0.
fn logged_in(mode: WireMode, unit: Outgoing) -> bool {
    let Outgoing::Data(bytes) = unit else {
        return false;
    };
    let frame = match mode {
        WireMode::Binary => {
            let mut buf = BytesMut::from(&bytes[..]);
            match TcpCodec::new(1 << 20).decode(&mut buf) {
                Ok(Some(frame)) => frame,
                _ => return false,
            }
        }
        WireMode::Json => match codec::json::decode_frame(bytes) {
            Ok(frame) => frame,
            Err(_) => return false,
        },
    };
    frame.op == 8 && frame.body.starts_with(br#"{"ret":0"#)
}
