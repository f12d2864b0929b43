//! The application's building blocks: the SQLite-backed [`SqlUsers`], the
//! [`Sessions`] its REST login issues, the [`AppAuth`] authenticator that
//! accepts either, the comet assembly and the axum router.
//!
//! `main.rs` serves them; `tests/embed_axum.rs` includes this same file with
//! `#[path = "../examples/embed_axum/app.rs"] mod app;` and drives them over
//! real sockets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use argon2::password_hash::{self, PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, PasswordHash, Version};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use comet::core::{
    async_trait, AuthContext, AuthOutcome, Authenticator, BoxError, ConnId, Conversation, Event,
    Identity, Mid, SendError,
};
use comet::plugins::memory::{MemoryGroups, MemoryStore};
use comet::transports::axum::CometWs;
use comet::Comet;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

/// The demo users seeded at startup: (mid, password).
pub(crate) const DEMO_USERS: [(Mid, &str); 2] = [(1, "pw1"), (2, "pw2")];

/// Argon2id parameters for new hashes: 19 MiB, 2 passes, 1 lane, the OWASP
/// minimum and the crate's default. Verification always uses the parameters
/// stored in the hash itself, so they can be raised later without
/// invalidating existing users.
fn hasher() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::default())
}

/// Hashes `password` with a fresh random salt into a PHC string
/// (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`). CPU-heavy: call it off
/// the async runtime.
fn hash_password(password: &str) -> Result<String, BoxError> {
    Ok(hasher().hash_password(password.as_bytes())?.to_string())
}

/// Whether `password` matches the PHC string `stored`. CPU-heavy.
fn password_matches(password: &str, stored: &str) -> Result<bool, BoxError> {
    let parsed = PasswordHash::new(stored)?;
    match hasher().verify_password(password.as_bytes(), &parsed) {
        Ok(()) => Ok(true),
        Err(password_hash::Error::PasswordInvalid) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn lock(db: &Mutex<Connection>) -> Result<MutexGuard<'_, Connection>, BoxError> {
    db.lock().map_err(|_| "user database lock poisoned".into())
}

/// The application's user table in SQLite: mid → salted argon2id hash of the
/// user's key. Plaintext keys are never stored.
///
/// SQLite and argon2 both block, so every call runs on tokio's blocking pool;
/// at most one hash per CPU is computed at a time (argon2 is memory-hard, and
/// a flood of logins must not spawn hundreds of 19 MiB computations).
pub(crate) struct SqlUsers {
    db: Arc<Mutex<Connection>>,
    /// Verified against when a mid is unknown, so a login takes as long for
    /// an unknown mid as for a wrong key and timing does not reveal which
    /// mids exist.
    dummy: Arc<str>,
    hashing: Arc<Semaphore>,
}

impl SqlUsers {
    /// Opens (creating if needed) the database at `path`; `":memory:"` is a
    /// private in-memory database that lives as long as this value.
    pub(crate) async fn open(path: &str) -> Result<Self, BoxError> {
        let path = path.to_owned();
        let (conn, dummy) = tokio::task::spawn_blocking(move || -> Result<_, BoxError> {
            let conn = Connection::open(&path)?;
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS users (
                     mid       INTEGER PRIMARY KEY,
                     mkey_hash TEXT NOT NULL
                 )",
            )?;
            let dummy = hash_password("no user has this key")?;
            Ok((conn, dummy))
        })
        .await??;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(SqlUsers {
            db: Arc::new(Mutex::new(conn)),
            dummy: dummy.into(),
            hashing: Arc::new(Semaphore::new(cpus)),
        })
    }

    /// Adds user `mid` with key `password`; `false` if `mid` already exists
    /// (its key is left unchanged).
    pub(crate) async fn add_user(&self, mid: Mid, password: String) -> Result<bool, BoxError> {
        let _slot = self.hashing.acquire().await?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            // Hash before taking the lock: other queries go on meanwhile.
            let hash = hash_password(&password)?;
            let inserted = lock(&db)?.execute(
                "INSERT OR IGNORE INTO users (mid, mkey_hash) VALUES (?1, ?2)",
                params![mid, hash],
            )?;
            Ok(inserted == 1)
        })
        .await?
    }

    /// Whether `mid` exists and `password` is its key.
    pub(crate) async fn check(&self, mid: Mid, password: String) -> Result<bool, BoxError> {
        let _slot = self.hashing.acquire().await?;
        let db = self.db.clone();
        let dummy = self.dummy.clone();
        tokio::task::spawn_blocking(move || {
            let stored: Option<String> = lock(&db)?
                .query_row("SELECT mkey_hash FROM users WHERE mid = ?1", [mid], |row| {
                    row.get(0)
                })
                .optional()?;
            match stored {
                Some(hash) => password_matches(&password, &hash),
                None => password_matches(&password, &dummy).map(|_| false),
            }
        })
        .await?
    }

    /// Runs `f` on the database connection, on the blocking pool: for the
    /// application's own queries.
    pub(crate) async fn with_conn<T, F>(&self, f: F) -> Result<T, BoxError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || Ok(f(&*lock(&db)?)?)).await?
    }
}

/// How a session logged in: the typed per-session data the authenticator
/// attaches ([`Identity::with_extension`]); the event hook reads it back,
/// and so could any middleware (`ConnContext::extensions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    /// The `session` cookie `POST /login` set, sent with the upgrade
    /// request (browsers do this by themselves).
    Cookie,
    /// `Authorization: Bearer <token>` on the upgrade request, the token
    /// from `POST /login` (non-browser clients).
    Bearer,
    /// `mid` and `mkey` in op 7's body, checked against the user table.
    Key,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Cookie => "cookie",
            Via::Bearer => "bearer",
            Via::Key => "key",
        }
    }
}

/// The login sessions `POST /login` issues (random 256-bit tokens → mid),
/// and the live WebSocket sessions with how each logged in, kept by the
/// comet's event hook. In memory: a restart logs everyone out.
#[derive(Default)]
pub(crate) struct Sessions {
    tokens: Mutex<HashMap<String, Mid>>,
    live: Mutex<HashMap<ConnId, (Mid, Via)>>,
}

impl Sessions {
    /// A new token for `mid`.
    fn issue(&self, mid: Mid) -> Result<String, BoxError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens
            .lock()
            .map_err(|_| "session table lock poisoned")?
            .insert(token.clone(), mid);
        Ok(token)
    }

    /// The mid a token was issued for.
    fn mid_of(&self, token: &str) -> Option<Mid> {
        self.tokens.lock().ok()?.get(token).copied()
    }

    /// The event hook: keeps `live` up to date from the extension each
    /// login attached.
    fn observe(&self, event: &Event) {
        let Ok(mut live) = self.live.lock() else {
            return;
        };
        match event {
            Event::Authenticated {
                conn,
                mid,
                extensions,
                ..
            } => {
                let via = extensions.get::<Via>().copied().unwrap_or(Via::Key);
                live.insert(conn.conn_id, (*mid, via));
            }
            Event::Disconnected { conn, .. } => {
                live.remove(&conn.conn_id);
            }
            _ => {}
        }
    }

    /// How each live session of `mid` logged in, sorted.
    fn logins_of(&self, mid: Mid) -> Vec<&'static str> {
        let mut via: Vec<_> = self.live.lock().map_or_else(
            |_| Vec::new(),
            |live| {
                live.values()
                    .filter(|(m, _)| *m == mid)
                    .map(|(_, v)| v.as_str())
                    .collect()
            },
        );
        via.sort_unstable();
        via
    }
}

/// The token of a WebSocket upgrade request: the `session` cookie, or else
/// a bearer token.
fn token_of(ctx: &AuthContext) -> Option<(Via, &str)> {
    let headers = ctx.headers()?;
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("session="));
    if let Some(token) = cookie {
        return Some((Via::Cookie, token));
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|token| (Via::Bearer, token.trim()))
}

/// The comet's authenticator: a session token from the upgrade request
/// (cookie or bearer, issued by `POST /login`) logs in as its user, op 7's
/// body may then be empty; without one, op 7 must carry `mid` and `mkey`,
/// checked against the user table. Each login attaches how it was made
/// ([`Via`]).
pub(crate) struct AppAuth {
    users: Arc<SqlUsers>,
    sessions: Arc<Sessions>,
}

#[async_trait]
impl Authenticator for AppAuth {
    async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError> {
        let req = ctx.auth_request();
        if let Some((via, token)) = token_of(ctx) {
            return Ok(match self.sessions.mid_of(token) {
                // A body naming another user than the token's is refused.
                Some(mid) if req.mid().is_none_or(|m| m == mid) => {
                    AuthOutcome::Accepted(Identity::new(mid).with_extension(via))
                }
                Some(_) => AuthOutcome::Denied("mid does not match the session".into()),
                None => AuthOutcome::Denied("unknown or expired session".into()),
            });
        }
        let (Some(mid), Some(mkey)) = (req.mid(), req.mkey()) else {
            return Ok(AuthOutcome::Denied("mid and mkey are required".into()));
        };
        // A database error is an `Err`: comet answers "authentication
        // backend unavailable" and logs it.
        if self.users.check(mid, mkey.to_owned()).await? {
            Ok(AuthOutcome::Accepted(
                Identity::new(mid).with_extension(Via::Key),
            ))
        } else {
            Ok(AuthOutcome::Denied("unknown mid or wrong mkey".into()))
        }
    }
}

/// Adds the demo users that do not exist yet; returns the mids added.
pub(crate) async fn seed_demo_users(users: &SqlUsers) -> Result<Vec<Mid>, BoxError> {
    let mut added = Vec::new();
    for (mid, password) in DEMO_USERS {
        if users.add_user(mid, password.to_owned()).await? {
            added.push(mid);
        }
    }
    Ok(added)
}

/// The comet: logins by session token or checked against `users`
/// ([`AppAuth`]), live sessions tracked in `sessions` by an event hook,
/// messages and groups in memory.
pub(crate) fn comet(users: Arc<SqlUsers>, sessions: Arc<Sessions>) -> Comet {
    let observer = sessions.clone();
    Comet::builder()
        .authenticator(Arc::new(AppAuth { users, sessions }))
        .store(Arc::new(MemoryStore::default()))
        .groups(Arc::new(MemoryGroups::default()))
        .on_event(move |event| observer.observe(event))
        .build()
        .expect("every plug-in is given")
}

#[derive(Clone)]
struct AppState {
    comet: Comet,
    users: Arc<SqlUsers>,
    sessions: Arc<Sessions>,
}

/// The application: its own REST routes, and comet's WebSocket endpoint
/// mounted at `/sub`.
///
/// The REST routes are unauthenticated to keep the example short; a real
/// application puts them behind its own authentication.
pub(crate) fn app(comet: Comet, users: Arc<SqlUsers>, sessions: Arc<Sessions>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/login", post(login))
        .route("/users", post(register))
        .route("/users/{mid}/online", get(online))
        .route("/users/{mid}/notify", post(notify))
        .route("/users/{mid}/history/{with}", get(direct_history))
        .with_state(AppState {
            comet: comet.clone(),
            users,
            sessions,
        })
        .route_service("/sub", CometWs::new(comet))
}

fn error(status: StatusCode, reason: impl ToString) -> Response {
    (status, Json(json!({ "error": reason.to_string() }))).into_response()
}

#[derive(Deserialize)]
struct NewUser {
    mid: Mid,
    password: String,
}

/// `POST /users {"mid": 5, "password": "..."}` → 201, or 409 if it exists.
async fn register(State(state): State<AppState>, Json(user): Json<NewUser>) -> Response {
    if user.mid <= 0 {
        return error(StatusCode::BAD_REQUEST, "mid must be positive");
    }
    if user.password.is_empty() {
        return error(StatusCode::BAD_REQUEST, "password must not be empty");
    }
    match state.users.add_user(user.mid, user.password).await {
        Ok(true) => (StatusCode::CREATED, Json(json!({ "mid": user.mid }))).into_response(),
        Ok(false) => error(StatusCode::CONFLICT, format!("mid {} exists", user.mid)),
        Err(e) => {
            tracing::error!(cause = %e, "registering a user failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "user database unavailable",
            )
        }
    }
}

/// `POST /login {"mid": 1, "password": "pw1"}` → 200 `{"mid": 1, "token":
/// "..."}` with `Set-Cookie: session=...; HttpOnly; SameSite=Strict`: a
/// browser's WebSocket to `/sub` then sends the cookie by itself, another
/// client sends the token as `Authorization: Bearer ...`; either logs in
/// with an empty op 7 body. 401 for a wrong password or an unknown mid.
async fn login(State(state): State<AppState>, Json(user): Json<NewUser>) -> Response {
    match state.users.check(user.mid, user.password).await {
        Ok(true) => match state.sessions.issue(user.mid) {
            Ok(token) => {
                let cookie = format!("session={token}; HttpOnly; SameSite=Strict; Path=/");
                (
                    [(header::SET_COOKIE, cookie)],
                    Json(json!({ "mid": user.mid, "token": token })),
                )
                    .into_response()
            }
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        Ok(false) => error(StatusCode::UNAUTHORIZED, "unknown mid or wrong password"),
        Err(e) => {
            tracing::error!(cause = %e, "checking a login failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "user database unavailable",
            )
        }
    }
}

/// `GET /users/{mid}/online` → `{"mid": 5, "online": true, "sessions": 1,
/// "via": ["cookie"]}`: how each live session logged in, as its login's
/// extension told the event hook.
async fn online(State(state): State<AppState>, Path(mid): Path<Mid>) -> Response {
    Json(json!({
        "mid": mid,
        "online": state.comet.is_online(mid),
        "sessions": state.comet.sessions_of(mid),
        "via": state.sessions.logins_of(mid),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct Notice {
    /// The sender; 0 (the default) stands for the system.
    #[serde(default)]
    from: Mid,
    msg: String,
}

/// `POST /users/{mid}/notify {"from": 0, "msg": "..."}` → `{"chatId": n}`:
/// sent exactly as if `from` had sent op 18 (stored, chatId assigned,
/// delivered to `mid`'s sessions or kept in its offline inbox).
async fn notify(
    State(state): State<AppState>,
    Path(to): Path<Mid>,
    Json(notice): Json<Notice>,
) -> Response {
    match state
        .comet
        .send_to_user(notice.from, to, notice.msg.into())
        .await
    {
        Ok(chat_id) => Json(json!({ "chatId": chat_id })).into_response(),
        Err(e @ (SendError::Store(_) | SendError::Groups(_))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e)
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// The page a history route asks for: `?after=41&limit=50`.
#[derive(Deserialize)]
struct Page {
    /// Messages with a chatId above this one (default 0: from the start).
    #[serde(default)]
    after: i64,
    /// At most this many (default 50, at most 500).
    #[serde(default = "Page::default_limit")]
    limit: usize,
}

impl Page {
    fn default_limit() -> usize {
        50
    }
}

/// `GET /users/{mid}/history/{with}?after=0&limit=50` → the conversation
/// of `mid` and `with`, oldest first: `{"oldest": 1, "head": 9, "messages":
/// [{"chatId": 1, "from": 1, "to": 2, "msg": "hi"}, ...]}` (the read behind
/// op 22; bytes that are not UTF-8 come as base64 with `"enc": "base64"`).
async fn direct_history(
    State(state): State<AppState>,
    Path((mid, with)): Path<(Mid, Mid)>,
    Query(page): Query<Page>,
) -> Response {
    if page.after < 0 {
        return error(StatusCode::BAD_REQUEST, "after must not be negative");
    }
    let conversation = Conversation::direct(mid, with);
    match state
        .comet
        .history(conversation, page.after, page.limit.min(500))
        .await
    {
        Ok(history) => {
            let messages: Vec<_> = history
                .messages
                .iter()
                .map(|m| {
                    let d = m.delivered();
                    let mut item = json!({"chatId": d.chat_id, "from": d.from, "to": d.to});
                    match std::str::from_utf8(&d.msg) {
                        Ok(text) => item["msg"] = json!(text),
                        Err(_) => {
                            use base64::Engine as _;
                            let b64 = base64::engine::general_purpose::STANDARD.encode(&d.msg);
                            item["msg"] = json!(b64);
                            item["enc"] = json!("base64");
                        }
                    }
                    item
                })
                .collect();
            Json(json!({
                "oldest": history.oldest,
                "head": history.head,
                "messages": messages,
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}
