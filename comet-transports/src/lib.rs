//! Transports for comet (TCP, WebSocket, axum).
