//! Shared test helpers: an in-process server on ephemeral ports, a WebSocket [`TestClient`]
//! that synchronises on protocol frames, raw frame builders for what tungstenite refuses to
//! send, and a small hand-written HTTP/1.1 client.
//!
//! Every socket made here has a read and a write timeout of [`TIMEOUT`], so a server bug makes
//! a test fail with a message instead of hanging the suite.
//!
//! For history on disk: [`TempDir`] (a data directory removed on drop), [`disk_config`],
//! `/healthz` readers ([`health`], [`wait_until_written`]), and the binary as a child process
//! ([`ChildServer`], [`ChildGuard`]) that is killed by its PID whatever path a test takes.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use chatroom::{Config, Server, ServerHandle};
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocket;
use tungstenite::{HandshakeError, Message};

/// How long any single wait may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How long a shutdown may take before the test fails. The server promises 2 s (README: "exits
/// 0 within 2 s"); tests allow ten times that, so a loaded machine cannot fail them, while a
/// shutdown that waits for a client (whose timeouts the tests set far above this) still does.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(20);

/// Opcodes and flag bits for hand-built client frames (RFC 6455, section 5.2).
pub const FIN: u8 = 0x80;
pub const RSV1: u8 = 0x40;
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;

/// The test default: both listeners on ephemeral ports, rate limit off, history in memory only
/// (tests that keep it on disk give each server its own directory), everything else as shipped.
/// Tests change one knob with struct update syntax: `Config { history: 5, ..config() }`.
pub fn config() -> Config {
    Config {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ws_addr: "127.0.0.1:0".parse().unwrap(),
        rate_limit: None,
        data_dir: None,
        // Tests open many connections from 127.0.0.1; the per-address tests turn these on.
        max_per_address: None,
        handshake_rate: None,
        ..Config::default()
    }
}

/// Starts a server in this process.
pub fn start(config: Config) -> ServerHandle {
    Server::start(config).expect("the server starts on ephemeral ports")
}

/// Starts a server with [`config`].
pub fn start_default() -> ServerHandle {
    start(config())
}

/// Polls a piece of server state until it holds, failing after [`TIMEOUT`]. This waits for
/// a state to be reached (threads ending, counters dropping), never for an ordering of events.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Milliseconds since 1970 by this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A fresh text for each call, so a sentinel can never be confused with an earlier frame.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A TCP connection with both timeouts set and Nagle off.
pub fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    set_timeouts(&stream);
    stream
}

/// Applies [`TIMEOUT`] to reads and writes, and `TCP_NODELAY`.
pub fn set_timeouts(stream: &TcpStream) {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
}

/// True for the error a socket timeout produces (EAGAIN on Linux).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A WebSocket client driven by the test, one frame at a time.
pub struct TestClient {
    ws: WebSocket<TcpStream>,
}

impl TestClient {
    /// Connects to `/ws/{room}`; panics if the handshake is refused.
    pub fn connect(server: &ServerHandle, room: &str) -> TestClient {
        Self::connect_path(server, &format!("/ws/{room}"))
    }

    /// Connects to an exact path; panics if the handshake is refused.
    pub fn connect_path(server: &ServerHandle, path: &str) -> TestClient {
        Self::try_connect(server.ws_addr(), path)
            .unwrap_or_else(|status| panic!("handshake for {path} refused with {status}"))
    }

    /// Connects to an exact path; `Err` holds the HTTP status of a refused handshake.
    pub fn try_connect(addr: SocketAddr, path: &str) -> Result<TestClient, u16> {
        Self::try_request(tcp(addr), format!("ws://{addr}{path}"))
    }

    /// Performs the client handshake on a stream the test owns, with any request (extra
    /// headers, another `Host`); `Err` holds the HTTP status of a refused handshake.
    pub fn try_request(
        stream: TcpStream,
        request: impl IntoClientRequest,
    ) -> Result<TestClient, u16> {
        match tungstenite::client(request, stream) {
            Ok((ws, _response)) => Ok(TestClient { ws }),
            Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                Err(response.status().as_u16())
            }
            Err(e) => panic!("handshake failed without an HTTP status: {e}"),
        }
    }

    /// Sends `hello` with this name and returns the `welcome`.
    pub fn join(&mut self, name: &str) -> Value {
        self.hello(json!({"type": "hello", "name": name}))
    }

    /// Sends a complete `hello` object and returns the `welcome`, which must be the next frame.
    pub fn hello(&mut self, hello: Value) -> Value {
        self.send_json(&hello);
        self.expect_type("welcome")
    }

    /// Sends a JSON value as one text frame.
    pub fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string());
    }

    /// Sends one text frame as is.
    pub fn send_text(&mut self, text: &str) {
        self.send(Message::text(text));
    }

    /// Sends any message and flushes it.
    pub fn send(&mut self, message: Message) {
        self.ws.send(message).expect("send a frame");
    }

    /// Sends `say`.
    pub fn say(&mut self, text: &str) {
        self.send_json(&json!({"type": "say", "text": text}));
    }

    /// Sends `typing`.
    pub fn typing(&mut self) {
        self.send_json(&json!({"type": "typing"}));
    }

    /// The next frame of any kind; panics on a timeout or a broken connection.
    pub fn next_frame(&mut self) -> Message {
        match self.ws.read() {
            Ok(message) => message,
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                panic!("no frame from the server within {TIMEOUT:?}")
            }
            Err(e) => panic!("connection failed while waiting for a frame: {e}"),
        }
    }

    /// The next frame, as tungstenite reports it (errors included).
    pub fn read(&mut self) -> tungstenite::Result<Message> {
        self.ws.read()
    }

    /// The next text frame parsed as a JSON object, skipping pings and pongs; panics on any
    /// other frame.
    pub fn next_json(&mut self) -> Value {
        loop {
            match self.next_frame() {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("server sent invalid JSON {text:?}: {e}"));
                    assert!(value.is_object(), "server frame is not an object: {value}");
                    return value;
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a JSON text frame, got {other:?}"),
            }
        }
    }

    /// The next JSON frame, which must have this `type`.
    pub fn expect_type(&mut self, kind: &str) -> Value {
        let value = self.next_json();
        assert_eq!(
            value["type"], kind,
            "expected a {kind:?} frame, got {value}"
        );
        value
    }

    /// The next JSON frame, which must be an error with this code and a human message.
    pub fn expect_error(&mut self, code: &str) -> Value {
        let value = self.expect_type("error");
        assert_eq!(value["code"], code, "wrong error code in {value}");
        let message = value["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "error without a message: {value}");
        value
    }

    /// The next JSON frame, which must be a `message` from `name` with exactly `text`.
    pub fn expect_said(&mut self, name: &str, text: &str) -> Value {
        let value = self.expect_type("message");
        assert_eq!(value["name"], name, "wrong sender in {value}");
        assert_eq!(value["text"], text, "wrong text in {value}");
        value
    }

    /// Skips frames until one satisfies `wanted`, and returns it.
    pub fn skip_until(&mut self, mut wanted: impl FnMut(&Value) -> bool) -> Value {
        loop {
            let value = self.next_json();
            if wanted(&value) {
                return value;
            }
        }
    }

    /// Says `text` and returns its echo, which must be the very next frame.
    pub fn say_echo(&mut self, text: &str) -> Value {
        self.say(text);
        let value = self.expect_type("message");
        assert_eq!(
            value["text"], text,
            "expected the echo of my message, got {value}"
        );
        value
    }

    /// Sentinel: says a fresh marker and asserts that its echo is the very next frame, which
    /// proves nothing else was queued for this client before it. Returns the echo.
    pub fn sync(&mut self) -> Value {
        let marker = unique("marker");
        self.say_echo(&marker)
    }

    /// Reads until a Close frame (skipping pings and pongs) and returns its code; `Err`
    /// describes what came instead: a text frame, a timeout, or an end without a Close frame.
    pub fn close_code(&mut self) -> Result<Option<u16>, String> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(frame)) => return Ok(frame.map(|f| u16::from(f.code))),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => return Err(format!("expected a Close frame, got {other:?}")),
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                    return Err(format!("no Close frame within {TIMEOUT:?}"))
                }
                Err(e) => return Err(format!("connection ended without a Close frame: {e}")),
            }
        }
    }

    /// Reads until a Close frame and asserts its status code.
    pub fn expect_close_code(&mut self, code: u16) {
        assert_eq!(self.close_code(), Ok(Some(code)));
    }

    /// Closes politely (Close frame, then waits for the server's echo or the end of the
    /// stream); returns once the server has seen the close.
    pub fn close(mut self) {
        self.ws.close(None).expect("send a Close frame");
        loop {
            match self.ws.read() {
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                    panic!("server did not answer a Close within {TIMEOUT:?}")
                }
                Err(_) => return,
            }
        }
    }

    /// Writes bytes straight to the socket, bypassing tungstenite: for frames it will not
    /// build (invalid UTF-8, reserved bits, oversized).
    pub fn write_raw(&mut self, bytes: &[u8]) {
        let stream = self.ws.get_mut();
        stream.write_all(bytes).expect("write raw bytes");
        stream.flush().unwrap();
    }

    /// The underlying socket.
    pub fn stream(&self) -> &TcpStream {
        self.ws.get_ref()
    }
}

/// Connects to `room` with a tiny receive buffer (4 KiB) and joins as `name`, so the server's
/// writes to this client back up as soon as the test stops reading it.
pub fn joined_with_a_tiny_buffer(server: &ServerHandle, room: &str, name: &str) -> TestClient {
    let addr = server.ws_addr();
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    set_timeouts(&stream);
    let mut client = TestClient::try_request(stream, format!("ws://{addr}/ws/{room}"))
        .unwrap_or_else(|status| panic!("handshake refused with {status}"));
    client.join(name);
    client
}

/// Connects to `room` and joins as `name`; returns the client and its `welcome`.
pub fn joined(server: &ServerHandle, room: &str, name: &str) -> (TestClient, Value) {
    let mut client = TestClient::connect(server, room);
    let welcome = client.join(name);
    (client, welcome)
}

/// The usual opening: connects and joins each of `names` to `room` in turn, and returns the
/// clients once each has read the `joined` of everyone after it, so every client's next frame
/// is whatever the test does next:
/// `let [mut alice, mut bob] = together(&server, "room1", ["alice", "bob"]);`
pub fn together<const N: usize>(
    server: &ServerHandle,
    room: &str,
    names: [&str; N],
) -> [TestClient; N] {
    let mut clients: Vec<TestClient> = Vec::with_capacity(N);
    for name in names {
        let (client, welcome) = joined(server, room, name);
        assert_eq!(welcome["name"], name, "{name} joined under another name");
        for earlier in &mut clients {
            assert_eq!(earlier.expect_type("joined")["name"], name);
        }
        clients.push(client);
    }
    match clients.try_into() {
        Ok(clients) => clients,
        Err(_) => unreachable!("one client per name"),
    }
}

/// The `users` of a welcome, sorted.
pub fn users(welcome: &Value) -> Vec<String> {
    let mut users: Vec<String> = welcome["users"]
        .as_array()
        .unwrap_or_else(|| panic!("welcome without users: {welcome}"))
        .iter()
        .map(|u| u.as_str().expect("user names are strings").to_owned())
        .collect();
    users.sort();
    users
}

/// The texts of a welcome's history, in order.
pub fn history_texts(welcome: &Value) -> Vec<String> {
    history(welcome)
        .iter()
        .map(|m| m["text"].as_str().expect("history text").to_owned())
        .collect()
}

/// The history array of a welcome.
pub fn history(welcome: &Value) -> Vec<Value> {
    welcome["history"]
        .as_array()
        .unwrap_or_else(|| panic!("welcome without history: {welcome}"))
        .clone()
}

/// The `id` of a message frame.
pub fn id(message: &Value) -> u64 {
    message["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("message without a numeric id: {message}"))
}

/// One masked client frame (RFC 6455 section 5.2). `first` is FIN/RSV bits | opcode.
pub fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut out = vec![first];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Performs a WebSocket handshake by hand and returns the bare socket, having read exactly
/// the response head (so no frame bytes are swallowed).
pub fn raw_ws_handshake(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = tcp(addr);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let head = read_head(&mut stream);
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "handshake not accepted: {head}"
    );
    stream
}

/// Reads one unmasked server frame: `Some((opcode, payload))`, or `None` when the server has
/// closed the connection (EOF or reset). Panics on a timeout.
pub fn read_server_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 2];
    if let Err(e) = stream.read_exact(&mut header) {
        assert!(!is_timeout(&e), "no frame and no close within {TIMEOUT:?}");
        return None;
    }
    let opcode = header[0] & 0x0f;
    let len = match header[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).ok()?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    assert_eq!(header[1] & 0x80, 0, "server frames must not be masked");
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).ok()?;
    Some((opcode, payload))
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("body is UTF-8")
    }

    /// The Content-Type without parameters, lowercased.
    pub fn mime(&self) -> String {
        self.header("content-type")
            .unwrap_or_else(|| panic!("no Content-Type in {self:?}"))
            .split(';')
            .next()
            .unwrap()
            .trim()
            .to_ascii_lowercase()
    }
}

/// Sends one request with `Connection: close` and returns the response.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    let body_headers = if method == "POST" || method == "PUT" {
        "Content-Length: 0\r\n"
    } else {
        ""
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{body_headers}Connection: close\r\n\r\n"
    );
    let mut stream = tcp(addr);
    stream.write_all(request.as_bytes()).unwrap();
    read_response(&mut stream, method == "HEAD")
}

/// `GET` with `Connection: close`.
pub fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http(addr, "GET", path)
}

/// Reads a response head up to and including the blank line, one byte at a time.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => panic!(
                "connection closed inside a response head: {:?}",
                String::from_utf8_lossy(&head)
            ),
            Ok(_) => head.push(byte[0]),
            Err(e) => panic!("reading a response head: {e}"),
        }
    }
    String::from_utf8(head).expect("response head is ASCII")
}

/// Reads one response: the head, then a body framed by Content-Length, chunked encoding or
/// the end of the stream. `head_only` is for HEAD requests, whose responses have no body.
pub fn read_response(stream: &mut TcpStream, head_only: bool) -> HttpResponse {
    let head = read_head(stream);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, value) = l.split_once(':').expect("header line has a colon");
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only {
        return response;
    }
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        response.body = read_chunked(stream);
    } else if let Some(len) = response.header("content-length") {
        let mut body = vec![0u8; len.parse().expect("numeric Content-Length")];
        stream.read_exact(&mut body).expect("read the body");
        response.body = body;
    } else {
        stream
            .read_to_end(&mut response.body)
            .expect("read the body to the end");
    }
    response
}

fn read_chunked(stream: &mut TcpStream) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            stream.read_exact(&mut byte).expect("read a chunk size");
            line.push(byte[0]);
        }
        let size_text = String::from_utf8_lossy(&line[..line.len() - 2]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .expect("hex chunk size");
        let mut chunk = vec![0u8; size + 2];
        stream.read_exact(&mut chunk).expect("read a chunk");
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

/// Waits until the peer closes this socket (EOF or reset), failing after [`TIMEOUT`]; the
/// bytes that arrived before the end are returned.
pub fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return seen,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => panic!("the server kept the connection open"),
            Err(_) => return seen,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// History on disk: temporary data directories, `/healthz`, and the binary as a child process.
// ---------------------------------------------------------------------------------------------

/// The `chatroom` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_chatroom");

/// A fresh directory under the system temp dir, unique to this test process and call, removed
/// (with everything in it, read-only parts included) when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `chatroom-test-{pid}-{label}-{n}` under [`std::env::temp_dir`].
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("chatroom-test-{}-{label}-{n}", std::process::id()));
        // A directory left by an earlier process with the same pid would only confuse.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.path.join(relative)
    }

    /// The directory as a command-line argument.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        make_writable(&self.path);
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Gives every directory under `path` back its write bit, so a test that made one read-only
/// can still be cleaned up by a user other than root.
fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o755));
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}

/// [`config`] with history kept in `dir/chatroom.db`.
pub fn disk_config(dir: &Path) -> Config {
    Config {
        data_dir: Some(dir.to_path_buf()),
        ..config()
    }
}

/// Where a server with this data directory keeps its database.
pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("chatroom.db")
}

/// `GET /healthz`, which must answer 200 with a JSON object.
pub fn health(http_addr: SocketAddr) -> Value {
    let response = get(http_addr, "/healthz");
    assert_eq!(response.status, 200, "/healthz: {response:?}");
    let body: Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("/healthz is not JSON ({e}): {}", response.text()));
    assert!(body.is_object(), "/healthz is not an object: {body}");
    body
}

/// The `store` object of `/healthz`.
pub fn store_health(http_addr: SocketAddr) -> Value {
    let body = health(http_addr);
    assert!(body["store"].is_object(), "/healthz without store: {body}");
    body["store"].clone()
}

/// A numeric field of a JSON object, failing with the whole object when it is missing.
pub fn count(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field:?} in {value}"))
}

/// Polls `/healthz` until the store reports state "ok", nothing unwritten, and at least
/// `written` messages committed since start; returns that `store` object.
pub fn wait_until_written(http_addr: SocketAddr, written: u64) -> Value {
    let mut last = Value::Null;
    wait_until("the store has written everything", || {
        last = store_health(http_addr);
        last["state"] == "ok"
            && count(&last, "unwritten") == 0
            && count(&last, "written") >= written
    });
    last
}

impl TestClient {
    /// Sends one text frame; `Err` instead of a panic when the connection is gone (for tests
    /// that kill the server under their clients).
    pub fn try_send_text(&mut self, text: &str) -> tungstenite::Result<()> {
        self.ws.send(Message::text(text))
    }
}

/// Connects to `room` on a server known only by its WebSocket address (a child process) and
/// joins as `name`; returns the client and its `welcome`.
pub fn joined_at(ws_addr: SocketAddr, room: &str, name: &str) -> (TestClient, Value) {
    let path = format!("/ws/{room}");
    let mut client = TestClient::try_connect(ws_addr, &path)
        .unwrap_or_else(|status| panic!("handshake for {path} refused with {status}"));
    let welcome = client.join(name);
    (client, welcome)
}

/// A child process that is killed (SIGKILL) and reaped when dropped, whatever path the test
/// takes. `stdout`/`stderr` are drained by threads, so a chatty child never blocks on a pipe.
pub struct ChildGuard {
    child: Child,
    stdout_lines: Receiver<String>,
    stdout_done: Option<JoinHandle<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    stderr_done: Option<JoinHandle<()>>,
}

impl ChildGuard {
    /// Spawns `command` with stdout and stderr piped (and stdin closed).
    pub fn spawn(mut command: Command) -> ChildGuard {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (line_tx, stdout_lines) = crossbeam_channel::unbounded();
        let stdout_done = std::thread::spawn(move || {
            let mut all = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = line_tx.send(line.clone());
                all.push(line);
            }
            all
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let stderr_done = std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr_pipe);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        ChildGuard {
            child,
            stdout_lines,
            stdout_done: Some(stdout_done),
            stderr,
            stderr_done: Some(stderr_done),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The next stdout line, waiting at most [`TIMEOUT`]; `None` if stdout ended first.
    pub fn next_stdout_line(&self) -> Option<String> {
        match self.stdout_lines.recv_timeout(TIMEOUT) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "no stdout line within {TIMEOUT:?}; stderr:\n{}",
                    self.stderr()
                )
            }
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, …) to the child's PID.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the child to exit (at most `limit`, then kills it and fails), and for its
    /// output pipes to end. Returns the status, every stdout line, and all of stderr.
    pub fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "the child did not exit within {limit:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The pipes end with the process (unless a grandchild holds them, which ours do not).
        let stdout = self
            .stdout_done
            .take()
            .map(|h| h.join().expect("stdout reader"))
            .unwrap_or_default();
        if let Some(h) = self.stderr_done.take() {
            h.join().expect("stderr reader");
        }
        (status, stdout, self.stderr())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Kill by this child's own PID (std refuses once it has been reaped), then reap.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `chatroom` binary running as a child process on ephemeral ports, rate limit off.
pub struct ChildServer {
    pub process: ChildGuard,
    pub http: SocketAddr,
    pub ws: SocketAddr,
}

impl ChildServer {
    /// Starts [`BIN`] with `args` after the address, rate-limit and per-address flags (all
    /// limits off), and waits for its
    /// `listening http=ADDR ws=ADDR` line.
    pub fn start(args: &[&str]) -> ChildServer {
        let mut command = Command::new(BIN);
        command
            .args(["--addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"])
            .args(["--rate-limit", "off"])
            // Tests connect from 127.0.0.1 only; a test's own args may set these again.
            .args(["--max-per-ip", "off", "--handshake-rate", "off"])
            .args(args);
        Self::from_command(command)
    }

    /// Spawns a prepared command and waits for its listening line.
    pub fn from_command(command: Command) -> ChildServer {
        let process = ChildGuard::spawn(command);
        let Some(line) = process.next_stdout_line() else {
            panic!(
                "the server ended before its listening line; stderr:\n{}",
                process.stderr()
            );
        };
        let parsed = line
            .strip_prefix("listening http=")
            .and_then(|rest| rest.split_once(" ws="))
            .and_then(|(http, ws)| Some((http.parse().ok()?, ws.parse().ok()?)));
        let Some((http, ws)) = parsed else {
            panic!("unexpected first stdout line {line:?}");
        };
        ChildServer { process, http, ws }
    }

    /// Sends `signal` (`TERM` or `INT`) and waits for the exit, which must be code 0 and come
    /// within [`SHUTDOWN_LIMIT`].
    pub fn stop_with(mut self, signal: &str) {
        self.process.signal(signal);
        let (status, _, stderr) = self.process.wait_exit(SHUTDOWN_LIMIT);
        assert_eq!(
            status.code(),
            Some(0),
            "SIG{signal} should end the server with 0 ({status}); stderr:\n{stderr}"
        );
    }

    /// SIGKILL: no chance to write anything more.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// True when this process runs as root (who ignores permission bits).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user of the process looking at it.
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}
