//! Counters of what the engine did, readable at any time.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident => $inc:ident;)*) => {
        /// Live counters, shared by every session of a [`crate::Comet`].
        #[derive(Debug, Default)]
        pub struct Stats {
            $($name: AtomicU64,)*
            /// The `metrics` handles (see [`crate::telemetry`]).
            pub(crate) tel: crate::telemetry::Telemetry,
        }

        /// A snapshot of [`Stats`].
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Stats {
            $(
                $(#[$doc])*
                // Some counters are only ever added to in bulk.
                #[allow(dead_code)]
                pub(crate) fn $inc(&self) {
                    self.$name.fetch_add(1, Ordering::Relaxed);
                }
            )*

            /// Reads every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Connections that reached the engine.
    connections => connection;
    /// Successful authentications.
    authenticated => auth_ok;
    /// Refused logins (bad key, bad body).
    auth_denied => auth_fail;
    /// Frames that broke the protocol and closed their connection.
    protocol_errors => protocol_error;
    /// Connections closed for silence (handshake or heartbeat timeout).
    timeouts => timeout;
    /// Sessions closed because their outbound queue hit its bound.
    slow_consumers => slow_consumer;
    /// Frames with an op no handler claims, ignored.
    unknown_ops => unknown_op;
    /// Messages stored and acknowledged.
    messages => message;
    /// Sends answered with ret -1.
    send_failures => send_failure;
    /// Plug-in calls that failed or timed out.
    plugin_errors => plugin_error;
    /// Errors from the application's middleware or handlers.
    handler_errors => handler_error;
    /// Panics caught in plug-ins, layers or handlers (each closed one connection).
    panics => panic;
    /// Frames refused for exceeding the body limit.
    oversized_frames => oversized_frame;
    /// Connections closed by the frame-rate limit.
    rate_limited => rate_limit;
    /// Sessions closed because their mid logged in once too often.
    sessions_replaced => session_replaced;
    /// Syncs (op 22) answered with ret 0.
    syncs => sync;
    /// Syncs answered with ret -1.
    sync_failures => sync_failure;
    /// Messages replayed by syncs.
    replayed => replayed_one;
}

impl Stats {
    /// Counts `n` messages replayed by syncs.
    pub(crate) fn replayed(&self, n: u64) {
        self.replayed.fetch_add(n, Ordering::Relaxed);
    }
}

/// Runs a plug-in call bounded by `timeout`, counting and logging a failure
/// or a timeout. The call is polled once first: a plug-in that answers at
/// once (in-memory ones always do) then costs no timer.
pub(crate) async fn bounded<T>(
    stats: &Stats,
    timeout: std::time::Duration,
    what: &'static str,
    call: impl std::future::Future<Output = Result<T, crate::BoxError>>,
) -> Result<T, crate::BoxError> {
    use std::task::Poll;
    let started = std::time::Instant::now();
    let mut call = std::pin::pin!(call);
    let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
    let outcome = match first {
        Poll::Ready(result) => Ok(result),
        Poll::Pending => tokio::time::timeout(timeout, call).await,
    };
    stats.tel.plugin_call(what, started.elapsed().as_secs_f64());
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            stats.plugin_error();
            stats.tel.plugin_error(what, false);
            tracing::error!(hook = what, cause = %e, "plug-in call failed");
            Err(e)
        }
        Err(_) => {
            stats.plugin_error();
            stats.tel.plugin_error(what, true);
            tracing::error!(hook = what, ?timeout, "plug-in call timed out");
            Err(Box::new(crate::error::PluginTimeout(what)))
        }
    }
}
