//! PROTOCOL.md 2.7 (op 22 / op 23, sync) end to end, over real sockets, with
//! the independent client of `common::raw` in every wire mode.
//!
//! The test server has users 1..=9 (mkey "k{mid}"), group 100 = {1, 2, 3}
//! and group 200 = {1..=9}.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::raw::{Client, Kind, Msg, KINDS};
use serde_json::json;

/// The address of `kind`'s listener.
fn addr(running: &comet::server::Running, kind: Kind) -> SocketAddr {
    match kind {
        Kind::Tcp => running.tcp_addr.unwrap(),
        _ => running.ws_addr.unwrap(),
    }
}

async fn login(running: &comet::server::Running, kind: Kind, mid: i32) -> Client {
    Client::login(kind, addr(running, kind), mid, &format!("k{mid}")).await
}

/// `n` messages from `from` to user (`op` 18) or group (`op` 20) `to`,
/// acknowledged; returns their chatIds.
async fn send_many(c: &mut Client, op: u32, from: i32, to: i32, n: usize, tag: &str) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let ack = c
            .send_msg(op, from, to, format!("{tag} {i}").as_bytes())
            .await;
        assert_eq!(ack.ret, 0, "{ack:?}");
        ids.push(ack.chat_id);
    }
    ids
}

fn ids(msgs: &[Msg]) -> Vec<i64> {
    msgs.iter().map(|m| m.chat_id).collect()
}

#[tokio::test]
async fn replay_after_a_gap_is_byte_identical_and_complete_before_op_23() {
    let running = common::server::start().await;
    for (i, kind) in KINDS.into_iter().enumerate() {
        // A fresh pair of users per mode: 1+2i and 2+2i are 1..=6.
        let (a, b) = (1 + 2 * i as i32, 2 + 2 * i as i32);
        let mut sender = login(&running, Kind::Tcp, a).await;
        let mut receiver = login(&running, kind, b).await;
        send_many(&mut sender, 18, a, b, 6, "m").await;
        // What live delivery carried.
        let mut live = Vec::new();
        for _ in 0..6 {
            live.push(receiver.msg().await);
        }
        assert_eq!(ids(&live), (1..=6).collect::<Vec<_>>());
        // The client lost 4..=6 (say): it asks after 3.
        let (ack, replay) = receiver.sync(18, a, 3, Some(100)).await;
        assert_eq!((ack.ret, ack.oldest, ack.head), (0, 1, 6), "{kind:?}");
        assert_eq!(
            replay,
            live[3..].to_vec(),
            "{kind:?}: replay = live delivery"
        );
        // The sender's side of the same conversation, from its own view.
        let (ack, replay) = sender.sync(18, b, 0, None).await;
        assert_eq!((ack.ret, ack.oldest, ack.head), (0, 1, 6));
        assert_eq!(replay, live);
        sender.no_msg().await;
        receiver.no_msg().await;
    }
}

#[tokio::test]
async fn paging_with_limit_the_cap_limit_zero_and_an_empty_conversation() {
    let running = common::server::start().await;
    for kind in KINDS {
        let mut a = login(&running, kind, 1).await;
        let mut b = login(&running, Kind::Tcp, 9).await;
        // An empty conversation: nothing, oldest = head = 0.
        let (ack, replay) = a.sync(18, 8, 0, Some(10)).await;
        assert_eq!((ack.ret, ack.oldest, ack.head, replay.len()), (0, 0, 0, 0));
        let base = {
            let (ack, _) = a.sync(18, 9, 0, Some(0)).await;
            ack.head
        };
        send_many(&mut b, 18, 9, 1, 105, "p").await;
        a.heartbeat().await;
        a.take_msgs();
        let head = base + 105;
        // limit 0: no messages, just the bounds.
        let (ack, replay) = a.sync(18, 9, base, Some(0)).await;
        assert_eq!((ack.ret, ack.oldest, ack.head), (0, 1, head));
        assert!(replay.is_empty());
        // Paging: 40 at a time from `base`, oldest first, until head.
        let mut got = Vec::new();
        let mut after = base;
        while after < head {
            let (ack, page) = a.sync(18, 9, after, Some(40)).await;
            assert_eq!((ack.ret, ack.head), (0, head));
            assert!(!page.is_empty() && page.len() <= 40);
            after = page.last().unwrap().chat_id;
            got.extend(page);
        }
        assert_eq!(ids(&got), ((base + 1)..=head).collect::<Vec<_>>());
        // The cap (100 by default) lowers a larger limit, and an absent one.
        for limit in [Some(1000), None] {
            let (ack, page) = a.sync(18, 9, base, limit).await;
            assert_eq!(ack.ret, 0);
            assert_eq!(ids(&page), ((base + 1)..=(base + 100)).collect::<Vec<_>>());
        }
        // After head: nothing.
        let (ack, page) = a.sync(18, 9, head, None).await;
        assert_eq!((ack.ret, ack.head, page.len()), (0, head, 0));
        a.close().await;
        b.close().await;
    }
}

#[tokio::test]
async fn notes_to_oneself_and_groups_for_members_only() {
    let running = common::server::start().await;
    for kind in KINDS {
        let mut one = login(&running, kind, 1).await;
        // Notes to oneself: the conversation of 1 with 1.
        let notes = send_many(&mut one, 18, 1, 1, 2, "note").await;
        let (ack, replay) = one.sync(18, 1, notes[0] - 1, None).await;
        assert_eq!((ack.ret, ack.head), (0, notes[1]));
        assert_eq!(ids(&replay), notes);
        assert!(replay.iter().all(|m| (m.from, m.to) == (1, 1)));

        let posted = send_many(&mut one, 20, 1, 100, 3, "group").await;
        // Member 3 of group 100 gets the replay, as op 20 frames.
        let mut three = login(&running, kind, 3).await;
        // Its offline inbox (the same messages) first.
        three.heartbeat().await;
        assert_eq!(ids(&three.take_msgs()), posted);
        let (ack, replay) = three.sync(20, 100, posted[0] - 1, None).await;
        assert_eq!((ack.ret, ack.head), (0, posted[2]));
        assert_eq!(ids(&replay), posted);
        assert!(replay
            .iter()
            .all(|m| m.op == 20 && m.from == 1 && m.to == 100));
        assert_eq!(replay[0].msg, b"group 0");
        // Non-member 4, and a group that does not exist: ret -1, connection kept.
        let mut four = login(&running, kind, 4).await;
        for group in [100, 999] {
            let (ack, replay) = four.sync(20, group, 0, None).await;
            assert_eq!(ack.ret, -1, "{kind:?} group {group}");
            assert!(replay.is_empty());
            if kind == Kind::WsJson {
                let reason = ack.error.unwrap();
                assert!(
                    reason.contains(&format!("not a member of group {group}")),
                    "{reason}"
                );
            }
        }
        four.heartbeat().await;
        for c in [one, three, four] {
            c.close().await;
        }
    }
}

#[tokio::test]
async fn every_bad_request_answers_ret_minus_one_and_keeps_the_connection() {
    let running = common::server::start().await;
    for kind in KINDS {
        let mut c = login(&running, kind, 5).await;
        let mut other = login(&running, Kind::Tcp, 6).await;
        let before = send_many(&mut other, 18, 6, 5, 1, "x").await[0];
        c.msg().await;
        let mut bad: Vec<(Option<serde_json::Value>, Vec<u8>)> = vec![
            c.sync_body(19, 6, 0, None),     // kind neither 18 nor 20
            c.sync_body(0, 6, 0, None),      // kind 0
            c.sync_body(18, 0, 0, None),     // to < 1
            c.sync_body(18, -6, 0, None),    // to < 1
            c.sync_body(18, 6, -1, None),    // negative after
            c.sync_body(18, 6, 0, Some(-1)), // negative limit
        ];
        match kind {
            Kind::WsJson => {
                for body in [
                    json!("kind 18"),
                    json!([18, 6, 0, 10]),
                    json!({"to": 6}),
                    json!({"kind": 18}),
                    json!({"kind": "18", "to": 6}),
                    json!({"kind": 18, "to": 6, "after": 1.5}),
                    json!(null),
                ] {
                    bad.push((Some(body), Vec::new()));
                }
            }
            _ => {
                let good = c.sync_body(18, 6, 0, Some(1)).1;
                bad.push((None, good[..16].to_vec())); // one byte short
                bad.push((None, [&good[..], &[0]].concat())); // one byte long
                bad.push((None, vec![18])); // far too short
            }
        }
        // An empty body: JSON absent, binary zero bytes.
        bad.push((None, Vec::new()));
        for (json_body, raw) in bad {
            let seq = c.next_seq();
            let raw_ref = if kind == Kind::WsJson {
                None
            } else {
                Some(&raw[..])
            };
            c.send_frame(22, seq, json_body.clone(), raw_ref).await;
            let ack = c.sync_ack(seq).await;
            assert_eq!(ack.ret, -1, "{kind:?} {json_body:?} {raw:?}");
        }
        // Still served, and no chatId was consumed by any of it.
        c.heartbeat().await;
        let ack = c.send_msg(18, 5, 6, b"after").await;
        assert_eq!((ack.ret, ack.chat_id), (0, before + 1));
        c.close().await;
        other.close().await;
    }
}

#[tokio::test]
async fn a_sync_consumes_no_chat_id_and_leaves_an_offline_inbox_alone() {
    let running = common::server::start().await;
    for (i, kind) in KINDS.into_iter().enumerate() {
        let (sender, offline) = (7, 1 + i as i32);
        let mut s = login(&running, kind, sender).await;
        let sent = send_many(&mut s, 18, sender, offline, 3, "kept").await;
        s.take_msgs();
        // The sender replays the conversation (twice): the recipient's inbox
        // is untouched, and the next send goes on at head + 1.
        for _ in 0..2 {
            let (ack, replay) = s.sync(18, offline, 0, None).await;
            assert_eq!(ids(&replay), sent);
            assert_eq!(ack.head, sent[2]);
        }
        let mut r = login(&running, Kind::Tcp, offline).await;
        let mut inbox = Vec::new();
        for _ in 0..3 {
            inbox.push(r.msg().await);
        }
        assert_eq!(ids(&inbox), sent);
        let ack = s.send_msg(18, sender, offline, b"next").await;
        assert_eq!(ack.chat_id, sent[2] + 1);
        s.close().await;
        r.close().await;
    }
}

#[tokio::test]
async fn non_utf8_bytes_replay_to_a_json_client_as_base64() {
    let running = common::server::start().await;
    let mut bin = login(&running, Kind::Tcp, 8).await;
    let raw = [0xff, 0x00, 0xfe, b'x'];
    let ack = bin.send_msg(18, 8, 9, &raw).await;
    assert_eq!(ack.ret, 0);
    let mut json_client = login(&running, Kind::WsJson, 9).await;
    json_client.heartbeat().await;
    json_client.take_msgs();
    // The raw client decodes `"enc": "base64"` itself (it fails on any
    // other encoding), so equal bytes mean the base64 was right.
    let (reply, replay) = json_client.sync(18, 8, ack.chat_id - 1, None).await;
    assert_eq!(reply.ret, 0);
    assert_eq!(replay.len(), 1);
    assert_eq!(replay[0].msg, raw);
}

#[tokio::test]
async fn a_replay_goes_at_the_readers_pace_past_the_outbound_bound() {
    // An outbound bound of 4 KiB and 100 messages of 2,000 bytes to replay:
    // the replay must wait for the reader, not close it as a slow consumer.
    let running = common::server::start_with(|s| {
        s.engine.max_body = 4096;
        s.engine.max_outbound_bytes = 4096;
    })
    .await;
    for kind in KINDS {
        let mut writer = login(&running, Kind::Tcp, 2).await;
        let body = vec![b'z'; 2000];
        let mut sent = Vec::new();
        for _ in 0..100 {
            let ack = writer.send_msg(18, 2, 3, &body).await;
            assert_eq!(ack.ret, 0);
            sent.push(ack.chat_id);
        }
        let mut reader = login(&running, kind, 3).await;
        reader.heartbeat().await;
        reader.take_msgs();
        // Two syncs pipelined: answered in order, each replay before its op 23.
        let (j1, r1) = reader.sync_body(18, 2, sent[0] - 1, Some(100));
        let (j2, r2) = reader.sync_body(18, 2, sent[49], Some(10));
        let (s1, s2) = (reader.next_seq(), reader.next_seq());
        let raw1 = Some(&r1[..]).filter(|r| !r.is_empty());
        let raw2 = Some(&r2[..]).filter(|r| !r.is_empty());
        reader.send_frame(22, s1, j1, raw1).await;
        reader.send_frame(22, s2, j2, raw2).await;
        // Read nothing for a while: a live message would have hit the bound.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let first = reader.sync_ack(s1).await;
        assert_eq!(first.ret, 0, "{kind:?}");
        let replay = reader.take_msgs();
        assert_eq!(ids(&replay), sent, "{kind:?}");
        assert!(replay.iter().all(|m| m.msg == body));
        let second = reader.sync_ack(s2).await;
        assert_eq!(second.ret, 0);
        assert_eq!(ids(&reader.take_msgs()), sent[50..60].to_vec());
        reader.heartbeat().await;
        writer.close().await;
        reader.close().await;
    }
}
