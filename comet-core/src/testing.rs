//! Conformance kits for plug-in authors: [`store_conformance`] checks a
//! [`MessageStore`] against every rule its documentation states, and
//! [`groups_conformance`] a [`GroupDirectory`].
//!
//! Call them from a test of your crate (`#[tokio::test(flavor =
//! "multi_thread")]`, so the kit's concurrent appends really race). A broken
//! rule panics with a message that starts with the rule, e.g.
//! `MessageStore rule broken: chatIds rise by exactly one per conversation: ...`.
//!
//! Some rules cannot be forced from outside a store and are left to its own
//! tests: **a failed append consumes no chatId** (make your backend fail once,
//! e.g. by closing its connection, then check the next append still gets the
//! next chatId), durability across restarts, and byte budgets or other bounds
//! beyond the two message counts of [`StoreLimits`].

use std::collections::HashSet;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::frame::op;
use crate::groups::GroupDirectory;
use crate::message::{Conversation, Message};
use crate::store::{Draft, History, MessageStore, Offline};
use crate::{GroupId, Mid};

/// The count bounds [`store_conformance`] asks its factory to give a store.
///
/// The kit asks for small bounds to check that the oldest messages are
/// dropped past them, and for generous ones (10,000 each) for every other
/// rule. Build it with [`StoreLimits::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreLimits {
    /// Messages of history to keep per conversation.
    pub history: usize,
    /// Messages to keep per offline inbox.
    pub inbox: usize,
}

impl StoreLimits {
    /// Keep `history` messages per conversation and `inbox` per inbox.
    pub fn new(history: usize, inbox: usize) -> Self {
        StoreLimits { history, inbox }
    }
}

/// The bounds used for every check that is not about bounds.
const ROOMY: StoreLimits = StoreLimits {
    history: 10_000,
    inbox: 10_000,
};

/// Checks every documented rule of [`MessageStore`] against the stores
/// `factory` makes, panicking with the rule broken.
///
/// `factory` is called once per check with the count bounds the store must
/// keep to and returns a store that is empty, or at least holds nothing for
/// the ids that check uses: every check uses its own conversations and
/// mids, so a factory may hand out views of one shared backend (e.g. one
/// Redis database, flushed before the run). The ids are positive and below
/// 100,000.
///
/// Checked: chatIds start at 1 and rise by exactly one per conversation;
/// conversations count independently (a direct conversation is the
/// unordered pair, a group is its own even when its id equals a mid); 8
/// tasks × 250 concurrent appends into one conversation get exactly
/// 1..=2000; the returned and the kept messages carry the draft's fields
/// and chatId; `history` answers `(messages, oldest, head)` as
/// [`History`] states for empty conversations, `after` ranges, `limit`
/// (0 gives none, pages oldest first), `after` beyond `head`, a bound that
/// drops the oldest (`oldest = head - bound + 1`) and a bound of 0
/// (`oldest = head + 1`); inboxes give their entries oldest first, peeking
/// does not remove, `remove_offline(through)` removes exactly the entries
/// with `seq <= through` and keeps later pushes, seqs rise store-wide and
/// are never reused after an inbox empties, removing twice or from an
/// absent inbox is `Ok`, an inbox bound (0 too) drops the oldest, inboxes
/// are independent, and concurrent pushes lose nothing.
///
/// Not checkable from outside, so test them in your store's own tests: a
/// failed append consumes no chatId; durability; byte budgets. A store that
/// keeps everything and takes no bounds uses
/// [`store_conformance_unbounded`].
///
/// # Example
///
/// A toy store (one lock, bounded `VecDeque`s) passing the kit; with
/// `comet-plugins` the factory is just
/// `|l| async move { Arc::new(MemoryStore::new(l.history, l.inbox)) }`.
///
/// ```
/// use comet_core::store::{Draft, History, MessageStore, Offline};
/// use comet_core::testing::{store_conformance, StoreLimits};
/// use comet_core::{async_trait, BoxError, Conversation, Message, Mid};
/// use std::collections::{HashMap, VecDeque};
/// use std::sync::{Arc, Mutex};
///
/// #[derive(Default)]
/// struct Toy {
///     limits: Option<StoreLimits>,
///     state: Mutex<State>,
/// }
///
/// #[derive(Default)]
/// struct State {
///     convs: HashMap<Conversation, (i64, VecDeque<Arc<Message>>)>,
///     inboxes: HashMap<Mid, VecDeque<Offline>>,
///     seq: u64,
/// }
///
/// #[async_trait]
/// impl MessageStore for Toy {
///     async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError> {
///         let mut s = self.state.lock().unwrap();
///         let (last, kept) = s.convs.entry(draft.conversation).or_default();
///         *last += 1;
///         let msg = draft.into_message(*last);
///         kept.push_back(msg.clone());
///         if kept.len() > self.limits.unwrap().history {
///             kept.pop_front();
///         }
///         Ok(msg)
///     }
///     async fn history(&self, c: Conversation, after: i64, limit: usize) -> Result<History, BoxError> {
///         let s = self.state.lock().unwrap();
///         let Some((head, kept)) = s.convs.get(&c) else { return Ok(History::default()) };
///         Ok(History {
///             messages: kept.iter().filter(|m| m.chat_id() > after).take(limit).cloned().collect(),
///             oldest: kept.front().map_or(head + 1, |m| m.chat_id()),
///             head: *head,
///         })
///     }
///     async fn push_offline(&self, mid: Mid, msg: Arc<Message>) -> Result<(), BoxError> {
///         let mut s = self.state.lock().unwrap();
///         s.seq += 1;
///         let seq = s.seq;
///         let inbox = s.inboxes.entry(mid).or_default();
///         inbox.push_back(Offline { seq, msg });
///         if inbox.len() > self.limits.unwrap().inbox {
///             inbox.pop_front();
///         }
///         Ok(())
///     }
///     async fn offline(&self, mid: Mid, limit: usize) -> Result<Vec<Offline>, BoxError> {
///         let s = self.state.lock().unwrap();
///         Ok(s.inboxes.get(&mid).map_or(vec![], |i| i.iter().take(limit).cloned().collect()))
///     }
///     async fn remove_offline(&self, mid: Mid, through: u64) -> Result<(), BoxError> {
///         let mut s = self.state.lock().unwrap();
///         if let Some(inbox) = s.inboxes.get_mut(&mid) {
///             inbox.retain(|e| e.seq > through);
///         }
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // In your crate: #[tokio::test(flavor = "multi_thread")] async fn conformance() { ... }
/// store_conformance(|limits| async move {
///     Arc::new(Toy { limits: Some(limits), ..Toy::default() })
/// })
/// .await;
/// # }
/// ```
pub async fn store_conformance<F, Fut, S>(factory: F)
where
    F: FnMut(StoreLimits) -> Fut,
    Fut: Future<Output = Arc<S>>,
    S: MessageStore + ?Sized,
{
    let mut kit = Kit {
        factory,
        bounded: true,
        next_id: 0,
    };
    kit.run().await;
}

/// [`store_conformance`] for a store that keeps every message and every
/// inbox entry (no bounds): every rule except the bound checks, plus "it
/// keeps everything" (`oldest` stays 1). `factory` returns a store as for
/// [`store_conformance`].
///
/// ```
/// # use comet_core::store::{Draft, History, MessageStore, Offline};
/// # use comet_core::{async_trait, BoxError, Conversation, Message, Mid};
/// # use std::collections::HashMap;
/// # use std::sync::{Arc, Mutex};
/// # #[derive(Default)]
/// # struct Everything(Mutex<(HashMap<Conversation, Vec<Arc<Message>>>, HashMap<Mid, Vec<Offline>>, u64)>);
/// # #[async_trait]
/// # impl MessageStore for Everything {
/// #     async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError> {
/// #         let mut s = self.0.lock().unwrap();
/// #         let kept = s.0.entry(draft.conversation).or_default();
/// #         let msg = draft.into_message(kept.len() as i64 + 1);
/// #         kept.push(msg.clone());
/// #         Ok(msg)
/// #     }
/// #     async fn history(&self, c: Conversation, after: i64, limit: usize) -> Result<History, BoxError> {
/// #         let s = self.0.lock().unwrap();
/// #         let kept = s.0.get(&c).map_or(&[][..], |v| &v[..]);
/// #         Ok(History {
/// #             messages: kept.iter().filter(|m| m.chat_id() > after).take(limit).cloned().collect(),
/// #             oldest: i64::from(!kept.is_empty()),
/// #             head: kept.len() as i64,
/// #         })
/// #     }
/// #     async fn push_offline(&self, mid: Mid, msg: Arc<Message>) -> Result<(), BoxError> {
/// #         let mut s = self.0.lock().unwrap();
/// #         s.2 += 1;
/// #         let seq = s.2;
/// #         s.1.entry(mid).or_default().push(Offline { seq, msg });
/// #         Ok(())
/// #     }
/// #     async fn offline(&self, mid: Mid, limit: usize) -> Result<Vec<Offline>, BoxError> {
/// #         let s = self.0.lock().unwrap();
/// #         Ok(s.1.get(&mid).map_or(vec![], |v| v.iter().take(limit).cloned().collect()))
/// #     }
/// #     async fn remove_offline(&self, mid: Mid, through: u64) -> Result<(), BoxError> {
/// #         if let Some(v) = self.0.lock().unwrap().1.get_mut(&mid) {
/// #             v.retain(|e| e.seq > through);
/// #         }
/// #         Ok(())
/// #     }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // `Everything` keeps every message in a Vec per conversation and inbox.
/// comet_core::testing::store_conformance_unbounded(|| async { Arc::new(Everything::default()) })
///     .await;
/// # }
/// ```
pub async fn store_conformance_unbounded<F, Fut, S>(mut factory: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<S>>,
    S: MessageStore + ?Sized,
{
    let mut kit = Kit {
        factory: move |_| factory(),
        bounded: false,
        next_id: 0,
    };
    kit.run().await;
}

/// Fails the check: `rule` is the documented rule, the rest what was seen.
macro_rules! rule {
    ($ok:expr, $rule:expr, $($what:tt)+) => {
        if !$ok {
            panic!("MessageStore rule broken: {}: {}", $rule, format!($($what)+));
        }
    };
}

struct Kit<F> {
    factory: F,
    bounded: bool,
    next_id: i32,
}

/// The fields a kept message must carry, for comparisons.
fn fields(m: &Message) -> (u32, i64, Mid, i32, Bytes) {
    let d = m.delivered();
    (d.op, d.chat_id, d.from, d.to, d.msg.clone())
}

fn ids(messages: &[Arc<Message>]) -> Vec<i64> {
    messages.iter().map(|m| m.chat_id()).collect()
}

fn seqs(entries: &[Offline]) -> Vec<u64> {
    entries.iter().map(|e| e.seq).collect()
}

fn bodies(entries: &[Offline]) -> Vec<Bytes> {
    entries
        .iter()
        .map(|e| e.msg.delivered().msg.clone())
        .collect()
}

fn direct(conversation: Conversation, from: Mid, to: Mid, msg: impl Into<Bytes>) -> Draft {
    Draft {
        conversation,
        op: op::SEND_TO_USER,
        from,
        to,
        msg: msg.into(),
    }
}

fn group(g: GroupId, from: Mid, msg: impl Into<Bytes>) -> Draft {
    Draft {
        conversation: Conversation::Group(g),
        op: op::SEND_TO_GROUP,
        from,
        to: g,
        msg: msg.into(),
    }
}

/// A message for inbox checks (inboxes take any message).
fn note(chat_id: i64, text: String) -> Arc<Message> {
    direct(Conversation::direct(1, 2), 1, 2, text).into_message(chat_id)
}

fn ok<T, E: Debug>(r: Result<T, E>, call: &str) -> T {
    r.unwrap_or_else(|e| panic!("MessageStore call failed: {call}: {e:?}"))
}

async fn append<S: MessageStore + ?Sized>(store: &Arc<S>, draft: Draft) -> Arc<Message> {
    ok(store.append(draft).await, "append")
}

async fn history<S: MessageStore + ?Sized>(
    store: &Arc<S>,
    c: Conversation,
    after: i64,
    limit: usize,
) -> History {
    ok(store.history(c, after, limit).await, "history")
}

async fn offline<S: MessageStore + ?Sized>(store: &Arc<S>, mid: Mid, limit: usize) -> Vec<Offline> {
    ok(store.offline(mid, limit).await, "offline")
}

impl<F, Fut, S> Kit<F>
where
    F: FnMut(StoreLimits) -> Fut,
    Fut: Future<Output = Arc<S>>,
    S: MessageStore + ?Sized,
{
    /// A block of 1,000 fresh ids for one check.
    fn ids(&mut self) -> i32 {
        self.next_id += 1;
        self.next_id * 1000
    }

    async fn run(&mut self) {
        self.chat_ids_start_at_one().await;
        self.conversations_are_independent().await;
        self.concurrent_appends_are_gapless().await;
        self.history_ranges_and_limits().await;
        self.inbox_peek_and_remove().await;
        self.inbox_seqs_rise_store_wide().await;
        self.concurrent_pushes_lose_nothing().await;
        if self.bounded {
            self.history_bound_drops_oldest().await;
            self.inbox_bound_drops_oldest().await;
        }
    }

    async fn chat_ids_start_at_one(&mut self) {
        let store = (self.factory)(ROOMY).await;
        let base = self.ids();
        let (a, b) = (base + 1, base + 2);
        let ab = Conversation::direct(a, b);
        for n in 1..=5i64 {
            let draft = direct(ab, a, b, format!("m{n}"));
            let want = (draft.op, n, a, b, draft.msg.clone());
            let got = append(&store, draft).await;
            rule!(
                got.chat_id() == n,
                "chatIds start at 1 and rise by exactly one per conversation",
                "append #{n} got chatId {}",
                got.chat_id()
            );
            rule!(
                fields(&got) == want,
                "the stored message carries the draft's fields and its chatId",
                "got {:?}, want {want:?}",
                fields(&got)
            );
            rule!(
                got.conversation() == ab,
                "the stored message carries the draft's fields and its chatId",
                "its conversation is {:?}, want {ab:?}",
                got.conversation()
            );
        }
        let g = base + 3;
        let got = append(&store, group(g, a, "to the group")).await;
        rule!(
            fields(&got) == (op::SEND_TO_GROUP, 1, a, g, Bytes::from("to the group"))
                && got.conversation() == Conversation::Group(g),
            "the stored message carries the draft's fields and its chatId",
            "group message stored as {:?}",
            fields(&got)
        );
    }

    async fn conversations_are_independent(&mut self) {
        let store = (self.factory)(ROOMY).await;
        let base = self.ids();
        let (a, b, c) = (base + 1, base + 2, base + 3);
        // Group `a` has the same number as mid `a`: still its own conversation.
        let mut want: Vec<(Conversation, i64)> = vec![
            (Conversation::direct(a, b), 0),
            (Conversation::direct(a, c), 0),
            (Conversation::direct(b, c), 0),
            (Conversation::Group(a), 0),
            (Conversation::direct(a, a), 0),
        ];
        for round in 0..4 {
            for (i, (conv, last)) in want.iter_mut().enumerate() {
                if round < i % 3 {
                    continue; // Uneven counts per conversation.
                }
                let draft = match *conv {
                    Conversation::Group(g) => group(g, b, "g"),
                    // Both directions of the pair share one conversation.
                    Conversation::Direct(lo, hi) if round % 2 == 1 => direct(*conv, hi, lo, "d"),
                    Conversation::Direct(lo, hi) => direct(*conv, lo, hi, "d"),
                };
                *last += 1;
                let got = append(&store, draft).await;
                rule!(
                    got.chat_id() == *last,
                    "each conversation counts its own chatIds; a direct conversation is the unordered pair",
                    "{conv:?} (round {round}) got chatId {}, want {last}",
                    got.chat_id()
                );
            }
        }
        for (conv, last) in want {
            let h = history(&store, conv, 0, 100).await;
            rule!(
                h.head == last && ids(&h.messages) == (1..=last).collect::<Vec<_>>(),
                "each conversation counts its own chatIds; a direct conversation is the unordered pair",
                "{conv:?}: head {} with chatIds {:?}, want 1..={last}",
                h.head,
                ids(&h.messages)
            );
            rule!(
                h.messages.iter().all(|m| m.conversation() == conv),
                "history holds only the conversation's messages",
                "{conv:?} returned a message of another conversation"
            );
        }
        let never = Conversation::direct(b, base + 4);
        let h = history(&store, never, 0, 100).await;
        rule!(
            h.messages.is_empty() && (h.oldest, h.head) == (0, 0),
            "a conversation with no messages has oldest 0 and head 0",
            "{never:?}: oldest {}, head {}, {} messages",
            h.oldest,
            h.head,
            h.messages.len()
        );
    }

    async fn concurrent_appends_are_gapless(&mut self) {
        const TASKS: i32 = 8;
        const EACH: i32 = 250;
        let total = i64::from(TASKS * EACH);
        let store = (self.factory)(ROOMY).await;
        let base = self.ids();
        let g = base + 1;
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let store = store.clone();
            tasks.spawn(async move {
                let mut got = Vec::new();
                for n in 0..EACH {
                    let m = append(&store, group(g, base + 10 + t, format!("{t}/{n}"))).await;
                    got.push(m.chat_id());
                }
                got
            });
        }
        let mut per_task = Vec::new();
        while let Some(got) = tasks.join_next().await {
            per_task.push(got.unwrap_or_else(|e| panic!("a concurrent append task failed: {e}")));
        }
        let mut all: Vec<i64> = per_task.concat();
        all.sort_unstable();
        let dup = all.windows(2).find(|w| w[0] == w[1]);
        rule!(
            dup.is_none(),
            "chatIds are gapless and unique under concurrent appends",
            "chatId {:?} given twice",
            dup.map(|w| w[0])
        );
        rule!(
            all == (1..=total).collect::<Vec<_>>(),
            "chatIds are gapless and unique under concurrent appends",
            "{TASKS} tasks x {EACH} appends got chatIds from {:?} to {:?}, want exactly 1..={total}",
            all.first(),
            all.last()
        );
        for got in &per_task {
            rule!(
                got.windows(2).all(|w| w[0] < w[1]),
                "chatIds rise in the order one sender's appends complete",
                "one task got {:?}...",
                &got[..got.len().min(10)]
            );
        }
        let h = history(&store, Conversation::Group(g), 0, 10_000).await;
        rule!(
            h.head == total && h.oldest == 1 && ids(&h.messages) == all,
            "history keeps what was appended, oldest first",
            "after {total} concurrent appends: oldest {}, head {}, {} messages",
            h.oldest,
            h.head,
            h.messages.len()
        );
        // Each task's messages are kept in the order it sent them.
        let mut next = vec![0; TASKS as usize];
        for m in &h.messages {
            let d = m.delivered();
            rule!(
                (base + 10..base + 10 + TASKS).contains(&d.from),
                "history gives messages byte for byte as appended",
                "chatId {} has from {}, which no task sent",
                d.chat_id,
                d.from
            );
            let t = (d.from - base - 10) as usize;
            let want = Bytes::from(format!("{t}/{}", next[t]));
            rule!(
                d.msg == want && d.to == g,
                "history keeps what was appended, oldest first",
                "chatId {} holds {:?} from {}, want {want:?}",
                d.chat_id,
                d.msg,
                d.from
            );
            next[t] += 1;
        }
    }

    async fn history_ranges_and_limits(&mut self) {
        let store = (self.factory)(ROOMY).await;
        let base = self.ids();
        let (a, b) = (base + 1, base + 2);
        let ab = Conversation::direct(a, b);
        let mut sent = Vec::new();
        for n in 1..=5 {
            sent.push(fields(
                &*append(&store, direct(ab, b, a, format!("h{n}"))).await,
            ));
        }
        for (after, limit, want) in [
            (0, 10, 1..=5),
            (0, 5, 1..=5),
            (2, 10, 3..=5),
            (0, 2, 1..=2),
            (2, 2, 3..=4),
            (4, 2, 5..=5),
            (0, 1, 1..=1),
        ] {
            let h = history(&store, ab, after, limit).await;
            let want: Vec<i64> = want.collect();
            rule!(
                ids(&h.messages) == want && (h.oldest, h.head) == (1, 5),
                "history gives the kept messages with chatId > after, oldest first, at most limit, with oldest and head",
                "history(after {after}, limit {limit}) = chatIds {:?}, oldest {}, head {}; want {want:?}, 1, 5",
                ids(&h.messages),
                h.oldest,
                h.head
            );
            for m in &h.messages {
                let want = &sent[(m.chat_id() - 1) as usize];
                rule!(
                    &fields(m) == want,
                    "history gives messages byte for byte as appended",
                    "chatId {} is {:?}, was appended as {want:?}",
                    m.chat_id(),
                    fields(m)
                );
            }
        }
        for (after, limit) in [(0, 0), (5, 10), (6, 10), (1_000, 10), (2, 0)] {
            let h = history(&store, ab, after, limit).await;
            rule!(
                h.messages.is_empty() && (h.oldest, h.head) == (1, 5),
                "history with limit 0 or after >= head gives no messages, still with oldest and head",
                "history(after {after}, limit {limit}) = chatIds {:?}, oldest {}, head {}",
                ids(&h.messages),
                h.oldest,
                h.head
            );
        }
        // History never changes the conversation: the next chatId is 6.
        let next = append(&store, direct(ab, a, b, "h6")).await;
        rule!(
            next.chat_id() == 6,
            "reading history consumes no chatId",
            "append after reads got chatId {}",
            next.chat_id()
        );
        if !self.bounded {
            // Everything is kept.
            let store = (self.factory)(ROOMY).await;
            let c = Conversation::Group(base + 3);
            for _ in 0..1_500 {
                append(&store, group(base + 3, a, "x")).await;
            }
            let h = history(&store, c, 0, 2_000).await;
            rule!(
                h.oldest == 1 && h.head == 1_500 && h.messages.len() == 1_500,
                "a store without bounds keeps every message",
                "after 1,500 appends: oldest {}, head {}, {} kept",
                h.oldest,
                h.head,
                h.messages.len()
            );
        }
    }

    async fn history_bound_drops_oldest(&mut self) {
        let store = (self.factory)(StoreLimits::new(3, ROOMY.inbox)).await;
        let base = self.ids();
        let g = base + 1;
        let c = Conversation::Group(g);
        for n in 1..=5 {
            append(&store, group(g, base + 2, format!("b{n}"))).await;
        }
        let h = history(&store, c, 0, 10).await;
        rule!(
            ids(&h.messages) == vec![3, 4, 5] && (h.oldest, h.head) == (3, 5),
            "past the history bound the oldest are dropped: oldest = head - bound + 1",
            "bound 3, 5 appended: chatIds {:?}, oldest {}, head {}",
            ids(&h.messages),
            h.oldest,
            h.head
        );
        rule!(
            h.messages
                .iter()
                .map(|m| m.delivered().msg.clone())
                .collect::<Vec<_>>()
                == ["b3", "b4", "b5"].map(Bytes::from),
            "past the history bound the oldest are dropped: oldest = head - bound + 1",
            "bound 3 kept the wrong messages"
        );
        for (after, limit, want) in [(3, 10, vec![4, 5]), (0, 1, vec![3]), (1, 10, vec![3, 4, 5])] {
            let h = history(&store, c, after, limit).await;
            rule!(
                ids(&h.messages) == want && (h.oldest, h.head) == (3, 5),
                "history gives the kept messages with chatId > after, oldest first, at most limit, with oldest and head",
                "bound 3: history(after {after}, limit {limit}) = {:?}, oldest {}, head {}; want {want:?}, 3, 5",
                ids(&h.messages),
                h.oldest,
                h.head
            );
        }

        let store = (self.factory)(StoreLimits::new(0, ROOMY.inbox)).await;
        let c = Conversation::direct(base + 3, base + 4);
        for n in 1..=2 {
            let m = append(&store, direct(c, base + 3, base + 4, "z")).await;
            rule!(
                m.chat_id() == n,
                "chatIds start at 1 and rise by exactly one per conversation",
                "with history bound 0, append #{n} got chatId {}",
                m.chat_id()
            );
        }
        let h = history(&store, c, 0, 10).await;
        rule!(
            h.messages.is_empty() && (h.oldest, h.head) == (3, 2),
            "a conversation whose messages were all dropped has oldest = head + 1",
            "history bound 0, 2 appended: {} messages, oldest {}, head {}",
            h.messages.len(),
            h.oldest,
            h.head
        );
    }

    async fn inbox_peek_and_remove(&mut self) {
        let store = (self.factory)(ROOMY).await;
        let base = self.ids();
        let (mid, other) = (base + 1, base + 2);
        rule!(
            offline(&store, mid, 10).await.is_empty(),
            "an inbox starts empty",
            "mid {mid} has entries before any push"
        );
        let pushed: Vec<Arc<Message>> = (1..=3).map(|n| note(n, format!("o{n}"))).collect();
        for m in &pushed {
            ok(store.push_offline(mid, m.clone()).await, "push_offline");
        }
        let all = offline(&store, mid, 10).await;
        rule!(
            bodies(&all) == ["o1", "o2", "o3"].map(Bytes::from),
            "offline gives the inbox oldest first",
            "got {:?}",
            bodies(&all)
        );
        for (e, m) in all.iter().zip(&pushed) {
            rule!(
                fields(&e.msg) == fields(m),
                "offline gives messages byte for byte as pushed",
                "got {:?}, pushed {:?}",
                fields(&e.msg),
                fields(m)
            );
        }
        rule!(
            all.windows(2).all(|w| w[0].seq < w[1].seq),
            "seqs rise with every push",
            "seqs {:?}",
            seqs(&all)
        );
        let again = offline(&store, mid, 10).await;
        rule!(
            seqs(&again) == seqs(&all),
            "offline peeks: it removes nothing",
            "a second offline gave seqs {:?}, the first {:?}",
            seqs(&again),
            seqs(&all)
        );
        for (limit, n) in [(2, 2), (0, 0), (1, 1), (1_000, 3)] {
            let got = offline(&store, mid, limit).await;
            rule!(
                seqs(&got) == seqs(&all)[..n],
                "offline gives at most limit entries, oldest first",
                "offline(limit {limit}) gave seqs {:?}",
                seqs(&got)
            );
        }
        if let Some(below) = all[0].seq.checked_sub(1) {
            ok(store.remove_offline(mid, below).await, "remove_offline");
            rule!(
                offline(&store, mid, 10).await.len() == 3,
                "remove_offline removes exactly the entries with seq <= through",
                "remove_offline(through {below}) removed entries from seq {}",
                all[0].seq
            );
        }
        ok(
            store.remove_offline(mid, all[1].seq).await,
            "remove_offline",
        );
        let left = offline(&store, mid, 10).await;
        rule!(
            seqs(&left) == [all[2].seq],
            "remove_offline removes exactly the entries with seq <= through",
            "after remove through {} of {:?}, left {:?}",
            all[1].seq,
            seqs(&all),
            seqs(&left)
        );
        // A push after the peek survives removal through the peeked last seq.
        let peeked = offline(&store, mid, 10).await;
        ok(
            store.push_offline(mid, note(4, "o4".into())).await,
            "push_offline",
        );
        ok(
            store
                .remove_offline(mid, peeked[peeked.len() - 1].seq)
                .await,
            "remove_offline",
        );
        let left = offline(&store, mid, 10).await;
        rule!(
            bodies(&left) == [Bytes::from("o4")] && left[0].seq > all[2].seq,
            "remove_offline keeps entries pushed after the peek it names",
            "left {:?} with seqs {:?}",
            bodies(&left),
            seqs(&left)
        );
        let highest = left[0].seq;
        ok(store.remove_offline(mid, highest).await, "remove_offline");
        rule!(
            offline(&store, mid, 10).await.is_empty(),
            "remove_offline removes exactly the entries with seq <= through",
            "the inbox is not empty after removing through its last seq"
        );
        for _ in 0..2 {
            ok(store.remove_offline(mid, highest).await, "remove_offline");
            ok(
                store.remove_offline(other, u64::MAX).await,
                "remove_offline",
            );
        }
        // Emptied, the inbox never hands out an old seq again.
        ok(
            store.push_offline(mid, note(5, "o5".into())).await,
            "push_offline",
        );
        let fresh = offline(&store, mid, 10).await;
        rule!(
            fresh.len() == 1 && fresh[0].seq > highest,
            "seqs are never reused, even after an inbox empties",
            "after emptying at seq {highest}, a new push got seqs {:?}",
            seqs(&fresh)
        );
        rule!(
            offline(&store, other, 10).await.is_empty(),
            "inboxes are independent",
            "mid {other} got entries pushed to {mid}"
        );
    }

    async fn inbox_seqs_rise_store_wide(&mut self) {
        let store = (self.factory)(ROOMY).await;
        let base = self.ids();
        let mids = [base + 1, base + 2, base + 3];
        let mut order = Vec::new();
        for n in 0..9 {
            let mid = mids[n % 3];
            let text = format!("s{n}");
            ok(
                store
                    .push_offline(mid, note(n as i64 + 1, text.clone()))
                    .await,
                "push_offline",
            );
            let entries = offline(&store, mid, 100).await;
            let last = entries
                .last()
                .unwrap_or_else(|| panic!("MessageStore rule broken: offline gives the inbox oldest first: mid {mid} is empty after a push"));
            rule!(
                last.msg.delivered().msg == text,
                "offline gives the inbox oldest first",
                "mid {mid}'s newest entry is {:?}, just pushed {text:?}",
                last.msg.delivered().msg
            );
            order.push(last.seq);
        }
        rule!(
            order.windows(2).all(|w| w[0] < w[1]),
            "seqs rise with every entry pushed to any inbox of the store",
            "pushes to three inboxes in turn got seqs {order:?}"
        );
        // Removing from one inbox leaves the others whole.
        ok(
            store.remove_offline(mids[0], u64::MAX).await,
            "remove_offline",
        );
        rule!(
            offline(&store, mids[0], 100).await.is_empty(),
            "remove_offline removes exactly the entries with seq <= through",
            "mid {} is not empty after removing through u64::MAX",
            mids[0]
        );
        for mid in &mids[1..] {
            let left = offline(&store, *mid, 100).await;
            rule!(
                left.len() == 3,
                "inboxes are independent",
                "mid {mid} has {} entries after another inbox was emptied, want 3",
                left.len()
            );
        }
    }

    async fn concurrent_pushes_lose_nothing(&mut self) {
        const TASKS: i64 = 8;
        const EACH: i64 = 50;
        let store = (self.factory)(ROOMY).await;
        let mid = self.ids() + 1;
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let store = store.clone();
            tasks.spawn(async move {
                for n in 0..EACH {
                    let msg = note(t * EACH + n + 1, format!("{t}/{n}"));
                    ok(store.push_offline(mid, msg).await, "push_offline");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap_or_else(|e| panic!("a concurrent push task failed: {e}"));
        }
        let all = offline(&store, mid, 10_000).await;
        rule!(
            all.len() == (TASKS * EACH) as usize,
            "concurrent pushes lose nothing",
            "{TASKS} tasks x {EACH} pushes left {} entries",
            all.len()
        );
        rule!(
            all.windows(2).all(|w| w[0].seq < w[1].seq),
            "offline gives the inbox oldest first (seqs rise)",
            "seqs out of order after concurrent pushes"
        );
        // Each task's entries in the order it pushed them.
        let mut next = vec![0; TASKS as usize];
        for e in &all {
            rule!(
                (1..=TASKS * EACH).contains(&e.msg.chat_id()),
                "offline gives messages byte for byte as pushed",
                "an entry has chatId {}, which was never pushed",
                e.msg.chat_id()
            );
            let t = ((e.msg.chat_id() - 1) / EACH) as usize;
            let want = Bytes::from(format!("{t}/{}", next[t]));
            rule!(
                e.msg.delivered().msg == want,
                "offline gives the inbox oldest first",
                "entry {:?}, want {want:?}",
                e.msg.delivered().msg
            );
            next[t] += 1;
        }
    }

    async fn inbox_bound_drops_oldest(&mut self) {
        let store = (self.factory)(StoreLimits::new(ROOMY.history, 3)).await;
        let base = self.ids();
        let (mid, other) = (base + 1, base + 2);
        for n in 1..=5 {
            ok(
                store.push_offline(mid, note(n, format!("i{n}"))).await,
                "push_offline",
            );
        }
        ok(
            store.push_offline(other, note(9, "other".into())).await,
            "push_offline",
        );
        let kept = offline(&store, mid, 10).await;
        rule!(
            bodies(&kept) == ["i3", "i4", "i5"].map(Bytes::from),
            "past the inbox bound the oldest entries are dropped",
            "bound 3, 5 pushed: kept {:?}",
            bodies(&kept)
        );
        rule!(
            bodies(&offline(&store, other, 10).await) == [Bytes::from("other")],
            "inboxes are independent",
            "a full inbox dropped another mid's entry"
        );
        let store = (self.factory)(StoreLimits::new(ROOMY.history, 0)).await;
        ok(
            store.push_offline(mid, note(1, "gone".into())).await,
            "push_offline",
        );
        rule!(
            offline(&store, mid, 10).await.is_empty(),
            "past the inbox bound the oldest entries are dropped",
            "inbox bound 0 kept an entry"
        );
    }
}

/// The groups and members [`groups_conformance`] asks its factory to
/// create: group 1 = {1, 2, 3}; group 2 = {2}; group 3 = 1..=1000; group
/// 4 = {1, i32::MAX}; group i32::MAX = {7}. The kit also asks about groups
/// 5, 999 and i32::MAX − 1, which must not exist, and mids 0 and −1, which
/// are in no group.
pub fn groups_fixture() -> Vec<(GroupId, Vec<Mid>)> {
    vec![
        (1, vec![1, 2, 3]),
        (2, vec![2]),
        (3, (1..=1000).collect()),
        (4, vec![1, i32::MAX]),
        (i32::MAX, vec![7]),
    ]
}

/// Checks [`GroupDirectory`]'s rules against the directory `factory` makes
/// from [`groups_fixture`] (it creates exactly those groups with exactly
/// those members and returns the directory), panicking with the rule broken:
/// `members` lists each member once and nobody else; `is_member` agrees with
/// it, for members and for non-members; an unknown group has no members and
/// nobody is a member of it.
///
/// ```
/// use comet_core::{async_trait, BoxError, GroupDirectory, GroupId, Members, Mid};
/// use std::collections::HashMap;
/// use std::sync::Arc;
///
/// struct Fixed(HashMap<GroupId, Vec<Mid>>);
///
/// #[async_trait]
/// impl GroupDirectory for Fixed {
///     async fn is_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError> {
///         Ok(self.0.get(&group).is_some_and(|m| m.contains(&mid)))
///     }
///     async fn members(&self, group: GroupId) -> Result<Members, BoxError> {
///         Ok(self.0.get(&group).map_or_else(|| Arc::from(vec![]), |m| m[..].into()))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// comet_core::testing::groups_conformance(|groups| async move {
///     Arc::new(Fixed(groups.into_iter().collect()))
/// })
/// .await;
/// # }
/// ```
pub async fn groups_conformance<F, Fut, G>(factory: F)
where
    F: FnOnce(Vec<(GroupId, Vec<Mid>)>) -> Fut,
    Fut: Future<Output = Arc<G>>,
    G: GroupDirectory + ?Sized,
{
    macro_rules! rule {
        ($ok:expr, $rule:expr, $($what:tt)+) => {
            if !$ok {
                panic!("GroupDirectory rule broken: {}: {}", $rule, format!($($what)+));
            }
        };
    }
    let fixture = groups_fixture();
    let dir = factory(fixture.clone()).await;
    let call = |what: &str| format!("GroupDirectory call failed: {what}");
    let everyone: HashSet<Mid> = fixture.iter().flat_map(|(_, m)| m.clone()).collect();
    for (g, want) in &fixture {
        let got = dir
            .members(*g)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", call("members")));
        let set: HashSet<Mid> = got.iter().copied().collect();
        rule!(
            set.len() == got.len(),
            "members lists each member once",
            "group {g}: {} entries for {} distinct mids",
            got.len(),
            set.len()
        );
        let want_set: HashSet<Mid> = want.iter().copied().collect();
        rule!(
            set == want_set,
            "members lists exactly the group's members",
            "group {g}: {} members, want {} (missing {:?}, extra {:?})",
            set.len(),
            want_set.len(),
            want_set.difference(&set).take(5).collect::<Vec<_>>(),
            set.difference(&want_set).take(5).collect::<Vec<_>>()
        );
        for mid in everyone.iter().chain(&[0, -1, 1001, i32::MAX - 1]) {
            let is = dir
                .is_member(*g, *mid)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", call("is_member")));
            rule!(
                is == want_set.contains(mid),
                "is_member agrees with members",
                "is_member({g}, {mid}) = {is}"
            );
        }
    }
    for g in [5, 999, i32::MAX - 1] {
        let got = dir
            .members(g)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", call("members")));
        rule!(
            got.is_empty(),
            "a group that does not exist has no members",
            "unknown group {g} has {} members",
            got.len()
        );
        for mid in [1, 2, 7, i32::MAX] {
            let is = dir
                .is_member(g, mid)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", call("is_member")));
            rule!(
                !is,
                "a group that does not exist has no members",
                "is_member({g}, {mid}) = true for an unknown group"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BoxError;
    use async_trait::async_trait;
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;

    /// A correct store, unless told to break one rule.
    #[derive(Default)]
    struct Toy {
        limits: Option<StoreLimits>,
        bug: Option<Bug>,
        state: Mutex<State>,
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Bug {
        /// chatIds per (from, to), not per unordered pair.
        OrderedPairs,
        /// Reads the counter, yields, then writes it back.
        RacyAppends,
        /// `oldest` is 0 when everything was dropped.
        OldestZero,
        /// Peeking removes.
        PeekRemoves,
        /// A seq counter per inbox, not per store.
        SeqsPerInbox,
        /// Drops the newest past the inbox bound.
        DropsNewest,
        /// Ignores `after`.
        IgnoresAfter,
    }

    #[derive(Default)]
    struct State {
        convs: HashMap<Conversation, (i64, VecDeque<Arc<Message>>)>,
        inboxes: HashMap<Mid, VecDeque<Offline>>,
        seq: u64,
        per_inbox: HashMap<Mid, u64>,
    }

    impl Toy {
        fn has(&self, bug: Bug) -> bool {
            self.bug == Some(bug)
        }
    }

    #[async_trait]
    impl MessageStore for Toy {
        async fn append(&self, mut draft: Draft) -> Result<Arc<Message>, BoxError> {
            if self.has(Bug::OrderedPairs) {
                draft.conversation = Conversation::Direct(draft.from, draft.to);
            }
            let next = {
                let s = self.state.lock().unwrap();
                s.convs.get(&draft.conversation).map_or(0, |c| c.0) + 1
            };
            if self.has(Bug::RacyAppends) {
                tokio::task::yield_now().await;
            }
            let mut s = self.state.lock().unwrap();
            let (last, kept) = s.convs.entry(draft.conversation).or_default();
            *last = if self.has(Bug::RacyAppends) {
                next
            } else {
                *last + 1
            };
            let msg = draft.into_message(*last);
            kept.push_back(msg.clone());
            if kept.len() > self.limits.map_or(usize::MAX, |l| l.history) {
                kept.pop_front();
            }
            Ok(msg)
        }
        async fn history(
            &self,
            c: Conversation,
            after: i64,
            limit: usize,
        ) -> Result<History, BoxError> {
            let s = self.state.lock().unwrap();
            let Some((head, kept)) = s.convs.get(&c) else {
                return Ok(History::default());
            };
            let after = if self.has(Bug::IgnoresAfter) {
                0
            } else {
                after
            };
            let gone = if self.has(Bug::OldestZero) {
                0
            } else {
                head + 1
            };
            Ok(History {
                messages: kept
                    .iter()
                    .filter(|m| m.chat_id() > after)
                    .take(limit)
                    .cloned()
                    .collect(),
                oldest: kept.front().map_or(gone, |m| m.chat_id()),
                head: *head,
            })
        }
        async fn push_offline(&self, mid: Mid, msg: Arc<Message>) -> Result<(), BoxError> {
            let mut s = self.state.lock().unwrap();
            s.seq += 1;
            let seq = match self.bug {
                Some(Bug::SeqsPerInbox) => {
                    let n = s.per_inbox.entry(mid).or_default();
                    *n += 1;
                    *n
                }
                _ => s.seq,
            };
            let bound = self.limits.map_or(usize::MAX, |l| l.inbox);
            let inbox = s.inboxes.entry(mid).or_default();
            if self.has(Bug::DropsNewest) && inbox.len() >= bound {
                return Ok(());
            }
            inbox.push_back(Offline { seq, msg });
            if inbox.len() > bound {
                inbox.pop_front();
            }
            Ok(())
        }
        async fn offline(&self, mid: Mid, limit: usize) -> Result<Vec<Offline>, BoxError> {
            let mut s = self.state.lock().unwrap();
            let Some(inbox) = s.inboxes.get_mut(&mid) else {
                return Ok(vec![]);
            };
            if self.has(Bug::PeekRemoves) {
                let n = limit.min(inbox.len());
                return Ok(inbox.drain(..n).collect());
            }
            Ok(inbox.iter().take(limit).cloned().collect())
        }
        async fn remove_offline(&self, mid: Mid, through: u64) -> Result<(), BoxError> {
            let mut s = self.state.lock().unwrap();
            if let Some(inbox) = s.inboxes.get_mut(&mid) {
                inbox.retain(|e| e.seq > through);
            }
            Ok(())
        }
    }

    async fn run(bug: Option<Bug>) {
        store_conformance(|limits| async move {
            Arc::new(Toy {
                limits: Some(limits),
                bug,
                ..Toy::default()
            })
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_correct_store_passes_both_kits() {
        run(None).await;
        store_conformance_unbounded(|| async { Arc::new(Toy::default()) }).await;
    }

    /// The panic message of the kit run against a store with `bug`.
    async fn broken(bug: Bug) -> String {
        let err = tokio::spawn(run(Some(bug)))
            .await
            .expect_err("the kit passed a broken store");
        let panic = err.into_panic();
        panic
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| format!("{:?}", panic.downcast_ref::<&str>()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_broken_rule_is_named() {
        for (bug, rule) in [
            (
                Bug::OrderedPairs,
                "a direct conversation is the unordered pair",
            ),
            (
                Bug::RacyAppends,
                "gapless and unique under concurrent appends",
            ),
            (Bug::OldestZero, "oldest = head + 1"),
            (Bug::PeekRemoves, "offline peeks"),
            (
                Bug::SeqsPerInbox,
                "seqs rise with every entry pushed to any inbox",
            ),
            (
                Bug::DropsNewest,
                "past the inbox bound the oldest entries are dropped",
            ),
            (Bug::IgnoresAfter, "chatId > after"),
        ] {
            let msg = broken(bug).await;
            assert!(
                msg.starts_with("MessageStore rule broken: ") && msg.contains(rule),
                "{bug:?}: {msg}"
            );
        }
    }

    /// Members from a map; `dup` lists group 1's first member twice,
    /// `leaky` says everyone is a member of unknown groups.
    struct Dir {
        groups: HashMap<GroupId, Vec<Mid>>,
        dup: bool,
        leaky: bool,
    }

    #[async_trait]
    impl GroupDirectory for Dir {
        async fn is_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError> {
            Ok(self
                .groups
                .get(&group)
                .map_or(self.leaky, |m| m.contains(&mid)))
        }
        async fn members(&self, group: GroupId) -> Result<crate::Members, BoxError> {
            let mut m = self.groups.get(&group).cloned().unwrap_or_default();
            if self.dup && group == 1 {
                m.push(m[0]);
            }
            Ok(m.into())
        }
    }

    async fn dir(dup: bool, leaky: bool) {
        groups_conformance(|fixture| async move {
            Arc::new(Dir {
                groups: fixture.into_iter().collect(),
                dup,
                leaky,
            })
        })
        .await;
    }

    #[tokio::test]
    async fn the_groups_kit_passes_a_correct_directory_and_names_broken_rules() {
        dir(false, false).await;
        for (dup, leaky, rule) in [
            (true, false, "members lists each member once"),
            (false, true, "a group that does not exist has no members"),
        ] {
            let err = tokio::spawn(dir(dup, leaky)).await.unwrap_err();
            let msg = err.into_panic().downcast_ref::<String>().cloned().unwrap();
            assert!(
                msg.starts_with("GroupDirectory rule broken: ") && msg.contains(rule),
                "{msg}"
            );
        }
    }
}
