//! Noticing a tiny_http accept thread that died without a word (at the fd limit it panics
//! on an `unwrap`): [`AcceptWatch`] reads the listening socket's accept queue from `/proc`;
//! the dispatcher ([`super::run_http`]) rebuilds the server when connections wait there and do
//! not drain.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::debug;

/// How often [`AcceptWatch`] reads the accept queue. Reading it costs a `/proc` read of the
/// listening sockets only (they come first in the table); a dead accept thread is noticed after
/// two looks, so within about two seconds.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Watches the listener's accept queue: a live tiny_http accept thread empties it at once, so
/// connections that wait there across two looks (and do not get fewer) mean the thread is
/// gone. Linux only (`/proc/self/net/tcp`, `tcp6`); elsewhere it never fires.
///
/// Why this and not a panic hook or a probe: a hook is process-wide (and would have to
/// recognise tiny_http's panics by their file name); a probe connection needs a descriptor
/// exactly when they have run out. The queue needs nothing from the process but a brief read
/// of `/proc`, and sees what a client sees: connections nobody accepts.
pub(super) struct AcceptWatch {
    /// The listening socket's inode, which names its row in `/proc/self/net/tcp*`.
    inode: Option<u64>,
    last_look: Instant,
    /// The queue at the last look.
    queued: usize,
}

impl AcceptWatch {
    pub(super) fn new(listener: &TcpListener) -> Self {
        let inode = fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .ok()
            .and_then(|link| socket_inode(&link.to_string_lossy()));
        if inode.is_none() {
            debug!("no /proc: a silently dead http accept thread will not be noticed");
        }
        AcceptWatch {
            inode,
            last_look: Instant::now(),
            queued: 0,
        }
    }

    /// Starts afresh for a new server.
    pub(super) fn restart(&mut self) {
        self.last_look = Instant::now();
        self.queued = 0;
    }

    /// `Some(queued)` when the accept queue has not been drained since the last look.
    pub(super) fn stalled(&mut self) -> Option<usize> {
        let inode = self.inode?;
        if self.last_look.elapsed() < WATCH_INTERVAL {
            return None;
        }
        self.last_look = Instant::now();
        // Unreadable (out of descriptors, say): no verdict this time.
        let queued = accept_queue(inode).unwrap_or(0);
        let stalled = queued > 0 && self.queued > 0 && queued >= self.queued;
        self.queued = queued;
        stalled.then_some(queued)
    }
}

/// The inode in a `/proc/self/fd` link to a socket: `socket:[12345]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Connections waiting to be accepted on the listening socket with this inode: the
/// `rx_queue` of its row (state `0A`, LISTEN) in `/proc/self/net/tcp` or `tcp6`.
fn accept_queue(inode: u64) -> Option<usize> {
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(file) = fs::File::open(table) else {
            continue;
        };
        if let Some(queued) = listen_row_queue(BufReader::new(file), inode) {
            return Some(queued);
        }
    }
    None
}

/// Finds the LISTEN row with this inode. The kernel lists listening sockets before all
/// others, so reading stops at the first other row: with thousands of WebSocket clients the
/// rest of the table is large, and never needed.
fn listen_row_queue(table: impl BufRead, inode: u64) -> Option<usize> {
    for line in table.lines().skip(1) {
        let line = line.ok()?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(3) != Some(&"0A") {
            return None;
        }
        if fields.get(9).and_then(|f| f.parse::<u64>().ok()) == Some(inode) {
            let (_, rx) = fields.get(4)?.split_once(':')?;
            return usize::from_str_radix(rx, 16).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_accept_queue_is_read_from_the_listen_row() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1388 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0
   1: 0100007F:1389 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1 0 100 0 0 10 0
   2: 0100007F:1388 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4244 1 0 20 4 30 10 -1
";
        assert_eq!(listen_row_queue(table.as_bytes(), 4242), Some(3));
        assert_eq!(listen_row_queue(table.as_bytes(), 4243), Some(0));
        // Not a listening socket, and past the listening rows: not looked at.
        assert_eq!(listen_row_queue(table.as_bytes(), 4244), None);
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
    }

    #[test]
    fn this_process_can_see_its_accept_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let watch = AcceptWatch::new(&listener);
        let Some(inode) = watch.inode else {
            return; // no /proc here
        };
        assert_eq!(accept_queue(inode), Some(0));
        let _waiting = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(accept_queue(inode), Some(1));
    }
}
