//! The innermost service: the protocol's own ops, then application handlers.

use foldhash::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use tower::{Service, ServiceExt};

use super::{FrameRequest, FrameResponse, Handler};
use crate::engine::Engine;
use crate::error::BoxError;
use crate::frame::op;
use crate::payload::{SendReply, SendRequest, SyncReply, SyncRequest};

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Result<FrameResponse, BoxError>> + Send>>;

/// Handles ops 2, 18, 20 and 22, routes application ops to their handlers, and
/// ignores (and counts) any other op.
#[derive(Clone)]
pub(crate) struct Router {
    pub(crate) engine: Weak<Engine>,
    pub(crate) handlers: Arc<HashMap<u32, Handler>>,
}

impl Service<FrameRequest> for Router {
    type Response = FrameResponse;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: FrameRequest) -> BoxFuture {
        let engine = self.engine.clone();
        // Only application ops look up (and clone) a handler.
        let handler = match req.frame.op {
            op::HEARTBEAT | op::SEND_TO_USER | op::SEND_TO_GROUP | op::SYNC => None,
            op => self.handlers.get(&op).cloned(),
        };
        Box::pin(async move {
            let Some(engine) = engine.upgrade() else {
                return Err("comet is shutting down".into());
            };
            match req.frame.op {
                op::HEARTBEAT => Ok(Some(req.frame.reply(op::HEARTBEAT_REPLY, ""))),
                op @ (op::SEND_TO_USER | op::SEND_TO_GROUP) => {
                    let mode = req.ctx.conn.mode;
                    let reply_op = op + 1;
                    let result = match SendRequest::decode(mode, &req.frame.body) {
                        // The session runs this call to its end even if it
                        // closes meanwhile (see `session::call`).
                        Ok(send) => {
                            engine
                                .send(op, &send, Some(req.ctx.mid()), Some(req.ctx.conn.conn_id))
                                .await
                        }
                        Err(e) => Err(e.into()),
                    };
                    let reply = match result {
                        Ok(chat_id) => SendReply::ok(chat_id),
                        Err(e) => {
                            engine.stats.send_failure();
                            tracing::debug!(peer = %req.ctx.conn.peer, mid = req.ctx.mid(), op, cause = %e, "send refused");
                            SendReply::failed(e.to_string())
                        }
                    };
                    Ok(Some(req.frame.reply(reply_op, reply.encode(mode))))
                }
                op::SYNC => {
                    let mode = req.ctx.conn.mode;
                    let result = match SyncRequest::decode(mode, &req.frame.body) {
                        Ok(sync) => engine.sync(req.ctx.mid(), &sync).await,
                        Err(e) => Err(e.into()),
                    };
                    let reply = match result {
                        Ok(page) => {
                            engine.stats.sync();
                            // Paced by what the client reads: at most two
                            // full op 9 batches wait in the queue at once.
                            let window = 2 * engine.config.max_body;
                            let handle = &req.ctx.handle;
                            for msg in &page.messages {
                                if !handle.push_replay(msg, None, window).await {
                                    // The session is gone: nobody to answer.
                                    return Ok(None);
                                }
                            }
                            engine.stats.replayed(page.messages.len() as u64);
                            engine.stats.tel.sync(true, page.messages.len());
                            SyncReply::ok(page.oldest, page.head)
                        }
                        Err(e) => {
                            engine.stats.sync_failure();
                            engine.stats.tel.sync(false, 0);
                            tracing::debug!(peer = %req.ctx.conn.peer, mid = req.ctx.mid(), cause = %e, "sync refused");
                            SyncReply::failed(e.to_string())
                        }
                    };
                    Ok(Some(req.frame.reply(op::SYNC_REPLY, reply.encode(mode))))
                }
                _ => match handler {
                    Some(handler) => handler.oneshot(req).await,
                    None => {
                        engine.stats.unknown_op();
                        tracing::debug!(peer = %req.ctx.conn.peer, op = req.frame.op, "ignoring op with no handler");
                        Ok(None)
                    }
                },
            }
        })
    }
}
