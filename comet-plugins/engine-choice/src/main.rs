//! Measures SQLite (rusqlite, WAL), redb and fjall for comet's embedded
//! store: 100-byte messages keyed by (conversation, chatId).
//!
//! ```text
//! cargo run --release -- [DIR] [MESSAGES] [ENGINES]
//! # defaults: a temp dir, 1,000,000, all; ENGINES: e.g. "sqlite (1,fjall"
//! ```
//!
//! For each engine: bulk append in batches of 1,000 (write reaches the OS,
//! no fsync), disk bytes per message, reopen time, range reads of 100
//! messages, and 100 writer threads feeding one committer thread that
//! commits everything pending as one batch (group commit), with and without
//! an fsync per batch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// 100 pseudo-random bytes, different for every message: repeated or
/// text-like messages would flatter fjall's compression.
fn msg(conv: u64, chat: u64) -> [u8; 100] {
    let mut m = [0u8; 100];
    let mut x = (conv << 32 ^ chat).wrapping_mul(0x9E3779B97F4A7C15) | 1;
    for b in m.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    m
}
const CONVS: u64 = 1000;
const BATCH: u64 = 1000;
const WRITERS: usize = 100;
const GROUP_SECS: u64 = 3;

fn key(conv: u64, chat: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&(conv as u32).to_be_bytes());
    k[4..].copy_from_slice(&chat.to_be_bytes());
    k
}

/// The stored value: sender, recipient, op, message (as the store keeps it).
fn value(conv: u64, chat: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(109);
    v.extend_from_slice(&1i32.to_be_bytes());
    v.extend_from_slice(&2i32.to_be_bytes());
    v.push(18);
    v.extend_from_slice(&msg(conv, chat));
    v
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        total += if md.is_dir() { dir_bytes(&e.path()) } else { md.len() };
    }
    total
}

trait Engine: Send + 'static {
    /// Appends `items` (conv, chat) in one batch; `sync` = fsync before returning.
    fn commit(&mut self, items: &[(u64, u64)], sync: bool);
    /// Reads up to 100 messages of `conv` after `after`; returns how many.
    fn range(&self, conv: u64, after: u64) -> usize;
}

// ---------- SQLite ----------
struct Sqlite {
    conn: rusqlite::Connection,
    reader: rusqlite::Connection,
}

impl Sqlite {
    fn open(dir: &Path, cache_kib: i64, page_size: u32) -> Self {
        let file = dir.join("store.db");
        let conn = rusqlite::Connection::open(&file).unwrap();
        conn.pragma_update(None, "page_size", page_size).unwrap();
        conn.pragma_update(None, "cache_size", -cache_kib).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS messages(conv INTEGER, chat INTEGER, sender INTEGER,
               recipient INTEGER, op INTEGER, msg BLOB, PRIMARY KEY(conv, chat)) WITHOUT ROWID;",
        )
        .unwrap();
        // Touch the table, as the store does at open.
        let _: i64 = conn
            .query_row("SELECT count(*) FROM (SELECT 1 FROM messages LIMIT 1)", [], |r| r.get(0))
            .unwrap();
        let reader = rusqlite::Connection::open(&file).unwrap();
        Sqlite { conn, reader }
    }
}

impl Engine for Sqlite {
    fn commit(&mut self, items: &[(u64, u64)], sync: bool) {
        self.conn
            .pragma_update(None, "synchronous", if sync { "FULL" } else { "NORMAL" })
            .unwrap();
        let tx = self.conn.transaction().unwrap();
        {
            let mut st = tx
                .prepare_cached("INSERT INTO messages VALUES (?1, ?2, 1, 2, 18, ?3)")
                .unwrap();
            for &(c, n) in items {
                st.execute(rusqlite::params![c as i64, n as i64, &msg(c, n)[..]]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    fn range(&self, conv: u64, after: u64) -> usize {
        let mut st = self
            .reader
            .prepare_cached(
                "SELECT chat, sender, recipient, op, msg FROM messages
                 WHERE conv = ?1 AND chat > ?2 ORDER BY chat LIMIT 100",
            )
            .unwrap();
        let mut rows = st.query(rusqlite::params![conv as i64, after as i64]).unwrap();
        let mut n = 0;
        while let Some(r) = rows.next().unwrap() {
            let m: Vec<u8> = r.get(4).unwrap();
            n += usize::from(!m.is_empty());
        }
        n
    }
}

// ---------- redb ----------
const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("messages");

struct Redb {
    db: redb::Database,
}

impl Redb {
    fn open(dir: &Path) -> Self {
        let db = redb::Database::create(dir.join("store.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(TABLE).unwrap();
        tx.commit().unwrap();
        Redb { db }
    }
}

impl Engine for Redb {
    fn commit(&mut self, items: &[(u64, u64)], sync: bool) {
        let mut tx = self.db.begin_write().unwrap();
        tx.set_durability(if sync { redb::Durability::Immediate } else { redb::Durability::None });
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for &(c, n) in items {
                t.insert(&key(c, n)[..], &value(c, n)[..]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    fn range(&self, conv: u64, after: u64) -> usize {
        let tx = self.db.begin_read().unwrap();
        let t = tx.open_table(TABLE).unwrap();
        let (lo, hi) = (key(conv, after + 1), key(conv + 1, 0));
        t.range(&lo[..]..&hi[..])
            .unwrap()
            .take(100)
            .map(|r| usize::from(!r.unwrap().1.value().is_empty()))
            .sum()
    }
}

// ---------- fjall ----------
struct Fjall {
    ks: fjall::Keyspace,
    part: fjall::PartitionHandle,
}

impl Fjall {
    fn open(dir: &Path) -> Self {
        let ks = fjall::Config::new(dir.join("fjall")).open().unwrap();
        let part = ks
            .open_partition("messages", fjall::PartitionCreateOptions::default())
            .unwrap();
        Fjall { ks, part }
    }
}

impl Engine for Fjall {
    fn commit(&mut self, items: &[(u64, u64)], sync: bool) {
        let mut b = self.ks.batch().durability(Some(if sync {
            fjall::PersistMode::SyncData
        } else {
            fjall::PersistMode::Buffer
        }));
        for &(c, n) in items {
            b.insert(&self.part, key(c, n), value(c, n));
        }
        b.commit().unwrap();
    }
    fn range(&self, conv: u64, after: u64) -> usize {
        let (lo, hi) = (key(conv, after + 1), key(conv + 1, 0));
        self.part
            .range(lo..hi)
            .take(100)
            .map(|r| usize::from(!r.unwrap().1.is_empty()))
            .sum()
    }
}

fn bulk(e: &mut dyn Engine, n: u64) -> f64 {
    let t = Instant::now();
    let mut items = Vec::with_capacity(BATCH as usize);
    let mut i = 0;
    while i < n {
        items.clear();
        for j in i..(i + BATCH).min(n) {
            items.push((j % CONVS, j / CONVS + 1));
        }
        e.commit(&items, false);
        i += BATCH;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn reads(e: &dyn Engine, n: u64) -> f64 {
    let per_conv = n / CONVS;
    let t = Instant::now();
    let mut got = 0usize;
    let mut x = 12345u64;
    while t.elapsed() < Duration::from_secs(2) {
        for _ in 0..100 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let conv = (x >> 33) % CONVS;
            let after = (x >> 13) % per_conv.saturating_sub(100).max(1);
            got += e.range(conv, after);
        }
    }
    got as f64 / t.elapsed().as_secs_f64()
}

/// 100 writer threads each send one message and wait for its commit; one
/// committer drains everything pending into one batch.
fn group(mut e: Box<dyn Engine>, sync: bool, start_chat: u64) -> (f64, f64) {
    type Req = (u64, mpsc::SyncSender<()>);
    let (tx, rx) = mpsc::channel::<Req>();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let committer = std::thread::spawn(move || {
        let mut commits = 0u64;
        let mut chat = start_chat;
        let mut items = Vec::new();
        let mut replies = Vec::new();
        while let Ok(first) = rx.recv() {
            items.clear();
            replies.clear();
            let mut push = |(c, r): Req| {
                chat += 1;
                // Random conversations among CONVS, as many pairs talking.
                let conv = (chat.wrapping_mul(0x9E3779B97F4A7C15) >> 40) % CONVS;
                items.push((conv + c, chat));
                replies.push(r);
            };
            push(first);
            while let Ok(more) = rx.try_recv() {
                push(more);
            }
            e.commit(&items, sync);
            commits += 1;
            for r in replies.drain(..) {
                let _ = r.send(());
            }
        }
        commits
    });
    let t = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (tx, stop, acked) = (tx.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let (rtx, rrx) = mpsc::sync_channel(1);
                while !stop.load(Ordering::Relaxed) {
                    tx.send((0, rtx.clone())).unwrap();
                    rrx.recv().unwrap();
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    drop(tx);
    std::thread::sleep(Duration::from_secs(GROUP_SECS));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let commits = committer.join().unwrap();
    let a = acked.load(Ordering::Relaxed) as f64;
    (a / secs, a / commits as f64)
}

fn run(name: &str, root: &Path, n: u64, open: fn(&Path) -> Box<dyn Engine>) {
    let dir = root.join(name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut e = open(&dir);
    let rate = bulk(e.as_mut(), n);
    drop(e);
    let bytes = dir_bytes(&dir);
    let t = Instant::now();
    let e = open(&dir);
    let open_ms = t.elapsed().as_secs_f64() * 1000.0;
    let read_rate = reads(e.as_ref(), n);
    let (buf_rate, buf_batch) = group(e, false, 5_000_000);
    let e = open(&dir);
    let (sync_rate, sync_batch) = group(e, true, 10_000_000);
    println!(
        "| {name} | {rate:.0} | {:.0} | {open_ms:.0} | {read_rate:.0} | {buf_rate:.0} (batch {buf_batch:.1}) | {sync_rate:.0} (batch {sync_batch:.1}) |",
        bytes as f64 / n as f64
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let root = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("comet-engine-choice"));
    let n: u64 = args.next().map_or(1_000_000, |s| s.parse().unwrap());
    println!("{n} messages of 100 bytes in {CONVS} conversations, under {}", root.display());
    println!("| engine | bulk appends/s (batches of {BATCH}, no fsync) | disk bytes/msg | reopen ms | range-read msgs/s | {WRITERS} writers, no fsync: acks/s | {WRITERS} writers, fsync per batch: acks/s |");
    println!("|---|---|---|---|---|---|---|");
    let only = args.next().unwrap_or_default();
    let engines: [(&str, fn(&Path) -> Box<dyn Engine>); 5] = [
        ("sqlite (4 KiB pages, 2 MiB cache)", |d| Box::new(Sqlite::open(d, 2048, 4096))),
        ("sqlite (4 KiB pages, 64 MiB cache)", |d| Box::new(Sqlite::open(d, 65536, 4096))),
        ("sqlite (1 KiB pages, 64 MiB cache)", |d| Box::new(Sqlite::open(d, 65536, 1024))),
        ("redb", |d| Box::new(Redb::open(d))),
        ("fjall", |d| Box::new(Fjall::open(d))),
    ];
    for (name, open) in engines {
        if only.is_empty() || only.split(',').any(|o| name.starts_with(o)) {
            run(name, &root, n, open);
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
