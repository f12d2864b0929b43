//! Cluster mode on Redis (cargo feature `redis`): many comet nodes behind a
//! load balancer behave as one server.
//!
//! [`RedisCluster`] holds one multiplexed connection to Redis
//! ([`redis::aio::ConnectionManager`]: every call of the node is pipelined
//! through it, and it reconnects by itself) and hands out the three parts a
//! node plugs into its [`CometBuilder`](comet_core::CometBuilder):
//!
//! - [`RedisStore`], the shared [`MessageStore`]: capped history per
//!   conversation (a stream), offline inboxes (sorted sets);
//! - [`RedisGroups`], the shared [`GroupDirectory`], with join and leave;
//! - [`RedisBroker`], the [`Broker`]: one Lua script call per send checks
//!   membership (a refused op 20 consumes no chatId), assigns the chatId
//!   (`INCR`), appends to the capped history (`XADD … MAXLEN`), and routes.
//!   A 1:1 message: `PUBLISH` to each node that holds its recipient or
//!   another session of its sender (the sending node included, if it holds
//!   one besides the sending connection: it delivers its own message from
//!   its feed, so every node delivers a conversation in the script's
//!   order), or into the inbox of a recipient online nowhere. A
//!   group message: one `PUBLISH` on the channel every node reads, whatever
//!   the group's size; each node delivers it to its own sessions of the
//!   members, from a membership cache that joins and leaves keep in step
//!   (they publish on the same channel, so every node sees them in order
//!   with the messages), loaded on a group's first message and forgotten
//!   when the feed is lost. A group message is kept once, in the group's
//!   history; a member who was offline everywhere catches up from it at
//!   login, from the chatId it had read when it left.
//!
//! Presence (which nodes hold which mids) lives in Redis next to a
//! heartbeat key per node that expires: a dead node's entries are ignored
//! and dropped, and its users' messages go to inboxes and group catch-up.
//! A node's entries also count as gone as soon as nobody listens on its
//! channel (`PUBLISH` reaches no subscriber, `PUBSUB NUMSUB` is 0).
//!
//! Login neither misses nor duplicates: the node is subscribed to its
//! channel before it accepts any login, and the session is registered
//! locally before one script, atomic with every send script, adds the node
//! to the mid's presence and (if the mid was online nowhere) copies the
//! group catch-up into its inbox. A send ordered before that script is in
//! the inbox or the catch-up; one ordered after it is published to the node,
//! which already holds the session. No chatId can be in both, so there is
//! nothing to drop. After a node crash (no logout ran), a user's group
//! catch-up restarts at its last login and may repeat messages it had
//! already received live: duplicates by chatId, never losses.
//!
//! Faults: a node whose feed (pub/sub connection) drops closes all its
//! sessions (their clients reconnect and sync with op 22) and refuses logins
//! until it has subscribed again. A node that falls behind its feed reads
//! no more than [`RedisOptions::feed_budget`] ahead of delivering; Redis's
//! limit for slow subscribers then drops the connection, and the node
//! resyncs its sessions the same way. While Redis is unreachable, sends fail
//! (ret -1) and logins are refused with a reason; both recover by themselves.
//! Scripts a restarted Redis has forgotten are loaded again (`NOSCRIPT`).
//!
//! ```no_run
//! # async fn run() -> Result<(), comet_core::BoxError> {
//! use comet_plugins::redis::{RedisCluster, RedisOptions};
//! use std::sync::Arc;
//!
//! let cluster = RedisCluster::connect(RedisOptions::new("redis://127.0.0.1:6379/", "node-a")).await?;
//! cluster.groups().set_members(100, [1, 2, 3]).await?;
//! let comet = comet_core::Comet::builder()
//!     .store(cluster.store())
//!     .groups(cluster.groups())
//!     .broker({
//!         let cluster = cluster.clone();
//!         move |registry| cluster.broker(registry)
//!     })
//!     .build()?;
//! # let _ = comet; Ok(()) }
//! ```

mod scripts;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use comet_core::broker::{Broker, BrokerError, NodeStatus};
use comet_core::payload::Delivered;
use comet_core::store::{Draft, History, MessageStore, Offline};
use comet_core::{
    async_trait, BoxError, ConnId, Conversation, Delivery, GroupDirectory, GroupId,
    GroupMembership, Members, Message, Mid, Registry,
};
use futures_util::{FutureExt as _, StreamExt as _};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

/// How to reach Redis and who this node is.
///
/// Its `Debug` form shows the URL [redacted](Self::redacted_url).
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisOptions {
    /// `redis://host:port/db`, or `redis://user:password@host:port/db` for
    /// a Redis that asks for a password (`requirepass`, or an ACL user):
    /// every connection of the node authenticates with it. `rediss://…`:
    /// over TLS, checking Redis's certificate against [`tls_ca`](Self::tls_ca)
    /// or the system's root certificates.
    pub url: String,
    /// This node's id, unique in the cluster (it names its feed channel).
    pub node_id: String,
    /// Prefix of every key and channel, so several clusters (or tests) can
    /// share one Redis. Default `comet:`.
    pub prefix: String,
    /// Messages of history kept per conversation (default 10,000).
    pub history: usize,
    /// Messages kept per offline inbox (default 1,000); also the most a
    /// group catch-up copies per group at login.
    pub inbox: usize,
    /// How long a node's presence outlives its last heartbeat (default
    /// 10 s, at least 300 ms; heartbeats go every third of it): how soon
    /// the cluster counts a node that died without a word as gone, its
    /// users' messages then going to their inboxes.
    pub node_ttl: Duration,
    /// Bound on connecting to Redis and on each answer (default 2 s).
    pub timeout: Duration,
    /// Most bytes the node reads from its feed (its pub/sub connection)
    /// ahead of delivering them (default 16 MiB, at least 16 KiB). A node
    /// that falls further behind stops reading; Redis holds the rest up to its
    /// `client-output-buffer-limit pubsub`, then drops the connection, and
    /// the node closes its sessions so that they resync.
    pub feed_budget: u64,
    /// Root certificates (PEM) that a `rediss://` Redis's certificate must
    /// chain to, for a private CA; `None` (the default): the system's.
    pub tls_ca: Option<Vec<u8>>,
    /// This node's certificate chain and private key (PEM), for a
    /// `rediss://` Redis that asks clients for a certificate
    /// (`tls-auth-clients yes`, Redis's default with TLS on).
    pub tls_client: Option<(Vec<u8>, Vec<u8>)>,
}

impl RedisOptions {
    /// Options with the defaults, for `url` and `node_id`.
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> Self {
        RedisOptions {
            url: url.into(),
            node_id: node_id.into(),
            prefix: "comet:".into(),
            history: 10_000,
            inbox: 1_000,
            node_ttl: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            feed_budget: FEED_BUDGET,
            tls_ca: None,
            tls_client: None,
        }
    }

    /// With `prefix` for keys and channels.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// With history and inbox bounds.
    pub fn limits(mut self, history: usize, inbox: usize) -> Self {
        self.history = history;
        self.inbox = inbox;
        self
    }

    /// With `ttl` as the presence lifetime after a node's last heartbeat.
    pub fn node_ttl(mut self, ttl: Duration) -> Self {
        self.node_ttl = ttl;
        self
    }

    /// With `bytes` as the most the node reads from its feed ahead of
    /// delivering it (see [`feed_budget`](Self::feed_budget)).
    pub fn feed_budget(mut self, bytes: u64) -> Self {
        self.feed_budget = bytes;
        self
    }

    /// With `pem` as the root certificates a `rediss://` Redis's
    /// certificate must chain to (see [`tls_ca`](Self::tls_ca)).
    pub fn tls_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(pem.into());
        self
    }

    /// With `cert_chain` and `key` (PEM) as this node's certificate for a
    /// `rediss://` Redis that asks for one (see
    /// [`tls_client`](Self::tls_client)).
    pub fn tls_client(mut self, cert_chain: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.tls_client = Some((cert_chain.into(), key.into()));
        self
    }

    /// [`url`](Self::url) with its password, if any, replaced by `***`: the
    /// form to log or show.
    ///
    /// ```
    /// use comet_plugins::redis::RedisOptions;
    ///
    /// let opts = RedisOptions::new("redis://comet:s3cret@10.0.0.5:6379/0", "node-1");
    /// assert_eq!(opts.redacted_url(), "redis://comet:***@10.0.0.5:6379/0");
    /// ```
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &self.redacted_url())
            .field("node_id", &self.node_id)
            .field("prefix", &self.prefix)
            .field("history", &self.history)
            .field("inbox", &self.inbox)
            .field("node_ttl", &self.node_ttl)
            .field("timeout", &self.timeout)
            .field("feed_budget", &self.feed_budget)
            .field("tls_ca", &self.tls_ca.as_ref().map(|pem| pem.len()))
            .field("tls_client", &self.tls_client.as_ref().map(|_| "…"))
            .finish()
    }
}

/// The feed connection's TLS, as for the connections redis-rs opens
/// itself: Redis's certificate must chain to `ca` (PEM) or, without it, to
/// the system's root certificates; `client` (certificate chain and key,
/// PEM) is presented when Redis asks for one.
fn tls_connector(
    ca: Option<&[u8]>,
    client: Option<(&[u8], &[u8])>,
) -> Result<tokio_rustls::TlsConnector, BoxError> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert.map_err(|e| format!("tls_ca: {e}"))?)?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        return Err(match ca {
            Some(_) => "tls_ca holds no certificate".into(),
            None => {
                "rediss://: no root certificates found on this system; give the CA (tls_ca)".into()
            }
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client {
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("tls client certificate: {e}"))?;
            let key =
                PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls client key: {e}"))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// `url` with the password of its user info replaced by `***`
/// (`scheme://user:password@host` or `scheme://:password@host`). The user
/// info ends at the last `@`, wherever it is: a password with an unescaped
/// `/` or `@` in it is hidden too, never half shown.
fn redact_url(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[start..];
    match rest.rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _password)) => {
                format!("{}{user}:***{}", &url[..start], &rest[at..])
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

struct Scripts {
    send: Script,
    login: Script,
    logout: Script,
    reset_node: Script,
    history: Script,
    push: Script,
    join: Script,
    leave: Script,
    load_group: Script,
    nodes_of: Script,
    heartbeat: Script,
    nodes: Script,
}

struct Inner {
    opts: RedisOptions,
    /// This process's claim on its node id (see `scripts::CLAIM`).
    token: String,
    claim: Script,
    client: redis::Client,
    /// The feed connection's TLS, for a `rediss://` URL.
    feed_tls: Option<tokio_rustls::TlsConnector>,
    con: ConnectionManager,
    scripts: Scripts,
}

impl Inner {
    fn con(&self) -> ConnectionManager {
        self.con.clone()
    }

    /// One call of the send script: the chatId (negative: refused, not a
    /// member). `route` publishes to the nodes holding recipients (and
    /// fills inboxes); without it the message is only stored. `except` is
    /// the sending connection (0: none); `echo_here`: this node holds a
    /// session of the sender other than `except`, so the sender's copy is
    /// published here too.
    async fn send_script(
        &self,
        draft: &Draft,
        route: Route,
        except: ConnId,
        echo_here: bool,
    ) -> redis::RedisResult<i64> {
        let o = &self.opts;
        self.scripts
            .send
            .arg(&o.prefix)
            .arg(draft.op)
            .arg(draft.from)
            .arg(draft.to)
            .arg(&draft.msg[..])
            .arg(conv_key(draft.conversation))
            .arg(o.history)
            .arg(o.inbox)
            .arg(route as i32)
            .arg(&o.node_id)
            .arg(except)
            .arg(i32::from(echo_here))
            .invoke_async(&mut self.con())
            .await
    }
}

/// What the send script does after storing (its `route` argument).
#[derive(Clone, Copy)]
enum Route {
    /// Nothing: `MessageStore::append`.
    StoreOnly = 0,
    /// Checks an op 20 sender's membership, then routes.
    Checked = 1,
    /// Routes without the membership check (a trusted system send).
    Trusted = 2,
}

/// One node's connection to the cluster's Redis; cheap to clone. See the
/// [module docs](self).
#[derive(Clone)]
pub struct RedisCluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("node_id", &self.inner.opts.node_id)
            .field("prefix", &self.inner.opts.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisCluster {
    /// Connects to Redis (failing if it cannot be reached now; later
    /// outages are recovered from by themselves, and failing if a live
    /// node, subscribed and heartbeating, already has this node id), and
    /// logs a warning for
    /// each Redis setting that could lose acknowledged sends or let a slow
    /// node's backlog grow without bound (`maxmemory-policy`, `appendonly`,
    /// the pubsub `client-output-buffer-limit`: docs/CLUSTER.md).
    pub async fn connect(opts: RedisOptions) -> Result<Self, BoxError> {
        if opts.node_id.is_empty() || opts.node_id.contains(['\n', ',']) {
            return Err(format!("bad cluster node id {:?}", opts.node_id).into());
        }
        if opts.node_ttl < MIN_NODE_TTL {
            return Err(format!(
                "cluster node_ttl {:?} is under {MIN_NODE_TTL:?}",
                opts.node_ttl
            )
            .into());
        }
        if opts.node_ttl < 3 * opts.timeout {
            // One slow answer to a heartbeat would let the node's keys
            // expire: the other nodes would count it as gone and send its
            // users' messages to their inboxes meanwhile.
            tracing::warn!(
                node = %opts.node_id,
                node_ttl = ?opts.node_ttl,
                timeout = ?opts.timeout,
                "cluster node_ttl is under three Redis answer timeouts: a slow heartbeat answer makes the cluster count this node as gone for a moment"
            );
        }
        let client = if opts.tls_ca.is_some() || opts.tls_client.is_some() {
            redis::Client::build_with_tls(
                opts.url.as_str(),
                redis::TlsCertificates {
                    client_tls: opts.tls_client.clone().map(|(client_cert, client_key)| {
                        redis::ClientTlsConfig {
                            client_cert,
                            client_key,
                        }
                    }),
                    root_cert: opts.tls_ca.clone(),
                },
            )?
        } else {
            redis::Client::open(opts.url.as_str())?
        };
        let feed_tls = match client.get_connection_info().addr {
            redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                return Err(
                    "a rediss:// URL with #insecure: comet checks Redis's certificate; \
                            give the CA that signed it instead (tls_ca)"
                        .into(),
                )
            }
            redis::ConnectionAddr::TcpTls { .. } => Some(tls_connector(
                opts.tls_ca.as_deref(),
                opts.tls_client.as_ref().map(|(c, k)| (&c[..], &k[..])),
            )?),
            _ => None,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(opts.timeout)
            .set_response_timeout(opts.timeout)
            .set_number_of_retries(1)
            .set_max_delay(1_000);
        let mut con = ConnectionManager::new_with_config(client.clone(), config).await?;
        check_settings(&mut con, &opts.node_id).await;
        // Two live nodes with one id would both read its channel (each
        // pushing the other's recipients to their inboxes), and this one
        // would reset the other's presence when its feed subscribes.
        let token = claim_token();
        let claim = Script::new(scripts::CLAIM);
        let claimed: i64 = claim
            .arg(&opts.prefix)
            .arg(&opts.node_id)
            .arg(&token)
            .arg(u64::try_from(opts.node_ttl.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut con)
            .await?;
        if claimed == 0 {
            return Err(format!(
                "cluster node id {:?} is taken: a live node reads its channel {}ch:{}; \
                 give each node its own node_id",
                opts.node_id, opts.prefix, opts.node_id
            )
            .into());
        }
        let scripts = Scripts {
            send: Script::new(&scripts::send()),
            login: Script::new(&scripts::login()),
            logout: Script::new(&scripts::logout()),
            reset_node: Script::new(&scripts::reset_node()),
            history: Script::new(scripts::HISTORY),
            push: Script::new(&scripts::push()),
            join: Script::new(scripts::JOIN),
            leave: Script::new(scripts::LEAVE),
            load_group: Script::new(scripts::LOAD_GROUP),
            nodes_of: Script::new(scripts::NODES_OF),
            heartbeat: Script::new(&scripts::heartbeat()),
            nodes: Script::new(&scripts::nodes()),
        };
        Ok(RedisCluster {
            inner: Arc::new(Inner {
                opts,
                token,
                claim,
                client,
                feed_tls,
                con,
                scripts,
            }),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.opts.node_id
    }

    /// The shared message store.
    pub fn store(&self) -> Arc<RedisStore> {
        Arc::new(RedisStore {
            inner: self.inner.clone(),
        })
    }

    /// The shared group directory.
    pub fn groups(&self) -> Arc<RedisGroups> {
        Arc::new(RedisGroups {
            inner: self.inner.clone(),
        })
    }

    /// The broker of the node whose sessions `registry` holds: pass this to
    /// [`CometBuilder::broker`](comet_core::CometBuilder::broker). Starts
    /// the node's heartbeat and feed on the current tokio runtime; they stop
    /// when the broker is dropped.
    pub fn broker(&self, registry: Arc<Registry>) -> Arc<dyn Broker> {
        let link = Arc::new(Link::default());
        let feed = tokio::spawn(feed(self.inner.clone(), registry.clone(), link.clone()));
        let heartbeat = tokio::spawn(heartbeat(
            self.inner.clone(),
            registry.clone(),
            link.clone(),
        ));
        Arc::new(RedisBroker {
            inner: self.inner.clone(),
            registry,
            link,
            stripes: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            tasks: [feed.abort_handle(), heartbeat.abort_handle()],
        })
    }
}

/// The conversation's key suffix.
/// Logs a warning for each Redis setting under which the cluster would
/// lose or reuse what it acknowledged, or let a node that falls behind grow
/// Redis's memory without bound (docs/CLUSTER.md, "Redis settings a node
/// checks"). A Redis that refuses `CONFIG GET` (renamed or denied, as
/// managed services do) is not checked, and the log says so.
async fn check_settings(con: &mut ConnectionManager, node: &str) {
    let mut pipe = redis::pipe();
    for name in CHECKED_SETTINGS {
        pipe.cmd("CONFIG").arg("GET").arg(name);
    }
    match pipe.query_async::<Vec<Vec<String>>>(con).await {
        Ok(replies) => {
            // Each reply is [name, value], or empty for a setting this
            // Redis does not have.
            let settings: HashMap<&str, &str> = replies
                .iter()
                .filter_map(|r| match r.as_slice() {
                    [name, value] => Some((name.as_str(), value.as_str())),
                    _ => None,
                })
                .collect();
            for (setting, why) in risky_settings(&settings) {
                tracing::warn!(node, setting, "redis setting: {why}");
            }
        }
        Err(e) => tracing::info!(
            node,
            error = %e,
            "redis settings not checked: CONFIG GET failed (maxmemory-policy, appendonly \
             and the pubsub output buffer limit: see docs/CLUSTER.md)"
        ),
    }
}

/// The settings [`check_settings`] reads.
const CHECKED_SETTINGS: [&str; 4] = [
    "maxmemory",
    "maxmemory-policy",
    "appendonly",
    "client-output-buffer-limit",
];

/// The risky ones among `settings` (name to value, as `CONFIG GET` gives
/// them), each with why. A setting missing from the map is not judged.
fn risky_settings(settings: &HashMap<&str, &str>) -> Vec<(&'static str, &'static str)> {
    let mut risky = Vec::new();
    let limited = settings
        .get("maxmemory")
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|bytes| bytes > 0);
    if limited
        && settings
            .get("maxmemory-policy")
            .is_some_and(|p| *p != "noeviction")
    {
        risky.push((
            "maxmemory-policy",
            "a policy other than noeviction under a maxmemory limit lets Redis evict \
             history, offline inboxes, presence and chatId counters (a conversation's \
             chatIds would start again at 1); with noeviction a full Redis refuses sends \
             (ret -1) instead",
        ));
    }
    if settings.get("appendonly").is_some_and(|v| *v != "yes") {
        risky.push((
            "appendonly",
            "without the AOF a Redis restart loses every acknowledged send since its last \
             RDB snapshot (all of them without one), and gives their chatIds out again; \
             set appendonly yes",
        ));
    }
    if settings
        .get("client-output-buffer-limit")
        .is_some_and(|v| pubsub_buffer_unlimited(v))
    {
        risky.push((
            "client-output-buffer-limit",
            "no pubsub limit: Redis holds the backlog of a node that falls behind its feed \
             without bound instead of dropping its subscription (which makes the node \
             resync its sessions); keep one, e.g. Redis's default pubsub 32mb 8mb 60",
        ));
    }
    risky
}

/// Whether the `pubsub` class of a `client-output-buffer-limit` value
/// ("normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60")
/// has neither a hard nor a soft limit.
fn pubsub_buffer_unlimited(value: &str) -> bool {
    let mut words = value.split_whitespace();
    while let Some(class) = words.next() {
        let limits: Vec<&str> = words.by_ref().take(3).collect();
        if class == "pubsub" {
            return matches!(limits.as_slice(), [hard, soft, _] if *hard == "0" && *soft == "0");
        }
    }
    false
}

fn conv_key(c: Conversation) -> String {
    match c {
        Conversation::Direct(a, b) => format!("d:{a}:{b}"),
        Conversation::Group(g) => format!("g:{g}"),
    }
}

/// The shortest [`RedisOptions::node_ttl`].
const MIN_NODE_TTL: Duration = Duration::from_millis(300);

/// Refreshes this node's claim and heartbeat key every third of their
/// lifetime, and reports its session count with them ([`RedisBroker`]'s
/// `nodes`). If another process has claimed the node id since, this node
/// steps down ([`step_down`]); while stepped down it claims the id again
/// every third of `node_ttl`, which succeeds once no live node holds it
/// (the other process stopped, or was never more than a claim), and then
/// its feed subscribes again.
async fn heartbeat(inner: Arc<Inner>, registry: Arc<Registry>, link: Arc<Link>) {
    let ttl = u64::try_from(inner.opts.node_ttl.as_millis()).unwrap_or(u64::MAX);
    let mut tick = tokio::time::interval(inner.opts.node_ttl / 3);
    loop {
        tick.tick().await;
        let mut con = inner.con();
        if link.displaced.load(Ordering::SeqCst) {
            let claimed: redis::RedisResult<i64> = inner
                .claim
                .arg(&inner.opts.prefix)
                .arg(&inner.opts.node_id)
                .arg(&inner.token)
                .arg(ttl)
                .invoke_async(&mut con)
                .await;
            if let Ok(1) = claimed {
                tracing::warn!(node = %inner.opts.node_id, "cluster node id claimed again: this node takes logins again");
                link.displaced.store(false, Ordering::SeqCst);
            }
            continue;
        }
        let beat: redis::RedisResult<i64> = inner
            .scripts
            .heartbeat
            .arg(&inner.opts.prefix)
            .arg(&inner.opts.node_id)
            .arg(ttl)
            .arg(registry.session_count())
            .arg(&inner.token)
            .invoke_async(&mut con)
            .await;
        match beat {
            Ok(0) => step_down(&inner, &link, &registry),
            Ok(_) => {}
            Err(e) => tracing::warn!(cause = %e, "cluster heartbeat failed"),
        }
    }
}

/// Another process has claimed this node's id: the node stops reading the
/// id's channel (its feed unsubscribes and waits), refuses logins, answers
/// not ready, closes its sessions so that they log in elsewhere, and
/// leaves the id's presence alone, until [`heartbeat`] claims the id again.
fn step_down(inner: &Inner, link: &Link, registry: &Registry) {
    if link.displaced.swap(true, Ordering::SeqCst) {
        return;
    }
    link.stepped.notify_waiters();
    let sessions = registry.session_count();
    registry.disconnect_all();
    tracing::error!(
        node = %inner.opts.node_id,
        sessions,
        "cluster node id taken over by another process: this node stopped reading its channel, \
         refuses logins and closed its sessions until it can claim the id again; give each node its own node_id"
    );
}

/// A token no other process picks: this process's claim on its node id.
fn claim_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState's keys are random per process.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", h.finish())
}

/// The state of this node's feed that logins check: whether it is
/// subscribed, and how many times it has subscribed (a login whose script
/// ran across a resubscription is refused: its `I` went to the lost feed).
#[derive(Debug, Default)]
struct Link {
    subscribed: AtomicBool,
    epoch: AtomicU64,
    /// Another process claimed this node's id: this one stepped down
    /// ([`step_down`]) until it claims the id again.
    displaced: AtomicBool,
    /// Wakes the feed when the node steps down.
    stepped: tokio::sync::Notify,
}

impl Link {
    /// The current subscription, if the feed is subscribed (never once the
    /// node is displaced).
    fn current(&self) -> Option<u64> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        (self.subscribed.load(Ordering::SeqCst) && !self.displaced.load(Ordering::SeqCst))
            .then_some(epoch)
    }
}

/// Most groups a node's membership cache holds; past it the cache forgets
/// every loaded group (each is loaded again on its next message).
const MAX_CACHED_GROUPS: usize = 100_000;
/// Most feed items held for one group while its members load; past it the
/// node closes its sessions (they resync) and forgets the group.
const MAX_PENDING: usize = 10_000;

/// A group in the node's membership cache.
enum Group {
    /// Its members as of the feed's current position, kept so by `J`/`L`.
    Ready(HashSet<Mid>),
    /// Its members were asked for (`LOAD_GROUP`); until their `S` arrives,
    /// the group's feed items wait here, in order.
    Loading(Vec<Pending>),
}

enum Pending {
    /// A message, the connection to skip, and the position in the feed's
    /// log of logins and logouts (`Feed::moves`) when it came: it goes to
    /// the sessions of its own moment, not of the moment its group loaded.
    Msg(Arc<Message>, Option<ConnId>, u64),
    Join(Mid),
    Leave(Mid),
}

/// A login (`I`, `login` true) or logout (`O`) of `mid` that reached the
/// feed while a group loaded, and whether the feed held `mid` as local just
/// before it.
#[derive(Clone, Copy, Debug)]
struct Move {
    mid: Mid,
    login: bool,
    before: bool,
}

/// Most logins and logouts the feed logs while groups load; past it the
/// node closes its sessions (they resync) and forgets the loading groups.
const MAX_MOVES: usize = 1 << 20;

/// What the feed task keeps between messages; reset when the feed is lost.
struct Feed {
    inner: Arc<Inner>,
    registry: Arc<Registry>,
    link: Arc<Link>,
    /// Mids whose login (`I`) this feed has seen and whose logout (`O`) it
    /// has not: group messages reach their sessions here.
    local: HashSet<Mid>,
    groups: HashMap<GroupId, Group>,
    /// The groups in `groups` that are loading.
    loading: HashSet<GroupId>,
    /// The logins and logouts that reached the feed since a group began
    /// loading (empty while none is), shared by the loading groups: entry
    /// `i` is at position `moves_base + i`.
    moves: Vec<Move>,
    moves_base: u64,
    /// Reused for each delivery's recipients.
    recipients: Vec<Mid>,
    /// The messages of the current burst that go to the same sessions,
    /// not yet delivered.
    run: Run,
    /// Recipients times messages of the runs delivered since the feed last
    /// took this count (an estimate of the session pushes: a mid's several
    /// sessions count once).
    pushes: u64,
}

/// Most feed messages a node reads before it delivers what it has read.
/// Past a few dozen, a bigger burst saves little more per message and only
/// delays the first of them.
const BURST: usize = 256;
/// Most payload bytes a node reads before it delivers what it has read: a
/// run lands in a session's queue at once, so a burst stays far below the
/// queue's bound (4 MiB by default) and a reader that keeps up is never
/// taken for a slow consumer because its messages came in bursts.
const BURST_BYTES: usize = 64 * 1024;

/// Whether the node's feed is flooded: how many session pushes its recent
/// bursts made, over windows of [`FLOOD_WINDOW`].
///
/// Why hold a flooded feed's bursts open: a node reads its feed at the pace
/// of the sends, which in cluster mode wait for a Redis round trip each.
/// Delivered as they come, one message at a time, every session's writer
/// wakes for each message and sends it in its own system call; on a busy
/// node that makes the round trips slower still, so messages keep coming
/// one at a time. Held open for a few milliseconds, a burst gathers the
/// messages of several sends, each writer sends them in one write, and the
/// time saved goes to the sends. A feed under either threshold (a
/// 2,000-member group at 50 messages a second, on one node or spread over
/// several) is never held: its latency is untouched.
struct Flood {
    since: tokio::time::Instant,
    pushes: u64,
    messages: u64,
    on: bool,
}

/// The window over which [`Flood`] counts pushes.
const FLOOD_WINDOW: Duration = Duration::from_millis(50);
/// Pushes per [`FLOOD_WINDOW`] past which the feed is flooded (100,000
/// session pushes a second)...
const FLOOD_PUSHES: u64 = 5_000;
/// ...if it also read this many messages in the window (160 a second):
/// holding a burst open gains nothing when the next message is not coming
/// soon, however many sessions each message reaches (a 2,000-member group
/// at 50 messages a second, all on one node, is not held).
const FLOOD_MESSAGES: u64 = 8;
/// How long a flooded feed holds a burst open for more messages. Measured
/// on the 3-node benchmark (BENCHMARKS.md): 3 ms gained 1.7×, 8 ms 2.1×,
/// 25 ms 5–6× deliveries a second over no hold, while the latency of a
/// flood was hundreds of milliseconds either way.
const FLOOD_HOLD: Duration = Duration::from_millis(25);

impl Flood {
    fn new() -> Self {
        Flood {
            since: tokio::time::Instant::now(),
            pushes: 0,
            messages: 0,
            on: false,
        }
    }

    /// Whether to hold bursts open: flooded in the last window, and that
    /// window is recent (a feed that went quiet is not flooded).
    fn on(&self) -> bool {
        self.on && self.since.elapsed() < 2 * FLOOD_WINDOW
    }

    /// Counts a burst's messages and pushes; at the end of a window,
    /// decides whether the next one is flooded.
    fn count(&mut self, messages: u64, pushes: u64) {
        self.messages += messages;
        self.pushes += pushes;
        let now = tokio::time::Instant::now();
        let elapsed = now.duration_since(self.since);
        if elapsed >= FLOOD_WINDOW {
            // Rates over the time counted: a window that ended in a quiet
            // spell spans several.
            let windows = (elapsed.as_millis() / FLOOD_WINDOW.as_millis()) as u64;
            self.on =
                self.pushes >= FLOOD_PUSHES * windows && self.messages >= FLOOD_MESSAGES * windows;
            self.pushes = 0;
            self.messages = 0;
            self.since = now;
        }
    }
}

/// Consecutive feed messages with the same recipients on this node: each
/// session gets them in one queue push and one wake-up
/// ([`Registry::deliver_run`]), so its writer sends them in one write.
/// Anything else the feed reads (a message for other sessions, a login, a
/// membership change) delivers the run first, so a run is delivered
/// exactly as its messages would have been one by one.
#[derive(Default)]
struct Run {
    /// Group messages: the group and sender the recipients were computed
    /// for (the membership and local sessions cannot change within a run).
    /// `None`: 1:1 messages, compared by their recipients.
    group: Option<(GroupId, Mid)>,
    recipients: Vec<Mid>,
    echo: Option<Mid>,
    except: Option<ConnId>,
    msgs: Vec<Arc<Message>>,
}

impl Feed {
    fn reset(&mut self) {
        self.local.clear();
        self.groups.clear();
        self.loading.clear();
        self.forget_moves();
        self.run.msgs.clear();
    }

    /// Delivers the current run, if any.
    async fn flush(&mut self) {
        let run = &mut self.run;
        if run.msgs.is_empty() {
            return;
        }
        self.registry
            .deliver_run(&run.recipients, run.echo, &run.msgs, run.except)
            .await;
        let sessions = run.recipients.len() + usize::from(run.echo.is_some());
        self.pushes += (sessions * run.msgs.len()) as u64;
        run.msgs.clear();
    }

    /// One payload of either channel (see the layout in `scripts`). Group
    /// and 1:1 messages may wait in the current run: call
    /// [`flush`](Self::flush) at the end of a burst.
    async fn handle(&mut self, payload: &[u8]) {
        let kind = payload.first().copied();
        if !matches!(kind, Some(b'D' | b'G')) {
            self.flush().await;
        }
        let handled = match payload.split_first() {
            Some((kind, rest)) if rest.first() == Some(&b'\n') => {
                let rest = &rest[1..];
                match kind {
                    b'D' => self.direct(rest).await,
                    b'G' => self.group_message(rest).await,
                    b'J' | b'L' => self.membership(*kind == b'J', rest),
                    b'I' | b'O' => num(rest).map(|mid: Mid| self.presence(*kind == b'I', mid)),
                    b'S' => self.snapshot(rest).await,
                    b'K' => num(rest).map(|mid: Mid| {
                        self.registry.disconnect(mid);
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        if handled.is_none() {
            tracing::error!(node = %self.inner.opts.node_id, "cluster feed: malformed message dropped");
        }
    }

    /// A 1:1 message for the mids listed, delivered to their sessions here
    /// (a recipient without one any more gets it in its inbox).
    async fn direct(&mut self, payload: &[u8]) -> Option<()> {
        let [chat, op, from, to, except, mids, msg] = fields::<7>(payload)?;
        let from: Mid = num(from)?;
        let except: ConnId = num(except)?;
        let mids = std::str::from_utf8(mids).ok()?;
        self.recipients.clear();
        let mut echo = None;
        for m in mids.split(',') {
            let m: Mid = m.parse().ok()?;
            if m == from {
                echo = Some(m);
            } else {
                self.recipients.push(m);
            }
        }
        let msg = Message::new(Delivered {
            op: num(op)?,
            chat_id: num(chat)?,
            from,
            to: num(to)?,
            msg: Bytes::copy_from_slice(msg),
        });
        // A self-addressed 1:1 message: the sender is its recipient.
        if self.recipients.is_empty() && msg.delivered().to == from {
            self.recipients.push(from);
            echo = None;
        }
        let except = (except != 0).then_some(except);
        let run = &self.run;
        let same = !run.msgs.is_empty()
            && run.group.is_none()
            && run.echo == echo
            && run.except == except
            && run.recipients == self.recipients;
        if !same {
            self.flush().await;
            let run = &mut self.run;
            std::mem::swap(&mut run.recipients, &mut self.recipients);
            run.group = None;
            run.echo = echo;
            run.except = except;
        }
        self.run.msgs.push(msg);
        Some(())
    }

    /// A group message: delivered to this node's sessions of the group's
    /// members, from the membership cache (loaded first if need be).
    async fn group_message(&mut self, payload: &[u8]) -> Option<()> {
        let [chat, from, group, node, except, msg] = fields::<6>(payload)?;
        let from: Mid = num(from)?;
        let group: GroupId = num(group)?;
        let except = if node == self.inner.opts.node_id.as_bytes() {
            Some(num::<ConnId>(except)?).filter(|&c| c != 0)
        } else {
            None
        };
        let msg = Message::new(Delivered {
            op: comet_core::op::SEND_TO_GROUP,
            chat_id: num(chat)?,
            from,
            to: group,
            msg: Bytes::copy_from_slice(msg),
        });
        if let Some(Group::Ready(_)) = self.groups.get(&group) {
            let run = &self.run;
            let same =
                !run.msgs.is_empty() && run.group == Some((group, from)) && run.except == except;
            if !same {
                self.flush().await;
                let run = &mut self.run;
                if let Some(Group::Ready(members)) = self.groups.get(&group) {
                    run.echo = group_recipients(&self.local, members, from, &mut run.recipients);
                }
                run.group = Some((group, from));
                run.except = except;
            }
            self.run.msgs.push(msg);
            return Some(());
        }
        self.flush().await;
        match self.groups.get_mut(&group) {
            Some(Group::Ready(_)) => {}
            Some(Group::Loading(pending)) => {
                let at = self.moves_base + self.moves.len() as u64;
                pending.push(Pending::Msg(msg, except, at));
                if pending.len() > MAX_PENDING {
                    self.overflow(group);
                }
            }
            None => {
                if self.groups.len() >= MAX_CACHED_GROUPS {
                    self.groups.retain(|_, g| matches!(g, Group::Loading(_)));
                }
                let at = self.moves_base + self.moves.len() as u64;
                self.groups
                    .insert(group, Group::Loading(vec![Pending::Msg(msg, except, at)]));
                self.loading.insert(group);
                let epoch = self.link.epoch.load(Ordering::SeqCst);
                tokio::spawn(load_group(
                    self.inner.clone(),
                    self.link.clone(),
                    epoch,
                    group,
                ));
            }
        }
        Some(())
    }

    /// A group's members took so long to load that too much waits for them:
    /// this node's sessions are closed (they resync) rather than fed late.
    fn overflow(&mut self, group: GroupId) {
        tracing::warn!(
            group,
            "cluster feed: group members did not load in time; closing this node's sessions so they resync"
        );
        self.groups.remove(&group);
        self.loaded(group);
        self.registry.disconnect_all();
    }

    /// `group` is no longer loading; with none left, the log of logins and
    /// logouts is dropped.
    fn loaded(&mut self, group: GroupId) {
        self.loading.remove(&group);
        if self.loading.is_empty() {
            self.forget_moves();
        }
    }

    fn forget_moves(&mut self) {
        self.moves_base += self.moves.len() as u64;
        self.moves.clear();
    }

    /// A login (`I`) or logout (`O`) of `mid` reached the feed: group
    /// messages from here on reach (no longer reach) its sessions here.
    /// While groups load, it is logged once for all of them, for the
    /// messages that wait.
    fn presence(&mut self, login: bool, mid: Mid) {
        let before = if login {
            !self.local.insert(mid)
        } else {
            self.local.remove(&mid)
        };
        if self.loading.is_empty() {
            return;
        }
        self.moves.push(Move { mid, login, before });
        if self.moves.len() > MAX_MOVES {
            tracing::warn!(
                groups = self.loading.len(),
                "cluster feed: too many logins while group members loaded; closing this node's sessions so they resync"
            );
            for group in std::mem::take(&mut self.loading) {
                self.groups.remove(&group);
            }
            self.forget_moves();
            self.registry.disconnect_all();
        }
    }

    fn membership(&mut self, joined: bool, payload: &[u8]) -> Option<()> {
        let [group, mid] = fields::<2>(payload)?;
        let (group, mid): (GroupId, Mid) = (num(group)?, num(mid)?);
        match self.groups.get_mut(&group) {
            Some(Group::Ready(members)) => {
                if joined {
                    members.insert(mid);
                } else {
                    members.remove(&mid);
                }
            }
            Some(Group::Loading(pending)) => {
                pending.push(if joined {
                    Pending::Join(mid)
                } else {
                    Pending::Leave(mid)
                });
                if pending.len() > MAX_PENDING {
                    self.overflow(group);
                }
            }
            // Not cached here: loaded, when needed, as of that moment.
            None => {}
        }
        Some(())
    }

    /// The members of a group as of this point of the feed. What waited
    /// for them came before this point: undoing the membership events among
    /// it, newest first, gives the members as of the first waiting item;
    /// then the items are played forward, each message delivered to the
    /// members of its own moment.
    async fn snapshot(&mut self, payload: &[u8]) -> Option<()> {
        let [group, mids] = fields::<2>(payload)?;
        let group: GroupId = num(group)?;
        let mut members = HashSet::new();
        for m in std::str::from_utf8(mids).ok()?.split(',') {
            if !m.is_empty() {
                members.insert(m.parse::<Mid>().ok()?);
            }
        }
        // Ready already (an earlier load answered first), or forgotten.
        if !matches!(self.groups.get(&group), Some(Group::Loading(_))) {
            return Some(());
        }
        let Some(Group::Loading(pending)) = self.groups.remove(&group) else {
            return Some(());
        };
        rewind(&mut members, &pending);
        let replayed = replay(
            &self.local,
            &mut members,
            pending,
            &self.moves,
            self.moves_base,
        );
        self.loaded(group);
        for (msg, except, recipients, echo) in replayed {
            if recipients.is_empty() && echo.is_none() {
                continue;
            }
            let _ = self.registry.deliver(&recipients, echo, &msg, except).await;
        }
        self.groups.insert(group, Group::Ready(members));
        Some(())
    }
}

/// Turns the members as of the end of `pending` into the members as of its
/// start, by undoing its membership events newest first. Events are
/// published only for real changes (a join of a non-member, a leave of a
/// member), so each undoes exactly.
fn rewind(members: &mut HashSet<Mid>, pending: &[Pending]) {
    for p in pending.iter().rev() {
        match p {
            Pending::Join(m) => {
                members.remove(m);
            }
            Pending::Leave(m) => {
                members.insert(*m);
            }
            Pending::Msg(..) => {}
        }
    }
}

/// A group message that waited for its group's members, with the
/// recipients and echo of its own moment ([`group_recipients`]).
type Replayed = (Arc<Message>, Option<ConnId>, Vec<Mid>, Option<Mid>);

/// Plays a loaded group's waiting items forward: `members` as of the first
/// of them (see [`rewind`]) becomes the members as of now, and each waiting
/// message gets the recipients of its own moment: the members then, and
/// this node's sessions then. `local` is as of now; `moves` (entry `i` at
/// position `base + i`) are the logins and logouts since before the first
/// waiting message, so a mid among them counts as it stood when each
/// message came. A member who logs in here while the group loads does not
/// also get, live, a message its login's catch-up copied to its inbox, and
/// one who logs out gets a message from before that in its inbox (a mid
/// without a session here any more gets its copy there).
fn replay(
    local: &HashSet<Mid>,
    members: &mut HashSet<Mid>,
    pending: Vec<Pending>,
    moves: &[Move],
    base: u64,
) -> Vec<Replayed> {
    // Index in `moves` of a position (positions before the log count as
    // its start).
    let index = |at: u64| {
        usize::try_from(at.saturating_sub(base)).map_or(moves.len(), |i| i.min(moves.len()))
    };
    // Whether each mid that moved is local as of the point reached: first
    // as it stood before its first move.
    let mut then: HashMap<Mid, bool> = HashMap::new();
    let mut applied = match pending.first() {
        Some(Pending::Msg(_, _, at)) => index(*at),
        _ => 0,
    };
    for m in &moves[applied..] {
        then.entry(m.mid).or_insert(m.before);
    }
    let mut out = Vec::new();
    for p in pending {
        match p {
            Pending::Msg(msg, except, at) => {
                let upto = index(at).max(applied);
                for m in &moves[applied..upto] {
                    then.insert(m.mid, m.login);
                }
                applied = upto;
                let mut recipients = Vec::new();
                let from = msg.delivered().from;
                let mut echo = group_recipients(local, members, from, &mut recipients);
                if !then.is_empty() {
                    recipients.retain(|m| then.get(m).copied().unwrap_or(true));
                    for (&m, &here) in &then {
                        if here && m != from && !local.contains(&m) && members.contains(&m) {
                            recipients.push(m);
                        }
                    }
                    if let Some(&here) = then.get(&from) {
                        echo = here.then_some(from);
                    }
                }
                out.push((msg, except, recipients, echo));
            }
            Pending::Join(m) => {
                members.insert(m);
            }
            Pending::Leave(m) => {
                members.remove(&m);
            }
        }
    }
    out
}

/// Fills `recipients` with this node's members of a group (those whose
/// login reached the feed) but `from`; returns `from` as the echo if it has
/// sessions here (a member or not: a trusted sender need not be one).
fn group_recipients(
    local: &HashSet<Mid>,
    members: &HashSet<Mid>,
    from: Mid,
    recipients: &mut Vec<Mid>,
) -> Option<Mid> {
    recipients.clear();
    let mut echo = None;
    let mut take = |m: Mid| {
        if m == from {
            echo = Some(m);
        } else {
            recipients.push(m);
        }
    };
    // Whichever side is smaller drives the intersection.
    if local.len() < members.len() {
        local
            .iter()
            .filter(|m| members.contains(m))
            .for_each(|&m| take(m));
    } else {
        members
            .iter()
            .filter(|m| local.contains(m))
            .for_each(|&m| take(m));
    }
    // A trusted sender need not be a member; its sessions here get their
    // copy all the same (a member sender was found above).
    if echo.is_none() && local.contains(&from) {
        echo = Some(from);
    }
    echo
}

/// Asks for `group`'s members to be published on this node's feed, again
/// every 250 ms until Redis takes the request, while the feed stays on
/// subscription `epoch` (meanwhile the group's feed items wait).
async fn load_group(inner: Arc<Inner>, link: Arc<Link>, epoch: u64, group: GroupId) {
    while link.current() == Some(epoch) {
        let mut con = inner.con();
        let loaded: redis::RedisResult<i64> = inner
            .scripts
            .load_group
            .arg(&inner.opts.prefix)
            .arg(group)
            .arg(&inner.opts.node_id)
            .invoke_async(&mut con)
            .await;
        match loaded {
            Ok(_) => return,
            Err(e) => tracing::warn!(group, cause = %e, "cluster: loading group members failed"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Default of [`RedisOptions::feed_budget`]: the most bytes a node reads
/// from its feed connection ahead of the feed task. redis-rs hands what
/// its pub/sub connection reads to the feed task through an unbounded
/// channel; [`Bounded`] stops reading from the socket
/// once this much is waiting there, so a node that cannot keep up with
/// its feed holds at most this much (plus one read). Redis then keeps the
/// rest in the subscriber's output buffer, and past its
/// `client-output-buffer-limit pubsub` (32 MB, or 8 MB for 60 s, by
/// default) closes the connection: the feed is lost, the node closes its
/// sessions and they resync, as for any lost feed. Nothing is delivered
/// after a gap: what the node did read came in order before the close.
const FEED_BUDGET: u64 = 16 << 20;
/// The smallest feed budget a node uses, whatever it is given: the replies
/// to its `SUBSCRIBE`, and what is published between them, are read before
/// the feed task starts handling anything.
const MIN_FEED_BUDGET: u64 = 16 << 10;

/// How far the reader of a feed connection is ahead of the feed task.
#[derive(Debug)]
struct Budget {
    /// The most it may be ahead.
    limit: u64,
    /// Bytes read from the socket.
    read: AtomicU64,
    /// `read` as of the last time the feed task found redis-rs' channel
    /// empty: everything read until then has been handled.
    handled: AtomicU64,
    /// The reader, waiting for the feed task to catch up.
    waker: futures_util::task::AtomicWaker,
}

impl Budget {
    fn new(limit: u64) -> Self {
        Budget {
            limit: limit.max(1),
            read: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            waker: futures_util::task::AtomicWaker::new(),
        }
    }

    /// The feed task found the channel empty: what has been read is
    /// handled. (Bytes read and queued between the check and this call
    /// count as handled too, until the next call; the error never grows
    /// past one such window.)
    fn caught_up(&self) {
        let read = self.read.load(Ordering::Acquire);
        if self.handled.swap(read, Ordering::AcqRel) != read {
            self.waker.wake();
        }
    }

    fn ahead(&self) -> u64 {
        self.read
            .load(Ordering::Acquire)
            .saturating_sub(self.handled.load(Ordering::Acquire))
    }
}

/// A feed connection's socket that reads only while its [`Budget`] allows.
struct Bounded<S> {
    io: S,
    budget: Arc<Budget>,
}

impl<S> Bounded<S> {
    fn new(io: S, budget: Arc<Budget>) -> Self {
        // A new connection starts with nothing waiting.
        budget.caught_up();
        Bounded { io, budget }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Bounded<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.budget.ahead() >= self.budget.limit {
            self.budget.waker.register(cx.waker());
            if self.budget.ahead() >= self.budget.limit {
                return std::task::Poll::Pending;
            }
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.budget.read.fetch_add(n, Ordering::AcqRel);
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Bounded<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Subscribes to this node's channel and the group channel and delivers
/// what they carry, in the order Redis published it; when the subscription
/// is lost, closes every session of the node (they reconnect and sync),
/// forgets its membership cache, and subscribes again.
async fn feed(inner: Arc<Inner>, registry: Arc<Registry>, link: Arc<Link>) {
    let own = format!("{}ch:{}", inner.opts.prefix, inner.opts.node_id);
    let all = format!("{}all", inner.opts.prefix);
    let mut state = Feed {
        inner: inner.clone(),
        registry: registry.clone(),
        link: link.clone(),
        local: HashSet::new(),
        groups: HashMap::new(),
        loading: HashSet::new(),
        moves: Vec::new(),
        moves_base: 0,
        recipients: Vec::new(),
        run: Run::default(),
        pushes: 0,
    };
    let mut first = true;
    let budget = Arc::new(Budget::new(inner.opts.feed_budget.max(MIN_FEED_BUDGET)));
    loop {
        if link.displaced.load(Ordering::SeqCst) {
            // Back from a step-down: this id's presence may be stale.
            first = true;
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        match subscribe(&inner, [own.as_str(), all.as_str()], &budget).await {
            Ok(stream) => {
                if first {
                    // Presence left by this node's previous life.
                    let mut con = inner.con();
                    let reset: redis::RedisResult<i64> = inner
                        .scripts
                        .reset_node
                        .arg(&inner.opts.prefix)
                        .arg(&inner.opts.node_id)
                        .arg(&inner.token)
                        .invoke_async(&mut con)
                        .await;
                    if let Ok(-1) = reset {
                        step_down(&inner, &link, &registry);
                        continue;
                    }
                    if let Err(e) = reset {
                        tracing::warn!(cause = %e, "cluster: resetting this node's presence failed");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                    first = false;
                }
                state.reset();
                link.epoch.fetch_add(1, Ordering::SeqCst);
                link.subscribed.store(true, Ordering::SeqCst);
                metrics::counter!("comet_cluster_feed_subscriptions_total").increment(1);
                tracing::info!(node = %inner.opts.node_id, "cluster feed subscribed");
                let mut stream = stream;
                let mut flood = Flood::new();
                // A burst: whatever the connection has already read (up
                // to BURST messages, BURST_BYTES of payload) is handled
                // before anything is delivered, so runs of messages for the
                // same sessions reach each session in one push. A flooded
                // feed holds the burst open for up to FLOOD_HOLD.
                //
                // Each time the feed finds nothing waiting, it tells the
                // budget (Budget::caught_up), so the reader, which may be
                // stopped at FEED_BUDGET, reads on before the feed waits.
                'feed: loop {
                    if link.displaced.load(Ordering::SeqCst) {
                        break 'feed;
                    }
                    let msg = match stream.next().now_or_never() {
                        Some(Some(msg)) => msg,
                        Some(None) => break 'feed,
                        None => {
                            budget.caught_up();
                            // Only a feed with nothing to read waits, so
                            // only it needs waking by a step-down: the
                            // waiter is registered before the flag is
                            // checked again, so one in between still wakes it.
                            let stepped = link.stepped.notified();
                            tokio::pin!(stepped);
                            stepped.as_mut().enable();
                            if link.displaced.load(Ordering::SeqCst) {
                                break 'feed;
                            }
                            tokio::select! {
                                biased;
                                _ = &mut stepped => break 'feed,
                                next = stream.next() => match next {
                                    Some(msg) => msg,
                                    None => break 'feed,
                                },
                            }
                        }
                    };
                    let until = tokio::time::Instant::now() + FLOOD_HOLD;
                    let holding = flood.on();
                    let mut bytes = msg.get_payload_bytes().len();
                    state.handle(msg.get_payload_bytes()).await;
                    let mut read = 1;
                    for _ in 1..BURST {
                        if bytes >= BURST_BYTES {
                            break;
                        }
                        let next = match stream.next().now_or_never() {
                            Some(next) => Some(next),
                            None if holding => {
                                budget.caught_up();
                                tokio::time::timeout_at(until, stream.next()).await.ok()
                            }
                            None => {
                                budget.caught_up();
                                None
                            }
                        };
                        match next {
                            Some(Some(msg)) => {
                                read += 1;
                                bytes += msg.get_payload_bytes().len();
                                state.handle(msg.get_payload_bytes()).await;
                            }
                            Some(None) => {
                                state.flush().await;
                                break 'feed;
                            }
                            None => break,
                        }
                    }
                    state.flush().await;
                    flood.count(read, std::mem::take(&mut state.pushes));
                }
                link.subscribed.store(false, Ordering::SeqCst);
                let sessions = registry.session_count();
                tracing::warn!(
                    sessions,
                    "cluster feed lost: closing this node's sessions so they resync"
                );
                registry.disconnect_all();
            }
            Err(e) => tracing::warn!(cause = %e, "cluster feed: cannot subscribe"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Subscribes to `channels` on a connection of its own, read through a
/// [`Bounded`] stream: what the feed task has not handled yet is capped by
/// `budget`.
async fn subscribe(
    inner: &Inner,
    channels: [&str; 2],
    budget: &Arc<Budget>,
) -> redis::RedisResult<redis::aio::PubSubStream> {
    let connect = async {
        let info = inner.client.get_connection_info();
        let mut pubsub = match &info.addr {
            redis::ConnectionAddr::Tcp(host, port) => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                tcp.set_nodelay(true)?;
                redis::aio::PubSub::new(&info.redis, Bounded::new(tcp, budget.clone())).await?
            }
            redis::ConnectionAddr::TcpTls { host, port, .. } => {
                let tls = inner.feed_tls.as_ref().ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "rediss:// without the feed's TLS set up",
                    ))
                })?;
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                tcp.set_nodelay(true)?;
                // The budget counts what comes off the socket, below TLS.
                let tls = tls.connect(name, Bounded::new(tcp, budget.clone())).await?;
                redis::aio::PubSub::new(&info.redis, tls).await?
            }
            #[cfg(unix)]
            redis::ConnectionAddr::Unix(path) => {
                let unix = tokio::net::UnixStream::connect(path).await?;
                redis::aio::PubSub::new(&info.redis, Bounded::new(unix, budget.clone())).await?
            }
            #[cfg(not(unix))]
            other => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "the cluster feed needs a redis:// or rediss:// address",
                    format!("{other}"),
                )))
            }
        };
        pubsub.subscribe(&channels[..]).await?;
        Ok(pubsub.into_on_message())
    };
    match tokio::time::timeout(inner.opts.timeout, connect).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::IoError,
            "timed out",
        ))),
    }
}

/// Splits `n` fields off `buf` at `\n`; the last field is the rest.
fn fields<const N: usize>(buf: &[u8]) -> Option<[&[u8]; N]> {
    let mut out = [&buf[..0]; N];
    let mut rest = buf;
    for slot in out.iter_mut().take(N - 1) {
        let at = rest.iter().position(|&b| b == b'\n')?;
        *slot = &rest[..at];
        rest = &rest[at + 1..];
    }
    out[N - 1] = rest;
    Some(out)
}

fn num<T: std::str::FromStr>(field: &[u8]) -> Option<T> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(Box::new(e))
}

/// Where sends go and logins register in cluster mode; made by
/// [`RedisCluster::broker`].
pub struct RedisBroker {
    inner: Arc<Inner>,
    registry: Arc<Registry>,
    link: Arc<Link>,
    /// Orders one mid's presence changes on this node (login against a
    /// logout still under way).
    stripes: Arc<[tokio::sync::Mutex<()>]>,
    tasks: [tokio::task::AbortHandle; 2],
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("node_id", &self.inner.opts.node_id)
            .field("subscribed", &self.is_subscribed())
            .finish_non_exhaustive()
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RedisBroker {
    /// Whether the node's feed is subscribed (logins are refused while not).
    pub fn is_subscribed(&self) -> bool {
        self.link.current().is_some()
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn send(&self, draft: Draft, except: Option<ConnId>) -> Result<i64, BrokerError> {
        // The sender's other sessions on this node get its copy from the
        // feed, like every session; with none (the sending connection is
        // its only one here) the script publishes no copy for this node. A
        // session of the sender that registers after this check misses the
        // copy, as one registering after a single node's delivery does: the
        // sender's copy goes to the sessions live when the send is made.
        let echo_here = match except {
            Some(_) => self.registry.sessions_of(draft.from) > 1,
            None => self.registry.sessions_of(draft.from) > 0,
        };
        let chat = self
            .inner
            .send_script(&draft, Route::Checked, except.unwrap_or(0), echo_here)
            .await
            .map_err(unavailable)?;
        if chat < 0 {
            return Err(BrokerError::NotMember);
        }
        Ok(chat)
    }

    async fn nodes_of(&self, mid: Mid) -> Result<Vec<String>, BoxError> {
        let mut con = self.inner.con();
        let mut nodes: Vec<String> = self
            .inner
            .scripts
            .nodes_of
            .arg(&self.inner.opts.prefix)
            .arg(mid)
            .invoke_async(&mut con)
            .await?;
        nodes.sort_unstable();
        Ok(nodes)
    }

    async fn nodes(&self) -> Result<Vec<NodeStatus>, BoxError> {
        let mut con = self.inner.con();
        let flat: Vec<redis::Value> = self
            .inner
            .scripts
            .nodes
            .arg(&self.inner.opts.prefix)
            .invoke_async(&mut con)
            .await?;
        let mut nodes = Vec::with_capacity(flat.len() / 4);
        for n in flat.chunks_exact(4) {
            let id: String = redis::from_redis_value(&n[0])?;
            let ready: i64 = redis::from_redis_value(&n[1])?;
            let sessions: u64 = redis::from_redis_value(&n[2])?;
            let age: u64 = redis::from_redis_value(&n[3])?;
            nodes.push(NodeStatus::new(
                id,
                ready == 1,
                sessions,
                Duration::from_millis(age),
            ));
        }
        nodes.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn disconnect(&self, mid: Mid) -> Result<(), BoxError> {
        // Every node's feed, this one's included, closes its sessions of
        // `mid` in feed order (after the messages published before it).
        let mut con = self.inner.con();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("{}all", self.inner.opts.prefix))
            .arg(format!("K\n{mid}"))
            .query_async(&mut con)
            .await?;
        Ok(())
    }

    async fn send_trusted(&self, draft: Draft) -> Result<i64, BrokerError> {
        // Only op 20 has a check to skip; the sender's sessions here all get
        // the copy (no sending connection to leave out).
        let echo_here = self.registry.sessions_of(draft.from) > 0;
        self.inner
            .send_script(&draft, Route::Trusted, 0, echo_here)
            .await
            .map_err(unavailable)
    }

    async fn login(&self, mid: Mid) -> Result<(), BoxError> {
        let Some(epoch) = self.link.current() else {
            if self.link.displaced.load(Ordering::SeqCst) {
                return Err("cluster node id taken over by another process".into());
            }
            return Err("cluster feed not subscribed".into());
        };
        let o = &self.inner.opts;
        let _order = stripe(&self.stripes, mid).lock().await;
        let mut con = self.inner.con();
        let copied: i64 = self
            .inner
            .scripts
            .login
            .arg(&o.prefix)
            .arg(mid)
            .arg(&o.node_id)
            .arg(u64::try_from(o.node_ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(o.inbox)
            .arg(o.inbox)
            .arg(&self.inner.token)
            .invoke_async(&mut con)
            .await?;
        if copied < 0 {
            step_down(&self.inner, &self.link, &self.registry);
            return Err("cluster node id taken over by another process".into());
        }
        // Lost while the script ran (even if subscribed again since): the
        // feed may have missed this mid's messages and its `I`, and
        // `disconnect_all` may have run before the session was registered.
        if self.link.current() != Some(epoch) {
            return Err("cluster feed not subscribed".into());
        }
        Ok(())
    }

    fn is_ready(&self) -> bool {
        self.is_subscribed()
    }

    fn logout(&self, mid: Mid) {
        // The node id's presence is another process's now.
        if self.link.displaced.load(Ordering::SeqCst) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        let registry = self.registry.clone();
        let stripes = self.stripes.clone();
        rt.spawn(async move {
            let _order = stripe(&stripes, mid).lock().await;
            if registry.sessions_of(mid) > 0 {
                return;
            }
            let mut con = inner.con();
            let gone: redis::RedisResult<i64> = inner
                .scripts
                .logout
                .arg(&inner.opts.prefix)
                .arg(mid)
                .arg(&inner.opts.node_id)
                .arg(&inner.token)
                .invoke_async(&mut con)
                .await;
            if let Err(e) = gone {
                // Messages routed here meanwhile go to the inbox (the mid
                // has no session here), and the node's death ends it.
                tracing::warn!(mid, cause = %e, "cluster logout not recorded");
            }
        });
    }
}

fn stripe(stripes: &[tokio::sync::Mutex<()>], mid: Mid) -> &tokio::sync::Mutex<()> {
    &stripes[mid.unsigned_abs() as usize % stripes.len()]
}

/// The cluster's shared [`MessageStore`]: history, offline inboxes; made by
/// [`RedisCluster::store`].
///
/// Used on its own (without the broker), [`append`](MessageStore::append)
/// stores and numbers a message without routing it.
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.opts.prefix)
            .finish_non_exhaustive()
    }
}

/// The `to` of a message of `conversation` sent by `from`.
fn recipient(conversation: Conversation, from: Mid) -> i32 {
    match conversation {
        Conversation::Direct(a, b) if a == from => b,
        Conversation::Direct(a, _) => a,
        Conversation::Group(g) => g,
    }
}

fn bad_reply(what: &str) -> BoxError {
    format!("malformed {what} in Redis").into()
}

#[async_trait]
impl MessageStore for RedisStore {
    async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError> {
        let chat = self
            .inner
            .send_script(&draft, Route::StoreOnly, 0, false)
            .await?;
        Ok(draft.into_message(chat))
    }

    async fn history(
        &self,
        conversation: Conversation,
        after: i64,
        limit: usize,
    ) -> Result<History, BoxError> {
        let mut con = self.inner.con();
        let reply: Vec<redis::Value> = self
            .inner
            .scripts
            .history
            .arg(&self.inner.opts.prefix)
            .arg(conv_key(conversation))
            .arg(after)
            .arg(limit)
            .invoke_async(&mut con)
            .await?;
        let int = |v: &redis::Value| redis::from_redis_value::<i64>(v).map_err(BoxError::from);
        let (Some(head), Some(oldest)) = (reply.first(), reply.get(1)) else {
            return Err(bad_reply("history"));
        };
        let (head, oldest) = (int(head)?, int(oldest)?);
        let op = match conversation {
            Conversation::Group(_) => comet_core::op::SEND_TO_GROUP,
            Conversation::Direct(..) => comet_core::op::SEND_TO_USER,
        };
        let mut messages = Vec::with_capacity((reply.len() - 2) / 3);
        for entry in reply[2..].chunks(3) {
            let [chat, from, msg] = entry else {
                return Err(bad_reply("history entry"));
            };
            let from: Mid = redis::from_redis_value(from)?;
            let msg: Vec<u8> = redis::from_redis_value(msg)?;
            messages.push(Message::new(Delivered {
                op,
                chat_id: int(chat)?,
                from,
                to: recipient(conversation, from),
                msg: Bytes::from(msg),
            }));
        }
        Ok(History {
            messages,
            oldest,
            head,
        })
    }

    async fn push_offline(&self, mid: Mid, msg: Arc<Message>) -> Result<(), BoxError> {
        let d = msg.delivered();
        let mut con = self.inner.con();
        let _: i64 = self
            .inner
            .scripts
            .push
            .arg(&self.inner.opts.prefix)
            .arg(mid)
            .arg(self.inner.opts.inbox)
            .arg(d.op)
            .arg(d.from)
            .arg(d.to)
            .arg(d.chat_id)
            .arg(&d.msg[..])
            .invoke_async(&mut con)
            .await?;
        Ok(())
    }

    async fn offline(&self, mid: Mid, limit: usize) -> Result<Vec<Offline>, BoxError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut con = self.inner.con();
        let key = format!("{}in:{mid}", self.inner.opts.prefix);
        let entries: Vec<Vec<u8>> = redis::cmd("ZRANGE")
            .arg(key)
            .arg(0)
            .arg(limit - 1)
            .query_async(&mut con)
            .await?;
        entries
            .iter()
            .map(|e| {
                let parsed = (|| {
                    let [seq, op, from, to, chat, msg] = fields::<6>(e)?;
                    Some(Offline {
                        seq: num(seq)?,
                        msg: Message::new(Delivered {
                            op: num(op)?,
                            chat_id: num(chat)?,
                            from: num(from)?,
                            to: num(to)?,
                            msg: Bytes::copy_from_slice(msg),
                        }),
                    })
                })();
                parsed.ok_or_else(|| bad_reply("inbox entry"))
            })
            .collect()
    }

    async fn remove_offline(&self, mid: Mid, through: u64) -> Result<(), BoxError> {
        let mut con = self.inner.con();
        let key = format!("{}in:{mid}", self.inner.opts.prefix);
        let _: i64 = redis::cmd("ZREMRANGEBYSCORE")
            .arg(key)
            .arg("-inf")
            .arg(through)
            .query_async(&mut con)
            .await?;
        Ok(())
    }
}

/// The cluster's shared [`GroupDirectory`], with join and leave; made by
/// [`RedisCluster::groups`].
pub struct RedisGroups {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisGroups")
            .field("prefix", &self.inner.opts.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisGroups {
    /// Adds `mid` to `group` (creating it); idempotent. A new member's
    /// catch-up starts at the group's current chatId.
    pub async fn join(&self, group: GroupId, mid: Mid) -> Result<(), BoxError> {
        self.change(&self.inner.scripts.join, group, mid).await?;
        Ok(())
    }

    /// Removes `mid` from `group`.
    pub async fn leave(&self, group: GroupId, mid: Mid) -> Result<(), BoxError> {
        self.change(&self.inner.scripts.leave, group, mid).await?;
        Ok(())
    }

    /// Runs the join or leave script; whether the membership changed.
    async fn change(&self, script: &Script, group: GroupId, mid: Mid) -> Result<bool, BoxError> {
        let mut con = self.inner.con();
        let changed: i64 = script
            .arg(&self.inner.opts.prefix)
            .arg(group)
            .arg(mid)
            .invoke_async(&mut con)
            .await?;
        Ok(changed == 1)
    }

    /// Adds every mid of `members` to `group` (idempotent: members already
    /// in keep their catch-up point; members not listed stay), in one
    /// pipeline.
    pub async fn set_members(
        &self,
        group: GroupId,
        members: impl IntoIterator<Item = Mid>,
    ) -> Result<(), BoxError> {
        let mut pipe = redis::pipe();
        for mid in members {
            pipe.invoke_script(
                self.inner
                    .scripts
                    .join
                    .arg(&self.inner.opts.prefix)
                    .arg(group)
                    .arg(mid),
            );
        }
        let mut con = self.inner.con();
        // A pipeline's EVALSHA may meet NOSCRIPT: load the script first.
        self.inner
            .scripts
            .join
            .prepare_invoke()
            .load_async(&mut con)
            .await?;
        let _: Vec<i64> = pipe.query_async(&mut con).await?;
        Ok(())
    }
}

/// The admin API's `PUT` / `DELETE /api/groups/{group}/members/{mid}` in
/// cluster mode: [`join`](RedisGroups::join) and
/// [`leave`](RedisGroups::leave), for every node.
#[async_trait]
impl GroupMembership for RedisGroups {
    async fn add_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError> {
        self.change(&self.inner.scripts.join, group, mid).await
    }

    async fn remove_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError> {
        self.change(&self.inner.scripts.leave, group, mid).await
    }
}

#[async_trait]
impl GroupDirectory for RedisGroups {
    fn membership(&self) -> Option<&dyn GroupMembership> {
        Some(self)
    }

    async fn is_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError> {
        let mut con = self.inner.con();
        let key = format!("{}gm:{group}", self.inner.opts.prefix);
        Ok(redis::cmd("SISMEMBER")
            .arg(key)
            .arg(mid)
            .query_async(&mut con)
            .await?)
    }

    async fn members(&self, group: GroupId) -> Result<Members, BoxError> {
        let mut con = self.inner.con();
        let key = format!("{}gm:{group}", self.inner.opts.prefix);
        let members: Vec<Mid> = redis::cmd("SMEMBERS")
            .arg(key)
            .query_async(&mut con)
            .await?;
        Ok(members.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewind_undoes_the_membership_events_that_waited() {
        let msg = Message::new(Delivered {
            op: comet_core::op::SEND_TO_GROUP,
            chat_id: 1,
            from: 1,
            to: 9,
            msg: Bytes::from_static(b"m"),
        });
        // Before: {1, 2}. Then a message, 3 joins, 2 leaves, 2 joins again,
        // 1 leaves: the snapshot that follows says {2, 3}.
        let pending = [
            Pending::Msg(msg, None, 0),
            Pending::Join(3),
            Pending::Leave(2),
            Pending::Join(2),
            Pending::Leave(1),
        ];
        let mut members: HashSet<Mid> = [2, 3].into();
        rewind(&mut members, &pending);
        assert_eq!(members, [1, 2].into());
        rewind(&mut members, &pending[..1]);
        assert_eq!(members, [1, 2].into(), "messages change nothing");
    }

    /// A message that waited for its group's members goes to the sessions
    /// of its own moment: a member whose login reached the feed after it
    /// (its login's catch-up has it) does not get it live, and one whose
    /// logout came after it still does (in its inbox, having no session).
    #[test]
    fn a_message_that_waited_for_its_group_goes_to_the_sessions_of_its_moment() {
        let msg = |chat_id, from, at| {
            Pending::Msg(
                Message::new(Delivered {
                    op: comet_core::op::SEND_TO_GROUP,
                    chat_id,
                    from,
                    to: 9,
                    msg: Bytes::from_static(b"m"),
                }),
                None,
                at,
            )
        };
        let moved = |mid, login| Move {
            mid,
            login,
            before: !login,
        };
        // Members {1, 2, 3, 4}; local before the wait {2, 4, 5}. The log
        // starts at position 100 (earlier loads' moves were dropped); 7
        // moved before the first waiting message, which is not this wait's.
        let moves = [
            moved(7, true),
            moved(3, true),
            moved(4, false),
            moved(2, false),
        ];
        let pending = vec![msg(1, 2, 101), msg(2, 2, 103), msg(3, 1, 104)];
        let local: HashSet<Mid> = [3, 5, 7].into();
        let mut members: HashSet<Mid> = [1, 2, 3, 4, 7].into();
        let got: Vec<(i64, Vec<Mid>, Option<Mid>)> =
            replay(&local, &mut members, pending, &moves, 100)
                .into_iter()
                .map(|(m, _, mut to, echo)| {
                    to.sort_unstable();
                    (m.delivered().chat_id, to, echo)
                })
                .collect();
        assert_eq!(
            got,
            [
                (1, vec![4, 7], Some(2)),
                (2, vec![3, 7], Some(2)),
                (3, vec![3, 7], None)
            ]
        );

        // Nothing moved during the wait: the sessions of now.
        let mut members: HashSet<Mid> = [1, 2, 3].into();
        let got = replay(&local, &mut members, vec![msg(4, 1, 104)], &moves, 100);
        assert_eq!((got[0].2.clone(), got[0].3), (vec![3], None));
    }

    /// Reads from `r` until a read would wait; returns the bytes read.
    async fn read_ready(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> usize {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 512];
        let mut n = 0;
        while let Some(got) = r.read(&mut buf).now_or_never() {
            let got = got.unwrap();
            assert!(got > 0, "the writer stays open");
            n += got;
        }
        n
    }

    #[tokio::test]
    async fn a_feed_connection_reads_no_further_than_its_budget_ahead_of_the_feed() {
        use tokio::io::AsyncWriteExt as _;
        let (mut redis, node) = tokio::io::duplex(64 * 1024);
        let budget = Arc::new(Budget::new(3000));
        let mut feed = Bounded::new(node, budget.clone());
        redis.write_all(&[7; 10_000]).await.unwrap();
        // The reader stops once 3,000 bytes are waiting for the feed task
        // (plus at most the one read that crossed the limit)...
        let first = read_ready(&mut feed).await;
        assert!((3000..3000 + 512).contains(&first), "{first}");
        assert_eq!(read_ready(&mut feed).await, 0, "stopped");
        // ...and goes on when the feed task has caught up, one budget at
        // a time, until it has read everything.
        let mut total = first;
        while total < 10_000 {
            budget.caught_up();
            let more = read_ready(&mut feed).await;
            assert!(more > 0 && more < 3000 + 512, "{more}");
            total += more;
        }
        assert_eq!(total, 10_000);
        // A reader stopped at its budget is woken by the catch-up.
        budget.caught_up();
        redis.write_all(&[7; 5000]).await.unwrap();
        assert!(read_ready(&mut feed).await >= 3000);
        let wait = tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut buf = [0u8; 512];
            feed.read(&mut buf).await.unwrap()
        });
        tokio::task::yield_now().await;
        assert!(!wait.is_finished());
        budget.caught_up();
        let n = tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("woken")
            .unwrap();
        assert!(n > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_feed_with_many_messages_and_many_pushes_is_held() {
        let step = |ms| tokio::time::advance(Duration::from_millis(ms));
        let mut flood = Flood::new();
        // A 2,000-member group at 50 messages a second, all on this node:
        // many pushes, few messages.
        for _ in 0..10 {
            step(20).await;
            flood.count(1, 2_000);
            assert!(!flood.on());
        }
        // Many messages to few sessions each.
        for _ in 0..10 {
            step(5).await;
            flood.count(1, 20);
            assert!(!flood.on());
        }
        // Both: held once a whole window of it has been counted.
        for _ in 0..25 {
            step(5).await;
            flood.count(1, 667);
        }
        assert!(flood.on());
        // A feed that went quiet is not held, even before a new window.
        step(2 * FLOOD_WINDOW.as_millis() as u64).await;
        assert!(!flood.on());
        flood.count(1, 667);
        assert!(!flood.on());
    }

    #[test]
    fn risky_redis_settings_are_named_and_safe_ones_are_not() {
        let safe = HashMap::from([
            ("maxmemory", "0"),
            ("maxmemory-policy", "allkeys-lru"),
            ("appendonly", "yes"),
            (
                "client-output-buffer-limit",
                "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60",
            ),
        ]);
        // An eviction policy matters only under a memory limit.
        assert!(risky_settings(&safe).is_empty());
        let mut limited = safe.clone();
        limited.insert("maxmemory", "1073741824");
        assert_eq!(names(&limited), ["maxmemory-policy"]);
        limited.insert("maxmemory-policy", "noeviction");
        assert!(risky_settings(&limited).is_empty());

        let mut risky = safe.clone();
        risky.insert("appendonly", "no");
        risky.insert(
            "client-output-buffer-limit",
            "normal 0 0 0 slave 268435456 67108864 60 pubsub 0 0 0",
        );
        assert_eq!(names(&risky), ["appendonly", "client-output-buffer-limit"]);
        // A soft limit alone still drops a subscriber that stays over it.
        risky.insert("client-output-buffer-limit", "pubsub 0 8388608 60");
        assert_eq!(names(&risky), ["appendonly"]);
        // Settings a Redis did not report are not judged.
        assert!(risky_settings(&HashMap::new()).is_empty());
    }

    #[tokio::test]
    async fn tls_without_a_certificate_check_or_with_an_empty_ca_is_refused_before_connecting() {
        // Nothing listens on port 1: these fail on their options alone.
        let insecure = RedisOptions::new("rediss://127.0.0.1:1/#insecure", "n");
        let err = RedisCluster::connect(insecure).await.unwrap_err();
        assert!(err.to_string().contains("#insecure"), "{err}");
        let empty = RedisOptions::new("rediss://127.0.0.1:1/", "n").tls_ca("not a PEM");
        let err = RedisCluster::connect(empty).await.unwrap_err();
        assert!(err.to_string().contains("tls_ca"), "{err}");
    }

    #[tokio::test]
    async fn a_node_ttl_too_short_to_heartbeat_in_is_refused_before_connecting() {
        let short = RedisOptions::new("redis://127.0.0.1:1/", "n").node_ttl(Duration::ZERO);
        let err = RedisCluster::connect(short).await.unwrap_err();
        assert!(err.to_string().contains("node_ttl"), "{err}");
    }

    #[test]
    fn urls_are_logged_without_their_password() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
            ("redis://u:p@ss:w@rd@h:1", "redis://u:***@h:1"),
            ("redis://u:pa/ss@h:1/0", "redis://u:***@h:1/0"),
            ("redis://user@h:1/", "redis://user@h:1/"),
            (
                "redis+unix:///run/redis.sock",
                "redis+unix:///run/redis.sock",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        let opts = RedisOptions::new("redis://u:secret@h:1/", "n");
        assert!(!format!("{opts:?}").contains("secret"));
    }

    fn names(settings: &HashMap<&str, &str>) -> Vec<&'static str> {
        risky_settings(settings)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn feed_fields_split_at_newlines_and_keep_the_rest_whole() {
        assert_eq!(
            fields::<3>(b"1\n2\nbytes\nwith\nnewlines"),
            Some([&b"1"[..], b"2", b"bytes\nwith\nnewlines"])
        );
        assert_eq!(fields::<3>(b"1\n2"), None);
    }
}
