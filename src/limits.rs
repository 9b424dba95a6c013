//! What this host lets one process hold: threads (memory maps and pids) and file descriptors.
//!
//! Read once at start-up by [`crate::Server::start`] to lower the connection cap when the host
//! cannot hold it, and on each accept by [`crate::ws::Admission`] to count the process's threads.
//! Everything comes from `/proc`, so no `unsafe` system calls are needed.

use std::fs;

/// Memory maps per thread: its stack and guard page, and std's signal stack and its guard.
pub const MAPS_PER_THREAD: usize = 4;
/// Maps kept for everything that is not a thread stack: the binary, libraries, heap arenas,
/// large allocations.
const RESERVED_MAPS: usize = 2048;
/// Threads kept for HTTP connections (tiny_http starts one per connection), our own few, and
/// the backlog writers of clients whose sockets are full.
pub const RESERVED_THREADS: usize = 512;
/// File descriptors kept for listeners, HTTP connections (two each) and files: with every
/// WebSocket slot taken, HTTP still has about 500 connections (tiny_http's thread each, inside
/// [`RESERVED_THREADS`]).
const RESERVED_FDS: usize = 1024;
/// Threads per idle WebSocket client: its reader. (A client with a backlog has a writer too,
/// for as long as the backlog lasts; [`RESERVED_THREADS`] leaves room for those.)
pub const THREADS_PER_CLIENT: usize = 1;

/// The limits read from the host.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    /// `vm.max_map_count`: a thread that cannot map its stacks aborts the process.
    pub max_map_count: usize,
    /// `kernel.pid_max`: every thread on the machine takes a pid.
    pub pid_max: usize,
    /// `kernel.threads-max`.
    pub threads_max: usize,
    /// The soft `RLIMIT_NOFILE` of this process; each client holds one descriptor.
    pub open_files: usize,
}

impl HostLimits {
    /// Reads the limits; anything unreadable counts as unlimited.
    pub fn read() -> Self {
        let number = |path: &str| {
            fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(usize::MAX)
        };
        HostLimits {
            max_map_count: number("/proc/sys/vm/max_map_count"),
            pid_max: number("/proc/sys/kernel/pid_max"),
            threads_max: number("/proc/sys/kernel/threads-max"),
            open_files: open_files_limit().unwrap_or(usize::MAX),
        }
    }

    /// How many threads this process may have in all while staying clear of every limit.
    pub fn safe_threads(&self) -> usize {
        let by_maps = self.max_map_count.saturating_sub(RESERVED_MAPS) / MAPS_PER_THREAD;
        // Other processes need pids too: take at most three quarters of them.
        let by_pids = self.pid_max / 4 * 3;
        let by_threads = self.threads_max / 4 * 3;
        by_maps.min(by_pids).min(by_threads)
    }

    /// How many clients the host can hold, leaving room for HTTP and everything else.
    pub fn max_clients(&self) -> usize {
        let by_fds = self.open_files.saturating_sub(RESERVED_FDS);
        self.clients_by_threads().min(by_fds)
    }

    fn clients_by_threads(&self) -> usize {
        self.safe_threads().saturating_sub(RESERVED_THREADS) / THREADS_PER_CLIENT
    }

    /// The open-files limit the server should run with: a descriptor for each client it can
    /// hold (`max_clients`, or fewer if the host's threads allow fewer) and [`RESERVED_FDS`].
    /// `main` raises the soft limit this far (never past the hard one), not further: tiny_http
    /// spends a thread on every HTTP connection and takes as many as descriptors allow, so
    /// the descriptor limit is what bounds HTTP's threads. With this one, HTTP can have at
    /// most (limit - WebSocket clients) / 2 connections: 500 beside a full house, and the
    /// threads of HTTP and WebSocket together stay within what the cap was sized for.
    pub fn open_files_wanted(&self, max_clients: usize) -> usize {
        max_clients
            .min(self.clients_by_threads())
            .saturating_add(RESERVED_FDS)
    }
}

/// The soft open-files limit, from `/proc/self/limits` ("Max open files  20000  20000  files").
fn open_files_limit() -> Option<usize> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Threads of this process right now (the `Threads:` line of `/proc/self/status`); 0 if
/// unreadable. Not `/proc/self/stat`: the kernel sums CPU times over every thread to write that
/// file, which measured 0.55 ms at 8,000 threads, against 0.03 ms for `status`.
pub fn process_threads() -> usize {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_linux_limits_hold_the_default_cap() {
        let host = HostLimits {
            max_map_count: 65_530,
            pid_max: 32_768,
            threads_max: 200_000,
            open_files: 20_000,
        };
        let cap = crate::config::DEFAULT_MAX_CLIENTS;
        assert!(host.max_clients() >= cap, "{}", host.max_clients());
        // ...and every client's thread plus the reserve stay under the map limit.
        let maps = (host.max_clients() * THREADS_PER_CLIENT + RESERVED_THREADS) * MAPS_PER_THREAD;
        assert!(maps + RESERVED_MAPS <= 65_530);
    }

    #[test]
    fn small_hosts_lower_the_cap() {
        let host = HostLimits {
            max_map_count: 65_530,
            pid_max: 32_768,
            threads_max: 200_000,
            open_files: 1024 + 100,
        };
        assert_eq!(host.max_clients(), 100);
    }

    #[test]
    fn the_wanted_fd_limit_fits_the_cap_and_keeps_the_http_reserve() {
        let host = HostLimits {
            max_map_count: 65_530,
            pid_max: 32_768,
            threads_max: 200_000,
            // A systemd service's soft default.
            open_files: 1024,
        };
        let wanted = host.open_files_wanted(crate::config::DEFAULT_MAX_CLIENTS);
        assert_eq!(wanted, crate::config::DEFAULT_MAX_CLIENTS + RESERVED_FDS);
        // After the raise, the full cap fits and HTTP keeps its descriptors.
        let raised = HostLimits {
            open_files: wanted,
            ..host
        };
        assert_eq!(raised.max_clients(), crate::config::DEFAULT_MAX_CLIENTS);
        // A host with fewer threads wants fewer descriptors: fds stay the bound on HTTP.
        let small = HostLimits {
            max_map_count: 8192,
            ..host
        };
        assert_eq!(
            small.open_files_wanted(crate::config::DEFAULT_MAX_CLIENTS),
            small.clients_by_threads() + RESERVED_FDS
        );
    }

    #[test]
    fn this_process_has_threads() {
        assert!(process_threads() >= 1);
    }
}
