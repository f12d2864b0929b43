use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connection limits shared by every listener of one server.
#[derive(Clone, Debug)]
pub struct Limits {
    connections: Arc<Semaphore>,
    max: usize,
}

impl Limits {
    /// At most `max_connections` connections at once, all listeners together.
    pub fn new(max_connections: usize) -> Self {
        Limits {
            connections: Arc::new(Semaphore::new(max_connections)),
            max: max_connections,
        }
    }

    /// The configured maximum.
    pub fn max_connections(&self) -> usize {
        self.max
    }

    /// A slot for a new connection from `peer`, or `None` (logged) when the
    /// server is full. The slot is given back when dropped.
    pub fn admit(&self, peer: SocketAddr, listener: &'static str) -> Option<OwnedSemaphorePermit> {
        match self.connections.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                tracing::warn!(%peer, listener, max = self.max, "refusing connection: connection limit reached");
                None
            }
        }
    }
}

impl Default for Limits {
    /// 100,000 connections.
    fn default() -> Self {
        Limits::new(100_000)
    }
}
