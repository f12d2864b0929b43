//! The offline inbox at login, over real sockets: it goes at the client's
//! pace while the session reads frames (heartbeats keep a slow download
//! alive), an entry leaves the store only once written (a session cut off
//! half-way leaves exactly the rest for the next login: nothing twice,
//! nothing lost), and live messages wait behind it.

mod common;

use std::time::Duration;

use comet::server::StoreBackend;
use common::raw::{Client, Kind, Msg};

/// 300 messages of 60,000 bytes: 18 MB, far more than loopback socket
/// buffers hold, so the server's writes block on the reader.
const INBOX: usize = 300;
const SIZE: usize = 60_000;

fn body(i: usize) -> Vec<u8> {
    let mut b = vec![b'a' + (i % 26) as u8; SIZE];
    b[..8].copy_from_slice(&(i as u64).to_be_bytes());
    b
}

async fn fill_inbox(sender: &mut Client, to: i32) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..INBOX {
        let ack = sender.send_msg(18, 2, to, &body(i)).await;
        assert_eq!(ack.ret, 0, "{ack:?}");
        ids.push(ack.chat_id);
    }
    ids
}

fn ids(msgs: &[Msg]) -> Vec<i64> {
    msgs.iter().map(|m| m.chat_id).collect()
}

/// A server whose inbox holds the whole test inbox, on `backend` (the
/// embedded store in `dir`).
async fn start(
    backend: StoreBackend,
    dir: &std::path::Path,
    heartbeat_ms: u64,
) -> comet::server::Running {
    common::server::start_edit(|c| {
        c.server.engine.heartbeat_timeout = std::time::Duration::from_millis(heartbeat_ms);
        c.store.backend = backend;
        c.store.path = dir.to_owned();
        c.store.inbox_limit = 10_000;
        c.store.inbox_bytes = 64 << 20;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_cut_off_half_way_delivers_nothing_twice_and_loses_nothing() {
    for backend in [StoreBackend::Memory, StoreBackend::Embedded] {
        let dir = tempfile::tempdir().unwrap();
        cut_off_half_way(start(backend, dir.path(), 90_000).await).await;
    }
}

async fn cut_off_half_way(running: comet::server::Running) {
    let tcp = running.tcp_addr.unwrap();
    let mut sender = Client::login(Kind::Tcp, tcp, 2, "k2").await;
    let sent = fill_inbox(&mut sender, 1).await;

    // The first login reads a third of its inbox, then is cut off.
    let mut first = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    let mut got = Vec::new();
    for _ in 0..INBOX / 3 {
        got.push(first.msg().await);
    }
    // A live message now waits behind the inbox.
    let live = sender.send_msg(18, 2, 1, b"live while downloading").await;
    assert_eq!(live.ret, 0);
    assert_eq!(running.comet.disconnect(1), 1);
    // Everything the server wrote before closing arrives (a frame cut short
    // by the close is dropped).
    let (rest, _) = first.msgs_until_closed().await;
    got.extend(rest);
    let first_ids = ids(&got);
    assert!(
        first_ids.len() < INBOX,
        "the cut came too late to test anything"
    );
    assert_eq!(
        first_ids,
        sent[..first_ids.len()].to_vec(),
        "in order, no gap"
    );
    assert!(
        !first_ids.contains(&live.chat_id),
        "the live message waits behind the inbox"
    );

    // The next login gets exactly the rest, then the held live message.
    let mut second = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    let mut second_ids = Vec::new();
    while second_ids.len() < INBOX - first_ids.len() + 1 {
        let m = second.msg().await;
        if m.chat_id != live.chat_id {
            let i = sent.iter().position(|&id| id == m.chat_id).unwrap();
            assert_eq!(m.msg, body(i), "chatId {} intact", m.chat_id);
        }
        second_ids.push(m.chat_id);
    }
    let mut expected = sent[first_ids.len()..].to_vec();
    expected.push(live.chat_id);
    assert_eq!(second_ids, expected, "the rest, in order, nothing twice");
    second.no_msg().await;
    // Nothing is left for a third login.
    second.close().await;
    let mut third = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    third.no_msg().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_download_lives_on_heartbeats_past_the_heartbeat_timeout() {
    // Heartbeat timeout 1.5 s; an 18 MB inbox read in small pieces over
    // well more than that, while the client beats every 300 ms. The old
    // login flush had one fixed budget (the heartbeat timeout) and read no
    // frames meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let running = start(StoreBackend::Embedded, dir.path(), 1_500).await;
    for kind in [Kind::Tcp, Kind::WsBinary, Kind::WsJson] {
        let addr = match kind {
            Kind::Tcp => running.tcp_addr.unwrap(),
            _ => running.ws_addr.unwrap(),
        };
        let mut sender = Client::login(Kind::Tcp, running.tcp_addr.unwrap(), 2, "k2").await;
        let sent = fill_inbox(&mut sender, 3).await;
        sender.close().await;
        let mut slow = Client::login(kind, addr, 3, "k3").await;
        let started = tokio::time::Instant::now();
        let mut got = Vec::new();
        let mut beat = tokio::time::Instant::now();
        while got.len() < INBOX {
            got.push(slow.msg_skipping_beats().await.chat_id);
            if got.len() % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            if beat.elapsed() > Duration::from_millis(300) {
                // A heartbeat, written without waiting for its reply (the
                // reply comes back among the messages).
                let seq = slow.next_seq();
                slow.send_frame(2, seq, None, None).await;
                beat = tokio::time::Instant::now();
            }
        }
        assert!(
            started.elapsed() > Duration::from_millis(1_500),
            "{kind:?}: the download must outlast the heartbeat timeout to test anything"
        );
        assert_eq!(got, sent, "{kind:?}");
        slow.close().await;
    }
}
