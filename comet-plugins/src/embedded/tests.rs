use super::*;
use bytes::Bytes;

fn draft(conversation: Conversation, from: Mid, to: i32, msg: &[u8]) -> Draft {
    let op = match conversation {
        Conversation::Group(_) => 20,
        Conversation::Direct(..) => 18,
    };
    Draft {
        conversation,
        op,
        from,
        to,
        msg: Bytes::copy_from_slice(msg),
    }
}

fn ids(history: &History) -> Vec<i64> {
    history.messages.iter().map(|m| m.chat_id()).collect()
}

fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(EmbeddedConfig::new(dir)).unwrap()
}

#[tokio::test]
async fn restart_keeps_heads_history_and_inboxes() {
    let dir = tempfile::tempdir().unwrap();
    let ab = Conversation::direct(1, 2);
    let g = Conversation::Group(100);
    {
        let store = open(dir.path());
        assert!(store.opened().created);
        for i in 0..5u8 {
            let m = store.append(draft(ab, 1, 2, &[i; 3])).await.unwrap();
            assert_eq!(m.chat_id(), i64::from(i) + 1);
        }
        let gm = store.append(draft(g, 3, 100, b"group")).await.unwrap();
        store.push_offline(7, gm).await.unwrap();
    }
    let store = open(dir.path());
    let opened = store.opened();
    assert!(!opened.created);
    assert_eq!(
        (opened.conversations, opened.messages, opened.inbox_messages),
        (2, 6, 1)
    );
    let page = store.history(ab, 2, 10).await.unwrap();
    assert_eq!(ids(&page), vec![3, 4, 5]);
    assert_eq!((page.oldest, page.head), (1, 5));
    let d = page.messages[0].delivered();
    assert_eq!((d.op, d.from, d.to, &d.msg[..]), (18, 1, 2, &[2u8; 3][..]));
    // chatIds go on from the head.
    assert_eq!(
        store.append(draft(ab, 2, 1, b"x")).await.unwrap().chat_id(),
        6
    );
    assert_eq!(
        store
            .append(draft(g, 1, 100, b"y"))
            .await
            .unwrap()
            .chat_id(),
        2
    );
    let inbox = store.offline(7, 10).await.unwrap();
    assert_eq!(inbox.len(), 1);
    let d = inbox[0].msg.delivered();
    assert_eq!(
        (d.op, d.chat_id, d.from, d.to, &d.msg[..]),
        (20, 1, 3, 100, &b"group"[..])
    );
    assert_eq!(inbox[0].msg.conversation(), g);
    // Removal is durable too, and seqs are not reused after a restart.
    let seq = inbox[0].seq;
    store.remove_offline(7, seq).await.unwrap();
    drop(store);
    let store = open(dir.path());
    assert!(store.offline(7, 10).await.unwrap().is_empty());
    let m = store.history(ab, 5, 1).await.unwrap().messages[0].clone();
    store.push_offline(7, m).await.unwrap();
    assert!(store.offline(7, 10).await.unwrap()[0].seq > seq);
}

#[tokio::test]
async fn history_count_bound_drops_oldest_and_keeps_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.history_limit = 3;
    let store = EmbeddedStore::open(config.clone()).unwrap();
    let ab = Conversation::direct(1, 2);
    for _ in 0..5 {
        store.append(draft(ab, 1, 2, b"m")).await.unwrap();
    }
    let page = store.history(ab, 0, 100).await.unwrap();
    assert_eq!(ids(&page), vec![3, 4, 5]);
    assert_eq!((page.oldest, page.head), (3, 5));
    assert_eq!(store.stats().history_dropped, 2);
    drop(store);
    // Nothing kept at all: the head stays, oldest is head + 1.
    config.history_limit = 0;
    let store = EmbeddedStore::open(config).unwrap();
    assert_eq!(
        store.append(draft(ab, 1, 2, b"m")).await.unwrap().chat_id(),
        6
    );
    let page = store.history(ab, 0, 100).await.unwrap();
    assert!(page.messages.is_empty());
    assert_eq!((page.oldest, page.head), (7, 6));
    assert_eq!(store.stats().history_dropped, 4);
}

#[tokio::test]
async fn history_byte_bound_drops_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.history_bytes = 25;
    let store = EmbeddedStore::open(config).unwrap();
    let g = Conversation::Group(9);
    for _ in 0..4 {
        store.append(draft(g, 1, 9, &[7; 10])).await.unwrap();
    }
    // 25 bytes hold two 10-byte messages.
    let page = store.history(g, 0, 100).await.unwrap();
    assert_eq!(ids(&page), vec![3, 4]);
    assert_eq!(page.oldest, 3);
    // A message bigger than the bound is numbered but not kept.
    assert_eq!(
        store
            .append(draft(g, 1, 9, &[1; 30]))
            .await
            .unwrap()
            .chat_id(),
        5
    );
    let page = store.history(g, 0, 100).await.unwrap();
    assert!(page.messages.is_empty());
    assert_eq!((page.oldest, page.head), (6, 5));
    assert_eq!(store.stats().history_dropped, 5);
}

#[tokio::test]
async fn inbox_bounds_drop_oldest_and_outlive_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.inbox_limit = 3;
    config.inbox_bytes = 1000;
    config.history_limit = 1;
    let store = EmbeddedStore::open(config).unwrap();
    let ab = Conversation::direct(1, 2);
    for i in 0..5u8 {
        let m = store.append(draft(ab, 1, 2, &[i])).await.unwrap();
        store.push_offline(2, m).await.unwrap();
    }
    let inbox = store.offline(2, 10).await.unwrap();
    let chat_ids: Vec<i64> = inbox.iter().map(|e| e.msg.chat_id()).collect();
    assert_eq!(chat_ids, vec![3, 4, 5], "count bound keeps the newest");
    assert!(inbox.windows(2).all(|w| w[0].seq < w[1].seq));
    // The history kept only #5; the inbox copies of #3 and #4 are intact.
    assert_eq!(ids(&store.history(ab, 0, 10).await.unwrap()), vec![5]);
    assert_eq!(&inbox[0].msg.delivered().msg[..], &[2]);
    assert_eq!(store.stats().inbox_dropped, 2);
    // Peek does not remove; removal through a seq removes up to it.
    assert_eq!(store.offline(2, 2).await.unwrap().len(), 2);
    store.remove_offline(2, inbox[1].seq).await.unwrap();
    let rest = store.offline(2, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].seq, inbox[2].seq);
}

#[tokio::test]
async fn inbox_byte_bound_drops_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.inbox_bytes = 20;
    let store = EmbeddedStore::open(config).unwrap();
    let ab = Conversation::direct(1, 2);
    for _ in 0..3 {
        let m = store.append(draft(ab, 1, 2, &[0; 8])).await.unwrap();
        store.push_offline(2, m).await.unwrap();
    }
    let inbox = store.offline(2, 10).await.unwrap();
    let chat_ids: Vec<i64> = inbox.iter().map(|e| e.msg.chat_id()).collect();
    assert_eq!(chat_ids, vec![2, 3]);
    assert_eq!(store.stats().inbox_dropped, 1);
}

#[tokio::test]
async fn a_failed_write_consumes_no_chat_id_and_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ab = Conversation::direct(1, 2);
    assert_eq!(
        store.append(draft(ab, 1, 2, b"a")).await.unwrap().chat_id(),
        1
    );
    // Cap the database at its current size: the next write that needs a
    // new page fails with SQLITE_FULL, the error a full disk gives.
    store
        .exec_on_writer("PRAGMA max_page_count = 1")
        .await
        .unwrap();
    let big = vec![9u8; 64 * 1024];
    let err = store.append(draft(ab, 1, 2, &big)).await.unwrap_err();
    assert!(err.to_string().contains("full"), "{err}");
    let new_conv = Conversation::direct(3, 4);
    assert!(store.append(draft(new_conv, 3, 4, &big)).await.is_err());
    assert_eq!(store.stats().failed_commits, 2);
    // The disk "has room again".
    store
        .exec_on_writer("PRAGMA max_page_count = 1073741823")
        .await
        .unwrap();
    assert_eq!(
        store.append(draft(ab, 1, 2, &big)).await.unwrap().chat_id(),
        2
    );
    assert_eq!(
        store
            .append(draft(new_conv, 3, 4, b"c"))
            .await
            .unwrap()
            .chat_id(),
        1
    );
    let page = store.history(ab, 0, 10).await.unwrap();
    assert_eq!(ids(&page), vec![1, 2]);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.history(ab, 0, 10).await.unwrap().head, 2);
    assert_eq!(store.history(new_conv, 0, 10).await.unwrap().head, 1);
}

#[tokio::test]
async fn an_unwritable_path_is_an_open_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let err = EmbeddedStore::open(EmbeddedConfig::new(&file)).unwrap_err();
    assert_eq!(err.file, file);
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[tokio::test]
async fn corrupt_or_foreign_files_are_refused_untouched() {
    // Garbage where the database should be.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(DB_FILE);
    let garbage: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&file, &garbage).unwrap();
    let err = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap_err();
    assert_eq!(err.file, file);
    assert!(err.to_string().contains("not a comet store"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), garbage);

    // Another program's SQLite database.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(DB_FILE);
    {
        let other = rusqlite::Connection::open(&file).unwrap();
        other
            .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let before = std::fs::read(&file).unwrap();
    let err = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap_err();
    assert!(err.to_string().contains("another program"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), before);

    // A comet store whose log was overwritten with garbage.
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let file = dir.path().join(DB_FILE);
    let wal = dir.path().join(format!("{DB_FILE}-wal"));
    std::fs::write(&wal, &garbage).unwrap();
    let db_before = std::fs::read(&file).unwrap();
    let err = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap_err();
    assert_eq!(err.file, wal);
    assert_eq!(std::fs::read(&wal).unwrap(), garbage);
    assert_eq!(std::fs::read(&file).unwrap(), db_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_mode_shares_fsyncs_between_concurrent_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.fsync = Fsync::Always;
    let store = Arc::new(EmbeddedStore::open(config).unwrap());
    let g = Conversation::Group(1);
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let store = store.clone();
            let conv = if i % 2 == 0 {
                g
            } else {
                Conversation::direct(i, i + 1)
            };
            tokio::spawn(async move { store.append(draft(conv, 1, 1, b"hello")).await })
        })
        .collect();
    let mut group_ids = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let m = t.await.unwrap().unwrap();
        if i % 2 == 0 {
            group_ids.push(m.chat_id());
        }
    }
    group_ids.sort_unstable();
    assert_eq!(group_ids, (1..=200).collect::<Vec<_>>());
    let stats = store.stats();
    assert_eq!(stats.appended, 400);
    assert_eq!(stats.fsyncs, stats.commits);
    assert!(
        stats.commits < 400,
        "400 concurrent appends took {} commits",
        stats.commits
    );
}

#[tokio::test]
async fn interval_mode_fsyncs_by_itself_and_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.fsync_interval = Duration::from_millis(10);
    let store = EmbeddedStore::open(config).unwrap();
    store
        .append(draft(Conversation::Group(1), 1, 1, b"x"))
        .await
        .unwrap();
    // Wait (bounded) for the background fsync; no timing is asserted.
    for _ in 0..500 {
        if store.stats().fsyncs > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store.stats().fsyncs >= 1);
    assert_eq!(store.stats().commits, 1);
}

#[tokio::test]
async fn unknown_conversations_and_empty_inboxes_read_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let page = store
        .history(Conversation::direct(5, 6), 0, 10)
        .await
        .unwrap();
    assert!(page.messages.is_empty());
    assert_eq!((page.oldest, page.head), (0, 0));
    assert!(store.offline(5, 10).await.unwrap().is_empty());
    store.remove_offline(5, 100).await.unwrap();
    let m = store
        .append(draft(Conversation::direct(5, 6), 5, 6, b"z"))
        .await
        .unwrap();
    assert!(store
        .history(m.conversation(), 0, 0)
        .await
        .unwrap()
        .messages
        .is_empty());
    assert_eq!(
        store.history(m.conversation(), 1, 10).await.unwrap().head,
        1
    );
}

#[test]
fn fsync_modes_parse() {
    assert_eq!("interval".parse::<Fsync>(), Ok(Fsync::Interval));
    assert_eq!("always".parse::<Fsync>(), Ok(Fsync::Always));
    assert!("sometimes".parse::<Fsync>().is_err());
    assert_eq!(Fsync::default(), Fsync::Interval);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms() {
    // One directory per store the kit asks for, kept until the end.
    let dirs = std::sync::Mutex::new(Vec::new());
    comet_core::testing::store_conformance(|limits| {
        let dir = tempfile::tempdir().unwrap();
        let mut config = EmbeddedConfig::new(dir.path());
        config.history_limit = limits.history;
        config.inbox_limit = limits.inbox;
        dirs.lock().unwrap().push(dir);
        async move { Arc::new(EmbeddedStore::open(config).unwrap()) }
    })
    .await;
}
