//! The web chat client (`web/`), served by the chat server on its WebSocket
//! listener and driven in real headless Chromium over WebDriver
//! (chromedriver, started here on a free port and killed at the end).
//!
//! Needs the Debian packages `chromium` and `chromium-driver` (`.ci/run`
//! installs them when missing); without them the test fails and says so.
//! With `COMET_WEB_SCREENSHOT=<file.png>` set it also writes a screenshot of
//! two pages chatting, side by side (the README's `docs/web-client.png`).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::raw::{Client as RawClient, Kind};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// Every wait on the page is bounded by this.
const PAGE_WAIT: Duration = Duration::from_secs(20);

fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain([
        PathBuf::from("/usr/bin"),
        PathBuf::from("/usr/lib/chromium"),
    ]);
    for dir in dirs {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// chromedriver as a child process in its own process group, which is
/// killed (browsers included) when this is dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let chromedriver = find_binary(&["chromedriver"]).unwrap_or_else(|| {
            panic!(
                "chromedriver not found: the browser test needs the Debian packages chromium and \
                 chromium-driver (apt-get install -y --no-install-recommends chromium chromium-driver; \
                 .ci/run installs them)"
            )
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut command = Command::new(&chromedriver);
        command
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + PAGE_WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        driver
    }

    /// A new headless Chromium window (its own profile, so its own storage).
    async fn browser(&self) -> Client {
        let chromium = find_binary(&["chromium", "chromium-browser"]).unwrap_or_else(|| {
            panic!(
                "chromium not found: the browser test needs the Debian package chromium \
                 (apt-get install -y --no-install-recommends chromium chromium-driver; .ci/run installs it)"
            )
        });
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-extensions",
                    "--no-first-run",
                    "--window-size=760,640",
                ],
            }
        });
        let caps = caps.as_object().expect("an object").clone();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("chromedriver could not start chromium: {e}"))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browsers it started. The
        // `--` matters: procps-ng's kill reads `-KILL -<pgid>` as a kill of
        // every process (pid -1).
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of the page's body, for failure messages.
async fn body_text(page: &Client) -> String {
    match page.find(Locator::Css("body")).await {
        Ok(body) => body.text().await.unwrap_or_default(),
        Err(e) => format!("<no body: {e}>"),
    }
}

/// Waits until some element matching `css` has a text containing `text`.
async fn wait_text(page: &Client, css: &str, text: &str) {
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        if let Ok(found) = page.find_all(Locator::Css(css)).await {
            for el in found {
                if el.text().await.is_ok_and(|t| t.contains(text)) {
                    return;
                }
            }
        }
        if Instant::now() > deadline {
            panic!(
                "no `{css}` with text {text:?} within {PAGE_WAIT:?}; the page says:\n{}",
                body_text(page).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fill(page: &Client, css: &str, value: &str) {
    let el = page.find(Locator::Css(css)).await.expect(css);
    el.clear().await.expect("clear");
    el.send_keys(value).await.expect("type");
}

async fn click(page: &Client, css: &str) {
    page.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("cannot click {css}: {e}"));
}

async fn sign_in(page: &Client, url: &str, mid: i32, mkey: &str) {
    page.goto(url).await.expect("open the page");
    fill(page, "#mid", &mid.to_string()).await;
    fill(page, "#mkey", mkey).await;
    click(page, "#login-button").await;
}

async fn signed_in(page: &Client, mid: i32) {
    wait_text(page, "#me-name", &format!("Member {mid}")).await;
    wait_text(page, "#conn-state", "online").await;
}

/// Opens (or starts) a conversation by kind (18 user, 20 group) and id.
async fn open_new(page: &Client, kind: u32, id: i32) {
    page.find(Locator::Css("#new-kind"))
        .await
        .expect("kind select")
        .select_by_value(&kind.to_string())
        .await
        .expect("select kind");
    fill(page, "#new-id", &id.to_string()).await;
    click(page, "#new-open").await;
    let title = if kind == 20 {
        format!("Group {id}")
    } else {
        format!("User {id}")
    };
    wait_text(page, "#pane-title", &title).await;
}

async fn say(page: &Client, text: &str) {
    fill(page, "#composer-text", text).await;
    click(page, "#send").await;
    // Acknowledged: the bubble shows its chatId instead of "sending…".
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let pending = page
            .find_all(Locator::Css(".msg.pending"))
            .await
            .map(|v| v.len());
        let failed = page
            .find_all(Locator::Css(".msg.failed"))
            .await
            .map(|v| v.len());
        assert_eq!(
            failed.unwrap_or(0),
            0,
            "a send failed: {}",
            body_text(page).await
        );
        if pending.unwrap_or(1) == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "send not acknowledged: {}",
            body_text(page).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_text(page, ".msg.mine .text", text).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_chat_sync_after_a_reload_and_a_wrong_key_is_shown() {
    let server = common::server::start().await;
    let addr: SocketAddr = server.ws_addr.expect("websocket listener");
    let url = format!("http://{addr}/");
    let driver = Driver::start().await;
    let (one, two, three) = tokio::join!(driver.browser(), driver.browser(), driver.browser());
    let (one, two, three) = (one, two, three);

    // A wrong key: the sign-in form says why, and stays.
    sign_in(&three, &url, 3, "not-the-key").await;
    wait_text(&three, "#login-error", "Sign-in failed").await;
    wait_text(&three, "#login-error", "wrong mkey").await;
    let still_there = three.find(Locator::Css("#login-form")).await.expect("form");
    assert!(still_there.is_displayed().await.expect("displayed"));
    sign_in(&three, &url, 3, "k3").await;
    signed_in(&three, 3).await;

    sign_in(&one, &url, 1, "k1").await;
    sign_in(&two, &url, 2, "k2").await;
    signed_in(&one, 1).await;
    signed_in(&two, 2).await;

    // 1:1, both ways; the new conversation shows up on the other side with
    // an unread count.
    open_new(&one, 18, 2).await;
    say(&one, "Hello two, this is one").await;
    wait_text(&two, ".conv[data-key='u:1'] .unread", "1").await;
    wait_text(
        &two,
        ".conv[data-key='u:1'] .conv-preview",
        "Hello two, this is one",
    )
    .await;
    click(&two, ".conv[data-key='u:1']").await;
    wait_text(&two, ".msg .text", "Hello two, this is one").await;
    assert!(
        two.find_all(Locator::Css(".conv[data-key='u:1'] .unread"))
            .await
            .expect("query")
            .is_empty(),
        "opening the conversation clears its unread count"
    );
    say(&two, "Hi one! Two here.").await;
    wait_text(&one, ".msg:not(.mine) .text", "Hi one! Two here.").await;

    // A group message reaches both other members, the third one included.
    open_new(&one, 20, 100).await;
    say(&one, "Hello group 100").await;
    wait_text(&three, ".conv[data-key='g:100'] .unread", "1").await;
    click(&three, ".conv[data-key='g:100']").await;
    wait_text(&three, ".msg .text", "Hello group 100").await;
    wait_text(&three, ".msg .who", "User 1").await;
    wait_text(
        &two,
        ".conv[data-key='g:100'] .conv-preview",
        "Hello group 100",
    )
    .await;
    click(&two, ".conv[data-key='g:100']").await;
    say(&two, "Two says hi to the group").await;
    wait_text(&three, ".msg .text", "Two says hi to the group").await;

    // Page two goes away. Meanwhile another device of user 2 is online, so
    // the messages sent now are delivered live to it and never reach an
    // offline inbox: page two can only get them back by syncing (op 22).
    two.goto("about:blank").await.expect("leave");
    let mut device = RawClient::login(Kind::WsJson, addr, 2, "k2").await;
    click(&one, ".conv[data-key='u:2']").await;
    // A message that is not UTF-8, from the other device to user 1 (its own
    // message: the page counts what came before it as read) ...
    let ack = device.send_msg(18, 2, 1, &[0xff, 0xfe, 0x41]).await;
    assert_eq!(ack.ret, 0, "{ack:?}");
    // ... and then one answers: unread for two.
    say(&one, "Sent while you were away").await;
    let live = common::within("the live copy", device.msg()).await;
    assert_eq!(live.msg, b"Sent while you were away");
    wait_text(&one, ".msg.binary code", "//5B").await;
    let tag = one
        .execute(
            "const t = document.querySelector('.msg.binary .tag'); return t ? t.textContent : null;",
            vec![],
        )
        .await
        .expect("script runs");
    assert_eq!(tag, json!("base64"), "the binary message is labelled");

    // Page two comes back (same tab: it signs in again by itself) and
    // syncs what it missed.
    two.goto(&url).await.expect("come back");
    signed_in(&two, 2).await;
    wait_text(
        &two,
        ".conv[data-key='u:1'] .conv-preview",
        "Sent while you were away",
    )
    .await;
    wait_text(&two, ".conv[data-key='u:1'] .unread", "1").await;
    click(&two, ".conv[data-key='u:1']").await;
    wait_text(&two, ".msg .text", "Sent while you were away").await;
    // History comes back too, from the conversations it remembered.
    wait_text(&two, ".msg .text", "Hello two, this is one").await;
    wait_text(&two, ".msg.binary code", "//5B").await;
    device.close().await;

    // A dropped connection: the page reconnects by itself (a new session on
    // the server) and then gets what is sent to it.
    let logins = server.comet.stats().authenticated;
    assert_eq!(server.comet.disconnect(1), 1, "page one's session");
    let deadline = Instant::now() + PAGE_WAIT;
    while server.comet.stats().authenticated == logins || server.comet.sessions_of(1) != 1 {
        assert!(Instant::now() < deadline, "page one did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signed_in(&one, 1).await;
    say(&two, "Welcome back, one").await;
    wait_text(&one, ".msg .text", "Welcome back, one").await;

    if let Ok(path) = std::env::var("COMET_WEB_SCREENSHOT") {
        click(&one, ".conv[data-key='u:2']").await;
        let (left, right) = (
            one.screenshot().await.expect("screenshot"),
            two.screenshot().await.expect("screenshot"),
        );
        write_side_by_side(&left, &right, Path::new(&path));
    }

    for page in [one, two, three] {
        let _ = page.close().await;
    }
    drop(driver);
    server.shutdown().await;
}

/// Joins two PNG screenshots left and right, with a thin gap.
fn write_side_by_side(left: &[u8], right: &[u8], path: &Path) {
    fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("a frame");
        buf.truncate(info.buffer_size());
        // Always RGBA.
        let rgba = match info.color_type {
            png::ColorType::Rgba => buf,
            png::ColorType::Rgb => buf
                .chunks(3)
                .flat_map(|p| [p[0], p[1], p[2], 255])
                .collect(),
            other => panic!("unexpected screenshot colour type {other:?}"),
        };
        (info.width, info.height, rgba)
    }
    let (lw, lh, l) = decode(left);
    let (rw, rh, r) = decode(right);
    let gap = 12;
    let (w, h) = (lw + gap + rw, lh.max(rh));
    let mut out = vec![0xd8; (w * h * 4) as usize];
    for y in 0..h {
        let row = (y * w * 4) as usize;
        if y < lh {
            let src = (y * lw * 4) as usize;
            out[row..row + (lw * 4) as usize].copy_from_slice(&l[src..src + (lw * 4) as usize]);
        }
        if y < rh {
            let dst = row + ((lw + gap) * 4) as usize;
            let src = (y * rw * 4) as usize;
            out[dst..dst + (rw * 4) as usize].copy_from_slice(&r[src..src + (rw * 4) as usize]);
        }
    }
    let file = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(&out))
        .expect("write the screenshot");
}
