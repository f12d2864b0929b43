//! What the transports hold back until a connection has logged in.
//!
//! [`Comet::serve`](comet_core::Comet::serve) reads the first frame (which
//! must be op 7), authenticates, and only once the login is accepted (op 8
//! queued) asks the inbound stream for another frame; a connection whose
//! login fails is closed without another read. So the first request for a
//! frame after the first one has been handed over marks the login: the
//! [`LoginGuard`] then gives back the connection's place among the
//! unauthenticated connections and lifts the limits that held before (a
//! smaller body limit, a read budget). `tests/engine.rs` checks the engine
//! keeps to that order.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::limits::Admission;

/// Wraps a connection's inbound frames: holds its [`Admission`] for the
/// connection's life, and at login calls `on_login` on the inner stream
/// (to raise its limits) and frees the admission's unauthenticated place.
pub(crate) struct LoginGuard<St, F> {
    inner: St,
    admission: Admission,
    handed_first: bool,
    on_login: Option<F>,
}

impl<St, F> LoginGuard<St, F> {
    pub(crate) fn new(inner: St, admission: Admission, on_login: F) -> Self {
        LoginGuard {
            inner,
            admission,
            handed_first: false,
            on_login: Some(on_login),
        }
    }
}

impl<St, F, T, E> Stream for LoginGuard<St, F>
where
    St: Stream<Item = Result<T, E>> + Unpin,
    F: FnOnce(&mut St) + Unpin,
{
    type Item = Result<T, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.handed_first {
            if let Some(on_login) = this.on_login.take() {
                this.admission.authenticated();
                on_login(&mut this.inner);
            }
        }
        let item = ready!(this.inner.poll_next_unpin(cx));
        if matches!(item, Some(Ok(_))) {
            this.handed_first = true;
        }
        Poll::Ready(item)
    }
}

/// The bytes a connection may still send before it logs in, shared by the
/// reader that counts them and the [`LoginGuard`] that lifts the bound.
#[derive(Clone, Debug)]
pub(crate) struct ReadBudget(Arc<AtomicUsize>);

/// A lifted budget.
const UNBOUNDED: usize = usize::MAX;

impl ReadBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        ReadBudget(Arc::new(AtomicUsize::new(bytes)))
    }

    /// No bound from now on.
    pub(crate) fn lift(&self) {
        self.0.store(UNBOUNDED, Ordering::Relaxed);
    }
}

/// The error a [`Budgeted`] reader fails with once its budget is spent.
#[derive(Debug)]
pub(crate) struct BudgetSpent {
    /// The budget, in bytes.
    pub(crate) budget: usize,
}

impl std::fmt::Display for BudgetSpent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "more than {} bytes before login", self.budget)
    }
}

impl std::error::Error for BudgetSpent {}

/// An `AsyncRead + AsyncWrite` that fails its reads once more bytes than
/// its [`ReadBudget`] have been read (until the budget is lifted). Between
/// the accept and the login of a WebSocket connection this bounds what
/// tungstenite can be made to buffer, whatever lengths the peer announces:
/// a read takes at most the reader's buffer (1 KiB in a session, 4 KiB
/// during the upgrade) past the budget before it fails.
#[derive(Debug)]
pub(crate) struct Budgeted<S> {
    inner: S,
    budget: ReadBudget,
    total: usize,
}

impl<S> Budgeted<S> {
    pub(crate) fn new(inner: S, budget: ReadBudget) -> Self {
        let total = budget.0.load(Ordering::Relaxed);
        Budgeted {
            inner,
            budget,
            total,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Budgeted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let left = this.budget.0.load(Ordering::Relaxed);
        if left == UNBOUNDED {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        if read > left {
            this.budget.0.store(0, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                BudgetSpent { budget: this.total },
            )));
        }
        // Only this reader lowers the budget; the guard may have lifted it
        // meanwhile, which a plain store would undo.
        let _ =
            this.budget
                .0
                .compare_exchange(left, left - read, Ordering::Relaxed, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budgeted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_budgeted_reader_fails_past_its_budget_until_lifted() {
        let (mut client, server) = tokio::io::duplex(64);
        let budget = ReadBudget::new(10);
        let mut reader = Budgeted::new(server, budget.clone());
        client.write_all(b"0123456789").await.unwrap();
        let mut buf = [0u8; 32];
        let mut got = 0;
        while got < 10 {
            got += reader.read(&mut buf[got..]).await.unwrap();
        }
        client.write_all(b"x").await.unwrap();
        let err = reader.read(&mut buf).await.unwrap_err();
        assert!(err.get_ref().unwrap().is::<BudgetSpent>(), "{err}");
        // A lifted budget counts nothing.
        let (mut client, server) = tokio::io::duplex(64);
        let budget = ReadBudget::new(4);
        let mut reader = Budgeted::new(server, budget.clone());
        client.write_all(b"abc").await.unwrap();
        assert_eq!(reader.read(&mut buf).await.unwrap(), 3);
        budget.lift();
        client.write_all(&[1; 40]).await.unwrap();
        let mut more = 0;
        while more < 40 {
            more += reader.read(&mut buf).await.unwrap();
        }
    }
}
