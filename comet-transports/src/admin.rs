//! The admin and push HTTP API (feature `admin`): one axum [`Router`] built
//! from a [`Comet`] handle, for an operator and for backend services that
//! push through comet without writing Rust. Nest it in an existing app, or
//! serve it on a listener of its own (`chat_server` does, on
//! `[admin] listen`).
//!
//! | route | what |
//! |---|---|
//! | `GET /metrics` | Prometheus text, rendered by [`AdminOptions::metrics`] (404 without one) |
//! | `GET /healthz` | 200 while the process answers |
//! | `GET /readyz` | 200 when the listeners are up ([`AdminOptions::ready`]), the cluster broker is ready ([`Comet::broker_ready`](comet_core::Comet::broker_ready)) and the store answers; 503 otherwise, with the reason |
//! | `POST /api/send/user` | send to a user on behalf of `from`, as op 18 |
//! | `POST /api/send/users` | the same message to several users, one 1:1 send each |
//! | `POST /api/send/group` | send to a group on behalf of `from`, as op 20; `"system": true` skips the membership check |
//! | `GET /api/online` | this node's session and connection totals and online users; in cluster mode also the cluster's live nodes and sessions |
//! | `GET /api/nodes` | in cluster mode, every live node with its readiness and session count (404 on a single node) |
//! | `GET /api/users/{mid}` | whether `mid` is online here, its session count here, and in cluster mode the nodes holding a session of it |
//! | `POST /api/users/{mid}/kick` | closes every session of `mid` (on every node of a cluster) |
//! | `GET /api/history/user/{a}/{b}` | a page of the a–b conversation (`after`, `limit`) |
//! | `GET /api/history/group/{group}` | a page of a group's conversation |
//! | `GET /api/groups/{group}/members` | a group's members |
//! | `PUT`/`DELETE /api/groups/{group}/members/{mid}` | membership changes, where the [`GroupDirectory`](comet_core::GroupDirectory) supports them (501 otherwise) |
//! | `GET /api/openapi.json` | the OpenAPI 3.1 document of these routes |
//!
//! Bodies are JSON. A message's `msg` is a UTF-8 string, or base64 with
//! `"enc": "base64"` (PROTOCOL.md 2.4); messages read back carry `enc` when
//! their bytes are not UTF-8. Sends follow exactly the rules and results of
//! a client's op 18 / op 20: validated, stored (chatId assigned), delivered
//! to live sessions and kept offline for the others. Errors are
//! `{"ret": -1, "error": "..."}` with status 400 (bad request), 401 (no or
//! wrong token), 403 (not a member of the group), 404 (unknown user, or no
//! such route), 413 (message over the limit), 501 (the directory does not
//! support membership changes) or 503 (a plug-in is unavailable, or the
//! comet is shutting down).
//!
//! Every route under `/api/` needs `Authorization: Bearer <token>` when
//! [`AdminOptions::token`] is set; the token is compared in constant time.
//! Without a token `/api/` is open: serve it on loopback only.
//!
//! ```no_run
//! # async fn run(comet: comet_core::Comet) -> std::io::Result<()> {
//! use comet_transports::admin::{self, AdminOptions};
//!
//! let app = admin::router(comet, AdminOptions::new().token("s3cret"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3103").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! Nested under a prefix of an application's own router (the routes then
//! sit at `/admin/metrics`, `/admin/api/send/user`, ...):
//!
//! ```no_run
//! # async fn run(comet: comet_core::Comet) -> std::io::Result<()> {
//! # use comet_transports::admin::{self, AdminOptions};
//! let app = axum::Router::new()
//!     .route("/", axum::routing::get(|| async { "my app" }))
//!     .nest("/admin", admin::router(comet, AdminOptions::new().token("s3cret")));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await
//! # }
//! ```

use std::fmt;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use comet_core::{Comet, Conversation, GroupId, Mid, SendError, SyncError};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, OpenApi, ToSchema};

/// Renders the metrics text for `GET /metrics`.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;
/// Says whether the listeners are up, for `GET /readyz`.
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the admin router needs beyond the comet.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct AdminOptions {
    /// The bearer token `/api/` requires; `None`: `/api/` is open.
    pub token: Option<String>,
    /// Renders `GET /metrics` (e.g. a
    /// `metrics_exporter_prometheus::PrometheusHandle`'s `render`); the
    /// router samples the comet's gauges first. `None`: 404.
    pub metrics: Option<MetricsRender>,
    /// Whether the listeners are up, for `GET /readyz` (`None`: assumed).
    pub ready: Option<ReadyCheck>,
}

impl fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminOptions")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("metrics", &self.metrics.is_some())
            .field("ready", &self.ready.is_some())
            .finish()
    }
}

impl AdminOptions {
    /// No token, no metrics, always ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requires `Authorization: Bearer <token>` on `/api/`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Renders `GET /metrics` with `render`.
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// Answers `GET /readyz`'s "listeners up" with `ready`.
    pub fn ready(mut self, ready: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.ready = Some(Arc::new(ready));
        self
    }
}

#[derive(Clone)]
struct AppState {
    comet: Comet,
    options: AdminOptions,
}

/// The admin router (see the [module docs](self)).
pub fn router(comet: Comet, options: AdminOptions) -> Router {
    // Room for the largest message in base64 plus the JSON around it;
    // anything larger is refused (413) before it is read.
    let body_limit = comet.config().max_body * 4 / 3 + 64 * 1024;
    let state = AppState { comet, options };
    let api = Router::new()
        .route("/send/user", post(send_user))
        .route("/send/users", post(send_users))
        .route("/send/group", post(send_group))
        .route("/online", get(online))
        .route("/nodes", get(nodes))
        .route("/users/{mid}", get(user))
        .route("/users/{mid}/kick", post(kick))
        .route("/history/user/{a}/{b}", get(history_user))
        .route("/history/group/{group}", get(history_group))
        .route("/groups/{group}/members", get(members))
        .route(
            "/groups/{group}/members/{mid}",
            put(add_member).delete(remove_member),
        )
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(DefaultBodyLimit::max(body_limit));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .nest("/api", api)
        .with_state(state)
}

/// The OpenAPI document of the admin API, generated from the handlers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "comet admin API",
        description = "Push, presence, history and group administration for a comet server."
    ),
    paths(
        send_user,
        send_users,
        send_group,
        online,
        nodes,
        user,
        kick,
        history_user,
        history_group,
        members,
        add_member,
        remove_member
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// An error answer: `{"ret": -1, "error": "..."}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    /// Always -1.
    pub ret: i32,
    /// What went wrong.
    pub error: String,
}

struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = ApiError {
            ret: -1,
            error: self.1,
        };
        (self.0, Json(body)).into_response()
    }
}

fn bad(why: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, why.into())
}

impl From<SendError> for Failure {
    fn from(e: SendError) -> Self {
        let status = match &e {
            SendError::MessageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            SendError::UnknownUser(_) => StatusCode::NOT_FOUND,
            SendError::NotMember(_) => StatusCode::FORBIDDEN,
            SendError::Store(_) | SendError::Groups(_) | SendError::Users(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_REQUEST,
        };
        Failure(status, e.to_string())
    }
}

impl From<SyncError> for Failure {
    fn from(e: SyncError) -> Self {
        let status = match &e {
            SyncError::Payload(_) => StatusCode::BAD_REQUEST,
            SyncError::NotMember(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Failure(status, e.to_string())
    }
}

type ApiResult<T> = Result<Json<T>, Failure>;

/// Reads a JSON body, answering 400 (or 413) in the API's error shape.
fn parse<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, Failure> {
    let body = body.map_err(|e| Failure(e.status(), e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| bad(format!("bad JSON body: {e}")))
}

/// A path parameter, or 400 in the API's error shape.
fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, Failure> {
    p.map(|Path(v)| v)
        .map_err(|e| Failure(e.status(), e.body_text()))
}

/// Query parameters, or 400 in the API's error shape.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, Failure> {
    q.map(|Query(v)| v)
        .map_err(|e| Failure(e.status(), e.body_text()))
}

fn decode_msg(msg: String, enc: Option<&str>) -> Result<Bytes, Failure> {
    match enc {
        None => Ok(Bytes::from(msg.into_bytes())),
        Some("base64") => BASE64
            .decode(msg.as_bytes())
            .map(Bytes::from)
            .map_err(|e| bad(format!("msg is not valid base64: {e}"))),
        Some(other) => Err(bad(format!(
            "unknown enc {other:?}, only \"base64\" is defined"
        ))),
    }
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.options.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time in the token's bytes (a length mismatch answers at
        // once: it reveals the length only).
        if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            let mut response = Failure(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token".into(),
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
    }
    if state.comet.is_shutting_down() {
        return Failure(StatusCode::SERVICE_UNAVAILABLE, "shutting down".into()).into_response();
    }
    next.run(req).await
}

async fn not_found() -> Failure {
    Failure(StatusCode::NOT_FOUND, "no such route".into())
}

async fn metrics(State(state): State<AppState>) -> Response {
    match &state.options.metrics {
        Some(render) => {
            state.comet.sample_metrics();
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            (headers, render()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no metrics recorder configured\n").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.comet.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if state.options.ready.as_ref().is_some_and(|ready| !ready()) {
        return (StatusCode::SERVICE_UNAVAILABLE, "listeners not up\n").into_response();
    }
    if !state.comet.broker_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster unavailable: this node's feed is not subscribed\n",
        )
            .into_response();
    }
    // A read of no messages: the store answers within the hook timeout.
    match state.comet.history(Conversation::direct(0, 0), 0, 0).await {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store not answering: {e}\n"),
        )
            .into_response(),
    }
}

/// `POST /api/send/user`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendToUser {
    /// The sender (what the recipient sees in `from`).
    pub from: Mid,
    /// The recipient.
    pub to: Mid,
    /// The message: UTF-8 text, or base64 with `enc`.
    pub msg: String,
    /// `"base64"` when `msg` is base64.
    #[serde(default)]
    pub enc: Option<String>,
}

/// `POST /api/send/users`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendToUsers {
    /// The sender.
    pub from: Mid,
    /// The recipients: one 1:1 send each, in order.
    pub to: Vec<Mid>,
    /// The message: UTF-8 text, or base64 with `enc`.
    pub msg: String,
    /// `"base64"` when `msg` is base64.
    #[serde(default)]
    pub enc: Option<String>,
}

/// `POST /api/send/group`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendToGroup {
    /// The sender; must be a member unless `system`.
    pub from: Mid,
    /// The group.
    pub group: GroupId,
    /// The message: UTF-8 text, or base64 with `enc`.
    pub msg: String,
    /// `"base64"` when `msg` is base64.
    #[serde(default)]
    pub enc: Option<String>,
    /// Send as a trusted system sender: no membership check
    /// ([`Comet::send_to_group_as_system`]).
    #[serde(default)]
    pub system: bool,
}

/// A stored send.
#[derive(Debug, Serialize, ToSchema)]
pub struct Sent {
    /// 0.
    pub ret: i32,
    /// The message's chatId in its conversation.
    #[serde(rename = "chatId")]
    pub chat_id: i64,
}

/// The outcome of one send of `POST /api/send/users`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SentTo {
    /// The recipient.
    pub mid: Mid,
    /// 0 when stored, -1 when refused.
    pub ret: i32,
    /// The chatId, when stored.
    #[serde(rename = "chatId", skip_serializing_if = "Option::is_none")]
    pub chat_id: Option<i64>,
    /// Why it was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer of `POST /api/send/users`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SentMany {
    /// 0 (each send's own outcome is in `results`).
    pub ret: i32,
    /// One per recipient, in order.
    pub results: Vec<SentTo>,
}

#[utoipa::path(post, path = "/api/send/user", tag = "send",
    request_body = SendToUser,
    responses(
        (status = 200, description = "stored and delivered", body = Sent),
        (status = 400, description = "bad request", body = ApiError),
        (status = 401, description = "missing or wrong token", body = ApiError),
        (status = 404, description = "unknown user", body = ApiError),
        (status = 413, description = "message over the limit", body = ApiError),
        (status = 503, description = "store or directory unavailable", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn send_user(
    State(state): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Sent> {
    let req: SendToUser = parse(body)?;
    let msg = decode_msg(req.msg, req.enc.as_deref())?;
    let chat_id = state.comet.send_to_user(req.from, req.to, msg).await?;
    Ok(Json(Sent { ret: 0, chat_id }))
}

#[utoipa::path(post, path = "/api/send/users", tag = "send",
    request_body = SendToUsers,
    responses(
        (status = 200, description = "one outcome per recipient", body = SentMany),
        (status = 400, description = "bad request", body = ApiError),
        (status = 401, description = "missing or wrong token", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn send_users(
    State(state): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<SentMany> {
    let req: SendToUsers = parse(body)?;
    let msg = decode_msg(req.msg, req.enc.as_deref())?;
    let outcomes = state.comet.send_to_users(req.from, &req.to, msg).await;
    let results = req
        .to
        .iter()
        .zip(outcomes)
        .map(|(&mid, outcome)| match outcome {
            Ok(chat_id) => SentTo {
                mid,
                ret: 0,
                chat_id: Some(chat_id),
                error: None,
            },
            Err(e) => SentTo {
                mid,
                ret: -1,
                chat_id: None,
                error: Some(e.to_string()),
            },
        })
        .collect();
    Ok(Json(SentMany { ret: 0, results }))
}

#[utoipa::path(post, path = "/api/send/group", tag = "send",
    request_body = SendToGroup,
    responses(
        (status = 200, description = "stored and delivered", body = Sent),
        (status = 400, description = "bad request", body = ApiError),
        (status = 401, description = "missing or wrong token", body = ApiError),
        (status = 403, description = "from is not a member", body = ApiError),
        (status = 413, description = "message over the limit", body = ApiError),
        (status = 503, description = "store or directory unavailable", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn send_group(
    State(state): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Sent> {
    let req: SendToGroup = parse(body)?;
    let msg = decode_msg(req.msg, req.enc.as_deref())?;
    let chat_id = if req.system {
        state
            .comet
            .send_to_group_as_system(req.from, req.group, msg)
            .await?
    } else {
        state.comet.send_to_group(req.from, req.group, msg).await?
    };
    Ok(Json(Sent { ret: 0, chat_id }))
}

/// Totals of this node, and in cluster mode of the cluster.
#[derive(Debug, Serialize, ToSchema)]
pub struct Online {
    /// 0.
    pub ret: i32,
    /// Logged-in sessions on this node.
    pub sessions: usize,
    /// Connections to this node, logged in or not.
    pub connections: usize,
    /// Mids with at least one session on this node.
    pub users: Vec<Mid>,
    /// In cluster mode: the live nodes and their sessions, as each node
    /// last reported them (every third of its heartbeat lifetime); absent
    /// on a single node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterTotals>,
    /// In cluster mode, when the cluster's totals could not be read (Redis
    /// unreachable): why. This node's own totals are answered all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_error: Option<String>,
}

/// The cluster's totals, summed over its live nodes' reports.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterTotals {
    /// Live nodes (heartbeat not expired).
    pub nodes: usize,
    /// Of them, those whose feed is subscribed (taking logins).
    pub ready: usize,
    /// Logged-in sessions on all of them.
    pub sessions: u64,
}

impl ClusterTotals {
    fn of(nodes: &[comet_core::NodeStatus]) -> Self {
        ClusterTotals {
            nodes: nodes.len(),
            ready: nodes.iter().filter(|n| n.ready).count(),
            sessions: nodes.iter().map(|n| n.sessions).sum(),
        }
    }
}

fn cluster_unavailable(e: comet_core::BoxError) -> Failure {
    Failure(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cluster unavailable: {e}"),
    )
}

#[utoipa::path(get, path = "/api/online", tag = "presence",
    responses(
        (status = 200, description = "totals", body = Online),
        (status = 401, description = "missing or wrong token", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn online(State(state): State<AppState>) -> Json<Online> {
    let c = &state.comet;
    // A monitor polls this: an unreachable cluster must not hide this
    // node's own totals.
    let (cluster, cluster_error) = match c.nodes().await {
        Ok(nodes) => (nodes.as_deref().map(ClusterTotals::of), None),
        Err(e) => (None, Some(cluster_unavailable(e).1)),
    };
    let mut users = c.online_users();
    users.sort_unstable();
    Json(Online {
        ret: 0,
        sessions: c.session_count(),
        connections: c.connection_count(),
        users,
        cluster,
        cluster_error,
    })
}

/// The cluster's live nodes.
#[derive(Debug, Serialize, ToSchema)]
pub struct Nodes {
    /// 0.
    pub ret: i32,
    /// Sorted by id.
    pub nodes: Vec<Node>,
    /// Their totals.
    pub totals: ClusterTotals,
}

/// One live node.
#[derive(Debug, Serialize, ToSchema)]
pub struct Node {
    /// Its `node_id`.
    pub id: String,
    /// Whether its feed is subscribed: it takes logins and delivers.
    pub ready: bool,
    /// Its logged-in sessions when it last reported.
    pub sessions: u64,
    /// Milliseconds since that report (under a third of `node_ttl` while
    /// the node heartbeats).
    pub reported_ms_ago: u64,
}

#[utoipa::path(get, path = "/api/nodes", tag = "presence",
    responses(
        (status = 200, description = "the live nodes", body = Nodes),
        (status = 401, description = "missing or wrong token", body = ApiError),
        (status = 404, description = "a single node, not a cluster", body = ApiError),
        (status = 503, description = "the cluster is unreachable", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn nodes(State(state): State<AppState>) -> ApiResult<Nodes> {
    let Some(list) = state.comet.nodes().await.map_err(cluster_unavailable)? else {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            "not a cluster: this comet runs on its own".into(),
        ));
    };
    Ok(Json(Nodes {
        ret: 0,
        totals: ClusterTotals::of(&list),
        nodes: list
            .into_iter()
            .map(|n| Node {
                reported_ms_ago: u64::try_from(n.reported.as_millis()).unwrap_or(u64::MAX),
                id: n.id,
                ready: n.ready,
                sessions: n.sessions,
            })
            .collect(),
    }))
}

/// One user's presence.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserState {
    /// 0.
    pub ret: i32,
    /// The user.
    pub mid: Mid,
    /// Whether it has a session on this node.
    pub online: bool,
    /// Its session count on this node.
    pub sessions: usize,
    /// In cluster mode: the nodes holding a session of it now, this one
    /// included (their ids, sorted); absent on a single node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<String>>,
}

#[utoipa::path(get, path = "/api/users/{mid}", tag = "presence",
    params(("mid" = i32, Path, description = "the user")),
    responses(
        (status = 200, description = "presence", body = UserState),
        (status = 401, description = "missing or wrong token", body = ApiError),
        (status = 503, description = "the cluster is unreachable", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn user(
    State(state): State<AppState>,
    mid: Result<Path<Mid>, PathRejection>,
) -> ApiResult<UserState> {
    let mid = path(mid)?;
    let sessions = state.comet.sessions_of(mid);
    let nodes = state
        .comet
        .nodes_of(mid)
        .await
        .map_err(cluster_unavailable)?;
    Ok(Json(UserState {
        ret: 0,
        mid,
        online: sessions > 0,
        sessions,
        nodes,
    }))
}

/// The answer of a kick.
#[derive(Debug, Serialize, ToSchema)]
pub struct Kicked {
    /// 0.
    pub ret: i32,
    /// Sessions closed on this node (in cluster mode the other nodes close
    /// theirs as the kick reaches them).
    pub closed: usize,
}

#[utoipa::path(post, path = "/api/users/{mid}/kick", tag = "presence",
    params(("mid" = i32, Path, description = "the user")),
    responses(
        (status = 200, description = "its sessions are closing, on every node", body = Kicked),
        (status = 401, description = "missing or wrong token", body = ApiError),
        (status = 503, description = "the cluster is unreachable (this node's sessions are closed)", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn kick(
    State(state): State<AppState>,
    mid: Result<Path<Mid>, PathRejection>,
) -> ApiResult<Kicked> {
    let mid = path(mid)?;
    let closed = state
        .comet
        .disconnect_everywhere(mid)
        .await
        .map_err(cluster_unavailable)?;
    Ok(Json(Kicked { ret: 0, closed }))
}

/// A page to read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// Messages with a chatId above this (default 0).
    #[serde(default)]
    pub after: i64,
    /// At most this many (default and cap: the server's `sync_limit`).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One stored message.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoredMessage {
    /// 18 (1:1) or 20 (group).
    pub op: u32,
    /// Its chatId.
    #[serde(rename = "chatId")]
    pub chat_id: i64,
    /// The sender.
    pub from: Mid,
    /// The recipient (a mid or a group).
    pub to: i32,
    /// UTF-8 text, or base64 when `enc` is set.
    pub msg: String,
    /// `"base64"` when the bytes are not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enc: Option<&'static str>,
}

/// A page of a conversation (as op 23 and its replay, PROTOCOL.md 2.7).
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryPage {
    /// 0.
    pub ret: i32,
    /// The oldest chatId still kept.
    pub oldest: i64,
    /// The newest chatId.
    pub head: i64,
    /// The messages, oldest first.
    pub messages: Vec<StoredMessage>,
}

async fn read_history(
    state: &AppState,
    conversation: Conversation,
    page: Page,
) -> ApiResult<HistoryPage> {
    if page.after < 0 {
        return Err(bad("after must not be negative"));
    }
    let cap = state.comet.config().sync_limit;
    let limit = page.limit.map_or(cap, |n| n.min(cap));
    let history = state.comet.history(conversation, page.after, limit).await?;
    let messages = history
        .messages
        .iter()
        .map(|m| {
            let d = m.delivered();
            let (msg, enc) = match std::str::from_utf8(&d.msg) {
                Ok(text) => (text.to_owned(), None),
                Err(_) => (BASE64.encode(&d.msg), Some("base64")),
            };
            StoredMessage {
                op: d.op,
                chat_id: d.chat_id,
                from: d.from,
                to: d.to,
                msg,
                enc,
            }
        })
        .collect();
    Ok(Json(HistoryPage {
        ret: 0,
        oldest: history.oldest,
        head: history.head,
        messages,
    }))
}

#[utoipa::path(get, path = "/api/history/user/{a}/{b}", tag = "history",
    params(("a" = i32, Path, description = "one user"), ("b" = i32, Path, description = "the other"), Page),
    responses(
        (status = 200, description = "a page", body = HistoryPage),
        (status = 400, description = "bad request", body = ApiError),
        (status = 401, description = "missing or wrong token", body = ApiError),
        (status = 503, description = "store unavailable", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn history_user(
    State(state): State<AppState>,
    ab: Result<Path<(Mid, Mid)>, PathRejection>,
    page: Result<Query<Page>, QueryRejection>,
) -> ApiResult<HistoryPage> {
    let ((a, b), page) = (path(ab)?, query(page)?);
    if a <= 0 || b <= 0 {
        return Err(bad("mids must be positive"));
    }
    read_history(&state, Conversation::direct(a, b), page).await
}

#[utoipa::path(get, path = "/api/history/group/{group}", tag = "history",
    params(("group" = i32, Path, description = "the group"), Page),
    responses(
        (status = 200, description = "a page", body = HistoryPage),
        (status = 400, description = "bad request", body = ApiError),
        (status = 401, description = "missing or wrong token", body = ApiError),
        (status = 503, description = "store unavailable", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn history_group(
    State(state): State<AppState>,
    group: Result<Path<GroupId>, PathRejection>,
    page: Result<Query<Page>, QueryRejection>,
) -> ApiResult<HistoryPage> {
    let (group, page) = (path(group)?, query(page)?);
    if group <= 0 {
        return Err(bad("group must be positive"));
    }
    read_history(&state, Conversation::Group(group), page).await
}

/// A group's members.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupMembers {
    /// 0.
    pub ret: i32,
    /// The group.
    pub group: GroupId,
    /// Its members.
    pub members: Vec<Mid>,
}

#[utoipa::path(get, path = "/api/groups/{group}/members", tag = "groups",
    params(("group" = i32, Path, description = "the group")),
    responses(
        (status = 200, description = "its members (none for an unknown group)", body = GroupMembers),
        (status = 401, description = "missing or wrong token", body = ApiError),
        (status = 503, description = "directory unavailable", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn members(
    State(state): State<AppState>,
    group: Result<Path<GroupId>, PathRejection>,
) -> ApiResult<GroupMembers> {
    let group = path(group)?;
    let members = state.comet.groups().members(group).await.map_err(|e| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("group directory unavailable: {e}"),
        )
    })?;
    let mut members = members.to_vec();
    members.sort_unstable();
    Ok(Json(GroupMembers {
        ret: 0,
        group,
        members,
    }))
}

/// The answer of a membership change.
#[derive(Debug, Serialize, ToSchema)]
pub struct Changed {
    /// 0.
    pub ret: i32,
    /// Whether anything changed (false: already a member / not a member).
    pub changed: bool,
}

async fn change(state: &AppState, group: GroupId, mid: Mid, add: bool) -> ApiResult<Changed> {
    if group <= 0 || mid <= 0 {
        return Err(bad("group and mid must be positive"));
    }
    let Some(membership) = state.comet.groups().membership() else {
        return Err(Failure(
            StatusCode::NOT_IMPLEMENTED,
            "this group directory does not accept membership changes".into(),
        ));
    };
    let changed = if add {
        membership.add_member(group, mid).await
    } else {
        membership.remove_member(group, mid).await
    }
    .map_err(|e| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("group directory unavailable: {e}"),
        )
    })?;
    Ok(Json(Changed { ret: 0, changed }))
}

#[utoipa::path(put, path = "/api/groups/{group}/members/{mid}", tag = "groups",
    params(("group" = i32, Path, description = "the group"), ("mid" = i32, Path, description = "the user")),
    responses(
        (status = 200, description = "added (or already a member)", body = Changed),
        (status = 400, description = "bad request", body = ApiError),
        (status = 401, description = "missing or wrong token", body = ApiError),
        (status = 501, description = "membership is managed elsewhere", body = ApiError),
        (status = 503, description = "directory unavailable", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn add_member(
    State(state): State<AppState>,
    ids: Result<Path<(GroupId, Mid)>, PathRejection>,
) -> ApiResult<Changed> {
    let (group, mid) = path(ids)?;
    change(&state, group, mid, true).await
}

#[utoipa::path(delete, path = "/api/groups/{group}/members/{mid}", tag = "groups",
    params(("group" = i32, Path, description = "the group"), ("mid" = i32, Path, description = "the user")),
    responses(
        (status = 200, description = "removed (or was not a member)", body = Changed),
        (status = 400, description = "bad request", body = ApiError),
        (status = 401, description = "missing or wrong token", body = ApiError),
        (status = 501, description = "membership is managed elsewhere", body = ApiError),
        (status = 503, description = "directory unavailable", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn remove_member(
    State(state): State<AppState>,
    ids: Result<Path<(GroupId, Mid)>, PathRejection>,
) -> ApiResult<Changed> {
    let (group, mid) = path(ids)?;
    change(&state, group, mid, false).await
}

async fn openapi_json() -> Response {
    match openapi().to_pretty_json() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
