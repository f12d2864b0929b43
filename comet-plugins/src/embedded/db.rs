//! The database file: checks before opening, the schema, and the reads.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use comet_core::store::{History, Offline};
use comet_core::{op, Conversation, Draft, Message, Mid};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::OpenError;

/// SQLite's `application_id` of a comet store: "comt".
pub(super) const APPLICATION_ID: i32 = 0x636f_6d74;
/// The schema's version (`user_version`).
const FORMAT: i32 = 1;
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

const SCHEMA: &str = "
CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('next_seq', 1), ('synced', 0);
CREATE TABLE conversations(
    id INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    a INTEGER NOT NULL,
    b INTEGER NOT NULL,
    head INTEGER NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    UNIQUE(kind, a, b)
);
CREATE TABLE messages(
    conv INTEGER NOT NULL,
    chat_id INTEGER NOT NULL,
    sender INTEGER NOT NULL,
    recipient INTEGER NOT NULL,
    msg BLOB NOT NULL,
    PRIMARY KEY(conv, chat_id)
) WITHOUT ROWID;
CREATE TABLE inbox(
    mid INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    op INTEGER NOT NULL,
    chat_id INTEGER NOT NULL,
    sender INTEGER NOT NULL,
    recipient INTEGER NOT NULL,
    msg BLOB NOT NULL,
    PRIMARY KEY(mid, seq)
) WITHOUT ROWID;
";

/// A conversation as the database keys it: (kind, a, b).
pub(super) fn conv_key(c: Conversation) -> (u32, i64, i64) {
    match c {
        Conversation::Direct(a, b) => (op::SEND_TO_USER, a.into(), b.into()),
        Conversation::Group(g) => (op::SEND_TO_GROUP, g.into(), 0),
    }
}

/// The writer's view of one conversation.
#[derive(Clone, Copy, Debug)]
pub(super) struct ConvState {
    pub(super) id: i64,
    pub(super) head: i64,
    /// Messages kept: chatIds `head - count + 1 ..= head`.
    pub(super) count: u64,
    pub(super) bytes: u64,
}

/// What the writer starts from.
#[derive(Debug)]
pub(super) struct State {
    pub(super) convs: HashMap<Conversation, ConvState>,
    pub(super) next_seq: u64,
    pub(super) inbox_messages: u64,
}

fn err(file: &Path, problem: impl Into<String>) -> OpenError {
    OpenError {
        file: file.into(),
        problem: problem.into(),
    }
}

/// Creates the directory and refuses files that are not a comet store,
/// before SQLite opens (and could write to) anything.
pub(super) fn prepare_dir(dir: &Path, file: &Path) -> Result<(), OpenError> {
    if dir.exists() && !dir.is_dir() {
        return Err(err(dir, "is not a directory"));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| err(dir, format!("cannot create the store directory: {e}")))?;
    let db_len = match std::fs::metadata(file) {
        Ok(md) if !md.is_file() => return Err(err(file, "is not a regular file")),
        Ok(md) => md.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(err(file, format!("cannot read: {e}"))),
    };
    if db_len > 0 {
        let mut header = [0u8; 100];
        let read = std::fs::File::open(file).and_then(|mut f| f.read_exact(&mut header));
        if read.is_err() || &header[..16] != SQLITE_MAGIC {
            return Err(err(
                file,
                "is not a comet store (not an SQLite database, or a corrupt one); \
                 it was left untouched: move it away or choose another path",
            ));
        }
        let app = i32::from_be_bytes([header[68], header[69], header[70], header[71]]);
        // 0: maybe a store whose creation was cut short (it creates its
        // schema and sets the id in one transaction); open_writer accepts
        // it only if it has no tables at all.
        if app != APPLICATION_ID && app != 0 {
            return Err(err(
                file,
                format!(
                    "is an SQLite database of another program (application_id {app:#x}), \
                     not a comet store; it was left untouched"
                ),
            ));
        }
    }
    let wal = file.with_file_name(format!("{}-wal", super::DB_FILE));
    if let Ok(md) = std::fs::metadata(&wal) {
        if md.len() > 0 {
            if db_len == 0 {
                return Err(err(
                    &wal,
                    "is a write-ahead log without its database; it was left untouched",
                ));
            }
            let mut magic = [0u8; 4];
            let read = std::fs::File::open(&wal).and_then(|mut f| f.read_exact(&mut magic));
            let magic = u32::from_be_bytes(magic);
            if read.is_err() || (magic != 0x377f_0682 && magic != 0x377f_0683) {
                return Err(err(
                    &wal,
                    "is not an SQLite write-ahead log (corrupt or foreign); it was left untouched",
                ));
            }
        }
    }
    Ok(())
}

fn tune(conn: &Connection) -> rusqlite::Result<()> {
    // 64 MiB of page cache: appends to many conversations touch many pages.
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(())
}

/// Opens the writer's connection: creates the schema in a new file, checks
/// an existing one, and loads the conversations.
pub(super) fn open_writer(file: &Path) -> Result<(Connection, State, bool), OpenError> {
    let fail = |what: &str, e: rusqlite::Error| err(file, format!("{what}: {e}"));
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| fail("cannot open", e))?;
    let app: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(|e| fail("cannot read the header", e))?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(|e| fail("cannot read the schema", e))?;
    let created = app == 0 && tables == 0;
    if created {
        // In a rollback journal, so the id is in the file itself before
        // the log exists (the check before opening reads it there).
        conn.execute_batch(&format!(
            "PRAGMA page_size=1024;
             BEGIN IMMEDIATE;
             PRAGMA application_id={APPLICATION_ID};
             PRAGMA user_version={FORMAT};
             {SCHEMA}
             COMMIT;
             PRAGMA journal_mode=WAL;"
        ))
        .map_err(|e| fail("cannot create the store", e))?;
    } else if app != APPLICATION_ID {
        return Err(err(
            file,
            format!(
                "is an SQLite database of another program (application_id {app:#x}, \
                 {tables} schema entries), not a comet store; it was left untouched"
            ),
        ));
    } else {
        let format: i32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| fail("cannot read the format", e))?;
        if format != FORMAT {
            return Err(err(
                file,
                format!("has store format {format}, this build reads format {FORMAT}"),
            ));
        }
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| fail("cannot open the write-ahead log", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(err(file, format!("cannot use WAL mode (got {mode})")));
        }
    }
    tune(&conn).map_err(|e| fail("cannot configure", e))?;
    let state = load(&conn).map_err(|e| fail("cannot read the store (corrupt?)", e))?;
    Ok((conn, state, created))
}

fn load(conn: &Connection) -> rusqlite::Result<State> {
    let mut convs = HashMap::new();
    let mut st = conn.prepare("SELECT id, kind, a, b, head, count, bytes FROM conversations")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let (kind, a, b): (u32, i32, i32) = (r.get(1)?, r.get(2)?, r.get(3)?);
        let conv = if kind == op::SEND_TO_GROUP {
            Conversation::Group(a)
        } else {
            Conversation::Direct(a, b)
        };
        let state = ConvState {
            id: r.get(0)?,
            head: r.get(4)?,
            count: r.get(5)?,
            bytes: r.get(6)?,
        };
        convs.insert(conv, state);
    }
    let next_seq: u64 = conn.query_row(
        "SELECT max((SELECT value FROM meta WHERE key = 'next_seq'),
                    (SELECT coalesce(max(seq), 0) + 1 FROM inbox))",
        [],
        |r| r.get(0),
    )?;
    let inbox_messages: u64 = conn.query_row("SELECT count(*) FROM inbox", [], |r| r.get(0))?;
    Ok(State {
        convs,
        next_seq,
        inbox_messages,
    })
}

/// A read connection (the database exists: the writer created it).
pub(super) fn open_reader(file: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "cache_size", -16384)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

fn message(
    conversation: Conversation,
    op: u32,
    chat_id: i64,
    from: Mid,
    to: i32,
    msg: &[u8],
) -> Arc<Message> {
    Draft {
        conversation,
        op,
        from,
        to,
        msg: Bytes::copy_from_slice(msg),
    }
    .into_message(chat_id)
}

pub(super) fn history(
    conn: &mut Connection,
    conversation: Conversation,
    after: i64,
    limit: usize,
) -> rusqlite::Result<History> {
    // One read transaction: the page and the bounds come from one snapshot.
    let tx = conn.transaction()?;
    let (kind, a, b) = conv_key(conversation);
    let found: Option<(i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT id, head, count FROM conversations WHERE kind = ?1 AND a = ?2 AND b = ?3",
        )?
        .query_row(params![kind, a, b], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((id, head, count)) = found else {
        return Ok(History::default());
    };
    let oldest = if head == 0 { 0 } else { head - count + 1 };
    let mut messages = Vec::new();
    if limit > 0 && count > 0 && after < head {
        let op = if kind == op::SEND_TO_GROUP {
            op::SEND_TO_GROUP
        } else {
            op::SEND_TO_USER
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        messages.reserve(limit.min(count).min(head - after) as usize);
        let mut st = tx.prepare_cached(
            "SELECT chat_id, sender, recipient, msg FROM messages
             WHERE conv = ?1 AND chat_id > ?2 ORDER BY chat_id LIMIT ?3",
        )?;
        let mut rows = st.query(params![id, after, limit])?;
        while let Some(r) = rows.next()? {
            let blob = r.get_ref(3)?.as_blob()?;
            messages.push(message(
                conversation,
                op,
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                blob,
            ));
        }
    }
    Ok(History {
        messages,
        oldest,
        head,
    })
}

pub(super) fn offline(
    conn: &mut Connection,
    mid: Mid,
    limit: usize,
) -> rusqlite::Result<Vec<Offline>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut st = conn.prepare_cached(
        "SELECT seq, op, chat_id, sender, recipient, msg FROM inbox
         WHERE mid = ?1 ORDER BY seq LIMIT ?2",
    )?;
    let mut rows = st.query(params![mid, limit])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let (op, from, to): (u32, Mid, i32) = (r.get(1)?, r.get(3)?, r.get(4)?);
        let conversation = if op == op::SEND_TO_GROUP {
            Conversation::Group(to)
        } else {
            Conversation::direct(from, to)
        };
        let blob = r.get_ref(5)?.as_blob()?;
        out.push(Offline {
            seq: r.get(0)?,
            msg: message(conversation, op, r.get(2)?, from, to, blob),
        });
    }
    Ok(out)
}
