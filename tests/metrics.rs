//! The engine's metrics (issue 13 part 1) counted exactly, over real
//! sockets: a comet built under a Prometheus recorder of its own (so other
//! tests' traffic cannot blur the counts), real TCP clients, and the
//! rendered Prometheus text.

mod common;

use std::sync::Arc;

use comet::core::Comet;
use comet::plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
use comet::transports::{tcp, ws};
use common::raw::{Client, Kind};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// A comet whose series live in a recorder of its own, serving TCP and
/// WebSocket; users 1..=4 (mkey "k{mid}"), group 100 = {1, 2, 3, 4}.
async fn start() -> (
    Comet,
    PrometheusHandle,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let comet = metrics::with_local_recorder(&recorder, || {
        let keys: Vec<(i32, Vec<u8>)> =
            (1..=4).map(|m| (m, format!("k{m}").into_bytes())).collect();
        let auth = Arc::new(MemoryAuth::from_iter(
            keys.iter().map(|(m, k)| (*m, k.as_slice())),
        ));
        let groups = Arc::new(MemoryGroups::default());
        groups.set_members(100, [1, 2, 3, 4]);
        Comet::builder()
            .authenticator(auth.clone())
            .users(auth)
            .store(Arc::new(MemoryStore::default()))
            .groups(groups)
            .build()
            .unwrap()
    });
    let listener = comet::transports::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tcp::serve(listener, comet.clone(), Default::default()));
    let listener = comet::transports::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let ws_addr = listener.local_addr().unwrap();
    tokio::spawn(ws::serve(listener, comet.clone(), ws::WsOptions::default()));
    (comet, handle, addr, ws_addr)
}

/// The value of one series in `text` (0 when absent).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn deliveries_sends_frames_and_sessions_are_counted_exactly() {
    let (comet, handle, addr, ws_addr) = start().await;
    let mut clients = Vec::new();
    for mid in 1..=3 {
        clients.push(Client::login(Kind::Tcp, addr, mid, &format!("k{mid}")).await);
    }
    // Mid 4 speaks JSON over WebSocket: its op 9 are text frames.
    clients.push(Client::login(Kind::WsJson, ws_addr, 4, "k4").await);
    let mut bad = Client::connect(Kind::Tcp, addr).await;
    let (ret, _) = bad
        .auth(serde_json::json!({"mid": 1, "mkey": "nope"}))
        .await;
    assert_ne!(ret, 0);

    // One group send fans out to the 3 other members; one 1:1 send to 1.
    assert_eq!(clients[0].send_msg(20, 1, 100, b"all").await.ret, 0);
    for c in &mut clients[1..] {
        assert_eq!(c.msg().await.msg, b"all");
    }
    assert_eq!(clients[1].send_msg(18, 2, 3, b"one").await.ret, 0);
    assert_eq!(clients[2].msg().await.msg, b"one");
    // Refused: not a member, unknown user, too large.
    assert_eq!(clients[1].send_msg(20, 2, 999, b"x").await.ret, -1);
    assert_eq!(clients[1].send_msg(18, 2, 77, b"x").await.ret, -1);
    assert_eq!(
        clients[1]
            .send_msg(18, 2, 3, &vec![b'x'; 65_536 - 31])
            .await
            .ret,
        -1
    );

    comet.sample_metrics();
    let text = handle.render();
    let v = |series: &str| value(&text, series);
    assert_eq!(v("comet_deliveries_total"), 4.0, "{text}");
    assert_eq!(
        v(r#"comet_sends_total{result="accepted",reason="ok"}"#),
        2.0
    );
    assert_eq!(
        v(r#"comet_sends_total{result="refused",reason="not_member"}"#),
        1.0
    );
    assert_eq!(
        v(r#"comet_sends_total{result="refused",reason="unknown_user"}"#),
        1.0
    );
    assert_eq!(
        v(r#"comet_sends_total{result="refused",reason="too_large"}"#),
        1.0
    );
    assert_eq!(v(r#"comet_frames_in_total{op="20"}"#), 2.0);
    assert_eq!(v(r#"comet_frames_in_total{op="18"}"#), 3.0);
    assert_eq!(v(r#"comet_frames_out_total{op="21"}"#), 2.0);
    assert_eq!(v(r#"comet_frames_out_total{op="19"}"#), 3.0);
    assert_eq!(
        v(r#"comet_frames_out_total{op="8"}"#),
        5.0,
        "4 accepted, 1 refused"
    );
    assert_eq!(v(r#"comet_logins_total{result="accepted"}"#), 4.0);
    assert_eq!(v(r#"comet_logins_total{result="refused"}"#), 1.0);
    assert_eq!(v(r#"comet_sessions{transport="tcp",mode="binary"}"#), 3.0);
    assert_eq!(
        v(r#"comet_sessions{transport="websocket",mode="json"}"#),
        1.0
    );
    // Every delivery above went out in an op 9 of its own (summary: count
    // and sum of the batch sizes).
    assert_eq!(v(r#"comet_frames_out_total{op="9"}"#), 4.0);
    assert_eq!(v("comet_batch_messages_count"), 4.0);
    assert_eq!(v("comet_batch_messages_sum"), 4.0);
    // The store was called for each accepted send.
    assert!(v(r#"comet_plugin_call_seconds_count{plugin="store"}"#) >= 2.0);
    assert_eq!(v("comet_outbound_queued_bytes"), 0.0);

    // A kick closes the sessions of mid 4 with cause "kick".
    assert_eq!(comet.disconnect(4), 1);
    clients.pop().unwrap().closed().await;
    common::within("the kick to be counted", async {
        loop {
            let text = handle.render();
            if value(&text, r#"comet_closes_total{cause="kick"}"#) == 1.0
                && value(
                    &text,
                    r#"comet_sessions{transport="websocket",mode="json"}"#,
                ) == 0.0
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    comet.shutdown_and_wait().await;
}
