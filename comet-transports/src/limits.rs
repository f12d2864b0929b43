use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

type ByIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Default of [`Limits::with_max_unauthenticated`]: connections that have
/// not logged in yet, all listeners together.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 10_000;

/// Default of [`Limits::with_ipv6_prefix`]: IPv6 peers are counted per /64,
/// the block one subscriber line (or one host's privacy addresses) gets.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// Connection limits shared by every listener of one server: a global cap,
/// a cap on connections that have not authenticated yet and, optionally, a
/// cap per source address (IPv4 address, or IPv6 prefix). Each refusal is
/// logged with the peer address and counted ([`Limits::refused`]).
///
/// ```
/// # use comet_transports::Limits;
/// let limits = Limits::new(100_000)
///     .with_max_unauthenticated(5_000)
///     .with_per_ip(10_000);
/// assert_eq!(limits.max_connections(), 100_000);
/// assert_eq!(limits.unauthenticated(), 0);
/// ```
#[derive(Clone, Debug)]
pub struct Limits {
    connections: Arc<Semaphore>,
    max: usize,
    unauthenticated: Arc<Semaphore>,
    max_unauthenticated: usize,
    per_ip: Option<usize>,
    ipv6_prefix: u8,
    by_ip: ByIp,
    refused: Arc<AtomicU64>,
    /// `comet_connections_refused_total` by reason: `max_connections`,
    /// `max_unauthenticated`, `per_ip`.
    refused_metrics: [metrics::Counter; 3],
}

/// A connection's place within the [`Limits`], and when it was accepted.
///
/// The transports keep it for the connection's life: its place among all
/// connections (and its source address's) is given back when it is
/// dropped; its place among the unauthenticated connections as soon as the
/// connection logs in ([`Admission::authenticated`]).
#[derive(Debug)]
pub(crate) struct Admission {
    _permit: Option<OwnedSemaphorePermit>,
    unauthenticated: Option<OwnedSemaphorePermit>,
    ip: Option<(IpAddr, ByIp)>,
    accepted_at: Instant,
}

impl Admission {
    /// A connection counted against no limit, accepted now.
    pub(crate) fn unlimited() -> Self {
        Admission {
            _permit: None,
            unauthenticated: None,
            ip: None,
            accepted_at: Instant::now(),
        }
    }

    /// When the connection was accepted. The whole handshake (TLS, the
    /// WebSocket upgrade, op 7) must be over by this plus the handshake
    /// timeout.
    pub(crate) fn accepted_at(&self) -> Instant {
        self.accepted_at
    }

    /// The connection logged in: gives back its place among the
    /// unauthenticated connections (the other places stay until it ends).
    pub(crate) fn authenticated(&mut self) {
        self.unauthenticated = None;
    }

    /// Whether the connection still holds a place among the unauthenticated
    /// connections.
    #[cfg(test)]
    pub(crate) fn is_unauthenticated(&self) -> bool {
        self.unauthenticated.is_some()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some((ip, by_ip)) = &self.ip {
            let mut map = by_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(ip);
                }
            }
        }
    }
}

/// The address a peer is counted under by the per-address limit: an IPv4
/// address as it is (an IPv4-mapped IPv6 address, `::ffff:a.b.c.d`, as its
/// IPv4 address), an IPv6 address cut to its first `prefix` bits (one
/// subscriber usually gets a whole /64 and picks addresses in it freely).
pub fn address_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let bits = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

impl Limits {
    /// At most `max_connections` connections at once, all listeners
    /// together, of which at most [`DEFAULT_MAX_UNAUTHENTICATED`] not yet
    /// logged in.
    pub fn new(max_connections: usize) -> Self {
        Limits {
            connections: Arc::new(Semaphore::new(max_connections)),
            max: max_connections,
            unauthenticated: Arc::new(Semaphore::new(DEFAULT_MAX_UNAUTHENTICATED)),
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            per_ip: None,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
            by_ip: Arc::default(),
            refused: Arc::default(),
            refused_metrics: ["max_connections", "max_unauthenticated", "per_ip"]
                .map(|r| metrics::counter!("comet_connections_refused_total", "reason" => r)),
        }
    }

    /// At most `max` connections at once that have not logged in (op 8 not
    /// yet sent), all listeners together; past it new connections are
    /// refused. Logged-in connections are not held back by it: a flood of
    /// connections that never authenticate cannot lock out users, and costs
    /// at most `max` handshakes' memory. Default
    /// [`DEFAULT_MAX_UNAUTHENTICATED`].
    pub fn with_max_unauthenticated(mut self, max: usize) -> Self {
        self.unauthenticated = Arc::new(Semaphore::new(max));
        self.max_unauthenticated = max;
        self
    }

    /// Also at most `max` connections at once from one source address: one
    /// IPv4 address, or one IPv6 prefix (see
    /// [`with_ipv6_prefix`](Self::with_ipv6_prefix)).
    /// Set it high: carrier-grade NAT puts thousands of users behind one.
    pub fn with_per_ip(mut self, max: usize) -> Self {
        self.per_ip = Some(max);
        self
    }

    /// The length of the IPv6 prefix the per-address limit counts together
    /// (default [`DEFAULT_IPV6_PREFIX`], /64; 128 counts each address on its
    /// own, which a host with a /64 can get around at will). Values above
    /// 128 mean 128.
    pub fn with_ipv6_prefix(mut self, bits: u8) -> Self {
        self.ipv6_prefix = bits.min(128);
        self
    }

    /// The configured global maximum.
    pub fn max_connections(&self) -> usize {
        self.max
    }

    /// The configured maximum of unauthenticated connections.
    pub fn max_unauthenticated(&self) -> usize {
        self.max_unauthenticated
    }

    /// Connections admitted that have not logged in (yet).
    pub fn unauthenticated(&self) -> usize {
        self.max_unauthenticated - self.unauthenticated.available_permits()
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A place for a new connection from `peer`, or `None` (logged and
    /// counted) when the server, its unauthenticated connections, or that
    /// address, are full.
    pub(crate) fn admit(&self, peer: SocketAddr, listener: &'static str) -> Option<Admission> {
        let mut admission = self.admit_unkeyed(peer, listener)?;
        self.key(&mut admission, peer, listener)
            .then_some(admission)
    }

    /// A place among all connections and the unauthenticated ones, not yet
    /// counted for any source address: for a connection from a trusted
    /// proxy, whose client address is known only once its PROXY header is
    /// read ([`key`](Self::key) then counts it).
    pub(crate) fn admit_unkeyed(
        &self,
        peer: SocketAddr,
        listener: &'static str,
    ) -> Option<Admission> {
        let accepted_at = Instant::now();
        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.refused_metrics[0].increment(1);
            tracing::warn!(%peer, listener, max = self.max, "refusing connection: connection limit reached");
            return None;
        };
        let Ok(unauthenticated) = self.unauthenticated.clone().try_acquire_owned() else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.refused_metrics[1].increment(1);
            tracing::warn!(%peer, listener, max = self.max_unauthenticated, "refusing connection: limit of unauthenticated connections reached");
            return None;
        };
        Some(Admission {
            _permit: Some(permit),
            unauthenticated: Some(unauthenticated),
            ip: None,
            accepted_at,
        })
    }

    /// Counts `admission` for the source address `client` under the
    /// per-address cap; `false` (logged and counted) when that address is
    /// full. An admission is counted for one address at most.
    pub(crate) fn key(
        &self,
        admission: &mut Admission,
        client: SocketAddr,
        listener: &'static str,
    ) -> bool {
        let Some(max) = self.per_ip else {
            return true;
        };
        if admission.ip.is_some() {
            return true;
        }
        let key = address_key(client.ip(), self.ipv6_prefix);
        let mut map = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= max {
            drop(map);
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.refused_metrics[2].increment(1);
            tracing::warn!(peer = %client, %key, listener, max, "refusing connection: per-address connection limit reached");
            return false;
        }
        *n += 1;
        admission.ip = Some((key, self.by_ip.clone()));
        true
    }
}

impl Default for Limits {
    /// 100,000 connections, of which 10,000 unauthenticated; no per-address
    /// cap.
    fn default() -> Self {
        Limits::new(100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_and_per_ip_caps_count_and_release() {
        let limits = Limits::new(3).with_per_ip(2);
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let a1 = limits.admit(a, "t").unwrap();
        let _a2 = limits.admit(a, "t").unwrap();
        assert!(limits.admit(a, "t").is_none(), "third from one address");
        let _b1 = limits.admit(b, "t").unwrap();
        assert!(limits.admit(b, "t").is_none(), "global cap");
        assert_eq!(limits.refused(), 2);
        drop(a1);
        assert!(
            limits.admit(a, "t").is_some(),
            "a released place is reusable"
        );
    }

    #[test]
    fn ipv6_peers_are_counted_per_prefix_and_mapped_ipv4_as_ipv4() {
        let key = |ip: &str, bits| address_key(ip.parse().unwrap(), bits);
        let ip = |ip: &str| ip.parse::<IpAddr>().unwrap();
        // One /64: every address in it is one key.
        assert_eq!(key("2001:db8:1:2:aaaa::1", 64), ip("2001:db8:1:2::"));
        assert_eq!(
            key("2001:db8:1:2:ffff:ffff:ffff:ffff", 64),
            ip("2001:db8:1:2::")
        );
        assert_ne!(key("2001:db8:1:3::1", 64), key("2001:db8:1:2::1", 64));
        // Other prefixes.
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 48), ip("2001:db8:1::"));
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 128), ip("2001:db8:1:2:3:4:5:6"));
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 200), ip("2001:db8:1:2:3:4:5:6"));
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 0), ip("::"));
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 1), ip("::"));
        assert_eq!(key("ffff::1", 1), ip("8000::"));
        // IPv4, and IPv4-mapped IPv6, are counted per IPv4 address.
        assert_eq!(key("10.1.2.3", 64), ip("10.1.2.3"));
        assert_eq!(key("::ffff:10.1.2.3", 64), ip("10.1.2.3"));
        assert_eq!(key("::ffff:10.1.2.3", 128), ip("10.1.2.3"));
        // Loopback stays itself at /128 and is its /64 otherwise.
        assert_eq!(key("::1", 128), ip("::1"));
        assert_eq!(key("::1", 64), ip("::"));
    }

    #[test]
    fn one_ipv6_prefix_cannot_get_around_the_per_address_cap() {
        let limits = Limits::new(100).with_per_ip(2);
        let peer = |s: &str| SocketAddr::new(s.parse().unwrap(), 1000);
        let _a = limits.admit(peer("2001:db8::1"), "t").unwrap();
        let _b = limits.admit(peer("2001:db8::2:3"), "t").unwrap();
        assert!(
            limits.admit(peer("2001:db8::ffff:1"), "t").is_none(),
            "a third address of the same /64"
        );
        let _c = limits.admit(peer("2001:db8:0:1::1"), "t").unwrap();
        // IPv4 over a dual-stack socket counts with plain IPv4.
        let _d = limits.admit(peer("192.0.2.7"), "t").unwrap();
        let _e = limits.admit(peer("::ffff:192.0.2.7"), "t").unwrap();
        assert!(limits.admit(peer("::ffff:192.0.2.7"), "t").is_none());
        assert!(limits.admit(peer("192.0.2.7"), "t").is_none());
        assert_eq!(limits.refused(), 3);
        // /128 restores per-address counting.
        let exact = Limits::new(100).with_per_ip(1).with_ipv6_prefix(128);
        let _f = exact.admit(peer("2001:db8::1"), "t").unwrap();
        let _g = exact.admit(peer("2001:db8::2"), "t").unwrap();
        assert!(exact.admit(peer("2001:db8::1"), "t").is_none());
    }

    #[test]
    fn unauthenticated_connections_have_a_cap_of_their_own() {
        let limits = Limits::new(10).with_max_unauthenticated(2);
        let peer: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let mut a = limits.admit(peer, "t").unwrap();
        let b = limits.admit(peer, "t").unwrap();
        assert_eq!(limits.unauthenticated(), 2);
        assert!(limits.admit(peer, "t").is_none(), "a third before login");
        assert_eq!(limits.refused(), 1);
        // Logging in frees the place among the unauthenticated only.
        a.authenticated();
        assert!(!a.is_unauthenticated() && b.is_unauthenticated());
        assert_eq!(limits.unauthenticated(), 1);
        let c = limits.admit(peer, "t").unwrap();
        assert!(limits.admit(peer, "t").is_none());
        drop(b);
        drop(c);
        assert_eq!(limits.unauthenticated(), 0);
        // The global cap still counts the logged-in connection.
        let global = Limits::new(1).with_max_unauthenticated(5);
        let mut only = global.admit(peer, "t").unwrap();
        only.authenticated();
        assert!(global.admit(peer, "t").is_none());
    }

    #[test]
    fn an_unlimited_admission_holds_nothing() {
        let mut a = Admission::unlimited();
        assert!(!a.is_unauthenticated());
        a.authenticated();
        assert!(a.accepted_at() <= Instant::now());
    }
}
