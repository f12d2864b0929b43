//! Transports for comet (TCP, WebSocket, axum).

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
