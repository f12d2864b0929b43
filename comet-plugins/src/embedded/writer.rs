//! The writer thread: every write of the store, batched into one
//! transaction per turn (group commit).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comet_core::{Conversation, Draft, Message, Mid};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use super::db::{conv_key, ConvState, State};
use super::{Counters, EmbeddedConfig, Fsync, StoreError};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write for the writer thread, with where to send its answer.
#[derive(Debug)]
pub(super) enum Cmd {
    Append(Draft, Reply<Arc<Message>>),
    PushOffline(Mid, Arc<Message>, Reply<()>),
    RemoveOffline(Mid, u64, Reply<()>),
    /// Runs SQL on the writer's connection (tests: e.g. a size cap that
    /// makes writes fail the way a full disk does).
    #[cfg(test)]
    Exec(String, Reply<()>),
}

/// Writes per transaction at most: bounds one commit's latency.
const MAX_BATCH: usize = 2048;

/// A command taken into the transaction, waiting for it to commit (its
/// message is None when applying it failed).
enum Done {
    Append(Option<Arc<Message>>, Reply<Arc<Message>>),
    Unit(Reply<()>),
}

#[derive(Clone, Copy, Debug, Default)]
struct InboxState {
    count: u64,
    bytes: u64,
}

pub(super) struct Writer {
    conn: Connection,
    convs: HashMap<Conversation, ConvState>,
    /// Inboxes written since their state was read; dropped when unsure.
    inboxes: HashMap<Mid, InboxState>,
    next_seq: u64,
    fsync: Fsync,
    fsync_interval: Duration,
    history_limit: u64,
    history_bytes: u64,
    inbox_limit: u64,
    inbox_bytes: u64,
    counters: Arc<Counters>,
    /// When the oldest commit not yet fsynced was made.
    unsynced_since: Option<Instant>,
    // Per-batch scratch, kept to reuse its allocations.
    done: Vec<Done>,
    /// Conversation states before this batch changed them (None: new).
    undo: HashMap<Conversation, Option<ConvState>>,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        state: State,
        config: &EmbeddedConfig,
        counters: Arc<Counters>,
    ) -> Self {
        let limit = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Writer {
            conn,
            convs: state.convs,
            inboxes: HashMap::new(),
            next_seq: state.next_seq,
            fsync: config.fsync,
            fsync_interval: config.fsync_interval,
            history_limit: limit(config.history_limit),
            history_bytes: limit(config.history_bytes),
            inbox_limit: limit(config.inbox_limit),
            inbox_bytes: limit(config.inbox_bytes),
            counters,
            unsynced_since: None,
            done: Vec::new(),
            undo: HashMap::new(),
        }
    }

    /// SQLite's `synchronous` setting for the fsync mode: FULL fsyncs the
    /// log at every commit, NORMAL only at checkpoints (and at [`sync`]).
    fn mode(&self) -> &'static str {
        match self.fsync {
            Fsync::Always => "FULL",
            Fsync::Interval => "NORMAL",
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Cmd>) {
        if let Err(e) = self.conn.pragma_update(None, "synchronous", self.mode()) {
            tracing::error!(cause = %e, "embedded store: cannot set synchronous mode");
        }
        let mut batch = VecDeque::with_capacity(64);
        loop {
            let first = match self.unsynced_since {
                Some(since) => {
                    let due = since + self.fsync_interval;
                    match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                        Ok(cmd) => cmd,
                        Err(RecvTimeoutError::Timeout) => {
                            self.sync();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => break,
                },
            };
            batch.push_back(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push_back(cmd),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
            if self
                .unsynced_since
                .is_some_and(|since| since.elapsed() >= self.fsync_interval)
            {
                self.sync();
            }
        }
        // Closed: make everything durable before the connection closes,
        // and move the log into the database file.
        if self.unsynced_since.is_some() {
            self.sync();
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(cause = %e, "embedded store: checkpoint at close failed");
        }
    }

    /// Fsyncs the log: a tiny commit in FULL mode syncs every frame before
    /// it too.
    fn sync(&mut self) {
        let result = self
            .conn
            .execute_batch(
                "PRAGMA synchronous=FULL;
                 UPDATE meta SET value = value + 1 WHERE key = 'synced';",
            )
            .and_then(|()| self.conn.pragma_update(None, "synchronous", self.mode()));
        match result {
            Ok(()) => {
                self.unsynced_since = None;
                Counters::add(&self.counters.fsyncs, 1);
            }
            Err(e) => {
                // Tried again at the next commit or interval.
                tracing::error!(cause = %e, "embedded store: fsync of the log failed");
                let _ = self.conn.pragma_update(None, "synchronous", self.mode());
                self.unsynced_since = Some(Instant::now());
            }
        }
    }

    /// Applies `batch` in one transaction and answers every command in it.
    fn commit(&mut self, batch: &mut VecDeque<Cmd>) {
        let next_seq = self.next_seq;
        let mut history_dropped = 0;
        let mut inbox_dropped = 0;
        let mut appended = 0;
        let result = (|| -> rusqlite::Result<()> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut touched_seq = false;
            while let Some(cmd) = batch.pop_front() {
                match cmd {
                    Cmd::Append(draft, reply) => {
                        let msg = append(
                            &tx,
                            &mut self.convs,
                            &mut self.undo,
                            (self.history_limit, self.history_bytes),
                            &mut history_dropped,
                            draft,
                        );
                        let failed = msg.is_err();
                        let (msg, result) = match msg {
                            Ok(msg) => (Some(msg), Ok(())),
                            Err(e) => (None, Err(e)),
                        };
                        self.done.push(Done::Append(msg, reply));
                        result?;
                        appended += u64::from(!failed);
                    }
                    Cmd::PushOffline(mid, msg, reply) => {
                        self.done.push(Done::Unit(reply));
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        touched_seq = true;
                        push_offline(
                            &tx,
                            &mut self.inboxes,
                            (self.inbox_limit, self.inbox_bytes),
                            &mut inbox_dropped,
                            mid,
                            seq,
                            &msg,
                        )?;
                    }
                    Cmd::RemoveOffline(mid, through, reply) => {
                        self.done.push(Done::Unit(reply));
                        let through = i64::try_from(through).unwrap_or(i64::MAX);
                        tx.prepare_cached("DELETE FROM inbox WHERE mid = ?1 AND seq <= ?2")?
                            .execute(params![mid, through])?;
                        // Read again at its next push.
                        self.inboxes.remove(&mid);
                    }
                    #[cfg(test)]
                    Cmd::Exec(sql, reply) => {
                        self.done.push(Done::Unit(reply));
                        tx.execute_batch(&sql)?;
                    }
                }
            }
            for conv in self.undo.keys() {
                let s = self.convs[conv];
                tx.prepare_cached(
                    "UPDATE conversations SET head = ?2, count = ?3, bytes = ?4 WHERE id = ?1",
                )?
                .execute(params![s.id, s.head, s.count, s.bytes])?;
            }
            if touched_seq {
                tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_seq'")?
                    .execute(params![self.next_seq])?;
            }
            tx.commit()
        })();
        match result {
            Ok(()) => {
                self.undo.clear();
                let c = &self.counters;
                Counters::add(&c.commits, 1);
                Counters::add(&c.appended, appended);
                Counters::add(&c.history_dropped, history_dropped);
                if inbox_dropped > 0 {
                    let before = c.inbox_dropped.fetch_add(inbox_dropped, Ordering::Relaxed);
                    let after = before + inbox_dropped;
                    // Warn at the first drop and whenever the total passes a
                    // power of two, so a long-offline user cannot flood the log.
                    if before == 0 || after.ilog2() > before.ilog2() {
                        tracing::warn!(
                            dropped_total = after,
                            limit = self.inbox_limit,
                            "offline inboxes full: dropping oldest messages"
                        );
                    }
                }
                match self.fsync {
                    Fsync::Always => Counters::add(&c.fsyncs, 1),
                    Fsync::Interval => {
                        self.unsynced_since.get_or_insert_with(Instant::now);
                    }
                }
                for done in self.done.drain(..) {
                    match done {
                        Done::Append(Some(msg), reply) => {
                            let _ = reply.send(Ok(msg));
                        }
                        Done::Append(None, reply) => {
                            let error = StoreError("embedded store write failed".into());
                            let _ = reply.send(Err(error));
                        }
                        Done::Unit(reply) => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(e) => {
                // The transaction rolled back (dropped uncommitted): forget
                // what it changed, so no chatId or seq is consumed.
                Counters::add(&self.counters.failed_commits, 1);
                for (conv, before) in self.undo.drain() {
                    match before {
                        Some(state) => self.convs.insert(conv, state),
                        None => self.convs.remove(&conv),
                    };
                }
                self.inboxes.clear();
                self.next_seq = next_seq;
                tracing::error!(cause = %e, "embedded store: write failed, rolled back");
                let error = StoreError::db("write", &e);
                for done in self.done.drain(..) {
                    match done {
                        Done::Append(_, reply) => {
                            let _ = reply.send(Err(error.clone()));
                        }
                        Done::Unit(reply) => {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
                // Commands not reached when it failed.
                for cmd in batch.drain(..) {
                    fail(cmd, &error);
                }
            }
        }
    }
}

fn fail(cmd: Cmd, error: &StoreError) {
    match cmd {
        Cmd::Append(_, reply) => {
            let _ = reply.send(Err(error.clone()));
        }
        Cmd::PushOffline(_, _, reply) | Cmd::RemoveOffline(_, _, reply) => {
            let _ = reply.send(Err(error.clone()));
        }
        #[cfg(test)]
        Cmd::Exec(_, reply) => {
            let _ = reply.send(Err(error.clone()));
        }
    }
}

fn len(msg: &[u8]) -> u64 {
    msg.len() as u64
}

/// Numbers and stores one message, dropping the conversation's oldest past
/// the bounds.
fn append(
    tx: &Connection,
    convs: &mut HashMap<Conversation, ConvState>,
    undo: &mut HashMap<Conversation, Option<ConvState>>,
    (limit, limit_bytes): (u64, u64),
    dropped: &mut u64,
    draft: Draft,
) -> rusqlite::Result<Arc<Message>> {
    let conversation = draft.conversation;
    let state = match convs.get(&conversation) {
        Some(state) => {
            undo.entry(conversation).or_insert(Some(*state));
            *state
        }
        None => {
            let (kind, a, b) = conv_key(conversation);
            tx.prepare_cached(
                "INSERT INTO conversations(kind, a, b, head, count, bytes) VALUES (?1, ?2, ?3, 0, 0, 0)",
            )?
            .execute(params![kind, a, b])?;
            undo.insert(conversation, None);
            ConvState {
                id: tx.last_insert_rowid(),
                head: 0,
                count: 0,
                bytes: 0,
            }
        }
    };
    let mut s = state;
    s.head += 1;
    let size = len(&draft.msg);
    let keep = limit > 0 && size <= limit_bytes;
    // Room for the new message (or none kept at all if it cannot be kept).
    let (room, room_bytes) = if keep {
        (limit - 1, limit_bytes - size)
    } else {
        (0, 0)
    };
    while s.count > room || s.bytes > room_bytes {
        let oldest = s.head - 1 - s.count as i64 + 1;
        let gone: Option<u64> = tx
            .prepare_cached(
                "DELETE FROM messages WHERE conv = ?1 AND chat_id = ?2 RETURNING length(msg)",
            )?
            .query_row(params![s.id, oldest], |r| r.get(0))
            .optional()?;
        s.count -= 1;
        s.bytes = s.bytes.saturating_sub(gone.unwrap_or(0));
        *dropped += 1;
    }
    if keep {
        tx.prepare_cached(
            "INSERT INTO messages(conv, chat_id, sender, recipient, msg) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![s.id, s.head, draft.from, draft.to, &draft.msg[..]])?;
        s.count += 1;
        s.bytes += size;
    } else {
        *dropped += 1;
    }
    convs.insert(conversation, s);
    Ok(draft.into_message(s.head))
}

/// Keeps a copy of `msg` in `mid`'s inbox, dropping the oldest past the
/// bounds.
fn push_offline(
    tx: &Connection,
    inboxes: &mut HashMap<Mid, InboxState>,
    (limit, limit_bytes): (u64, u64),
    dropped: &mut u64,
    mid: Mid,
    seq: u64,
    msg: &Message,
) -> rusqlite::Result<()> {
    let d = msg.delivered();
    let size = len(&d.msg);
    let mut s = match inboxes.get(&mid) {
        Some(s) => *s,
        None => tx
            .prepare_cached(
                "SELECT count(*), coalesce(sum(length(msg)), 0) FROM inbox WHERE mid = ?1",
            )?
            .query_row(params![mid], |r| {
                Ok(InboxState {
                    count: r.get(0)?,
                    bytes: r.get(1)?,
                })
            })?,
    };
    let keep = limit > 0 && size <= limit_bytes;
    let (room, room_bytes) = if keep {
        (limit - 1, limit_bytes - size)
    } else {
        (0, 0)
    };
    let mut drops = 0u64;
    while s.count > room || s.bytes > room_bytes {
        let gone: Option<u64> = tx
            .prepare_cached(
                "DELETE FROM inbox WHERE mid = ?1
                 AND seq = (SELECT min(seq) FROM inbox WHERE mid = ?1) RETURNING length(msg)",
            )?
            .query_row(params![mid], |r| r.get(0))
            .optional()?;
        let Some(gone) = gone else {
            // Nothing left to drop: the state was stale.
            s = InboxState::default();
            break;
        };
        s.count -= 1;
        s.bytes = s.bytes.saturating_sub(gone);
        drops += 1;
    }
    if keep {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        tx.prepare_cached(
            "INSERT INTO inbox(mid, seq, op, chat_id, sender, recipient, msg)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![mid, seq, d.op, d.chat_id, d.from, d.to, &d.msg[..]])?;
        s.count += 1;
        s.bytes += size;
    } else {
        drops += 1;
    }
    if drops > 0 {
        tracing::debug!(
            mid,
            drops,
            "offline inbox full: dropped its oldest messages"
        );
    }
    *dropped += drops;
    inboxes.insert(mid, s);
    Ok(())
}
