//! Metrics through the [`metrics`] facade: every series the engine reports,
//! registered once when a [`Comet`](crate::Comet) is built, so that the hot
//! path only increments a handle it already holds (no label lookup per
//! frame or per delivery).
//!
//! The handles are taken from the recorder installed at build time: install
//! the application's recorder (for example
//! `metrics_exporter_prometheus::PrometheusBuilder::install_recorder`)
//! *before* building the comet. Without a recorder every handle is a no-op.
//!
//! The series (Prometheus names; counters end in `_total`, durations are in
//! seconds, sizes in bytes):
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `comet_connections` | gauge | `transport`, `mode` | connections served by the engine, logged in or not |
//! | `comet_sessions` | gauge | `transport`, `mode` | logged-in sessions |
//! | `comet_logins_total` | counter | `result` (`accepted`, `refused`) | op 7 outcomes |
//! | `comet_frames_in_total` | counter | `op` (2, 3, 7, 8, 9, 18–23, `other`) | frames read from logged-in sessions |
//! | `comet_frames_out_total` | counter | `op` | frames written (op 9 counts once per batch) |
//! | `comet_sends_total` | counter | `result` (`accepted`, `refused`), `reason` (`ok`; `spoofed`, `bad_request`, `too_large`, `not_member`, `unknown_user`, `unavailable`) | op 18/20 and handle sends |
//! | `comet_deliveries_total` | counter | | messages queued to a live session (added once per send) |
//! | `comet_batch_messages` | histogram | | messages per op 9 batch written |
//! | `comet_outbound_queued_bytes` | gauge | | bytes waiting in outbound queues (sampled) |
//! | `comet_closes_total` | counter | `cause` (`peer_closed`, `handshake_timeout`, `heartbeat_timeout`, `protocol_error`, `auth_failed`, `slow_consumer`, `kick`, `replaced`, `panic`, `shutdown`, `handler_error`, `limit`, `transport_error`) | connections ended, by cause |
//! | `comet_plugin_call_seconds` | histogram | `plugin` (`authenticator`, `store`, `groups`, `users`, `offline_inbox`) | plug-in call latency |
//! | `comet_plugin_errors_total` | counter | `plugin`, `kind` (`error`, `timeout`) | failed plug-in calls |
//! | `comet_panics_total` | counter | | panics caught in plug-ins, layers or handlers |
//! | `comet_syncs_total` | counter | `result` (`ok`, `failed`) | op 22 outcomes |
//! | `comet_replayed_messages_total` | counter | | messages replayed by syncs |
//! | `comet_cluster_ready` | gauge | | cluster mode: 1 while the node's broker takes logins and delivers ([`Broker::is_ready`](crate::broker::Broker::is_ready); sampled), 0 while not |
//! | `comet_cluster_feed_subscriptions_total` | counter | | cluster mode (comet-plugins' Redis broker): times the node's feed subscribed, the first time and once after each lost feed (each closed the node's sessions) |
//!
//! The transports add `comet_connections_refused_total{reason}`, and the
//! process gauges (`comet_process_resident_memory_bytes`,
//! `comet_process_open_fds`) are sampled by [`sample_process`] at scrape
//! time.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::error::SendError;
use crate::frame::{Transport, WireMode};
use crate::session::SessionEnd;

/// The ops of PROTOCOL.md, each with a series of its own; any other op
/// (an application's handler ops, say) counts as `op="other"`.
const OPS: [u32; 11] = [2, 3, 7, 8, 9, 18, 19, 20, 21, 22, 23];

/// The slot of `op` in the by-op handles.
fn op_slot(op: u32) -> usize {
    match op {
        2 => 0,
        3 => 1,
        7 => 2,
        8 => 3,
        9 => 4,
        18..=23 => 5 + (op - 18) as usize,
        _ => OPS.len(),
    }
}

/// The plug-ins whose calls are timed, in `plugin` label order.
pub(crate) const PLUGINS: [&str; 5] = [
    "authenticator",
    "message store",
    "group directory",
    "user directory",
    "offline inbox",
];

/// The label value of a plug-in name.
fn plugin_label(what: &str) -> &'static str {
    match what {
        "authenticator" => "authenticator",
        "message store" => "store",
        "group directory" => "groups",
        "user directory" => "users",
        "offline inbox" => "offline_inbox",
        _ => "other",
    }
}

/// The send-refusal reason classes, in index order.
const SEND_REASONS: [&str; 7] = [
    "spoofed",
    "bad_request",
    "too_large",
    "not_member",
    "unknown_user",
    "unavailable",
    "other",
];

/// The close causes, in index order.
const CLOSE_CAUSES: [&str; 13] = [
    "peer_closed",
    "handshake_timeout",
    "heartbeat_timeout",
    "protocol_error",
    "auth_failed",
    "slow_consumer",
    "kick",
    "replaced",
    "panic",
    "shutdown",
    "handler_error",
    "limit",
    "transport_error",
];

fn transport_label(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::WebSocket => "websocket",
        Transport::Local => "local",
    }
}

fn mode_index(m: WireMode) -> usize {
    match m {
        WireMode::Binary => 0,
        WireMode::Json => 1,
    }
}

fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Tcp => 0,
        Transport::WebSocket => 1,
        Transport::Local => 2,
    }
}

/// Per transport and wire mode.
type ByConn<T> = [[T; 2]; 3];

fn by_conn<T>(make: impl Fn(&'static str, &'static str) -> T) -> ByConn<T> {
    let modes = ["binary", "json"];
    [Transport::Tcp, Transport::WebSocket, Transport::Local]
        .map(|t| modes.map(|m| make(transport_label(t), m)))
}

/// Counter handles for frames by op, in [`op_slot`] order.
fn by_op(name: &'static str) -> Box<[Counter]> {
    OPS.iter()
        .map(|op| counter!(name, "op" => op.to_string()))
        .chain(std::iter::once(counter!(name, "op" => "other")))
        .collect()
}

/// Every handle the engine reports through, registered once.
pub(crate) struct Telemetry {
    connections: ByConn<Gauge>,
    sessions: ByConn<Gauge>,
    logins_accepted: Counter,
    logins_refused: Counter,
    frames_in: Box<[Counter]>,
    frames_out: Box<[Counter]>,
    sends_accepted: Counter,
    sends_refused: [Counter; SEND_REASONS.len()],
    pub(crate) deliveries: Counter,
    batch_messages: Histogram,
    queued_bytes: Gauge,
    closes: [Counter; CLOSE_CAUSES.len()],
    plugin_seconds: [Histogram; PLUGINS.len() + 1],
    plugin_errors: [Counter; PLUGINS.len() + 1],
    plugin_timeouts: [Counter; PLUGINS.len() + 1],
    panics: Counter,
    syncs_ok: Counter,
    syncs_failed: Counter,
    replayed: Counter,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        let plugin_names = {
            let mut names = [""; PLUGINS.len() + 1];
            for (i, p) in PLUGINS.iter().enumerate() {
                names[i] = plugin_label(p);
            }
            names[PLUGINS.len()] = "other";
            names
        };
        Telemetry {
            connections: by_conn(|t, m| gauge!("comet_connections", "transport" => t, "mode" => m)),
            sessions: by_conn(|t, m| gauge!("comet_sessions", "transport" => t, "mode" => m)),
            logins_accepted: counter!("comet_logins_total", "result" => "accepted"),
            logins_refused: counter!("comet_logins_total", "result" => "refused"),
            frames_in: by_op("comet_frames_in_total"),
            frames_out: by_op("comet_frames_out_total"),
            sends_accepted: counter!("comet_sends_total", "result" => "accepted", "reason" => "ok"),
            sends_refused: SEND_REASONS
                .map(|r| counter!("comet_sends_total", "result" => "refused", "reason" => r)),
            deliveries: counter!("comet_deliveries_total"),
            batch_messages: histogram!("comet_batch_messages"),
            queued_bytes: gauge!("comet_outbound_queued_bytes"),
            closes: CLOSE_CAUSES.map(|c| counter!("comet_closes_total", "cause" => c)),
            plugin_seconds: plugin_names
                .map(|p| histogram!("comet_plugin_call_seconds", "plugin" => p)),
            plugin_errors: plugin_names
                .map(|p| counter!("comet_plugin_errors_total", "plugin" => p, "kind" => "error")),
            plugin_timeouts: plugin_names
                .map(|p| counter!("comet_plugin_errors_total", "plugin" => p, "kind" => "timeout")),
            panics: counter!("comet_panics_total"),
            syncs_ok: counter!("comet_syncs_total", "result" => "ok"),
            syncs_failed: counter!("comet_syncs_total", "result" => "failed"),
            replayed: counter!("comet_replayed_messages_total"),
        }
    }
}

fn plugin_index(what: &str) -> usize {
    PLUGINS
        .iter()
        .position(|p| *p == what)
        .unwrap_or(PLUGINS.len())
}

impl Telemetry {
    pub(crate) fn connection(&self, t: Transport, m: WireMode) -> GaugeGuard {
        GaugeGuard::new(self.connections[transport_index(t)][mode_index(m)].clone())
    }

    pub(crate) fn session(&self, t: Transport, m: WireMode) -> GaugeGuard {
        GaugeGuard::new(self.sessions[transport_index(t)][mode_index(m)].clone())
    }

    pub(crate) fn login(&self, accepted: bool) {
        if accepted {
            self.logins_accepted.increment(1);
        } else {
            self.logins_refused.increment(1);
        }
    }

    pub(crate) fn frame_in(&self, op: u32) {
        self.frames_in[op_slot(op)].increment(1);
    }

    pub(crate) fn frame_out(&self, op: u32) {
        self.frames_out[op_slot(op)].increment(1);
    }

    /// One op 9 batch of `n` messages written.
    pub(crate) fn batch(&self, n: usize) {
        self.frames_out[op_slot(crate::frame::op::BATCH)].increment(1);
        self.batch_messages.record(n as f64);
    }

    pub(crate) fn send(&self, result: &Result<i64, SendError>) {
        let e = match result {
            Ok(_) => return self.sends_accepted.increment(1),
            Err(e) => e,
        };
        let i = match e {
            SendError::Spoofed => 0,
            SendError::BadRecipient | SendError::EmptyMessage | SendError::Payload(_) => 1,
            SendError::MessageTooLarge { .. } => 2,
            SendError::NotMember(_) => 3,
            SendError::UnknownUser(_) => 4,
            SendError::Users(_) | SendError::Store(_) | SendError::Groups(_) => 5,
        };
        self.sends_refused[i].increment(1);
    }

    pub(crate) fn close(&self, end: &SessionEnd) {
        let i = match end {
            SessionEnd::PeerClosed => 0,
            SessionEnd::HandshakeTimeout => 1,
            SessionEnd::HeartbeatTimeout => 2,
            SessionEnd::Protocol(..) => 3,
            SessionEnd::AuthFailed(_) => 4,
            SessionEnd::SlowConsumer => 5,
            SessionEnd::Disconnected => 6,
            SessionEnd::Replaced => 7,
            SessionEnd::Panic(_) => 8,
            SessionEnd::Shutdown => 9,
            SessionEnd::Handler(_) => 10,
            SessionEnd::RateLimited(_) => 11,
            SessionEnd::Transport(_) | SessionEnd::Store(_) => 12,
        };
        self.closes[i].increment(1);
    }

    pub(crate) fn plugin_call(&self, what: &str, seconds: f64) {
        self.plugin_seconds[plugin_index(what)].record(seconds);
    }

    pub(crate) fn plugin_error(&self, what: &str, timeout: bool) {
        let i = plugin_index(what);
        if timeout {
            self.plugin_timeouts[i].increment(1);
        } else {
            self.plugin_errors[i].increment(1);
        }
    }

    pub(crate) fn panic(&self) {
        self.panics.increment(1);
    }

    pub(crate) fn sync(&self, ok: bool, replayed: usize) {
        if ok {
            self.syncs_ok.increment(1);
            self.replayed.increment(replayed as u64);
        } else {
            self.syncs_failed.increment(1);
        }
    }

    pub(crate) fn queued_bytes(&self, bytes: usize) {
        self.queued_bytes.set(bytes as f64);
    }
}

/// Raises a gauge for as long as it lives.
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.increment(1.0);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Sets `comet_process_resident_memory_bytes` and `comet_process_open_fds`
/// from `/proc/self` (Linux; elsewhere nothing is set). Call it when the
/// metrics are scraped; it reads two small files and one directory.
pub fn sample_process() {
    #[cfg(target_os = "linux")]
    {
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            if let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            {
                gauge!("comet_process_resident_memory_bytes").set(kb * 1024.0);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            gauge!("comet_process_open_fds").set(dir.count() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protocol_op_has_its_own_slot_and_the_rest_share_one() {
        for (i, op) in OPS.iter().enumerate() {
            assert_eq!(op_slot(*op), i, "op {op}");
        }
        for op in [0, 1, 4, 10, 17, 24, 1000, u32::MAX] {
            assert_eq!(op_slot(op), OPS.len(), "op {op}");
        }
    }
}
