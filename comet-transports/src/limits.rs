use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

type ByIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Connection limits shared by every listener of one server: a global cap
/// and, optionally, a cap per source IP address. Each refusal is logged with
/// the peer address and counted ([`Limits::refused`]).
///
/// ```
/// # use comet_transports::Limits;
/// let limits = Limits::new(100_000).with_per_ip(10_000);
/// let a = limits.admit("10.0.0.1:5000".parse().unwrap(), "tcp");
/// assert!(a.is_some());
/// ```
#[derive(Clone, Debug)]
pub struct Limits {
    connections: Arc<Semaphore>,
    max: usize,
    per_ip: Option<usize>,
    by_ip: ByIp,
    refused: Arc<AtomicU64>,
}

/// A connection's place within the [`Limits`]; given back when dropped.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    ip: Option<(IpAddr, ByIp)>,
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

impl Limits {
    /// At most `max_connections` connections at once, all listeners together.
    pub fn new(max_connections: usize) -> Self {
        Limits {
            connections: Arc::new(Semaphore::new(max_connections)),
            max: max_connections,
            per_ip: None,
            by_ip: Arc::default(),
            refused: Arc::default(),
        }
    }

    /// Also at most `max` connections at once from one source IP address.
    /// Set it high: carrier-grade NAT puts thousands of users behind one.
    pub fn with_per_ip(mut self, max: usize) -> Self {
        self.per_ip = Some(max);
        self
    }

    /// The configured global maximum.
    pub fn max_connections(&self) -> usize {
        self.max
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A place for a new connection from `peer`, or `None` (logged and
    /// counted) when the server, or that address, is full.
    pub fn admit(&self, peer: SocketAddr, listener: &'static str) -> Option<Admission> {
        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, listener, max = self.max, "refusing connection: connection limit reached");
            return None;
        };
        let ip = match self.per_ip {
            None => None,
            Some(max) => {
                let mut map = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
                let n = map.entry(peer.ip()).or_insert(0);
                if *n >= max {
                    drop(map);
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, listener, max, "refusing connection: per-address connection limit reached");
                    return None;
                }
                *n += 1;
                Some((peer.ip(), self.by_ip.clone()))
            }
        };
        Some(Admission {
            _permit: permit,
            ip,
        })
    }
}

impl Default for Limits {
    /// 100,000 connections, no per-address cap.
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
}
