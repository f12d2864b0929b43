//! A zero-copy sink of [`Outgoing`] units over any `AsyncWrite`.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use comet_core::codec::Units;
use comet_core::Outgoing;
use futures_util::Sink;
use tokio::io::AsyncWrite;

/// Most buffers handed to one vectored write.
const MAX_IOV: usize = 32;

/// Writes each unit's shared bytes straight to the socket, several per
/// `writev`, without copying them into a buffer of its own (and without
/// keeping one per idle connection). `Close` shuts the write side down.
#[derive(Debug)]
pub(crate) struct WriteSink<W> {
    io: W,
    queue: Units,
}

impl<W: AsyncWrite + Unpin> WriteSink<W> {
    pub(crate) fn new(io: W) -> Self {
        WriteSink {
            io,
            queue: Units::default(),
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let written = if self.queue.len() == 1 {
                // One buffer: a plain write (`send`), cheaper in the kernel
                // than `writev`, which a lone reply or delivery would take.
                let unit = self.queue.front().map_or(&[][..], |u| &u[..]);
                ready!(Pin::new(&mut self.io).poll_write(cx, unit))?
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOV];
                let mut n = 0;
                for (slot, buf) in slices.iter_mut().zip(self.queue.iter()) {
                    *slot = IoSlice::new(buf);
                    n += 1;
                }
                ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]))?
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.queue.advance(written);
        }
        // Drained: an idle connection keeps no spill-over list.
        self.queue.shrink();
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> Sink<Outgoing> for WriteSink<W> {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.queue.len() >= MAX_IOV {
            ready!(this.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: Outgoing) -> io::Result<()> {
        if let Outgoing::Data(bytes) = item {
            if !bytes.is_empty() {
                self.get_mut().queue.push_back(bytes);
            }
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
