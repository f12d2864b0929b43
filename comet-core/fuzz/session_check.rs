//! The session-level fuzz property, shared with the regression tests: an
//! arbitrary byte stream fed to a session (after a valid login, or not)
//! never panics the engine, ends the session with a reason, and leaves no
//! session registered.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use comet_core::codec::TcpCodec;
use comet_core::{Comet, Config, Frame, FrameError, Outgoing, Transport, WireMode};
use comet_plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
use tokio_util::codec::Decoder;

/// Runs one session over `data`: the first byte picks the mode and whether
/// a valid op 7 comes first; the rest is cut into frames as a transport
/// would (binary: the TCP decoder; JSON: newline-separated text frames).
pub fn session(data: &[u8]) {
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
        let comet = Comet::builder()
            .authenticator(auth)
            .store(Arc::new(MemoryStore::new(16, 16)))
            .groups(groups)
            .config(Config {
                max_body: 1024,
                max_outbound_bytes: 64 * 1024,
                heartbeat_timeout: Duration::from_secs(5),
                handshake_timeout: Duration::from_secs(5),
                ..Config::default()
            })
            .build()
            .expect("comet");
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Outgoing>(1024);
        let drain = tokio::spawn(async move { while out_rx.recv().await.is_some() {} });
        let info = comet.conn_info(Transport::Local, mode, "127.0.0.1:1".parse().expect("addr"));
        let inbound = tokio_stream::iter(frames);
        let sink = tokio_util::sync::PollSender::new(out_tx);
        let _end = comet.serve(info, inbound, sink).await;
        assert_eq!(
            comet.session_count(),
            0,
            "a finished session leaves the registry"
        );
        assert_eq!(comet.connection_count(), 0);
        drain.abort();
    });
}
