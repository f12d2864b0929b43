//! Applications replace every default plug-in and extend the frame stack,
//! without touching comet's code.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use comet::core::frame::{op, Frame, WireMode};
use comet::core::payload::{AuthReply, SendReply};
use comet::core::{
    async_trait, AuthContext, AuthOutcome, Authenticator, BoxError, Comet, Config, Conversation,
    Draft, FrameRequest, FrameResponse, GroupDirectory, History, Identity, Members, Message,
    MessageStore, Offline, SessionEnd,
};
use common::engine::Conn;
use tower::{service_fn, Service};

/// Tokens of the form "token-of-<mid>", like a company SSO might issue, in
/// a goim-style `key` field.
struct TokenAuth;

#[async_trait]
impl Authenticator for TokenAuth {
    async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError> {
        assert_eq!(ctx.peer().ip().to_string(), "127.0.0.1");
        let token = ctx
            .auth_request()
            .field("key")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        Ok(
            match token.strip_prefix("token-of-").and_then(|m| m.parse().ok()) {
                Some(mid) => AuthOutcome::Accepted(Identity::new(mid)),
                None => AuthOutcome::Denied("bad token".into()),
            },
        )
    }
}

/// chatIds from a plain map (as a SQL table with a counter row might), and
/// a log of every message, unbounded.
#[derive(Default)]
struct LogStore {
    conversations: Mutex<BTreeMap<Conversation, Vec<Arc<Message>>>>,
    log: Mutex<Vec<(i64, Bytes)>>,
    inbox: Mutex<HashMap<i32, Vec<Offline>>>,
    next_seq: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl MessageStore for LogStore {
    async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError> {
        let mut conversations = self.conversations.lock().unwrap();
        let kept = conversations.entry(draft.conversation).or_default();
        let chat_id = kept.len() as i64 + 1;
        self.log.lock().unwrap().push((chat_id, draft.msg.clone()));
        let msg = draft.into_message(chat_id);
        kept.push(msg.clone());
        Ok(msg)
    }
    async fn history(
        &self,
        conversation: Conversation,
        after: i64,
        limit: usize,
    ) -> Result<History, BoxError> {
        let conversations = self.conversations.lock().unwrap();
        let kept = conversations.get(&conversation).map_or(&[][..], |v| &v[..]);
        Ok(History {
            messages: kept
                .iter()
                .skip(after.max(0) as usize)
                .take(limit)
                .cloned()
                .collect(),
            oldest: i64::from(!kept.is_empty()),
            head: kept.len() as i64,
        })
    }
    async fn push_offline(&self, mid: i32, msg: Arc<Message>) -> Result<(), BoxError> {
        // The seq is taken under the inbox lock: taken before it, two
        // concurrent pushes could queue seq 5 before seq 4, and a peek of
        // one entry followed by remove_offline(through 5) would lose seq 4
        // (the conformance kit caught this).
        let mut inbox = self.inbox.lock().unwrap();
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        inbox.entry(mid).or_default().push(Offline { seq, msg });
        Ok(())
    }
    async fn offline(&self, mid: i32, limit: usize) -> Result<Vec<Offline>, BoxError> {
        let inbox = self.inbox.lock().unwrap();
        let entries = inbox.get(&mid).map_or(&[][..], |v| &v[..]);
        Ok(entries.iter().take(limit).cloned().collect())
    }
    async fn remove_offline(&self, mid: i32, through: u64) -> Result<(), BoxError> {
        if let Some(entries) = self.inbox.lock().unwrap().get_mut(&mid) {
            entries.retain(|e| e.seq > through);
        }
        Ok(())
    }
}

/// Group n holds every mid divisible by n.
struct Divisors;

#[async_trait]
impl GroupDirectory for Divisors {
    async fn is_member(&self, group: i32, mid: i32) -> Result<bool, BoxError> {
        Ok(mid % group == 0)
    }
    async fn members(&self, group: i32) -> Result<Members, BoxError> {
        Ok((1..=20).filter(|m| m % group == 0).collect())
    }
}

async fn token_login(comet: &Comet, mid: i32) -> Conn {
    let mut c = Conn::connect(comet, WireMode::Binary);
    let body = format!(r#"{{"key":"token-of-{mid}","platform":"ios"}}"#);
    assert_eq!(c.auth(&body).await, AuthReply::Ok { mid });
    c
}

#[tokio::test]
async fn an_application_swaps_all_three_plugins() {
    let store = Arc::new(LogStore::default());
    let comet = Comet::builder()
        .authenticator(Arc::new(TokenAuth))
        .store(store.clone())
        .groups(Arc::new(Divisors))
        .build()
        .unwrap();
    let mut four = token_login(&comet, 4).await;
    let mut six = token_login(&comet, 6).await;
    let mut nine = token_login(&comet, 9).await;
    let mut bad = Conn::connect(&comet, WireMode::Json);
    assert!(
        matches!(bad.auth(r#"{"mid":1,"mkey":"k1"}"#).await, AuthReply::Failed { error } if error == "bad token")
    );

    assert_eq!(
        four.send_msg(op::SEND_TO_USER, 4, 6, "hi six").await,
        SendReply::ok(1)
    );
    assert_eq!(&six.delivered().await.msg[..], b"hi six");
    // Group 2 = even mids: 4 and 6 (and offline 2, 8, ...), not 9.
    assert_eq!(
        six.send_msg(op::SEND_TO_GROUP, 6, 2, "evens").await,
        SendReply::ok(1)
    );
    assert_eq!(&four.delivered().await.msg[..], b"evens");
    nine.assert_no_delivery().await;
    assert_eq!(nine.send_msg(op::SEND_TO_GROUP, 9, 2, "odd").await.ret, -1);
    assert_eq!(store.log.lock().unwrap().len(), 2);
    // Offline even members got it in the application's own inbox.
    assert_eq!(store.inbox.lock().unwrap().get(&8).map(Vec::len), Some(1));
    let mut eight = token_login(&comet, 8).await;
    assert_eq!(&eight.delivered().await.msg[..], b"evens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_stores_pass_the_conformance_kit() {
    // LogStore keeps everything: the kit checks it also loses nothing.
    comet::core::testing::store_conformance_unbounded(|| async { Arc::new(LogStore::default()) })
        .await;
    // A wrapper with its gate open is its inner store.
    comet::core::testing::store_conformance(|limits| async move {
        Arc::new(GatedStore {
            inner: comet::plugins::memory::MemoryStore::new(limits.history, limits.inbox),
            gate: Arc::new(tokio::sync::Semaphore::new(
                tokio::sync::Semaphore::MAX_PERMITS,
            )),
        })
    })
    .await;
}

fn setup_with(builder: comet::core::CometBuilder) -> Comet {
    let auth = Arc::new(comet::plugins::memory::MemoryAuth::from_iter(
        (1..=9).map(|m| (m, format!("k{m}"))),
    ));
    let groups = Arc::new(comet::plugins::memory::MemoryGroups::default());
    groups.set_members(100, [1, 2, 3]);
    builder
        .authenticator(auth)
        .store(Arc::new(comet::plugins::memory::MemoryStore::default()))
        .groups(groups)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_custom_op_is_handled_by_an_application_service() {
    // op 1000: "who am I", answered with op 1001 from the connection context;
    // op 1002: the application pushes an extra frame itself and stays silent.
    let comet = setup_with(
        Comet::builder()
            .handler(
                1000,
                service_fn(|req: FrameRequest| async move {
                    let body = format!(
                        r#"{{"mid":{},"transport":"{}"}}"#,
                        req.ctx.mid(),
                        req.ctx.conn.transport
                    );
                    Ok::<FrameResponse, BoxError>(Some(req.frame.reply(1001, body)))
                }),
            )
            .handler(
                1002,
                service_fn(|req: FrameRequest| async move {
                    let online = req.ctx.comet().online_users().len();
                    req.ctx.push(Frame::new(1, 1003, 0, format!("{online}")));
                    Ok::<FrameResponse, BoxError>(None)
                }),
            ),
    );
    let mut a = Conn::login(&comet, WireMode::Json, 5).await;
    a.send(Frame::new(1, 1000, 77, "{}")).await;
    let reply = a.reply().await.unwrap();
    assert_eq!((reply.op, reply.seq), (1001, 77));
    assert_eq!(&reply.body[..], br#"{"mid":5,"transport":"local"}"#);
    a.send(Frame::new(1, 1002, 78, "")).await;
    let pushed = a.reply().await.unwrap();
    assert_eq!((pushed.op, &pushed.body[..]), (1003, &b"1"[..]));
    assert_eq!(comet.stats().unknown_ops, 0);
}

#[tokio::test]
async fn handlers_for_protocol_ops_are_refused() {
    let err = Comet::builder()
        .handler(
            18,
            service_fn(|_req: FrameRequest| async { Ok::<FrameResponse, BoxError>(None) }),
        )
        .authenticator(Arc::new(TokenAuth))
        .store(Arc::new(LogStore::default()))
        .groups(Arc::new(Divisors))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("op 18"));
    assert!(Comet::builder().build().is_err());
}

/// Rejects op 20 with a polite reply, closes the connection on op 666, and
/// counts everything it sees.
#[derive(Clone)]
struct Guard<S> {
    inner: S,
    seen: Arc<AtomicUsize>,
}

impl<S> Service<FrameRequest> for Guard<S>
where
    S: Service<FrameRequest, Response = FrameResponse, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = FrameResponse;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<FrameResponse, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: FrameRequest) -> Self::Future {
        self.seen.fetch_add(1, Ordering::SeqCst);
        match req.frame.op {
            op::SEND_TO_GROUP => {
                let body =
                    SendReply::failed("group messages are disabled here").encode(req.ctx.conn.mode);
                let reply = req.frame.reply(op::SEND_TO_GROUP_REPLY, body);
                Box::pin(async move { Ok(Some(reply)) })
            }
            666 => Box::pin(async { Err("op 666 is forbidden".into()) }),
            _ => Box::pin(self.inner.call(req)),
        }
    }
}

#[tokio::test]
async fn layers_see_every_frame_and_can_reject() {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let comet = setup_with(
        Comet::builder().layer(tower::layer::layer_fn(move |inner| Guard {
            inner,
            seen: counter.clone(),
        })),
    );
    let mut a = Conn::login(&comet, WireMode::Json, 1).await;
    let mut b = Conn::login(&comet, WireMode::Json, 2).await;
    a.sync().await;
    let r = a.send_msg(op::SEND_TO_GROUP, 1, 100, "blocked").await;
    assert_eq!(r.error.as_deref(), Some("group messages are disabled here"));
    b.assert_no_delivery().await;
    assert_eq!(
        a.send_msg(op::SEND_TO_USER, 1, 2, "fine").await,
        SendReply::ok(1)
    );
    a.send(Frame::new(1, 666, 1, "")).await;
    let (end, close) = a.end().await;
    assert_eq!(end, SessionEnd::Handler("op 666 is forbidden".into()));
    assert_eq!(close.unwrap().0, 1011);
    // heartbeat, op 20, op 18, op 666 on a; one heartbeat on b.
    assert_eq!(seen.load(Ordering::SeqCst), 5);
    b.sync().await;
    assert_eq!(comet.stats().handler_errors, 1);
}

#[tokio::test]
async fn tower_rate_limit_layer_limits_a_connection() {
    // A stock tower layer: at most 2 frames per second per connection.
    let comet = setup_with(
        Comet::builder().layer(tower::limit::RateLimitLayer::new(2, Duration::from_secs(1))),
    );
    let mut a = Conn::login(&comet, WireMode::Binary, 1).await;
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    for _ in 0..6 {
        a.sync().await;
    }
    // Six frames at two per second need at least two more windows.
    assert!(start.elapsed() >= Duration::from_secs(2));
}

/// A store that fails (its inbox too, unless `.0`), and an authenticator
/// that hangs.
struct Failing(bool);

#[async_trait]
impl MessageStore for Failing {
    async fn append(&self, _: Draft) -> Result<Arc<Message>, BoxError> {
        Err("database is down".into())
    }
    async fn history(&self, _: Conversation, _: i64, _: usize) -> Result<History, BoxError> {
        Err("database is down".into())
    }
    async fn push_offline(&self, _: i32, _: Arc<Message>) -> Result<(), BoxError> {
        Err("database is down".into())
    }
    async fn offline(&self, _: i32, _: usize) -> Result<Vec<Offline>, BoxError> {
        if self.0 {
            return Ok(Vec::new());
        }
        Err("database is down".into())
    }
    async fn remove_offline(&self, _: i32, _: u64) -> Result<(), BoxError> {
        Err("database is down".into())
    }
}

struct Hanging;

#[async_trait]
impl Authenticator for Hanging {
    async fn authenticate(&self, _: &AuthContext) -> Result<AuthOutcome, BoxError> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn plugin_failures_become_failure_replies() {
    let auth = Arc::new(comet::plugins::memory::MemoryAuth::from_iter([
        (1, "k1"),
        (2, "k2"),
    ]));
    let build = |store| {
        Comet::builder()
            .authenticator(auth.clone())
            .store(Arc::new(store))
            .groups(Arc::new(Divisors))
            .build()
            .unwrap()
    };
    // The inbox cannot be read: the login is refused with the reason, not
    // passed off as an empty inbox.
    let comet = build(Failing(false));
    let mut c = Conn::connect(&comet, WireMode::Json);
    let reply = c.auth(r#"{"mid":1,"mkey":"k1"}"#).await;
    assert_eq!(
        reply,
        AuthReply::Failed {
            error: "message store unavailable".into()
        }
    );
    assert!(matches!(c.end().await.0, SessionEnd::AuthFailed(_)));
    assert!(!comet.is_online(1));
    // Appends fail: the send answers ret -1 with the store's reason.
    let comet = build(Failing(true));
    let mut a = Conn::login(&comet, WireMode::Json, 1).await;
    let r = a.send_msg(op::SEND_TO_USER, 1, 2, "x").await;
    assert_eq!(r.ret, -1);
    assert!(r
        .error
        .unwrap()
        .contains("message store unavailable: database is down"));
    a.sync().await;
    // A sync the store cannot answer: op 23 ret -1 with the reason, and the
    // connection stays.
    let seq = a.next_seq();
    let body = comet::core::payload::SyncRequest {
        kind: 18,
        to: 2,
        after: 0,
        limit: None,
    }
    .encode(WireMode::Json);
    a.send(Frame::new(1, op::SYNC, seq, body)).await;
    let reply = a.reply().await.expect("op 23");
    assert_eq!((reply.op, reply.seq), (op::SYNC_REPLY, seq));
    let sync = comet::core::payload::SyncReply::decode(WireMode::Json, &reply.body).unwrap();
    assert_eq!((sync.ret, sync.oldest, sync.head), (-1, 0, 0));
    assert!(sync
        .error
        .unwrap()
        .contains("message store unavailable: database is down"));
    a.sync().await;

    let comet = Comet::builder()
        .authenticator(Arc::new(Hanging))
        .store(Arc::new(LogStore::default()))
        .groups(Arc::new(Divisors))
        .config(Config::default().with_hook_timeout(Duration::from_millis(50)))
        .build()
        .unwrap();
    let mut c = Conn::connect(&comet, WireMode::Binary);
    let reply = c.auth(r#"{"mid":1,"mkey":"k1"}"#).await;
    assert_eq!(
        reply,
        AuthReply::Failed {
            error: "authentication backend unavailable".into()
        }
    );
    assert!(matches!(c.end().await.0, SessionEnd::AuthFailed(_)));
    assert!(comet.stats().plugin_errors >= 1);
}

/// A delivery seam that wraps the local registry, as a multi-node backend
/// would, and records what passes through it.
struct Recording {
    local: Arc<comet::core::Registry>,
    seen: Mutex<Vec<Seen>>,
}

/// Recipients, echo and chatId of one delivery.
type Seen = (Vec<i32>, Option<i32>, i64);

#[async_trait]
impl comet::core::Delivery for Recording {
    async fn deliver(
        &self,
        recipients: &[i32],
        echo: Option<i32>,
        msg: &Arc<Message>,
        except: Option<comet::core::ConnId>,
    ) -> Result<(), BoxError> {
        self.seen
            .lock()
            .unwrap()
            .push((recipients.to_vec(), echo, msg.chat_id()));
        self.local.deliver(recipients, echo, msg, except).await
    }
}

#[tokio::test]
async fn the_delivery_seam_can_be_wrapped() {
    let recording: Arc<Mutex<Option<Arc<Recording>>>> = Arc::default();
    let slot = recording.clone();
    let comet = setup_with(Comet::builder().delivery(move |local| {
        let r = Arc::new(Recording {
            local,
            seen: Mutex::default(),
        });
        *slot.lock().unwrap() = Some(r.clone());
        r
    }));
    let mut a = Conn::login(&comet, WireMode::Binary, 1).await;
    let mut b = Conn::login(&comet, WireMode::Binary, 2).await;
    assert_eq!(
        a.send_msg(op::SEND_TO_USER, 1, 2, "via seam").await,
        SendReply::ok(1)
    );
    assert_eq!(&b.delivered().await.msg[..], b"via seam");
    a.send_msg(op::SEND_TO_GROUP, 1, 100, "group").await;
    let r = recording.lock().unwrap().clone().unwrap();
    let mut seen = r.seen.lock().unwrap().clone();
    seen[1].0.sort();
    assert_eq!(
        seen,
        vec![(vec![2], Some(1), 1), (vec![1, 2, 3], Some(1), 1)]
    );
}

/// A group directory that fails for group 1 and hangs for group 2.
struct BrokenGroups;

#[async_trait]
impl GroupDirectory for BrokenGroups {
    async fn is_member(&self, group: i32, _mid: i32) -> Result<bool, BoxError> {
        match group {
            1 => Err("directory is down".into()),
            2 => std::future::pending().await,
            _ => Ok(true),
        }
    }
    async fn members(&self, _group: i32) -> Result<Members, BoxError> {
        Ok(Arc::from(vec![1, 2]))
    }
}

#[tokio::test]
async fn group_directory_failures_and_hangs_become_op21_failures() {
    let auth = Arc::new(comet::plugins::memory::MemoryAuth::from_iter([
        (1, "k1"),
        (2, "k2"),
    ]));
    let comet = Comet::builder()
        .authenticator(auth)
        .store(Arc::new(comet::plugins::memory::MemoryStore::default()))
        .groups(Arc::new(BrokenGroups))
        .config(Config::default().with_hook_timeout(Duration::from_millis(50)))
        .build()
        .unwrap();
    let mut a = Conn::login(&comet, WireMode::Json, 1).await;
    let r = a.send_msg(op::SEND_TO_GROUP, 1, 1, "x").await;
    assert!(r
        .error
        .unwrap()
        .contains("group directory unavailable: directory is down"));
    let r = a.send_msg(op::SEND_TO_GROUP, 1, 2, "x").await;
    assert!(r.error.unwrap().contains("timed out"));
    // Neither consumed a chatId; a working group still gets 1.
    assert_eq!(
        a.send_msg(op::SEND_TO_GROUP, 1, 3, "x").await,
        SendReply::ok(1)
    );
    assert_eq!(comet.stats().plugin_errors, 2);
}

/// An inbox that never answers: offline pushes hang.
struct StuckInbox(comet::plugins::memory::MemoryStore);

#[async_trait]
impl MessageStore for StuckInbox {
    async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError> {
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
    async fn push_offline(&self, _: i32, _: Arc<Message>) -> Result<(), BoxError> {
        std::future::pending().await
    }
    async fn offline(&self, mid: i32, limit: usize) -> Result<Vec<Offline>, BoxError> {
        self.0.offline(mid, limit).await
    }
    async fn remove_offline(&self, mid: i32, through: u64) -> Result<(), BoxError> {
        self.0.remove_offline(mid, through).await
    }
}

#[tokio::test]
async fn a_hanging_inbox_and_a_vanished_sender_never_lock_the_recipient_out() {
    let auth = Arc::new(comet::plugins::memory::MemoryAuth::from_iter([
        (1, "k1"),
        (2, "k2"),
    ]));
    let comet = Comet::builder()
        .authenticator(auth)
        .store(Arc::new(StuckInbox(
            comet::plugins::memory::MemoryStore::default(),
        )))
        .groups(Arc::new(Divisors))
        .config(Config::default().with_hook_timeout(Duration::from_millis(200)))
        .build()
        .unwrap();
    let mut a = Conn::login(&comet, WireMode::Binary, 1).await;
    // Mid 2 is offline: the send stores, then hangs in the inbox.
    let seq = a.next_seq();
    let body = comet::core::payload::SendRequest {
        from: 1,
        to: 2,
        msg: "hi".into(),
    }
    .encode(WireMode::Binary);
    a.send(Frame::new(1, op::SEND_TO_USER, seq, body)).await;
    // The sender vanishes while its send is under way.
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.hang_up();
    let _ = a.end().await;
    // The recipient can still log in (the push settles at the hook timeout).
    let b = Conn::login(&comet, WireMode::Binary, 2).await;
    assert!(comet.is_online(2));
    drop(b);
    assert!(comet.stats().plugin_errors >= 1);
}

#[tokio::test]
async fn a_group_send_to_offline_members_is_bounded_as_a_whole() {
    // Group 1 is mids 1..=20; only 1 is online, and every inbox push hangs.
    // Each push used to get its own hook timeout under the conversation's
    // lock: 19 x 300 ms. One send now gets one timeout for all of them.
    let auth = Arc::new(comet::plugins::memory::MemoryAuth::from_iter([(1, "k1")]));
    let comet = Comet::builder()
        .authenticator(auth)
        .store(Arc::new(StuckInbox(
            comet::plugins::memory::MemoryStore::default(),
        )))
        .groups(Arc::new(Divisors))
        .config(Config::default().with_hook_timeout(Duration::from_millis(300)))
        .build()
        .unwrap();
    let mut a = Conn::login(&comet, WireMode::Binary, 1).await;
    let started = tokio::time::Instant::now();
    assert_eq!(
        a.send_msg(op::SEND_TO_GROUP, 1, 1, "to the offline").await,
        SendReply::ok(1)
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(3_000),
        "the send took {took:?}"
    );
    // The next send of the conversation is not held up either.
    assert_eq!(
        a.send_msg(op::SEND_TO_GROUP, 1, 1, "again").await,
        SendReply::ok(2)
    );
}

/// A store whose appends wait until the test opens its gate.
struct GatedStore {
    inner: comet::plugins::memory::MemoryStore,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl MessageStore for GatedStore {
    async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError> {
        drop(self.gate.acquire().await?);
        self.inner.append(draft).await
    }
    async fn history(
        &self,
        conversation: Conversation,
        after: i64,
        limit: usize,
    ) -> Result<History, BoxError> {
        self.inner.history(conversation, after, limit).await
    }
    async fn push_offline(&self, mid: i32, msg: Arc<Message>) -> Result<(), BoxError> {
        self.inner.push_offline(mid, msg).await
    }
    async fn offline(&self, mid: i32, limit: usize) -> Result<Vec<Offline>, BoxError> {
        self.inner.offline(mid, limit).await
    }
    async fn remove_offline(&self, mid: i32, through: u64) -> Result<(), BoxError> {
        self.inner.remove_offline(mid, through).await
    }
}

#[tokio::test]
async fn a_send_and_a_handler_pending_when_their_session_closes_still_complete() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handled = Arc::new(tokio::sync::Notify::new());
    let comet = Comet::builder()
        .authenticator(Arc::new(comet::plugins::memory::MemoryAuth::from_iter([
            (1, "k1"),
            (2, "k2"),
        ])))
        .store(Arc::new(GatedStore {
            inner: comet::plugins::memory::MemoryStore::default(),
            gate: gate.clone(),
        }))
        .groups(Arc::new(Divisors))
        .handler(1000, {
            let (gate, handled) = (gate.clone(), handled.clone());
            service_fn(move |_req: FrameRequest| {
                let (gate, handled) = (gate.clone(), handled.clone());
                async move {
                    drop(gate.acquire().await?);
                    handled.notify_one();
                    Ok::<FrameResponse, BoxError>(None)
                }
            })
        })
        .build()
        .unwrap();
    let mut b = Conn::login(&comet, WireMode::Binary, 2).await;
    let mut a = Conn::login(&comet, WireMode::Binary, 1).await;
    let seq = a.next_seq();
    let body = comet::core::payload::SendRequest {
        from: 1,
        to: 2,
        msg: "sent before hanging up".into(),
    }
    .encode(WireMode::Binary);
    a.send(Frame::new(1, op::SEND_TO_USER, seq, body)).await;
    // The store holds the send; the sender's session is closed meanwhile
    // (a hang-up would only be noticed once the request is done).
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(comet.disconnect(1), 1);
    assert_eq!(a.end().await.0, SessionEnd::Disconnected);
    gate.add_permits(1);
    let got = b.delivered().await;
    assert_eq!(
        (got.from, got.chat_id, &got.msg[..]),
        (1, 1, &b"sent before hanging up"[..])
    );

    // The same for an application handler.
    let mut c = Conn::login(&comet, WireMode::Binary, 1).await;
    c.send(Frame::new(1, 1000, 1, "")).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(comet.disconnect(1), 1);
    assert_eq!(c.end().await.0, SessionEnd::Disconnected);
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(5), handled.notified())
        .await
        .expect("the handler ran to its end after its connection closed");
}

#[tokio::test]
async fn a_client_that_logs_in_and_never_reads_its_inbox_is_closed_and_keeps_it() {
    let comet = Comet::builder()
        .authenticator(Arc::new(comet::plugins::memory::MemoryAuth::from_iter([
            (1, "k1"),
            (2, "k2"),
        ])))
        .store(Arc::new(comet::plugins::memory::MemoryStore::default()))
        .groups(Arc::new(Divisors))
        .config(
            Config::default()
                .with_heartbeat_timeout(Duration::from_millis(300))
                // One message per op 9: the inbox takes five units.
                .with_max_body(256),
        )
        .build()
        .unwrap();
    let msg = |i: i64| format!("m{i}-{}", "x".repeat(150));
    let mut a = Conn::login(&comet, WireMode::Json, 1).await;
    for i in 0..5 {
        assert_eq!(
            a.send_msg(op::SEND_TO_USER, 1, 2, msg(i)).await,
            SendReply::ok(i + 1)
        );
    }
    // Mid 2 logs in over a transport that buffers one unit and is then read
    // no more after the op 8 reply: the login flush is stuck on the inbox.
    let mut stuck = Conn::connect_with(&comet, WireMode::Json, 1);
    assert_eq!(
        stuck.auth(r#"{"mid":2,"mkey":"k2"}"#).await,
        AuthReply::Ok { mid: 2 }
    );
    assert_eq!(stuck.end().await.0, SessionEnd::HeartbeatTimeout);
    // The inbox was put back: the next login gets all of it, in order.
    let mut b = Conn::login(&comet, WireMode::Json, 2).await;
    for i in 0..5 {
        let got = b.delivered().await;
        assert_eq!((got.chat_id, got.msg), (i + 1, Bytes::from(msg(i))));
    }
}

/// A user directory that knows mids 1 to 9, answering either at once
/// (`exists_now`) or only through its async `exists`, and counting both.
struct Directory {
    at_once: bool,
    asked: AtomicUsize,
    asked_now: AtomicUsize,
}

#[async_trait]
impl comet::core::UserDirectory for Directory {
    async fn exists(&self, mid: i32) -> Result<bool, BoxError> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        Ok((1..=9).contains(&mid))
    }

    fn exists_now(&self, mid: i32) -> Option<bool> {
        self.asked_now.fetch_add(1, Ordering::Relaxed);
        self.at_once.then_some((1..=9).contains(&mid))
    }
}

#[tokio::test]
async fn a_user_directory_answers_at_once_or_through_its_future() {
    for at_once in [true, false] {
        let users = Arc::new(Directory {
            at_once,
            asked: AtomicUsize::new(0),
            asked_now: AtomicUsize::new(0),
        });
        let comet = setup_with(Comet::builder().users(users.clone()));
        let mut one = Conn::login(&comet, WireMode::Json, 1).await;
        let mut two = Conn::login(&comet, WireMode::Json, 2).await;
        assert_eq!(
            one.send_msg(op::SEND_TO_USER, 1, 2, "hi").await,
            SendReply::ok(1)
        );
        assert_eq!(&two.delivered().await.msg[..], b"hi");
        let refused = one.send_msg(op::SEND_TO_USER, 1, 77, "who?").await;
        assert_eq!(
            (refused.ret, refused.error.as_deref()),
            (-1, Some("unknown user 77")),
            "at_once = {at_once}"
        );
        // Both sends consulted the directory once each, by the path it offers.
        assert_eq!(users.asked_now.load(Ordering::Relaxed), 2);
        let expect_async = if at_once { 0 } else { 2 };
        assert_eq!(users.asked.load(Ordering::Relaxed), expect_async);
    }
}
