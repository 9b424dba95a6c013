//! The WebSocket opening handshake (RFC 6455, section 4.2): the client's request head parsed,
//! the server's answer written.
//!
//! Pure: no sockets. The reader ([`crate::client`]) reads the head (bounded by
//! [`MAX_HEAD_BYTES`] and a deadline), calls [`parse`], lets [`crate::ws::Admission`] judge the
//! path, `Host` and `Origin`, then writes [`accept`] or [`refuse`]. Doing this here rather than
//! in tungstenite keeps the head bounded in bytes and the stack shallow: tungstenite's
//! handshake keeps room for 124 headers and an `http::Request` on the reader's stack, pages
//! that then stay resident for the whole life of every idle connection. tungstenite still
//! reads every frame after it ([`tungstenite::WebSocket::from_partially_read`]).

/// The longest request head accepted: a browser's is under 2 KiB.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The most headers accepted: a browser sends about fifteen.
const MAX_HEADERS: usize = 32;

/// What the server needs of a valid opening request.
#[derive(Debug, PartialEq, Eq)]
pub struct Opening {
    pub path: String,
    pub host: Option<String>,
    pub origin: Option<String>,
    /// `X-Forwarded-For` and `X-Real-IP`: believed only from a trusted proxy
    /// ([`crate::admission`]).
    pub forwarded_for: Option<String>,
    pub real_ip: Option<String>,
    /// `Sec-WebSocket-Key`, for the accept key.
    key: String,
    /// Bytes that came after the head (frames sent before the answer), for tungstenite.
    pub rest: Vec<u8>,
}

/// A refused handshake: the HTTP status, a one-line body, and for a refusal that passes
/// (429, 503) how many seconds to wait before trying again.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: &'static str,
    pub retry_after: Option<u32>,
}

impl Refusal {
    pub const fn new(status: u16, body: &'static str) -> Refusal {
        Refusal {
            status,
            body,
            retry_after: None,
        }
    }

    pub const fn retry_after(mut self, seconds: u32) -> Refusal {
        self.retry_after = Some(seconds);
        self
    }
}

/// Where the head ends (just past its blank line), if it has ended.
pub fn head_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// Parses a complete head (`buffer` holds it, and possibly more after it).
pub fn parse(buffer: &[u8]) -> Result<Opening, Refusal> {
    let bad = |why| Err(Refusal::new(400, why));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let end = match request.parse(buffer) {
        Ok(httparse::Status::Complete(end)) => end,
        Ok(httparse::Status::Partial) => return bad("incomplete request\n"),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(431, "too many headers\n"))
        }
        Err(_) => return bad("malformed request\n"),
    };
    if request.method != Some("GET") || request.version != Some(1) {
        return bad("a WebSocket handshake is an HTTP/1.1 GET\n");
    }
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("Upgrade", "websocket") || !has_token("Connection", "upgrade") {
        return bad("not a WebSocket upgrade\n");
    }
    if header("Sec-WebSocket-Version") != Some("13") {
        return Err(Refusal::new(426, "WebSocket version 13 only\n"));
    }
    let Some(key) = header("Sec-WebSocket-Key").filter(|k| !k.is_empty()) else {
        return bad("no Sec-WebSocket-Key\n");
    };
    Ok(Opening {
        path: request.path.unwrap_or("").to_owned(),
        host: header("Host").map(str::to_owned),
        origin: header("Origin").map(str::to_owned),
        forwarded_for: header("X-Forwarded-For").map(str::to_owned),
        real_ip: header("X-Real-IP").map(str::to_owned),
        key: key.to_owned(),
        rest: buffer[end..].to_vec(),
    })
}

/// The answer that opens the WebSocket.
pub fn accept(opening: &Opening) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        tungstenite::handshake::derive_accept_key(opening.key.as_bytes())
    )
}

/// The answer that refuses it, closing the connection.
pub fn refuse(refusal: &Refusal) -> String {
    let reason = match refusal.status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut extra = String::new();
    if refusal.status == 426 {
        extra.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    if let Some(seconds) = refusal.retry_after {
        extra.push_str(&format!("Retry-After: {seconds}\r\n"));
    }
    format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}\
         Connection: close\r\n\r\n{}",
        refusal.status,
        refusal.body.len(),
        refusal.body
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws/room2 HTTP/1.1\r\nHost: localhost:5001\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nOrigin: http://localhost:5000\r\n\r\n";

    #[test]
    fn a_browser_request_is_understood_and_answered() {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes.extend_from_slice(b"\x81\x80early");
        assert_eq!(head_end(&bytes), Some(GOOD.len()));
        let opening = parse(&bytes).unwrap();
        assert_eq!(opening.path, "/ws/room2");
        assert_eq!(opening.host.as_deref(), Some("localhost:5001"));
        assert_eq!(opening.origin.as_deref(), Some("http://localhost:5000"));
        assert_eq!(opening.rest, b"\x81\x80early");
        // The example of RFC 6455, section 1.3.
        assert!(accept(&opening).contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn requests_that_are_not_websocket_handshakes_are_refused() {
        let cases = [
            (GOOD.replace("GET", "POST"), 400),
            (GOOD.replace("HTTP/1.1", "HTTP/1.0"), 400),
            (GOOD.replace("Upgrade: websocket", "Upgrade: h2c"), 400),
            (GOOD.replace("keep-alive, Upgrade", "keep-alive"), 400),
            (GOOD.replace("Version: 13", "Version: 8"), 426),
            (GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", ""), 400),
            ("GET / HTTP/1.1\r\nBad Header\r\n\r\n".to_owned(), 400),
            (
                GOOD.replace(
                    "Host:",
                    &format!("{}Host:", "X-A: 1\r\n".repeat(MAX_HEADERS)),
                ),
                431,
            ),
        ];
        for (request, status) in cases {
            let refusal = parse(request.as_bytes()).unwrap_err();
            assert_eq!(refusal.status, status, "{request:?}");
            let answer = refuse(&refusal);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{answer}"
            );
            assert!(answer.ends_with(refusal.body));
        }
    }
}
