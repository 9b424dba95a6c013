//! The HTTP side: page routes, room-name normalisation and refusal (traversal attempts
//! included), static assets and their types, `/healthz`, security headers, 405, HEAD, and
//! idle HTTP connections being closed.

use std::io::Write;

use serde_json::Value;

use crate::support::{
    config, get, http, joined, read_response, read_until_closed, start, start_default, tcp,
    wait_until, HttpResponse,
};

/// The room a page was rendered for, from `<meta name="chatroom-room" content="...">`.
fn page_room(response: &HttpResponse) -> String {
    meta(response, "chatroom-room")
        .unwrap_or_else(|| panic!("page without a chatroom-room meta: {}", response.text()))
}

/// The content of `<meta name="{name}" content="...">`, if present.
fn meta(response: &HttpResponse, name: &str) -> Option<String> {
    let html = response.text();
    let start = html.find(&format!("<meta name=\"{name}\" content=\""))?;
    let rest = &html[start..];
    let value = rest.split("content=\"").nth(1)?;
    Some(value[..value.find('"')?].to_owned())
}

fn assert_page(response: &HttpResponse, room: &str) {
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.mime(), "text/html");
    assert_eq!(page_room(response), room);
    assert!(
        !response.text().contains("{{"),
        "page has an unfilled placeholder"
    );
}

fn assert_not_found(response: &HttpResponse, path: &str) {
    assert_eq!(
        response.status, 404,
        "{path} should be 404, got {response:?}"
    );
    assert_eq!(response.mime(), "text/html", "404 for {path}");
    assert!(
        response.text().contains("href=\"/\""),
        "404 page for {path} should link to /"
    );
}

#[test]
fn root_serves_the_general_room() {
    let server = start_default();
    assert_page(&get(server.http_addr(), "/"), "general");
}

#[test]
fn room_paths_serve_the_page_for_that_room() {
    let server = start_default();
    let addr = server.http_addr();
    let long = "a".repeat(64);
    for (path, room) in [
        ("/room2", "room2"),
        ("/Room2", "room2"),
        ("/GENERAL", "general"),
        ("/general", "general"),
        ("/a_b-c9", "a_b-c9"),
        ("/-", "-"),
        ("/_", "_"),
        (&format!("/{long}"), long.as_str()),
    ] {
        let response = get(addr, path);
        assert_eq!(response.status, 200, "{path}");
        assert_page(&response, room);
    }
}

#[test]
fn invalid_rooms_and_unknown_paths_are_404_with_a_link_home() {
    let server = start_default();
    let addr = server.http_addr();
    let too_long = format!("/{}", "a".repeat(65));
    for path in [
        "/a.b",
        "/..%2f..%2fetc%2fpasswd",
        "/../../etc/passwd",
        "/%2e%2e/Cargo.toml",
        "/static",
        "/static/",
        "/STATIC",
        "/api",
        "/ws",
        "/WS",
        "/ws/general",
        "/healthz/x",
        too_long.as_str(),
        "/a/b",
        "/room2/x",
        "/%00",
        "/a%00",
        "/caf%C3%A9",
        "/a%20b",
        "/static/nope.js",
        "/static/../Cargo.toml",
        "/static/..%2fCargo.toml",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/index.html/x",
        "/static//etc/passwd",
    ] {
        let response = get(addr, path);
        assert_not_found(&response, path);
        let body = response.text();
        assert!(!body.contains("[package]"), "{path} leaked Cargo.toml");
        assert!(!body.contains("root:"), "{path} leaked /etc/passwd");
    }
}

#[test]
fn every_asset_the_page_links_is_served_with_its_type() {
    let server = start_default();
    let addr = server.http_addr();
    let page = get(addr, "/").text();
    let mut assets: Vec<&str> = page
        .split('"')
        .filter(|s| s.starts_with("/static/"))
        .collect();
    assets.push("/static/app.js");
    assets.sort();
    assets.dedup();
    assert!(assets.len() >= 2, "the page links no assets: {page}");
    for path in assets {
        let response = get(addr, path);
        assert_eq!(response.status, 200, "{path}");
        assert!(!response.body.is_empty(), "{path} is empty");
        let mime = response.mime();
        let extension = path.rsplit('.').next().unwrap();
        let allowed: &[&str] = match extension {
            "js" | "mjs" => &["text/javascript", "application/javascript"],
            "css" => &["text/css"],
            "svg" => &["image/svg+xml"],
            "png" => &["image/png"],
            "ico" => &["image/x-icon", "image/vnd.microsoft.icon"],
            "html" => &["text/html"],
            "json" => &["application/json"],
            "webmanifest" => &["application/manifest+json"],
            other => panic!("no expected Content-Type known for .{other} ({path})"),
        };
        assert!(allowed.contains(&mime.as_str()), "{path} served as {mime}");
        assert_eq!(
            response.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
    }
}

#[test]
fn page_headers_restrict_the_page() {
    let server = start_default();
    let ws_port = server.ws_addr().port();
    for path in ["/", "/room2"] {
        let response = get(server.http_addr(), path);
        assert_eq!(response.status, 200);
        let csp = response
            .header("content-security-policy")
            .unwrap_or_else(|| panic!("{path} has no CSP"));
        assert!(csp.contains("default-src 'self'"), "CSP: {csp}");
        let connect_src = csp
            .split(';')
            .map(str::trim)
            .find(|d| d.starts_with("connect-src"))
            .unwrap_or_else(|| panic!("CSP without connect-src: {csp}"));
        assert!(
            connect_src.contains(&format!("ws://127.0.0.1:{ws_port}")),
            "connect-src does not name the ws endpoint: {csp}"
        );
        let script_src = csp
            .split(';')
            .map(str::trim)
            .find(|d| d.starts_with("script-src"))
            .unwrap_or("");
        assert!(
            !script_src.contains("'unsafe-inline'"),
            "CSP allows inline scripts: {csp}"
        );
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(response.header("referrer-policy"), Some("no-referrer"));
    }
}

#[test]
fn page_tells_the_script_where_the_websocket_is() {
    let server = start_default();
    let page = get(server.http_addr(), "/room2");
    assert_eq!(
        meta(&page, "chatroom-ws-port").as_deref(),
        Some(server.ws_addr().port().to_string().as_str()),
        "the page must learn the ws port without configuration"
    );
}

#[test]
fn a_ws_url_no_header_can_carry_does_not_stop_the_http_side() {
    // The flag refuses such a URL; a library user's Config is not checked. Before, the first
    // page load panicked the thread that serves every request.
    let server = start(chatroom::Config {
        ws_url: Some("wss://bücher.example/ws".to_owned()),
        ..config()
    });
    for _ in 0..2 {
        assert_eq!(get(server.http_addr(), "/room2").status, 200);
    }
    assert_eq!(get(server.http_addr(), "/healthz").status, 200);
}

#[test]
fn ws_url_behind_a_proxy_reaches_the_page_and_its_csp() {
    let url = "wss://chat.example.org/ws";
    let server = start(chatroom::Config {
        ws_url: Some(url.to_owned()),
        ..config()
    });
    let page = get(server.http_addr(), "/room2");
    assert_eq!(page.status, 200);
    assert_eq!(meta(&page, "chatroom-ws-url").as_deref(), Some(url));
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("wss://chat.example.org"),
        "CSP does not allow the proxied ws endpoint: {csp}"
    );
}

#[test]
fn healthz_reports_counts_but_never_room_names() {
    let server = start_default();
    let addr = server.http_addr();
    let health = |expected_clients: u64| -> Value {
        let response = get(addr, "/healthz");
        assert_eq!(response.status, 200);
        assert_eq!(response.mime(), "application/json");
        let body = response.text();
        assert!(
            !body.contains("secretroom"),
            "healthz leaks room names: {body}"
        );
        let value: Value = serde_json::from_str(&body).expect("healthz is JSON");
        assert_eq!(value["status"], "ok", "{value}");
        assert!(value["rooms"].is_u64(), "{value}");
        assert_eq!(value["clients"], expected_clients, "{value}");
        value
    };
    assert_eq!(health(0)["rooms"], 0);

    let (alice, _) = joined(&server, "secretroom1", "alice");
    let (bob, _) = joined(&server, "secretroom2", "bob");
    assert_eq!(health(2)["rooms"], 2);

    alice.close();
    bob.close();
    wait_until("healthz reports no clients", || {
        let value: Value = serde_json::from_str(&get(addr, "/healthz").text()).unwrap();
        value["clients"] == 0
    });
}

#[test]
fn other_methods_are_405() {
    let server = start_default();
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/", "/room2", "/healthz", "/static/app.js"] {
            let response = http(server.http_addr(), method, path);
            assert_eq!(response.status, 405, "{method} {path}: {response:?}");
            // RFC 9110 section 15.5.6: a 405 response must carry an Allow header.
            let allow = response.header("allow").unwrap_or_default();
            assert!(allow.contains("GET"), "{method} {path}: Allow is {allow:?}");
        }
    }
}

#[test]
fn head_gives_the_headers_without_a_body() {
    let server = start_default();
    let addr = server.http_addr();
    for path in ["/", "/room2", "/healthz", "/static/app.js", "/a.b"] {
        let got = get(addr, path);
        let mut stream = tcp(addr);
        write!(
            stream,
            "HEAD {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let head = read_response(&mut stream, true);
        assert_eq!(head.status, got.status, "HEAD {path}");
        assert_eq!(head.mime(), got.mime(), "HEAD {path}");
        if let Some(length) = head.header("content-length") {
            assert_eq!(length, got.body.len().to_string(), "HEAD {path}");
        }
        let rest = read_until_closed(&mut stream);
        assert!(
            rest.is_empty(),
            "HEAD {path} sent a body of {} bytes",
            rest.len()
        );
    }
}

/// Opens an HTTP connection to a server whose idle timeout is 1 s, writes `sent` and then
/// nothing; asserts the server closes the connection and still serves new ones, and returns
/// what it sent before the close. 1 s leaves the test's own request (written right after the
/// connect) a wide margin on a loaded machine, and the close comes ten times sooner than
/// TIMEOUT would fail the read.
fn idle_connection_is_closed(sent: &str) -> String {
    let server = start(chatroom::Config {
        http_idle_timeout: std::time::Duration::from_secs(1),
        ..config()
    });
    let addr = server.http_addr();
    let mut stream = tcp(addr);
    stream.write_all(sent.as_bytes()).unwrap();
    let received = read_until_closed(&mut stream);
    // Time passed with no new connection; the listener must still accept.
    assert_eq!(get(addr, "/healthz").status, 200);
    String::from_utf8(received).expect("HTTP heads are ASCII")
}

#[test]
fn idle_keep_alive_connection_is_closed_and_http_keeps_serving() {
    // The connection stays open (keep-alive) after its answer, then sends nothing: the server
    // must end it.
    let received = idle_connection_is_closed("GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(received.starts_with("HTTP/1.1 200 "), "{received:?}");
}

#[test]
fn slow_header_connection_is_closed() {
    let received = idle_connection_is_closed("GET / HTTP/1.1\r\nHost: ");
    assert_eq!(received, "", "an unfinished request got an answer");
}
