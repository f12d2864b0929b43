//! Limits and faults (issue: robustness): sessions per mid, the frame-rate
//! layer, and panics in plug-ins, layers and handlers — each closes at most
//! the connection concerned, is logged and counted, and the rest carry on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use comet::core::frame::{op, Frame, WireMode};
use comet::core::middleware::FrameRateLimitLayer;
use comet::core::payload::{AuthReply, SendReply};
use comet::core::{
    async_trait, AuthContext, AuthOutcome, Authenticator, BoxError, Comet, Config, Conversation,
    Draft, FrameRequest, FrameResponse, History, Message, MessageStore, Offline, SessionEnd,
};
use comet::plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
use common::engine::{setup, Conn};
use tower::service_fn;

fn users() -> Arc<MemoryAuth> {
    Arc::new(MemoryAuth::from_iter((1..=9).map(|m| (m, format!("k{m}")))))
}

#[tokio::test]
async fn a_login_past_the_sessions_per_mid_limit_closes_the_oldest() {
    let s = setup(Config::default().with_max_sessions_per_mid(2));
    let mut first = Conn::login(&s.comet, WireMode::Binary, 1).await;
    first.sync().await;
    let mut second = Conn::login(&s.comet, WireMode::Json, 1).await;
    let mut third = Conn::login(&s.comet, WireMode::Binary, 1).await;
    let (end, close) = first.end().await;
    assert_eq!(end, SessionEnd::Replaced);
    assert_eq!(close.unwrap().0, 1008);
    assert_eq!(s.comet.sessions_of(1), 2);
    assert_eq!(s.comet.stats().sessions_replaced, 1);
    // The two newest both receive.
    let mut other = Conn::login(&s.comet, WireMode::Binary, 2).await;
    assert_eq!(
        other.send_msg(op::SEND_TO_USER, 2, 1, "hi").await,
        SendReply::ok(1)
    );
    assert_eq!(second.delivered().await.chat_id, 1);
    assert_eq!(third.delivered().await.chat_id, 1);
}

fn rate_limited(per_second: u32, burst: u32) -> Comet {
    let groups = Arc::new(MemoryGroups::default());
    Comet::builder()
        .authenticator(users())
        .store(Arc::new(MemoryStore::default()))
        .groups(groups)
        .layer(FrameRateLimitLayer::new(per_second, burst))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_frame_rate_layer_closes_a_flooding_connection_only() {
    let comet = rate_limited(10, 5);
    let mut steady = Conn::login(&comet, WireMode::Binary, 1).await;
    let mut flood = Conn::login(&comet, WireMode::Json, 2).await;
    // A burst of 5 is allowed; the 6th frame at once is not.
    for seq in 1..=6 {
        flood.send(Frame::new(1, op::HEARTBEAT, seq, "")).await;
    }
    let (end, close) = flood.end().await;
    assert!(
        matches!(end, SessionEnd::RateLimited(ref r) if r.contains("frame rate limit")),
        "{end:?}"
    );
    assert_eq!(close.unwrap().0, 1008);
    assert_eq!(comet.stats().rate_limited, 1);
    // Ten frames a second for three seconds is fine.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        steady.sync().await;
    }
    assert!(comet.is_online(1));
}

struct PanickyAuth;

#[async_trait]
impl Authenticator for PanickyAuth {
    async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError> {
        if ctx.auth_request().mid() == Some(13) {
            panic!("authenticator bug for mid 13");
        }
        users().authenticate(ctx).await
    }
}

/// Panics when a message says "boom".
struct PanickyStore(MemoryStore);

#[async_trait]
impl MessageStore for PanickyStore {
    async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError> {
        if &draft.msg[..] == b"boom" {
            panic!("store bug");
        }
        self.0.append(draft).await
    }
    async fn history(
        &self,
        conversation: Conversation,
        after: i64,
        limit: usize,
    ) -> Result<History, BoxError> {
        self.0.history(conversation, after, limit).await
    }
    async fn push_offline(&self, mid: i32, msg: Arc<Message>) -> Result<(), BoxError> {
        self.0.push_offline(mid, msg).await
    }
    async fn offline(&self, mid: i32, limit: usize) -> Result<Vec<Offline>, BoxError> {
        self.0.offline(mid, limit).await
    }
    async fn remove_offline(&self, mid: i32, through: u64) -> Result<(), BoxError> {
        self.0.remove_offline(mid, through).await
    }
}

#[tokio::test]
async fn panics_close_only_the_connection_concerned() {
    let groups = Arc::new(MemoryGroups::default());
    groups.set_members(100, [1, 2, 3]);
    let comet = Comet::builder()
        .authenticator(Arc::new(PanickyAuth))
        .store(Arc::new(PanickyStore(MemoryStore::default())))
        .groups(groups)
        .handler(
            1000,
            service_fn(|req: FrameRequest| async move {
                if req.frame.body.is_empty() {
                    panic!("handler bug");
                }
                Ok::<FrameResponse, BoxError>(None)
            }),
        )
        .layer(tower::layer::layer_fn(|inner: comet::core::BoxService| {
            tower::util::MapRequest::new(inner, |req: FrameRequest| {
                assert!(req.frame.op != 4242, "layer bug");
                req
            })
        }))
        .build()
        .unwrap();
    let mut witness = Conn::login(&comet, WireMode::Binary, 1).await;

    // Authenticator panic: op 8 failure, then close.
    let mut c = Conn::connect(&comet, WireMode::Json);
    assert_eq!(
        c.auth(r#"{"mid":13,"mkey":"x"}"#).await,
        AuthReply::Failed {
            error: "authentication backend unavailable".into()
        }
    );
    assert!(matches!(c.end().await.0, SessionEnd::AuthFailed(_)));

    // Handler panic, layer panic, store panic: that connection closes with 1011.
    let mut h = Conn::login(&comet, WireMode::Binary, 2).await;
    h.send(Frame::new(1, 1000, 1, "")).await;
    let (end, close) = h.end().await;
    assert_eq!(end, SessionEnd::Panic("handler bug".into()));
    assert_eq!(close.unwrap().0, 1011);

    let mut l = Conn::login(&comet, WireMode::Binary, 2).await;
    l.send(Frame::new(1, 4242, 1, "")).await;
    assert!(matches!(l.end().await.0, SessionEnd::Panic(ref m) if m.contains("layer bug")));

    let mut st = Conn::login(&comet, WireMode::Json, 3).await;
    let seq = st.next_seq();
    st.send(Frame::new(
        1,
        op::SEND_TO_USER,
        seq,
        r#"{"from":3,"to":1,"msg":"boom"}"#,
    ))
    .await;
    assert_eq!(st.end().await.0, SessionEnd::Panic("store bug".into()));

    // Nobody else noticed, and the conversation lock was released.
    assert_eq!(comet.stats().panics, 4);
    let mut again = Conn::login(&comet, WireMode::Json, 3).await;
    assert_eq!(
        again.send_msg(op::SEND_TO_USER, 3, 1, "fine").await,
        SendReply::ok(1)
    );
    assert_eq!(&witness.delivered().await.msg[..], b"fine");
    assert_eq!(comet.session_count(), 2);
}
