//! A crash-safe message store on disk: SQLite (through `rusqlite`, bundled)
//! in write-ahead-log mode. Enabled by the `embedded` cargo feature.
//!
//! [`EmbeddedStore`] keeps what [`MemoryStore`](crate::memory::MemoryStore)
//! keeps — chatIds per conversation, a bounded history per conversation, a
//! bounded offline inbox per user — in one database file,
//! `<path>/comet.db` (with SQLite's `comet.db-wal` and `comet.db-shm` next
//! to it), so a restart finds every conversation's head, its history and
//! every inbox as they were.
//!
//! # What an acknowledged append means
//!
//! [`append`](MessageStore::append) returns `Ok` only once the message is
//! committed to the database's log (the WAL). One writer thread takes every
//! pending write and commits them together, so a commit holds as many
//! messages as arrived while the previous one was being written.
//!
//! - [`Fsync::Interval`] (the default): the commit is written to the
//!   operating system before `append` returns, so killing the process
//!   (`kill -9`, a panic, an OOM kill) at any moment loses no acknowledged
//!   message. The log is fsynced at most `fsync_interval` after a commit, so
//!   a power cut or kernel crash loses at most that interval.
//! - [`Fsync::Always`]: `append` returns after the commit's fsync; a power
//!   cut loses no acknowledged message. Concurrent appends share one fsync
//!   (group commit).
//!
//! # Bounds
//!
//! Each conversation keeps at most `history_limit` messages and
//! `history_bytes` bytes of message bodies; each user's inbox at most
//! `inbox_limit` messages and `inbox_bytes` bytes. Past a bound the oldest
//! entries are dropped and counted ([`EmbeddedStats`]). A conversation's
//! head survives even when all its messages are dropped, so chatIds never
//! restart. An inbox entry is a copy of its message, so it survives the
//! history bound of its conversation.
//!
//! # Failures
//!
//! A commit that fails (disk full, I/O error) is rolled back whole: its
//! appends answer `Err` and consume no chatId. The store keeps running and
//! the next commit tries again, so it recovers when the disk does. Opening
//! refuses a file it does not recognise as its own ([`OpenError`]), naming
//! it and leaving it untouched.
//!
//! One process at a time may use a `path`.
//!
//! ```
//! use comet_core::{Conversation, Draft, MessageStore};
//! use comet_plugins::embedded::{EmbeddedConfig, EmbeddedStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let dir = std::env::temp_dir().join(format!("comet-doc-{}", std::process::id()));
//! let store = EmbeddedStore::open(EmbeddedConfig::new(&dir))?;
//! let opened = store.opened();
//! println!("{} conversations, {} messages", opened.conversations, opened.messages);
//!
//! let chat = Conversation::direct(1, 2);
//! let draft = Draft { conversation: chat, op: 18, from: 1, to: 2, msg: "hi".into() };
//! let stored = store.append(draft).await?;
//! let history = store.history(chat, 0, 100).await?;
//! assert_eq!(history.head, stored.chat_id());
//! # drop(store);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

mod db;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comet_core::store::{History, Offline};
use comet_core::{async_trait, BoxError, Conversation, Draft, Message, MessageStore, Mid};
use tokio::sync::oneshot;

use self::writer::Cmd;

/// The database file's name inside the store's directory.
pub const DB_FILE: &str = "comet.db";

/// When the database log is fsynced (see the [module docs](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fsync {
    /// Acknowledge once the commit reached the operating system; fsync
    /// within `fsync_interval` after it. Survives `kill -9`; a power cut
    /// loses at most the interval.
    #[default]
    Interval,
    /// Acknowledge once the commit is fsynced; concurrent appends share one
    /// fsync. Survives a power cut.
    Always,
}

impl FromStr for Fsync {
    type Err = String;

    /// `"interval"` or `"always"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "interval" => Ok(Fsync::Interval),
            "always" => Ok(Fsync::Always),
            other => Err(format!(
                "unknown fsync mode {other:?} (expected \"interval\" or \"always\")"
            )),
        }
    }
}

impl fmt::Display for Fsync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fsync::Interval => "interval",
            Fsync::Always => "always",
        })
    }
}

/// How to open an [`EmbeddedStore`]; [`EmbeddedConfig::new`] gives the
/// documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddedConfig {
    /// The store's directory, created if missing.
    pub path: PathBuf,
    /// When the log is fsynced (default [`Fsync::Interval`]).
    pub fsync: Fsync,
    /// The longest time a commit waits for its fsync under
    /// [`Fsync::Interval`] (default 1 s).
    pub fsync_interval: Duration,
    /// Messages kept per conversation (default 1,000).
    pub history_limit: usize,
    /// Bytes of message bodies kept per conversation (default 4 MiB).
    pub history_bytes: usize,
    /// Messages kept per offline user (default 1,000).
    pub inbox_limit: usize,
    /// Bytes of message bodies kept per offline user (default 4 MiB).
    pub inbox_bytes: usize,
}

impl EmbeddedConfig {
    /// The defaults, in directory `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            path: path.into(),
            fsync: Fsync::Interval,
            fsync_interval: Duration::from_millis(1000),
            history_limit: 1000,
            history_bytes: 4 * 1024 * 1024,
            inbox_limit: 1000,
            inbox_bytes: 4 * 1024 * 1024,
        }
    }
}

/// What [`EmbeddedStore::open`] found, for the server's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The database file.
    pub file: PathBuf,
    /// Whether the file was created by this open.
    pub created: bool,
    /// Conversations with at least one chatId given.
    pub conversations: u64,
    /// Messages kept in conversation histories.
    pub messages: u64,
    /// Messages waiting in offline inboxes.
    pub inbox_messages: u64,
    /// How long opening took.
    pub elapsed: Duration,
}

/// The store could not be opened: which file, and why. Nothing in the file
/// was changed.
#[derive(Debug)]
pub struct OpenError {
    /// The file (or directory) at fault.
    pub file: PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.problem)
    }
}

impl std::error::Error for OpenError {}

/// A write or read the store could not do (disk full, I/O error, a closed
/// store). The engine answers the send with ret -1.
#[derive(Debug, Clone)]
pub struct StoreError(String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    fn db(what: &str, e: &rusqlite::Error) -> Self {
        StoreError(format!("embedded store {what} failed: {e}"))
    }
}

/// Counters of an [`EmbeddedStore`], read with [`EmbeddedStore::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmbeddedStats {
    /// Messages appended (acknowledged).
    pub appended: u64,
    /// Write transactions committed; each holds every write pending when it
    /// started.
    pub commits: u64,
    /// Commits that fsynced the log.
    pub fsyncs: u64,
    /// Write transactions that failed and were rolled back.
    pub failed_commits: u64,
    /// Messages dropped from conversation histories by the history bounds.
    pub history_dropped: u64,
    /// Messages dropped from offline inboxes by the inbox bounds.
    pub inbox_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appended: AtomicU64,
    commits: AtomicU64,
    fsyncs: AtomicU64,
    failed_commits: AtomicU64,
    history_dropped: AtomicU64,
    inbox_dropped: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Reads run on tokio's blocking threads, beside the writer (WAL readers
/// do not wait for it), at most this many at once: a login storm queues
/// its inbox reads here rather than start hundreds of blocking threads,
/// each with a database connection. Their connections are kept for reuse.
const READERS: usize = 8;

/// The SQLite-backed [`MessageStore`] (see the [module docs](self)).
#[derive(Debug)]
pub struct EmbeddedStore {
    tx: Option<mpsc::Sender<Cmd>>,
    writer: Option<JoinHandle<()>>,
    readers: Arc<Mutex<Vec<rusqlite::Connection>>>,
    /// One permit per read under way (see [`READERS`]).
    reads: Arc<tokio::sync::Semaphore>,
    file: PathBuf,
    opened: Opened,
    counters: Arc<Counters>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `config.path`, creating the directory
    /// if missing. Blocking: it reads the database's conversation table
    /// (call it at start-up, or inside `spawn_blocking`).
    ///
    /// A file named [`DB_FILE`] that is not a comet store (another program's
    /// file, a corrupt header, a log without its database) is refused with
    /// an [`OpenError`] naming it, and left as it was.
    pub fn open(config: EmbeddedConfig) -> Result<Self, OpenError> {
        let started = Instant::now();
        let file = config.path.join(DB_FILE);
        db::prepare_dir(&config.path, &file)?;
        let (conn, state, created) = db::open_writer(&file)?;
        let counters = Arc::new(Counters::default());
        let reader = db::open_reader(&file).map_err(|e| OpenError {
            file: file.clone(),
            problem: format!("cannot open a read connection: {e}"),
        })?;
        let opened = Opened {
            file: file.clone(),
            created,
            conversations: state.convs.len() as u64,
            messages: state.convs.values().map(|c| c.count).sum(),
            inbox_messages: state.inbox_messages,
            elapsed: Duration::ZERO,
        };
        let (tx, rx) = mpsc::channel();
        let writer = writer::Writer::new(conn, state, &config, counters.clone());
        let handle = std::thread::Builder::new()
            .name("comet-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OpenError {
                file: file.clone(),
                problem: format!("cannot start the writer thread: {e}"),
            })?;
        let mut store = EmbeddedStore {
            tx: Some(tx),
            writer: Some(handle),
            readers: Arc::new(Mutex::new(vec![reader])),
            reads: Arc::new(tokio::sync::Semaphore::new(READERS)),
            file,
            opened,
            counters,
        };
        store.opened.elapsed = started.elapsed();
        Ok(store)
    }

    /// What opening found, and how long it took.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// The database file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The store's counters so far.
    pub fn stats(&self) -> EmbeddedStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EmbeddedStats {
            appended: get(&c.appended),
            commits: get(&c.commits),
            fsyncs: get(&c.fsyncs),
            failed_commits: get(&c.failed_commits),
            history_dropped: get(&c.history_dropped),
            inbox_dropped: get(&c.inbox_dropped),
        }
    }

    /// Sends `cmd` (built around a reply sender) to the writer and waits for
    /// its answer.
    async fn call<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Cmd,
    ) -> Result<T, BoxError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError("embedded store writer stopped".into());
        self.tx
            .as_ref()
            .ok_or_else(stopped)?
            .send(cmd(reply))
            .map_err(|_| stopped())?;
        Ok(answer.await.map_err(|_| stopped())??)
    }

    /// Runs `read` on a pooled read connection on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&mut rusqlite::Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, BoxError> {
        let readers = self.readers.clone();
        let file = self.file.clone();
        // Held by the blocking task itself: a caller that gives up (a
        // timeout) does not free a place while its read still runs.
        let permit = self
            .reads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError("embedded store closed".into()))?;
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let pooled = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => db::open_reader(&file).map_err(|e| StoreError::db("read", &e))?,
            };
            let out = read(&mut conn).map_err(|e| StoreError::db("read", &e));
            let mut pool = readers.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < READERS {
                pool.push(conn);
            }
            out
        });
        match task.await {
            Ok(out) => Ok(out?),
            Err(e) => Err(StoreError(format!("embedded store read task failed: {e}")).into()),
        }
    }

    #[cfg(test)]
    async fn exec_on_writer(&self, sql: &str) -> Result<(), BoxError> {
        let sql = sql.to_owned();
        self.call(|reply| Cmd::Exec(sql, reply)).await
    }
}

impl Drop for EmbeddedStore {
    /// Stops the writer after the writes already sent, fsyncs, and closes
    /// the database.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[async_trait]
impl MessageStore for EmbeddedStore {
    async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError> {
        self.call(|reply| Cmd::Append(draft, reply)).await
    }

    async fn history(
        &self,
        conversation: Conversation,
        after: i64,
        limit: usize,
    ) -> Result<History, BoxError> {
        self.read(move |conn| db::history(conn, conversation, after, limit))
            .await
    }

    async fn push_offline(&self, mid: Mid, msg: Arc<Message>) -> Result<(), BoxError> {
        self.call(|reply| Cmd::PushOffline(mid, msg, reply)).await
    }

    async fn offline(&self, mid: Mid, limit: usize) -> Result<Vec<Offline>, BoxError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(move |conn| db::offline(conn, mid, limit)).await
    }

    async fn remove_offline(&self, mid: Mid, through: u64) -> Result<(), BoxError> {
        self.call(|reply| Cmd::RemoveOffline(mid, through, reply))
            .await
    }
}

#[cfg(test)]
mod tests;
