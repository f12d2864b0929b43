//! The session engine below the socket level: the protocol's flows and its
//! bad-input rows over in-process channels, on the in-memory plug-ins.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use comet::core::frame::{op, Frame, WireMode};
use comet::core::payload::{AuthReply, SendReply};
use comet::core::{Config, Conversation, Event, FrameError, SessionEnd};
use common::engine::{setup, Conn};

const MODES: [WireMode; 2] = [WireMode::Binary, WireMode::Json];

/// Asserts a failure reply and returns its reason. Only JSON replies carry
/// one (a binary op 19/21 is exactly 9 bytes), so binary ones return a
/// reason that passes every `contains` check of the tests.
fn failed(reply: &SendReply) -> &str {
    assert_eq!(
        (reply.ret, reply.chat_id),
        (-1, 0),
        "expected a failure, got {reply:?}"
    );
    match &reply.error {
        Some(reason) => {
            assert!(!reason.is_empty(), "a JSON failure carries a reason");
            reason
        }
        None => "",
    }
}

fn says(reason: &str, what: &str) -> bool {
    reason.is_empty() || reason.contains(what)
}

#[tokio::test]
async fn login_heartbeat_and_direct_message_in_both_modes() {
    for mode in MODES {
        let s = setup(Config::default());
        let mut a = Conn::login(&s.comet, mode, 1).await;
        let mut b = Conn::login(&s.comet, mode, 2).await;
        a.sync().await;
        let reply = a.send_msg(op::SEND_TO_USER, 1, 2, "hi").await;
        assert_eq!(reply, SendReply::ok(1));
        let got = b.delivered().await;
        assert_eq!(
            (got.op, got.chat_id, got.from, got.to),
            (op::SEND_TO_USER, 1, 1, 2)
        );
        assert_eq!(&got.msg[..], b"hi");
        // The reply in the other direction continues the same conversation.
        assert_eq!(
            b.send_msg(op::SEND_TO_USER, 2, 1, "yo").await,
            SendReply::ok(2)
        );
        assert_eq!(a.delivered().await.chat_id, 2);
        assert_eq!(s.comet.session_count(), 2);
        assert_eq!(s.comet.stats().messages, 2);
    }
}

#[tokio::test]
async fn replies_echo_the_request_ver_and_seq() {
    let s = setup(Config::default());
    let mut a = Conn::connect(&s.comet, WireMode::Binary);
    a.send(Frame::new(7, op::AUTH, 4242, r#"{"mid":1,"mkey":"k1"}"#))
        .await;
    let reply = a.reply().await.unwrap();
    assert_eq!((reply.ver, reply.op, reply.seq), (7, op::AUTH_REPLY, 4242));
    a.send(Frame::new(300, op::HEARTBEAT, 99, "")).await;
    let reply = a.reply().await.unwrap();
    assert_eq!(
        (reply.ver, reply.op, reply.seq),
        (300, op::HEARTBEAT_REPLY, 99)
    );
}

#[tokio::test]
async fn direct_delivery_rules() {
    let s = setup(Config::default());
    let mut a1 = Conn::login(&s.comet, WireMode::Binary, 1).await;
    let mut a2 = Conn::login(&s.comet, WireMode::Json, 1).await;
    let mut b1 = Conn::login(&s.comet, WireMode::Json, 2).await;
    let mut b2 = Conn::login(&s.comet, WireMode::Binary, 2).await;
    let mut c = Conn::login(&s.comet, WireMode::Binary, 3).await;

    assert_eq!(
        a1.send_msg(op::SEND_TO_USER, 1, 2, "to b").await,
        SendReply::ok(1)
    );
    // Every session of the recipient, and the sender's other sessions.
    for conn in [&mut b1, &mut b2, &mut a2] {
        let d = conn.delivered().await;
        assert_eq!(
            (d.chat_id, d.from, d.to, &d.msg[..]),
            (1, 1, 2, &b"to b"[..])
        );
    }
    // Never back to the sending connection, never to a third party.
    a1.assert_no_delivery().await;
    c.assert_no_delivery().await;

    // A note to one's own other devices.
    assert_eq!(
        a2.send_msg(op::SEND_TO_USER, 1, 1, "note").await,
        SendReply::ok(1)
    );
    let d = a1.delivered().await;
    assert_eq!((d.from, d.to, &d.msg[..]), (1, 1, &b"note"[..]));
    a2.assert_no_delivery().await;
    b1.assert_no_delivery().await;
}

#[tokio::test]
async fn group_delivery_rules() {
    let s = setup(Config::default());
    let mut a1 = Conn::login(&s.comet, WireMode::Binary, 1).await;
    let mut a2 = Conn::login(&s.comet, WireMode::Binary, 1).await;
    let mut b = Conn::login(&s.comet, WireMode::Json, 2).await;
    let mut c = Conn::login(&s.comet, WireMode::Binary, 3).await;
    let mut outsider = Conn::login(&s.comet, WireMode::Json, 4).await;

    assert_eq!(
        a1.send_msg(op::SEND_TO_GROUP, 1, 100, "all").await,
        SendReply::ok(1)
    );
    for conn in [&mut a2, &mut b, &mut c] {
        let d = conn.delivered().await;
        assert_eq!(
            (d.op, d.chat_id, d.from, d.to),
            (op::SEND_TO_GROUP, 1, 1, 100)
        );
    }
    a1.assert_no_delivery().await;
    outsider.assert_no_delivery().await;

    // Not a member, and a group that does not exist: ret -1, nothing consumed.
    let r = outsider
        .send_msg(op::SEND_TO_GROUP, 4, 100, "let me in")
        .await;
    assert!(failed(&r).contains("not a member"), "{r:?}");
    let r = a1.send_msg(op::SEND_TO_GROUP, 1, 999, "nobody").await;
    failed(&r);
    let r = outsider.send_msg(op::SEND_TO_GROUP, 4, 999, "nobody").await;
    assert!(failed(&r).contains("not a member of group 999"));
    assert_eq!(
        c.send_msg(op::SEND_TO_GROUP, 3, 100, "next").await,
        SendReply::ok(2)
    );
    outsider.sync().await;

    // Membership changes take effect at once.
    s.groups.join(100, 4);
    assert_eq!(
        outsider.send_msg(op::SEND_TO_GROUP, 4, 100, "in").await,
        SendReply::ok(3)
    );
    s.groups.leave(100, 4);
    let r = outsider.send_msg(op::SEND_TO_GROUP, 4, 100, "out").await;
    failed(&r);
}

#[tokio::test]
async fn send_rules_fail_without_closing_or_consuming_chat_ids() {
    let config = Config::default().with_max_body(1024);
    for mode in MODES {
        let s = setup(config.clone());
        let mut a = Conn::login(&s.comet, mode, 1).await;
        let mut b = Conn::login(&s.comet, mode, 2).await;
        assert!(says(
            failed(&a.send_msg(op::SEND_TO_USER, 2, 1, "spoof").await),
            "from does not match the authenticated mid"
        ));
        assert!(says(
            failed(&a.send_msg(op::SEND_TO_GROUP, 3, 100, "spoof").await),
            "from does not match"
        ));
        assert!(says(
            failed(&a.send_msg(op::SEND_TO_USER, 1, 0, "x").await),
            "positive"
        ));
        assert!(says(
            failed(&a.send_msg(op::SEND_TO_USER, 1, -5, "x").await),
            "positive"
        ));
        assert!(says(
            failed(&a.send_msg(op::SEND_TO_USER, 1, 2, "").await),
            "empty"
        ));
        let too_big = vec![b'x'; 1024 - 32 + 1];
        assert!(says(
            failed(&a.send_msg(op::SEND_TO_USER, 1, 2, too_big).await),
            "exceeds"
        ));
        let short = match mode {
            WireMode::Binary => Bytes::from_static(&[0, 0, 0, 1, 0, 0]),
            WireMode::Json => Bytes::from_static(br#"{"from":1}"#),
        };
        assert!(says(
            failed(&a.send_body(op::SEND_TO_USER, short).await),
            "body"
        ));
        if mode == WireMode::Json {
            let bad = Bytes::from_static(br#"{"from":1,"to":2,"msg":"%%%","enc":"base64"}"#);
            assert!(failed(&a.send_body(op::SEND_TO_USER, bad).await).contains("base64"));
        }
        b.assert_no_delivery().await;
        // The largest allowed message goes through, in one op 9, and the
        // failures above consumed no chatId.
        let biggest = vec![b'y'; 1024 - 32];
        assert_eq!(
            a.send_msg(op::SEND_TO_USER, 1, 2, biggest.clone()).await,
            SendReply::ok(1)
        );
        let d = b.delivered().await;
        assert_eq!(d.msg.len(), biggest.len());
        assert!(s.comet.stats().send_failures >= 7);
    }
}

#[tokio::test]
async fn non_utf8_msg_crosses_modes_byte_for_byte() {
    let s = setup(Config::default());
    let mut bin = Conn::login(&s.comet, WireMode::Binary, 1).await;
    let mut txt = Conn::login(&s.comet, WireMode::Json, 2).await;
    let raw = Bytes::from_static(&[0xff, 0x00, 0xfe, b'a']);
    assert_eq!(
        bin.send_msg(op::SEND_TO_USER, 1, 2, raw.clone()).await,
        SendReply::ok(1)
    );
    // Read the JSON text itself: base64 with "enc":"base64".
    let frame = txt.frame().await.unwrap();
    let text = std::str::from_utf8(&frame.body).unwrap();
    assert!(
        text.contains(r#""msg":"/wD+YQ==""#) && text.contains(r#""enc":"base64""#),
        "{text}"
    );
    // And back: the JSON client sends base64, the binary client gets raw bytes.
    let body = Bytes::from_static(br#"{"from":2,"to":1,"msg":"/wD+YQ==","enc":"base64"}"#);
    assert_eq!(
        txt.send_body(op::SEND_TO_USER, body).await,
        SendReply::ok(2)
    );
    assert_eq!(bin.delivered().await.msg, raw);
    // Valid UTF-8 sent as base64 arrives as plain text.
    let body = Bytes::from_static(br#"{"from":2,"to":1,"msg":"aMOp","enc":"base64"}"#);
    txt.send_body(op::SEND_TO_USER, body).await;
    let mut txt1 = Conn::login(&s.comet, WireMode::Json, 1).await;
    txt.send_msg(op::SEND_TO_USER, 2, 1, "hé").await;
    assert_eq!(&bin.delivered().await.msg[..], "hé".as_bytes());
    let frame = txt1.frame().await.unwrap();
    let text = std::str::from_utf8(&frame.body).unwrap();
    assert!(
        text.contains(r#""msg":"hé""#) && !text.contains("enc"),
        "{text}"
    );
}

#[tokio::test]
async fn ops_before_auth_and_auth_twice_close_the_connection() {
    let s = setup(Config::default());
    let mut witness = Conn::login(&s.comet, WireMode::Binary, 9).await;
    for first in [op::HEARTBEAT, op::SEND_TO_USER, 1000] {
        let mut c = Conn::connect(&s.comet, WireMode::Binary);
        c.send(Frame::new(1, first, 1, "")).await;
        let (end, close) = c.end().await;
        assert!(
            matches!(end, SessionEnd::Protocol(_, ref r) if r.contains("before op 7")),
            "{end:?}"
        );
        assert_eq!(close.unwrap().0, 1002);
    }
    let mut c = Conn::login(&s.comet, WireMode::Json, 1).await;
    c.send(Frame::new(1, op::AUTH, 9, r#"{"mid":1,"mkey":"k1"}"#))
        .await;
    assert!(matches!(c.end().await.0, SessionEnd::Protocol(..)));
    assert_eq!(
        s.comet.sessions_of(1),
        0,
        "a closed session leaves the registry"
    );
    witness.sync().await;
    assert!(s.comet.stats().protocol_errors >= 4);
}

#[tokio::test]
async fn bad_logins_get_op8_failure_then_close() {
    let s = setup(Config::default());
    for body in [
        "not json",
        r#"["mid",1]"#,
        r#"{"mid":1,"mkey":"wrong"}"#,
        r#"{"mid":77,"mkey":"k77"}"#,
        r#"{"mkey":"k1"}"#,
    ] {
        for mode in MODES {
            let mut c = Conn::connect(&s.comet, mode);
            let body = if mode == WireMode::Json && body == "not json" {
                "\"not json\""
            } else {
                body
            };
            match c.auth(body).await {
                AuthReply::Failed { error } => assert!(!error.is_empty()),
                other => panic!("{body}: {other:?}"),
            }
            let (end, _) = c.end().await;
            assert!(matches!(end, SessionEnd::AuthFailed(_)), "{end:?}");
        }
    }
    // Extra fields never make a valid login fail.
    let mut c = Conn::connect(&s.comet, WireMode::Binary);
    let reply = c
        .auth(r#"{"mid":5,"mkey":"k5","room_id":"live://1","platform":"web","accepts":[1000]}"#)
        .await;
    assert_eq!(reply, AuthReply::Ok { mid: 5 });
}

#[tokio::test]
async fn frame_errors_close_only_their_connection() {
    let s = setup(Config::default());
    let mut a = Conn::login(&s.comet, WireMode::Binary, 1).await;
    let mut b = Conn::login(&s.comet, WireMode::Binary, 2).await;
    b.send_raw(Err(FrameError::BadHeaderLen(12))).await;
    let (end, close) = b.end().await;
    assert!(
        matches!(end, SessionEnd::Protocol(_, ref r) if r.contains("headerLen")),
        "{end:?}"
    );
    assert_eq!(close.unwrap().0, 1002);
    let mut c = Conn::login(&s.comet, WireMode::Json, 3).await;
    c.send_raw(Err(FrameError::Json("expected value".into())))
        .await;
    let (end, close) = c.end().await;
    assert!(matches!(end, SessionEnd::Protocol(1007, _)), "{end:?}");
    assert_eq!(close.unwrap().0, 1007);
    // The others carry on; mid 2 now gets its messages offline.
    assert_eq!(
        a.send_msg(op::SEND_TO_USER, 1, 2, "still here?").await,
        SendReply::ok(1)
    );
    a.sync().await;
    assert_eq!(s.store.inbox_len(2), 1);
}

#[tokio::test]
async fn unknown_ops_are_ignored_and_counted() {
    let s = setup(Config::default());
    let mut a = Conn::login(&s.comet, WireMode::Binary, 1).await;
    for unknown in [1000, 0, op::BATCH, op::SEND_TO_USER_REPLY, u32::MAX] {
        a.send(Frame::new(1, unknown, 5, "whatever")).await;
    }
    a.sync().await;
    assert_eq!(s.comet.stats().unknown_ops, 5);
    assert_eq!(
        a.send_msg(op::SEND_TO_USER, 1, 2, "alive").await,
        SendReply::ok(1)
    );
}

#[tokio::test]
async fn offline_inbox_is_delivered_once_in_order_before_new_messages() {
    for mode in MODES {
        let s = setup(Config::default());
        let mut a = Conn::login(&s.comet, WireMode::Binary, 1).await;
        for i in 1..=5 {
            let r = a.send_msg(op::SEND_TO_USER, 1, 3, format!("dm {i}")).await;
            assert_eq!(r.chat_id, i);
            let r = a
                .send_msg(op::SEND_TO_GROUP, 1, 100, format!("group {i}"))
                .await;
            assert_eq!(r.chat_id, i);
        }
        assert_eq!(s.store.inbox_len(3), 10);
        let mut c = Conn::connect(&s.comet, mode);
        // op 8 comes first, then the inbox, in the order it was stored.
        assert_eq!(
            c.auth(r#"{"mid":3,"mkey":"k3"}"#).await,
            AuthReply::Ok { mid: 3 }
        );
        a.send_msg(op::SEND_TO_USER, 1, 3, "live").await;
        let mut got = Vec::new();
        for _ in 0..11 {
            let d = c.delivered().await;
            got.push(String::from_utf8(d.msg.to_vec()).unwrap());
        }
        let mut want: Vec<String> = (1..=5)
            .flat_map(|i| [format!("dm {i}"), format!("group {i}")])
            .collect();
        want.push("live".into());
        assert_eq!(got, want);
        // A second session does not get the inbox again.
        let mut c2 = Conn::login(&s.comet, mode, 3).await;
        c2.assert_no_delivery().await;
        assert_eq!(s.store.inbox_len(3), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_ids_are_gapless_and_ordered_under_eight_concurrent_senders() {
    let s = setup(Config::default());
    let members: Vec<i32> = (1..=9).collect();
    s.groups.set_members(200, members.clone());
    let per_sender = 100;
    // The watcher (mid 9) and a second session of each sender.
    let mut watcher = Conn::login(&s.comet, WireMode::Binary, 9).await;
    let mut senders = Vec::new();
    for mid in 1..=8 {
        senders.push(
            Conn::login(
                &s.comet,
                if mid % 2 == 0 {
                    WireMode::Json
                } else {
                    WireMode::Binary
                },
                mid,
            )
            .await,
        );
    }
    // Eight sessions of mid 10 write to mid 11 concurrently: one direct conversation.
    let mut dm_watcher = Conn::login(&s.comet, WireMode::Json, 11).await;
    let mut dm_senders = Vec::new();
    for _ in 0..8 {
        dm_senders.push(Conn::login(&s.comet, WireMode::Binary, 10).await);
    }
    let mut tasks = Vec::new();
    for (i, mut conn) in senders.into_iter().enumerate() {
        let mid = i as i32 + 1;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..per_sender {
                let r = conn
                    .send_msg(op::SEND_TO_GROUP, mid, 200, format!("{mid}:{n}"))
                    .await;
                assert_eq!(r.ret, 0);
                ids.push(r.chat_id);
            }
            (ids, conn)
        }));
    }
    for mut conn in dm_senders {
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..per_sender {
                let r = conn
                    .send_msg(op::SEND_TO_USER, 10, 11, format!("dm {n}"))
                    .await;
                assert_eq!(r.ret, 0);
                ids.push(r.chat_id);
            }
            (ids, conn)
        }));
    }
    let mut group_ids = Vec::new();
    let mut dm_ids = Vec::new();
    let mut conns = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (ids, conn) = t.await.unwrap();
        // Each sender's own acks rise.
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        if i < 8 {
            group_ids.extend(ids)
        } else {
            dm_ids.extend(ids)
        }
        conns.push(conn);
    }
    let total = 8 * per_sender as i64;
    group_ids.sort();
    dm_ids.sort();
    assert_eq!(group_ids, (1..=total).collect::<Vec<_>>());
    assert_eq!(dm_ids, (1..=total).collect::<Vec<_>>());
    // Watchers see every chatId exactly once, in order.
    for n in 1..=total {
        assert_eq!(watcher.delivered().await.chat_id, n);
        assert_eq!(dm_watcher.delivered().await.chat_id, n);
    }
    // Every sender session sees the others' messages in rising order too.
    for conn in conns.iter_mut() {
        conn.sync().await;
    }
    let mut last_seen = 0;
    let first = &mut conns[0];
    let mut seen = 0;
    while seen < total - per_sender as i64 {
        let d = first.delivered().await;
        assert!(d.chat_id > last_seen);
        last_seen = d.chat_id;
        seen += 1;
    }
    assert_eq!(s.store.last_chat_id(Conversation::Group(200)), total);
    assert_eq!(s.store.last_chat_id(Conversation::direct(10, 11)), total);
}

#[tokio::test]
async fn slow_consumer_is_closed_without_blocking_the_sender_or_others() {
    let config = Config::default().with_max_outbound_bytes(16 * 1024);
    let s = setup(config);
    let mut sender = Conn::login(&s.comet, WireMode::Binary, 1).await;
    let mut good = Conn::login(&s.comet, WireMode::Binary, 2).await;
    // Mid 3 reads nothing: its transport takes one unit and then blocks.
    let mut stuck = Conn::connect_with(&s.comet, WireMode::Binary, 1);
    let reply = stuck.auth(r#"{"mid":3,"mkey":"k3"}"#).await;
    assert_eq!(reply, AuthReply::Ok { mid: 3 });
    let msg = vec![b'z'; 1000];
    for i in 1..=100 {
        // Every send is acknowledged: the stuck reader never slows the sender.
        assert_eq!(
            sender
                .send_msg(op::SEND_TO_GROUP, 1, 100, msg.clone())
                .await,
            SendReply::ok(i)
        );
    }
    for i in 1..=100 {
        assert_eq!(good.delivered().await.chat_id, i);
    }
    let end = common::within("the slow consumer's task", stuck.task)
        .await
        .unwrap();
    assert_eq!(end, SessionEnd::SlowConsumer);
    assert_eq!(s.comet.sessions_of(3), 0);
    assert!(s.comet.stats().slow_consumers >= 1);
    // Everything stays stored.
    assert_eq!(s.store.last_chat_id(Conversation::Group(100)), 100);
}

#[tokio::test]
async fn replies_count_what_they_hold_against_the_outbound_bound() {
    // 900 heartbeats from a client that reads nothing: 14,400 bytes of op 3
    // on the wire, under the 16 KiB bound, but each queued reply also holds
    // a boxed frame and a queue slot, which the bound counts too.
    let s = setup(Config::default().with_max_outbound_bytes(16 * 1024));
    let mut stuck = Conn::connect_with(&s.comet, WireMode::Binary, 1);
    let reply = stuck.auth(r#"{"mid":3,"mkey":"k3"}"#).await;
    assert_eq!(reply, AuthReply::Ok { mid: 3 });
    for _ in 0..900 {
        let seq = stuck.next_seq();
        stuck.send(Frame::new(1, op::HEARTBEAT, seq, "")).await;
    }
    let end = common::within("the slow consumer's task", stuck.task)
        .await
        .unwrap();
    assert_eq!(end, SessionEnd::SlowConsumer);
}

#[tokio::test(start_paused = true)]
async fn handshake_timeout_closes_silent_connections() {
    let s = setup(Config::default().with_handshake_timeout(Duration::from_secs(3)));
    let c = Conn::connect(&s.comet, WireMode::Binary);
    let started = tokio::time::Instant::now();
    let (end, close) = c.end().await;
    assert_eq!(end, SessionEnd::HandshakeTimeout);
    assert!(close.is_some());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert_eq!(s.comet.stats().timeouts, 1);
}

#[tokio::test(start_paused = true)]
async fn the_handshake_deadline_counts_from_the_accept_not_the_session_start() {
    let s = setup(Config::default().with_handshake_timeout(Duration::from_secs(3)));
    // Accepted 2 s ago (a slow TLS handshake or upgrade, say): 1 s is left.
    let mut info = s.comet.conn_info(
        comet::core::Transport::Local,
        WireMode::Binary,
        "127.0.0.1:9".parse().unwrap(),
    );
    info.accepted_at -= Duration::from_secs(2);
    let (_in_tx, in_rx) = tokio::sync::mpsc::channel::<Result<Frame, FrameError>>(1);
    let (out_tx, _out_rx) = tokio::sync::mpsc::channel(8);
    let started = tokio::time::Instant::now();
    let end = s
        .comet
        .serve(
            info,
            tokio_stream::wrappers::ReceiverStream::new(in_rx),
            tokio_util::sync::PollSender::new(out_tx),
        )
        .await;
    assert_eq!(end, SessionEnd::HandshakeTimeout);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
}

/// The transports rely on this order: after op 7 the engine asks its
/// inbound stream for nothing more until the login is accepted (or never,
/// when it fails), so the first request for a second frame marks the login
/// (comet-transports' `LoginGuard` lifts the pre-login limits then).
#[tokio::test]
async fn the_engine_reads_nothing_after_op7_until_the_login_is_accepted() {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    type Log = Arc<Mutex<Vec<&'static str>>>;
    struct Inbound {
        first: Option<Frame>,
        log: Log,
    }
    impl futures_util::Stream for Inbound {
        type Item = Result<Frame, FrameError>;
        fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let this = self.get_mut();
            match this.first.take() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => {
                    this.log.lock().unwrap().push("read");
                    Poll::Ready(None)
                }
            }
        }
    }
    let log = Log::default();
    let comet = comet::core::Comet::builder()
        .authenticator(Arc::new(comet::plugins::memory::MemoryAuth::from_iter([(
            1, "k1",
        )])))
        .store(Arc::new(comet::plugins::memory::MemoryStore::default()))
        .groups(Arc::new(comet::plugins::memory::MemoryGroups::default()))
        .on_event({
            let log = log.clone();
            move |event| {
                if matches!(event, Event::Authenticated { .. }) {
                    log.lock().unwrap().push("login");
                }
            }
        })
        .build()
        .unwrap();
    for (body, logs_in) in [
        (r#"{"mid":1,"mkey":"k1"}"#, true),
        (r#"{"mid":1,"mkey":"no"}"#, false),
    ] {
        log.lock().unwrap().clear();
        let info = comet.conn_info(
            comet::core::Transport::Local,
            WireMode::Binary,
            "127.0.0.1:9".parse().unwrap(),
        );
        let inbound = Inbound {
            first: Some(Frame::new(1, op::AUTH, 1, body)),
            log: log.clone(),
        };
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(64);
        let drain = tokio::spawn(async move { while out_rx.recv().await.is_some() {} });
        let end = comet
            .serve(info, inbound, tokio_util::sync::PollSender::new(out_tx))
            .await;
        drain.await.unwrap();
        let seen = log.lock().unwrap().clone();
        if logs_in {
            assert_eq!(end, SessionEnd::PeerClosed);
            assert_eq!(seen, ["login", "read"]);
        } else {
            assert!(matches!(end, SessionEnd::AuthFailed(_)), "{end:?}");
            assert!(
                seen.is_empty(),
                "a failed login reads nothing more: {seen:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeat_timeout_counts_from_the_last_frame() {
    let config = Config::default().with_heartbeat_timeout(Duration::from_secs(5));
    let s = setup(config);
    let mut c = Conn::login(&s.comet, WireMode::Binary, 1).await;
    // Beating every 4 s keeps it alive well past the timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        c.sync().await;
    }
    let last = tokio::time::Instant::now();
    let (end, _) = c.end().await;
    assert_eq!(end, SessionEnd::HeartbeatTimeout);
    let silent = last.elapsed();
    assert!(
        silent >= Duration::from_secs(5) && silent < Duration::from_secs(6),
        "{silent:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_only_receives_still_times_out() {
    // Deliveries wake the session every 100 ms, but the client never sends
    // a frame: the heartbeat timer must still end it after 5 s of silence.
    let config = Config::default().with_heartbeat_timeout(Duration::from_secs(5));
    let s = setup(config);
    let mut c = Conn::login(&s.comet, WireMode::Binary, 1).await;
    let silent_since = tokio::time::Instant::now();
    let comet = s.comet.clone();
    let pusher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = comet.send_to_user(2, 1, Bytes::from_static(b"tick")).await;
        }
    });
    let mut frames = 0;
    while c.reply().await.is_some() {
        frames += 1;
    }
    pusher.abort();
    let silent = silent_since.elapsed();
    // About 50 deliveries arrived meanwhile (each woke the session).
    for _ in 0..40 {
        assert_eq!(&c.delivered().await.msg[..], b"tick");
    }
    let (end, _) = c.end().await;
    assert_eq!(end, SessionEnd::HeartbeatTimeout);
    assert!(
        silent >= Duration::from_secs(5) && silent < Duration::from_secs(6),
        "{silent:?}"
    );
    assert_eq!(frames, 0, "only op 9 deliveries came, no replies");
}

#[tokio::test]
async fn peer_hang_up_ends_the_session_and_unregisters() {
    let s = setup(Config::default());
    let mut c = Conn::login(&s.comet, WireMode::Binary, 1).await;
    assert!(s.comet.is_online(1));
    c.hang_up();
    assert_eq!(c.end().await.0, SessionEnd::PeerClosed);
    assert!(!s.comet.is_online(1));
    assert_eq!(s.comet.connection_count(), 0);
}

#[tokio::test]
async fn the_handle_sends_like_a_client_and_controls_sessions() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let s = {
        let auth = Arc::new(comet::plugins::memory::MemoryAuth::from_iter([
            (1, "k1"),
            (2, "k2"),
            (3, "k3"),
        ]));
        let groups = Arc::new(comet::plugins::memory::MemoryGroups::default());
        groups.set_members(100, [1, 2, 3]);
        let store = Arc::new(comet::plugins::memory::MemoryStore::default());
        let comet = comet::Comet::builder()
            .authenticator(auth.clone())
            .store(store.clone())
            .groups(groups.clone())
            .on_event(move |e| {
                let line = match e {
                    Event::Authenticated { mid, .. } => format!("auth {mid}"),
                    Event::Disconnected { mid, reason, .. } => format!("gone {mid:?} {reason:?}"),
                    _ => "other".into(),
                };
                seen.lock().unwrap().push(line);
            })
            .build()
            .unwrap();
        common::engine::Setup {
            comet,
            auth,
            store,
            groups,
        }
    };
    let mut a = Conn::login(&s.comet, WireMode::Binary, 1).await;
    let mut b = Conn::login(&s.comet, WireMode::Json, 2).await;
    // From the backend: stored, chatId assigned, delivered to both sides.
    assert_eq!(
        s.comet
            .send_to_user(1, 2, "from the backend".into())
            .await
            .unwrap(),
        1
    );
    assert_eq!(&b.delivered().await.msg[..], b"from the backend");
    assert_eq!(a.delivered().await.chat_id, 1);
    assert_eq!(
        s.comet
            .send_to_group(3, 100, "group news".into())
            .await
            .unwrap(),
        1
    );
    assert_eq!(a.delivered().await.to, 100);
    assert_eq!(b.delivered().await.to, 100);
    assert!(s.comet.send_to_group(9, 100, "x".into()).await.is_err());
    assert_eq!(
        s.store.inbox_len(3),
        0,
        "the sender's own copy never goes to its inbox"
    );

    let mut online = s.comet.online_users();
    online.sort();
    assert_eq!(online, vec![1, 2]);
    assert_eq!(s.comet.disconnect(2), 1);
    let (end, close) = b.end().await;
    assert_eq!(end, SessionEnd::Disconnected);
    assert_eq!(close.unwrap().0, 1000);
    assert!(!s.comet.is_online(2));
    let log = events.lock().unwrap().clone();
    assert_eq!(
        &log[..3],
        &["auth 1", "auth 2", "gone Some(2) Disconnected"]
    );
}

#[tokio::test]
async fn shutdown_flushes_queued_messages_then_closes() {
    let s = setup(Config::default());
    let mut a = Conn::login(&s.comet, WireMode::Binary, 1).await;
    let mut b = Conn::login(&s.comet, WireMode::Binary, 2).await;
    for i in 1..=20 {
        assert_eq!(
            a.send_msg(op::SEND_TO_USER, 1, 2, format!("m{i}"))
                .await
                .chat_id,
            i
        );
    }
    assert!(s.comet.shutdown_and_wait().await);
    // Every acknowledged message reached b before its close.
    for i in 1..=20 {
        assert_eq!(b.delivered().await.chat_id, i);
    }
    let (end, close) = b.end().await;
    assert_eq!(end, SessionEnd::Shutdown);
    assert_eq!(close.unwrap().0, 1001);
    assert_eq!(a.end().await.0, SessionEnd::Shutdown);
    // New connections are turned away.
    let c = Conn::connect(&s.comet, WireMode::Binary);
    assert_eq!(c.end().await.0, SessionEnd::Shutdown);
}

#[tokio::test]
async fn batches_coalesce_pending_messages_within_max_body() {
    let config = Config::default().with_max_body(512);
    let s = setup(config);
    let mut a = Conn::login(&s.comet, WireMode::Binary, 1).await;
    // Mid 2 logs in after 40 messages piled up in its inbox.
    for _ in 0..40 {
        a.send_msg(op::SEND_TO_USER, 1, 2, vec![b'q'; 100]).await;
    }
    let mut b = Conn::connect(&s.comet, WireMode::Binary);
    b.auth(r#"{"mid":2,"mkey":"k2"}"#).await;
    let mut batches = 0;
    let mut count = 0;
    while count < 40 {
        let f = b.frame().await.unwrap();
        assert_eq!(f.op, op::BATCH);
        assert!(f.body.len() <= 512, "op 9 body of {} bytes", f.body.len());
        count += comet::core::codec::read_batch(WireMode::Binary, &f.body, 512)
            .unwrap()
            .len();
        batches += 1;
    }
    assert_eq!(count, 40);
    // 132-byte inner frames, at most 3 per 512-byte body: 14 op 9s when
    // packed perfectly. The inbox goes at the client's pace (two op 9s'
    // worth queued at a time), so a batch may close early at that edge.
    assert!(
        (14..=20).contains(&batches),
        "{batches} op 9s for 40 messages"
    );
}

#[tokio::test]
async fn an_inbox_that_could_not_be_written_is_kept_for_the_next_login() {
    let s = setup(Config::default());
    let mut a = Conn::login(&s.comet, WireMode::Binary, 1).await;
    for i in 1..=2 {
        assert_eq!(
            a.send_msg(op::SEND_TO_USER, 1, 3, format!("m{i}"))
                .await
                .chat_id,
            i
        );
    }
    // Mid 3 logs in over a transport that fails at the first write.
    let mut broken = Conn::connect(&s.comet, WireMode::Binary);
    broken.break_transport();
    broken
        .send(Frame::new(1, op::AUTH, 1, r#"{"mid":3,"mkey":"k3"}"#))
        .await;
    assert!(matches!(broken.end().await.0, SessionEnd::Transport(_)));
    assert_eq!(s.store.inbox_len(3), 2);
    let mut c = Conn::login(&s.comet, WireMode::Json, 3).await;
    assert_eq!(&c.delivered().await.msg[..], b"m1");
    assert_eq!(&c.delivered().await.msg[..], b"m2");
}
