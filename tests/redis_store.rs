//! The Redis cluster backend's store and group directory against the
//! conformance kits, and its recovery from a Redis restart, on a real
//! `redis-server` that the test starts (see `common::redis`).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use comet::core::store::{Draft, MessageStore};
use comet::core::testing::{groups_conformance, store_conformance};
use comet::core::{op, Conversation, GroupDirectory};
use comet::plugins::redis::{RedisCluster, RedisOptions};
use common::redis::RedisServer;

async fn cluster(server: &RedisServer, prefix: &str) -> RedisCluster {
    RedisCluster::connect(RedisOptions::new(server.url(), "test-node").prefix(prefix))
        .await
        .expect("connects to the test redis")
}

fn draft(from: i32, to: i32, text: &'static str) -> Draft {
    Draft {
        conversation: Conversation::direct(from, to),
        op: op::SEND_TO_USER,
        from,
        to,
        msg: Bytes::from_static(text.as_bytes()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_passes_the_conformance_kit() {
    let server = RedisServer::start();
    let url = server.url();
    let n = AtomicUsize::new(0);
    store_conformance(|limits| {
        // Each check gets an empty store: its own key prefix.
        let prefix = format!("kit{}:", n.fetch_add(1, Ordering::Relaxed));
        let url = url.clone();
        async move {
            let opts = RedisOptions::new(url, "kit")
                .prefix(prefix)
                .limits(limits.history, limits.inbox);
            RedisCluster::connect(opts).await.expect("connects").store()
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_groups_pass_the_conformance_kit() {
    let server = RedisServer::start();
    let cluster = cluster(&server, "groups:").await;
    groups_conformance(|fixture| async move {
        let groups = cluster.groups();
        for (g, members) in fixture {
            groups
                .set_members(g, members)
                .await
                .expect("writes a group");
        }
        groups
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_membership_is_written_idempotently_and_leave_works() {
    let server = RedisServer::start();
    let groups = cluster(&server, "idem:").await.groups();
    groups.set_members(7, [1, 2, 3]).await.unwrap();
    // A second node starting with the same `[[groups]]` table, and a join
    // made at run time: nothing doubles, nothing is lost.
    groups.join(7, 4).await.unwrap();
    groups.set_members(7, [1, 2, 3]).await.unwrap();
    let mut members = groups.members(7).await.unwrap().to_vec();
    members.sort_unstable();
    assert_eq!(members, [1, 2, 3, 4]);
    groups.leave(7, 2).await.unwrap();
    assert!(!groups.is_member(7, 2).await.unwrap());
    assert!(groups.is_member(7, 4).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_by_redis_are_loaded_again() {
    let server = RedisServer::start();
    let store = cluster(&server, "noscript:").await.store();
    assert_eq!(store.append(draft(1, 2, "a")).await.unwrap().chat_id(), 1);
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).as_deref(), Some("OK"));
    // EVALSHA meets NOSCRIPT: the client loads the script and retries.
    assert_eq!(store.append(draft(1, 2, "b")).await.unwrap().chat_id(), 2);
    let page = store
        .history(Conversation::direct(1, 2), 0, 10)
        .await
        .unwrap();
    let texts: Vec<&[u8]> = page
        .messages
        .iter()
        .map(|m| &m.delivered().msg[..])
        .collect();
    assert_eq!(texts, [&b"a"[..], &b"b"[..]]);
    assert_eq!((page.oldest, page.head), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_calls_and_a_restart_recovers_without_a_gap() {
    let mut server = RedisServer::start();
    let store = cluster(&server, "down:").await.store();
    assert_eq!(
        store.append(draft(1, 2, "before")).await.unwrap().chat_id(),
        1
    );

    server.stop();
    let down = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.append(draft(1, 2, "lost")),
    )
    .await
    .expect("a call to a dead Redis ends (error), it does not hang");
    assert!(down.is_err(), "an append while Redis is down must fail");

    // Same port, same append-only file; every script forgotten.
    server.start_again();
    let mut chat_id = None;
    for _ in 0..100 {
        if let Ok(msg) = store.append(draft(2, 1, "after")).await {
            chat_id = Some(msg.chat_id());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The failed append consumed no chatId; the one before it survived.
    assert_eq!(chat_id, Some(2), "the store recovers by itself");
    let page = store
        .history(Conversation::direct(1, 2), 0, 10)
        .await
        .unwrap();
    let ids: Vec<i64> = page.messages.iter().map(|m| m.chat_id()).collect();
    assert_eq!(ids, [1, 2]);
}

/// A node with no sessions: its broker (feed subscribed) and store.
async fn broker_node(
    server: &RedisServer,
    prefix: &str,
    node: &str,
) -> (
    Arc<dyn comet::core::Broker>,
    Arc<comet::plugins::redis::RedisStore>,
    RedisCluster,
) {
    let cluster = RedisCluster::connect(RedisOptions::new(server.url(), node).prefix(prefix))
        .await
        .expect("connects");
    let store = cluster.store();
    let registry = Arc::new(comet::core::Registry::new(
        store.clone(),
        Arc::new(comet::core::stats::Stats::default()),
    ));
    let broker = cluster.broker(registry);
    // Logins are refused until the feed is subscribed.
    let mut subscribed = false;
    for _ in 0..100 {
        if server
            .cli(&["PUBSUB", "NUMSUB", &format!("{prefix}ch:{node}")])
            .is_some_and(|out| out.ends_with("\n1"))
        {
            subscribed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(subscribed, "node {node} subscribed to its feed");
    (broker, store, cluster)
}

fn group_draft(from: i32, group: i32, text: &'static str) -> Draft {
    Draft {
        conversation: Conversation::Group(group),
        op: op::SEND_TO_GROUP,
        from,
        to: group,
        msg: Bytes::from_static(text.as_bytes()),
    }
}

async fn inbox(store: &dyn MessageStore, mid: i32) -> Vec<(i64, Vec<u8>)> {
    store
        .offline(mid, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| (e.msg.chat_id(), e.msg.delivered().msg.to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_group_send_consumes_no_chat_id() {
    let server = RedisServer::start();
    let (broker, store, cluster) = broker_node(&server, "refuse:", "n1").await;
    cluster.groups().set_members(9, [1, 2]).await.unwrap();
    let refused = broker.send(group_draft(3, 9, "intruder"), None).await;
    assert!(matches!(refused, Err(comet::core::BrokerError::NotMember)));
    assert_eq!(broker.send(group_draft(1, 9, "hi"), None).await.unwrap(), 1);
    let page = store.history(Conversation::Group(9), 0, 10).await.unwrap();
    assert_eq!(page.head, 1, "the refused send left no trace");
}

/// Calls of `command` since the last `CONFIG RESETSTAT`.
fn calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]).unwrap_or_default();
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_send_costs_the_same_whatever_the_group_size() {
    let server = RedisServer::start();
    let (broker, _store, cluster) = broker_node(&server, "size:", "n1").await;
    let groups = cluster.groups();
    groups.set_members(1, [1, 2]).await.unwrap();
    groups.set_members(2, 1..=500).await.unwrap();
    for group in [1, 2] {
        // The first message of a group makes the node load its members
        // (one more PUBLISH, of the member list, to the node): wait for it.
        server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
        assert_eq!(
            broker
                .send(group_draft(1, group, "first"), None)
                .await
                .unwrap(),
            1
        );
        for _ in 0..100 {
            if calls(&server, "publish") == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(
            calls(&server, "publish"),
            2,
            "group {group}: members loaded once"
        );
        server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
        assert_eq!(
            broker
                .send(group_draft(1, group, "hi"), None)
                .await
                .unwrap(),
            2
        );
        assert_eq!(calls(&server, "publish"), 1, "group {group}: one PUBLISH");
        assert_eq!(
            calls(&server, "smembers"),
            0,
            "group {group}: no member lookup"
        );
        assert_eq!(
            calls(&server, "sismember"),
            1,
            "group {group}: the membership check"
        );
        assert_eq!(calls(&server, "incr"), 1);
        assert_eq!(calls(&server, "xadd"), 1);
        assert_eq!(calls(&server, "evalsha"), 1, "one round trip");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_catch_up_at_login_copies_what_was_missed_once() {
    let server = RedisServer::start();
    let (broker, store, cluster) = broker_node(&server, "catch:", "n1").await;
    let groups = cluster.groups();
    groups.set_members(5, [1, 2]).await.unwrap();
    // Before 3 joins: not its business.
    broker.send(group_draft(1, 5, "early"), None).await.unwrap();
    groups.join(5, 3).await.unwrap();
    broker.send(group_draft(1, 5, "m2"), None).await.unwrap();
    broker.send(group_draft(3, 5, "own"), None).await.unwrap();
    broker.send(group_draft(2, 5, "m4"), None).await.unwrap();
    // One history copy, no per-member inbox copies at send time.
    assert!(inbox(&*store, 3).await.is_empty());
    broker.login(3).await.unwrap();
    assert_eq!(
        inbox(&*store, 3).await,
        [(2, b"m2".to_vec()), (4, b"m4".to_vec())],
        "catch-up starts at the join and leaves out the member's own message"
    );
    // A second session while online: no second copy.
    broker.login(3).await.unwrap();
    assert_eq!(inbox(&*store, 3).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_feed_is_gone_counts_as_offline() {
    let server = RedisServer::start();
    let (broker, store, _cluster) = broker_node(&server, "ghost:", "n1").await;
    // Mid 5 registered on node "ghost", which died a moment ago: its
    // heartbeat key has not expired, but nobody listens on its feed.
    server.cli(&["SADD", "ghost:pr:5", "ghost"]).unwrap();
    server
        .cli(&["SET", "ghost:node:ghost", "1", "PX", "60000"])
        .unwrap();
    assert_eq!(
        broker.send(draft(1, 5, "to a ghost"), None).await.unwrap(),
        1
    );
    assert_eq!(
        inbox(&*store, 5).await,
        [(1, b"to a ghost".to_vec())],
        "the message waits in the inbox instead of vanishing"
    );
    assert_eq!(
        server.cli(&["EXISTS", "ghost:node:ghost"]).as_deref(),
        Some("0"),
        "the dead node is forgotten at once"
    );
}
