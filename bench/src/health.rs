//! `GET /healthz` as JSON, and chatroom's history-store counters in it.
//!
//! chatroom answers `{"status":…,"clients":N,"rooms":N,"store":{"state":…,"written":N,
//! "unwritten":N,"dropped":N,"error":…}}`. `written` counts messages committed to disk since the
//! server started, `unwritten` those accepted but not yet committed, `dropped` those the store
//! gave up on; so accepted = written + unwritten + dropped. The Node peer answers plain `ok`:
//! every figure here is then `None`, and the workloads carry on without them.

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The store's counters at one moment.
#[derive(Clone, Copy, Debug)]
pub struct StoreCounters {
    /// Committed to disk since start.
    pub written: u64,
    /// Accepted, not yet committed.
    pub unwritten: u64,
    /// Given up on.
    pub dropped: u64,
    /// When they were read.
    pub at: Instant,
}

impl StoreCounters {
    /// Every message the store was handed.
    pub fn accepted(&self) -> u64 {
        self.written + self.unwritten + self.dropped
    }
}

/// `GET /healthz` over a fresh connection (`Connection: close`): the status and the body.
pub async fn fetch(http: SocketAddr) -> Result<(u16, String), String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(http)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity(512);
        // The server closes after its answer; 64 KiB is far more than a health report.
        let mut chunk = [0u8; 1024];
        while buf.len() < 64 * 1024 {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("no status line in {:?}", text.lines().next()))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| Err("healthz: timeout".to_string()))
}

/// `GET /healthz`, the body parsed as JSON.
pub async fn get(http: SocketAddr) -> Result<Value, String> {
    let (_, body) = fetch(http).await?;
    // Plain bodies only (chatroom sends a Content-Length); a chunked one still holds the
    // object between its first `{` and last `}`.
    match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if b > a => {
            serde_json::from_str(&body[a..=b]).map_err(|e| format!("healthz body: {e}"))
        }
        _ => Ok(json!({ "raw": body.trim() })),
    }
}

/// The store's counters, if the server reports them.
pub fn counters(v: &Value) -> Option<StoreCounters> {
    let s = v.get("store")?;
    Some(StoreCounters {
        written: s.get("written")?.as_u64()?,
        unwritten: s.get("unwritten")?.as_u64()?,
        dropped: s.get("dropped").and_then(Value::as_u64).unwrap_or(0),
        at: Instant::now(),
    })
}

/// Reads the store's counters (`None` without an HTTP address, or from a server without them).
pub async fn store(http: Option<SocketAddr>) -> (Option<StoreCounters>, Option<Value>) {
    let Some(h) = http else {
        return (None, None);
    };
    match get(h).await {
        Ok(v) => (counters(&v), v.get("store").cloned()),
        Err(_) => (None, None),
    }
}

/// Polls every `every` until `unwritten` is 0 or `limit` has passed; the counters at the end
/// and how long it took (`None`: it never got to 0, or the server reports no store).
pub async fn wait_written(
    http: Option<SocketAddr>,
    every: Duration,
    limit: Duration,
) -> (Option<StoreCounters>, Option<Duration>) {
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() <= limit {
        let (c, _) = store(http).await;
        match c {
            None => return (last, None),
            Some(c) if c.unwritten == 0 => return (Some(c), Some(t0.elapsed())),
            Some(c) => last = Some(c),
        }
        tokio::time::sleep(every).await;
    }
    (last, None)
}
