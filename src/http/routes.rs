//! What each path answers, from memory: the page (its template filled in, with its CSP), the
//! embedded assets, `/healthz`, `/metrics` (only to `--metrics-allow`), 404 and 405; and the
//! `Host` check against DNS rebinding. Called by the responders ([`super::responders`]).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use log::debug;
use tiny_http::{Header, Method, Request, Response};

use crate::admission::{host_allowed, hostname};
use crate::config::Config;
use crate::room::{normalize_room_name, GENERAL_ROOM};
use crate::shared::Shared;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

/// What a path names.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Page(String),
    Asset(&'static str, &'static [u8]),
    Health,
    Metrics,
    NotFound,
}

fn route(path: &str) -> Route {
    let path = path.split(['?', '#']).next().unwrap_or("");
    match path {
        "/" => Route::Page(GENERAL_ROOM.to_owned()),
        "/healthz" => Route::Health,
        "/metrics" => Route::Metrics,
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

/// Answers one request; false when the answer could not be written (the connection is then
/// not worth answering again).
pub(super) fn respond(request: Request, shared: &Shared) -> bool {
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
    match request.respond(response) {
        Ok(()) => {
            shared.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(err) => {
            debug!("http response not delivered: {err}");
            false
        }
    }
}

/// Whether `/metrics` may be shown to this peer (`--metrics-allow`).
fn metrics_allowed(config: &Config, peer: Option<&SocketAddr>) -> bool {
    peer.is_some_and(|peer| config.metrics_allow.iter().any(|r| r.contains(peer.ip())))
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
        Route::Metrics if !metrics_allowed(&shared.config, request.remote_addr()) => {
            Response::from_data(b"metrics are served only to --metrics-allow addresses\n".to_vec())
                .with_status_code(403)
                .with_header(header("Content-Type", "text/plain; charset=utf-8"))
                .with_header(header("Cache-Control", "no-store"))
        }
        Route::Metrics => {
            let body = crate::metrics::render(&shared.metrics, &shared.gauges());
            Response::from_data(body.into_bytes())
                .with_header(header(
                    "Content-Type",
                    "text/plain; version=0.0.4; charset=utf-8",
                ))
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
        assert_eq!(route("/metrics"), Route::Metrics);
        assert_eq!(route("/metrics?x=1"), Route::Metrics);
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
            "/metrics/x",
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

    #[test]
    fn metrics_only_for_allowed_peers() {
        let config = Config::default();
        let peer = |text: &str| Some(text.parse::<SocketAddr>().unwrap());
        assert!(metrics_allowed(&config, peer("127.0.0.1:9").as_ref()));
        assert!(metrics_allowed(&config, peer("[::1]:9").as_ref()));
        assert!(metrics_allowed(
            &config,
            peer("[::ffff:127.0.0.1]:9").as_ref()
        ));
        assert!(!metrics_allowed(&config, peer("10.0.0.1:9").as_ref()));
        assert!(!metrics_allowed(&config, None));
        let config = Config {
            metrics_allow: vec![crate::config::AddressRange::parse("10.0.0.0/8").unwrap()],
            ..Config::default()
        };
        assert!(metrics_allowed(&config, peer("10.1.2.3:9").as_ref()));
        assert!(!metrics_allowed(&config, peer("127.0.0.1:9").as_ref()));
    }
}
