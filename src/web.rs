//! The web chat client (`web/` in the repository), embedded in the binary:
//! the files [`server::start`](crate::server::start) serves on its
//! WebSocket listener, beside the `/sub` endpoint (same origin).
//!
//! `web/comet.js` is the protocol part, a standalone ES module a web
//! application can take as it is (`web/README.md` documents it); the other
//! files are the single-page client built on it. Plain HTML, CSS and
//! JavaScript modules: no build step, nothing fetched from elsewhere.

use comet_transports::static_files::StaticFiles;

/// Every file of the client, by the path it is served at.
pub const FILES: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../web/index.html"),
    ),
    (
        "/index.html",
        "text/html; charset=utf-8",
        include_bytes!("../web/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/app.js"),
    ),
    (
        "/comet.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/comet.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_bytes!("../web/style.css"),
    ),
    (
        "/favicon.svg",
        "image/svg+xml",
        include_bytes!("../web/favicon.svg"),
    ),
];

/// The client as a [`StaticFiles`] map for
/// [`WsOptions::with_static_files`](comet_transports::ws::WsOptions::with_static_files).
pub fn files() -> StaticFiles {
    FILES
        .iter()
        .fold(StaticFiles::new(), |files, (path, content_type, body)| {
            files.with(*path, *content_type, *body)
        })
}
