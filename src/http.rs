//! The HTTP side: tiny_http serves the page, its assets and `/healthz` from memory.
//!
//! [`run_http`] is one thread that answers every request itself (all responses are small and
//! come from memory, so they fit the socket buffer and never wait on a slow client). It also
//! supervises tiny_http, whose accept thread ends for good on its first accept error: when
//! `recv()` reports that error, a new `tiny_http::Server` is built on a clone of the same
//! listener, and the old one is handed to a drain thread that answers its remaining requests.
//!
//! Idle connections: the listener carries `SO_RCVTIMEO`/`SO_SNDTIMEO`, which Linux copies to
//! every accepted socket, so tiny_http's per-connection thread gives up on a client that sends
//! nothing for `http_idle_timeout` (idle keep-alive, slow headers). The same timeout also ends a
//! quiet `accept()`, which is just one more accept error: the supervisor rebuilds and goes on.

use std::io;
use std::net::TcpListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, error, warn};
use tiny_http::{Header, Method, Request, Response};

use crate::admission::{host_allowed, hostname};
use crate::room::{normalize_room_name, GENERAL_ROOM};
use crate::shared::{LiveServers, Shared};

mod assets {
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

/// Pause after a real accept error (e.g. out of file descriptors) before rebuilding.
const REBUILD_BACKOFF: Duration = Duration::from_millis(100);
const DRAIN_STACK_BYTES: usize = 256 * 1024;

/// Gives the listener the idle timeout that accepted sockets inherit.
pub fn set_idle_timeout(listener: &TcpListener, timeout: Duration) -> io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))
}

/// The HTTP thread: serve requests, rebuild tiny_http after each accept error, until stopping.
pub fn run_http(listener: TcpListener, shared: Arc<Shared>) {
    let mut drains: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stopping.load(Ordering::Acquire) {
        let Some(server) = build_server(&listener) else {
            thread::sleep(REBUILD_BACKOFF);
            continue;
        };
        lock(&shared.http_servers).push(Arc::clone(&server));
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        let err = loop {
            match server.recv() {
                Ok(request) => respond(request, &shared),
                Err(err) => break err,
            }
        };
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        if matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            debug!("http accept idle; rebuilding tiny_http");
        } else {
            warn!("http accept failed: {err}; rebuilding tiny_http");
            thread::sleep(REBUILD_BACKOFF);
        }
        drains.retain(|d| !d.is_finished());
        if let Some(drain) = retire(server, &shared) {
            drains.push(drain);
        }
    }
    // Stop listening now, for every clone of the listener: shutting a listening socket down
    // makes new connections fail and wakes tiny_http's accept thread, so the port is closed
    // when shutdown returns, not whenever that thread gets around to it.
    let _ = socket2::SockRef::from(&listener).shutdown(std::net::Shutdown::Both);
    lock(&shared.http_servers).clear();
    for drain in drains {
        let _ = drain.join();
    }
}

fn build_server(listener: &TcpListener) -> Option<Arc<tiny_http::Server>> {
    let clone = match listener.try_clone() {
        Ok(clone) => clone,
        Err(err) => {
            error!("cannot clone the http listener: {err}");
            return None;
        }
    };
    // tiny_http starts its accept thread with `thread::spawn`, which panics if the host has no
    // thread to give: catch that here rather than lose HTTP for good.
    match catch_unwind(AssertUnwindSafe(|| {
        tiny_http::Server::from_listener(clone, None)
    })) {
        Ok(Ok(server)) => Some(Arc::new(server)),
        Ok(Err(err)) => {
            error!("cannot start tiny_http: {err}");
            None
        }
        Err(_) => {
            error!("cannot start tiny_http: no thread for its accept loop");
            None
        }
    }
}

/// Answers what is still arriving on a retired server's connections, until it has been quiet
/// for longer than those connections may idle (by then they are all closed), or until shutdown
/// wakes it.
fn retire(server: Arc<tiny_http::Server>, shared: &Arc<Shared>) -> Option<JoinHandle<()>> {
    let shared = Arc::clone(shared);
    let quiet_limit = shared.config.http_idle_timeout + Duration::from_secs(1);
    thread::Builder::new()
        .name("http-drain".into())
        .stack_size(DRAIN_STACK_BYTES)
        .spawn(move || {
            loop {
                match server.recv_timeout(quiet_limit) {
                    Ok(Some(request)) => respond(request, &shared),
                    // Quiet for the whole limit, or woken by shutdown.
                    Ok(None) => break,
                    // tiny_http reports its accept error once; requests may still follow.
                    Err(_) => continue,
                }
            }
            lock(&shared.http_servers).retain(|live| !Arc::ptr_eq(live, &server));
        })
        .map_err(|err| warn!("no thread to drain a retired http server: {err}"))
        .ok()
}

fn lock(servers: &LiveServers) -> std::sync::MutexGuard<'_, Vec<Arc<tiny_http::Server>>> {
    servers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Wakes every thread blocked on a tiny_http server, so each sees that the server is stopping.
pub fn wake(shared: &Shared) {
    for server in lock(&shared.http_servers).iter() {
        server.unblock();
    }
}

/// What a path names.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Page(String),
    Asset(&'static str, &'static [u8]),
    Health,
    NotFound,
}

fn route(path: &str) -> Route {
    let path = path.split(['?', '#']).next().unwrap_or("");
    match path {
        "/" => Route::Page(GENERAL_ROOM.to_owned()),
        "/healthz" => Route::Health,
        _ => {
            if let Some(file) = path.strip_prefix("/static/") {
                // Only names in the embedded table: nothing on disk is ever read.
                return assets::ASSETS
                    .iter()
                    .find(|(name, _)| *name == file)
                    .map_or(Route::NotFound, |(name, bytes)| Route::Asset(name, bytes));
            }
            path.strip_prefix('/')
                .and_then(normalize_room_name)
                .map_or(Route::NotFound, Route::Page)
        }
    }
}

fn asset(name: &str) -> &'static [u8] {
    assets::ASSETS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(&[], |(_, bytes)| bytes)
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        "webmanifest" => "application/manifest+json",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// A response header. A value HTTP cannot carry (only a configured value could be one: the
/// flags are checked, but a library user's `Config` is not) becomes empty instead of
/// panicking the thread that serves every request.
fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes())
        .or_else(|_| Header::from_bytes(name.as_bytes(), &b""[..]))
        .unwrap_or_else(|_| unreachable!("header names are static and valid"))
}

fn respond(request: Request, shared: &Shared) {
    let response = match request.method() {
        Method::Get | Method::Head => build_response(&request, shared),
        _ => Response::from_data(b"method not allowed\n".to_vec())
            .with_status_code(405)
            .with_header(header("Allow", "GET, HEAD"))
            .with_header(header("Content-Type", "text/plain; charset=utf-8")),
    };
    let response = response
        .with_header(header("X-Content-Type-Options", "nosniff"))
        .with_header(header("Referrer-Policy", "no-referrer"));
    if let Err(err) = request.respond(response) {
        debug!("http response not delivered: {err}");
    }
}

/// The request's `Host` header, or "" without one.
fn host_of(request: &Request) -> &str {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Host"))
        .map_or("", |h| h.value.as_str())
}

fn build_response(request: &Request, shared: &Shared) -> Response<io::Cursor<Vec<u8>>> {
    let host = host_of(request);
    if !host_allowed(&shared.config, host) {
        // 421 Misdirected Request: this server does not answer for that name (DNS rebinding).
        let host: String = host.chars().take(100).collect();
        let body = format!(
            "This chatroom server does not answer for the host {host:?}.\nIf that is its name, \
             start it with --allowed-host {}\n",
            hostname(&host)
        );
        return Response::from_data(body.into_bytes())
            .with_status_code(421)
            .with_header(header("Content-Type", "text/plain; charset=utf-8"))
            .with_header(header("Cache-Control", "no-store"));
    }
    match route(request.url()) {
        Route::Page(room) => {
            let page = render_page(&room, shared);
            html(page.into_bytes(), 200, request, shared)
        }
        Route::NotFound => html(asset("404.html").to_vec(), 404, request, shared),
        Route::Health => {
            let (code, body) = shared.health_report();
            Response::from_data(body.into_bytes())
                .with_status_code(code)
                .with_header(header("Content-Type", "application/json"))
                .with_header(header("Cache-Control", "no-store"))
        }
        Route::Asset(name, bytes) => Response::from_data(bytes.to_vec())
            .with_header(header("Content-Type", content_type(name)))
            .with_header(header("Cache-Control", "no-cache")),
    }
}

/// The page with its three placeholders filled in. Room names are `[a-z0-9_-]` and the port
/// is a number, so only the operator's `--ws-url` needs escaping.
fn render_page(room: &str, shared: &Shared) -> String {
    let template = String::from_utf8_lossy(asset("index.html"));
    template
        .replace("{{ROOM}}", room)
        .replace(
            "{{WS_URL}}",
            &escape_html(shared.config.ws_url.as_deref().unwrap_or("")),
        )
        .replace("{{WS_PORT}}", &shared.ws_port.to_string())
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html(
    body: Vec<u8>,
    status: u16,
    request: &Request,
    shared: &Shared,
) -> Response<io::Cursor<Vec<u8>>> {
    let csp = format!(
        "default-src 'self'; connect-src 'self' {}; img-src 'self' data:; style-src 'self'; \
         script-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        websocket_sources(request, shared)
    );
    Response::from_data(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "text/html; charset=utf-8"))
        .with_header(header("Cache-Control", "no-cache"))
        .with_header(header("Content-Security-Policy", &csp))
}

/// The WebSocket endpoint the page will use, as CSP sources.
fn websocket_sources(request: &Request, shared: &Shared) -> String {
    if let Some(url) = &shared.config.ws_url {
        // The origin part of the configured URL: scheme://host[:port].
        let origin_end = url
            .find("://")
            .map(|i| i + 3)
            .and_then(|start| url[start..].find('/').map(|i| start + i))
            .unwrap_or(url.len());
        return url[..origin_end].to_owned();
    }
    let host = host_of(request);
    let name = hostname(host);
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':');
    let name = if host.starts_with('[') && plain {
        format!("[{name}]")
    } else if plain {
        name.to_owned()
    } else {
        "*".to_owned()
    };
    let port = shared.ws_port;
    format!("ws://{name}:{port} wss://{name}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/"), Route::Page("general".into()));
        assert_eq!(route("/Room2?x=1"), Route::Page("room2".into()));
        assert_eq!(route("/healthz"), Route::Health);
        assert!(matches!(route("/static/app.js"), Route::Asset("app.js", _)));
        for bad in [
            "/static",
            "/static/",
            "/static/../Cargo.toml",
            "/static/nope.js",
            "/a/b",
            "/a.b",
            "/..%2f..%2fetc%2fpasswd",
            "/%2e%2e",
            "/ws",
            "/healthz/x",
            "//",
            "/api",
        ] {
            assert_eq!(route(bad), Route::NotFound, "{bad}");
        }
    }

    #[test]
    fn every_asset_has_a_content_type() {
        for (name, _) in assets::ASSETS {
            assert_ne!(content_type(name), "application/octet-stream", "{name}");
        }
    }
}
