//! Server settings: the command-line flags, their defaults and their parsing.
//!
//! Pure: nothing here opens a socket or spawns a thread. `main.rs` parses the flags into a
//! [`Config`]; tests build one with [`Config::default`] and change the knobs they need.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Messages kept per room and replayed in `welcome` (`--history`).
pub const DEFAULT_HISTORY: usize = 100;
/// Connection cap (`--max-clients`): 15,000 clients are 15,000 reader threads and 60,000
/// memory maps, under Linux's default `vm.max_map_count` of 65,530 with room for the rest of the
/// process (see limits.rs). Each also holds one file descriptor: the cap is lowered at start-up
/// when the open-files limit is lower.
pub const DEFAULT_MAX_CLIENTS: usize = 15_000;
/// Frames queued for one client before it counts as a slow consumer and is dropped. The queue
/// allocates only as it fills (see [`crate::connection`]), so a deep one costs idle clients
/// nothing; 1,024 frames absorb a room-wide burst while a backlog writer waits for the CPU.
pub const DEFAULT_OUTBOUND_CAPACITY: usize = 1024;
/// Bytes of frames queued for one client before it counts as a slow consumer: with the frame
/// limit alone, a client that stopped reading a room of long messages would pin 16 MB.
pub const DEFAULT_OUTBOUND_BYTES: usize = 1024 * 1024;
/// The server pings every client this often...
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// ...and closes one it has heard nothing from (not even a pong) for this long: 2.5 pings.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// A client must finish its handshake (its whole request head) this soon after it was
/// accepted, however slowly it drips its bytes, or its slot is given back.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection must say `hello` this soon after its handshake, or it is closed (1008): a
/// client that answers pings but never joins would otherwise hold a slot for ever. The page
/// connects only once it has a name, and says hello at once.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one socket write may block before the peer counts as dead.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// An HTTP connection that sends nothing for this long is closed (idle keep-alive, slow headers).
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where history is kept (`--data`): `chatroom.db` in this directory, created if missing.
pub const DEFAULT_DATA_DIR: &str = "chatroom-data";
/// Newest messages kept on disk per room (`--retain`); older ones are pruned in the background.
pub const DEFAULT_RETAIN: usize = 10_000;

/// WebSocket connections open at once from one address (`--max-per-ip`): a household or an
/// office behind one NAT stays far below it, one machine cannot take every slot.
pub const DEFAULT_MAX_PER_ADDRESS: usize = 64;
/// Handshakes per address (`--handshake-rate`): a burst of 20, then one every 2 s. A browser
/// that reloads or reconnects never meets it; guessing room names at 30 a minute is hopeless.
pub const DEFAULT_HANDSHAKE_RATE: RateLimit = RateLimit {
    burst: 20,
    per_second: 0.5,
};
/// History kept in memory, in bytes of message text and names (`--memory-budget`): the rooms
/// with members and the cache of idle rooms together. 64 MiB suits a small host.
pub const DEFAULT_MEMORY_BUDGET: usize = 64 * 1024 * 1024;
/// Largest the history database may grow (`--max-disk`); see the store for what is pruned.
pub const DEFAULT_MAX_DISK: u64 = 1024 * 1024 * 1024;

/// Per-client token bucket for `say` frames (`--rate-limit BURST:PER_SECOND`); `typing` has its
/// own fixed interval in the client thread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Frames a client may send at once after being quiet.
    pub burst: u32,
    /// Frames per second refilled into the bucket.
    pub per_second: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            burst: 20,
            per_second: 5.0,
        }
    }
}

/// A range of addresses, `10.0.0.0/8` or one address (`::1`), for `--metrics-allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressRange {
    pub network: IpAddr,
    pub prefix: u8,
}

impl AddressRange {
    /// Parses `ADDR` or `ADDR/PREFIX`.
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix.parse::<u8>().ok()?)),
            None => (text, None),
        };
        let network: IpAddr = addr.parse().ok()?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(AddressRange { network, prefix })
    }

    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// Loopback only: `127.0.0.0/8` and `::1`, the default of `--metrics-allow`.
    pub fn loopback() -> Vec<Self> {
        vec![
            AddressRange::parse("127.0.0.0/8").expect("valid"),
            AddressRange::parse("::1").expect("valid"),
        ]
    }
}

/// Everything [`crate::Server::start`] needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the page is served (`--addr`); port 0 picks a free one.
    pub http_addr: SocketAddr,
    /// Where WebSocket clients connect (`--ws-addr`); port 0 picks a free one.
    pub ws_addr: SocketAddr,
    /// The WebSocket base URL the page should use behind a reverse proxy (`--ws-url`), e.g.
    /// `wss://example.org/ws`; `None` means "same host as the page, port of `ws_addr`".
    pub ws_url: Option<String>,
    /// Messages kept per room (`--history`).
    pub history: usize,
    /// Most WebSocket connections at once (`--max-clients`); may be lowered at start-up when
    /// the host cannot hold that many threads.
    pub max_clients: usize,
    /// `None` turns rate limiting off (`--rate-limit off`, for benchmarks).
    pub rate_limit: Option<RateLimit>,
    /// Origins allowed besides the page's own host (`--allow-origin`, repeatable).
    pub allowed_origins: Vec<String>,
    /// Host names the server answers for besides IP literals, `localhost` and the host of
    /// `ws_url` (`--allowed-host`, repeatable): the defence against DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// WebSocket connections open at once from one address (`--max-per-ip`); `None`: no limit.
    pub max_per_address: Option<usize>,
    /// Handshakes per address (`--handshake-rate`); `None`: no limit.
    pub handshake_rate: Option<RateLimit>,
    /// Reverse proxies whose `X-Forwarded-For` / `X-Real-IP` name the client (`--trust-proxy`,
    /// repeatable). From any other address those headers are ignored.
    pub trusted_proxies: Vec<IpAddr>,
    /// Who may read `/metrics` (`--metrics-allow`, repeatable; loopback by default).
    pub metrics_allow: Vec<AddressRange>,
    /// Bytes of history kept in memory, all rooms together (`--memory-budget`).
    pub memory_budget: usize,
    /// Largest the history database may grow, in bytes (`--max-disk`); `None`: no limit.
    pub max_disk: Option<u64>,
    /// Frames queued per client before it is dropped as a slow consumer.
    pub outbound_capacity: usize,
    /// Bytes queued per client before it is dropped as a slow consumer.
    pub outbound_bytes: usize,
    /// How often the server pings each client.
    pub ping_interval: Duration,
    /// Silence after which a client is closed.
    pub idle_timeout: Duration,
    /// How soon after it is accepted a connection must have sent its whole handshake (see
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// How soon after its handshake a connection must say `hello` (see
    /// [`DEFAULT_HELLO_TIMEOUT`]).
    pub hello_timeout: Duration,
    /// How long one socket write may block.
    pub write_timeout: Duration,
    /// Silence after which an HTTP connection is closed.
    pub http_idle_timeout: Duration,
    /// The directory holding `chatroom.db` (`--data`); `None` keeps history in memory only
    /// (`--data none`), so a restart starts every room afresh.
    pub data_dir: Option<PathBuf>,
    /// Newest messages kept on disk per room (`--retain`); with `--redis`, about how many
    /// each room's stream keeps.
    pub retain: usize,
    /// The Redis that shares rooms between processes (`--redis`, issue 12); `None`: this
    /// process alone, history in SQLite. With it, history lives in Redis and `data_dir` is
    /// not used.
    pub redis: Option<String>,
    /// What every Redis key starts with (`--redis-prefix`), so deployments can share a Redis.
    pub redis_prefix: String,
    /// Makes one service thread panic on purpose, so tests can prove that a dead thread is
    /// noticed (logged, `/healthz` 503, exit non-zero). No flag sets it; always `None` in use.
    #[doc(hidden)]
    pub crash_for_tests: Option<CrashForTests>,
}

/// Where [`Config::crash_for_tests`] makes a thread panic.
#[doc(hidden)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashForTests {
    /// The hub panics when a client joins this room.
    HubOnJoin(String),
    /// The store thread panics when the hub asks it to load this room.
    StoreOnLoad(String),
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
            ws_addr: SocketAddr::from(([127, 0, 0, 1], 5001)),
            ws_url: None,
            history: DEFAULT_HISTORY,
            max_clients: DEFAULT_MAX_CLIENTS,
            rate_limit: Some(RateLimit::default()),
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_per_address: Some(DEFAULT_MAX_PER_ADDRESS),
            handshake_rate: Some(DEFAULT_HANDSHAKE_RATE),
            trusted_proxies: Vec::new(),
            metrics_allow: AddressRange::loopback(),
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_disk: Some(DEFAULT_MAX_DISK),
            outbound_capacity: DEFAULT_OUTBOUND_CAPACITY,
            outbound_bytes: DEFAULT_OUTBOUND_BYTES,
            ping_interval: DEFAULT_PING_INTERVAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            http_idle_timeout: DEFAULT_HTTP_IDLE_TIMEOUT,
            data_dir: Some(PathBuf::from(DEFAULT_DATA_DIR)),
            retain: DEFAULT_RETAIN,
            redis: None,
            redis_prefix: crate::bus::keys::DEFAULT_PREFIX.to_owned(),
            crash_for_tests: None,
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run {
        config: Box<Config>,
        log_level: log::LevelFilter,
    },
    /// `chatroom backup FILE [--data DIR]`: copy the live database to FILE.
    Backup {
        data_dir: PathBuf,
        dest: PathBuf,
    },
    Help,
    Version,
}

/// The text of `--help`.
pub const USAGE: &str = "\
chatroom: a small real-time browser chat server

Usage: chatroom [OPTIONS]
       chatroom backup FILE [--data DIR]   copy the history database to FILE, safe while
                                           a server runs (FILE must not exist)

Options:
  --addr ADDR           serve the page here [default: 127.0.0.1:5000]
  --ws-addr ADDR        accept WebSocket clients here [default: 127.0.0.1:5001]
  --ws-url URL          WebSocket base URL the page uses behind a reverse proxy,
                        e.g. wss://example.org/ws [default: same host, ws-addr's port]
  --history N           messages per room kept in memory and replayed on join [default: 100]
  --data DIR|none       keep history in DIR/chatroom.db (SQLite), or only in memory
                        [default: ./chatroom-data]
  --retain N            newest messages kept on disk per room [default: 10000]
  --redis URL           share rooms with other chatroom processes through the Redis at
                        redis://[user:pass@]HOST:PORT[/DB] (rediss:// for TLS, checked
                        against the system's CA roots); history then lives in Redis
                        (each room's stream keeps about --retain messages), not in --data
  --redis-prefix P      what every Redis key starts with [default: chatroom]
  --max-clients N       most WebSocket connections at once [default: 15000]
  --rate-limit B:R|off  per-client burst B, then R messages per second [default: 20:5]
  --allow-origin ORIGIN also accept pages from ORIGIN (repeatable), e.g. https://chat.example.org
  --allowed-host NAME   answer requests for host NAME (repeatable); IP addresses, localhost and
                        the host of --ws-url are always answered, any other Host is refused
  --max-per-ip N|off    most WebSocket connections from one address [default: 64]
  --handshake-rate B:R|off
                        per-address burst B, then R WebSocket handshakes per second
                        [default: 20:0.5]
  --trust-proxy ADDR    take the client's address from X-Forwarded-For / X-Real-IP when the
                        connection comes from ADDR, a reverse proxy (repeatable)
  --memory-budget SIZE  history kept in memory, all rooms together, e.g. 64M [default: 64M]
  --max-disk SIZE|off   largest the history database may grow, e.g. 1G [default: 1G]
  --metrics-allow RANGE who may read /metrics, e.g. 10.0.0.0/8 (repeatable)
                        [default: 127.0.0.0/8 and ::1]
  --log-level LEVEL     off, error, warn, info, debug or trace [default: info]
  -h, --help            print this help
  -V, --version         print the version
";

/// Parses the arguments after the program name. Errors are one line, for the user.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    if args.peek().map(String::as_str) == Some("backup") {
        args.next();
        return parse_backup(args);
    }
    let mut config = Config::default();
    let mut log_level = log::LevelFilter::Info;
    let mut metrics_allow_given = false;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        if matches!(flag.as_str(), "-h" | "--help") {
            return Ok(Command::Help);
        }
        if matches!(flag.as_str(), "-V" | "--version") {
            return Ok(Command::Version);
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--addr" => config.http_addr = parse_addr(&flag, &value()?)?,
            "--ws-addr" => config.ws_addr = parse_addr(&flag, &value()?)?,
            "--ws-url" => {
                let url = value()?;
                if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                    return Err(format!(
                        "--ws-url must start with ws:// or wss://, not {url:?}"
                    ));
                }
                // It goes into an HTTP header (the page's CSP), which takes visible ASCII only.
                if !url
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b";,'\"".contains(&b))
                {
                    return Err(format!(
                        "--ws-url must be plain ASCII without spaces, quotes, commas or \
                         semicolons (write a non-ASCII host in its xn-- form), not {url:?}"
                    ));
                }
                config.ws_url = Some(url.trim_end_matches('/').to_owned());
            }
            "--history" => config.history = parse_number(&flag, &value()?)?,
            "--max-clients" => {
                config.max_clients = parse_number(&flag, &value()?)?;
                if config.max_clients == 0 {
                    return Err("--max-clients must be at least 1".into());
                }
            }
            "--data" => {
                let dir = value()?;
                if dir.is_empty() {
                    return Err("--data takes a directory, or none".into());
                }
                config.data_dir = (dir != "none").then(|| PathBuf::from(dir));
            }
            "--retain" => {
                config.retain = parse_number(&flag, &value()?)?;
                if config.retain == 0 {
                    return Err("--retain must be at least 1".into());
                }
            }
            "--redis" => {
                let url = value()?;
                crate::bus::connect::parse_url(&url).map_err(|e| e.to_string())?;
                config.redis = Some(url);
            }
            "--redis-prefix" => {
                let prefix = value()?;
                crate::bus::Keys::new(&prefix)?;
                config.redis_prefix = prefix;
            }
            "--rate-limit" => config.rate_limit = parse_rate_limit(&flag, &value()?)?,
            "--handshake-rate" => config.handshake_rate = parse_rate_limit(&flag, &value()?)?,
            "--max-per-ip" => {
                let n = value()?;
                config.max_per_address = match n.as_str() {
                    "off" => None,
                    n => match parse_number(&flag, n)? {
                        0 => return Err("--max-per-ip must be at least 1, or off".into()),
                        n => Some(n),
                    },
                };
            }
            "--trust-proxy" => {
                let addr = value()?;
                let ip = addr.parse().map_err(|_| {
                    format!("--trust-proxy takes the proxy's IP address, not {addr:?}")
                })?;
                config.trusted_proxies.push(ip);
            }
            "--metrics-allow" => {
                let range = value()?;
                let range = AddressRange::parse(&range).ok_or_else(|| {
                    format!("--metrics-allow takes ADDR or ADDR/PREFIX, not {range:?}")
                })?;
                if !metrics_allow_given {
                    // The first one replaces the default: the operator says who, in full.
                    config.metrics_allow.clear();
                    metrics_allow_given = true;
                }
                config.metrics_allow.push(range);
            }
            "--memory-budget" => {
                let size = parse_size(&flag, &value()?)?;
                config.memory_budget = usize::try_from(size)
                    .map_err(|_| format!("--memory-budget is too large: {size}"))?;
            }
            "--max-disk" => {
                let size = value()?;
                config.max_disk = match size.as_str() {
                    "off" => None,
                    size => Some(parse_size(&flag, size)?),
                };
            }
            "--allow-origin" => config.allowed_origins.push(value()?),
            "--allowed-host" => config.allowed_hosts.push(value()?.to_ascii_lowercase()),
            "--log-level" => {
                let level = value()?;
                log_level = level.parse().map_err(|_| {
                    format!(
                        "--log-level takes off, error, warn, info, debug or trace, not {level:?}"
                    )
                })?;
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Command::Run {
        config: Box::new(config),
        log_level,
    })
}

fn parse_backup(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut data_dir = PathBuf::from(DEFAULT_DATA_DIR);
    let mut dest = None;
    while let Some(arg) = args.next() {
        if let Some(dir) = arg.strip_prefix("--data=") {
            data_dir = PathBuf::from(dir);
        } else if arg == "--data" {
            data_dir = PathBuf::from(args.next().ok_or("--data needs a value")?);
        } else if arg.starts_with('-') || dest.is_some() {
            return Err(format!("unexpected argument to backup: {arg:?}"));
        } else {
            dest = Some(PathBuf::from(arg));
        }
    }
    let dest = dest.ok_or("backup needs the FILE to write")?;
    if data_dir.as_os_str() == "none" {
        return Err("backup needs a data directory, not none".into());
    }
    Ok(Command::Backup { data_dir, dest })
}

fn parse_addr(flag: &str, value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} takes IP:PORT, e.g. 127.0.0.1:5000, not {value:?}"))
}

fn parse_number(flag: &str, value: &str) -> Result<usize, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} takes a whole number, not {value:?}"))
}

/// A size in bytes: `65536`, `512K`, `64M`, `1G` (powers of 1024; a trailing `B` or `iB` is
/// allowed). At least 1 MiB: less cannot hold even one room's history.
pub fn parse_size(flag: &str, value: &str) -> Result<u64, String> {
    let bad = || format!("{flag} takes a size such as 64M or 1G, not {value:?}");
    let upper = value.trim().to_ascii_uppercase();
    let digits = upper.trim_end_matches("IB").trim_end_matches('B');
    let (number, unit) = match digits.char_indices().last() {
        Some((i, c @ ('K' | 'M' | 'G' | 'T'))) => (&digits[..i], c),
        _ => (digits, ' '),
    };
    let number: u64 = number.trim().parse().map_err(|_| bad())?;
    let shift = match unit {
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => 0,
    };
    let bytes = number.checked_mul(1 << shift).ok_or_else(bad)?;
    if bytes < 1024 * 1024 {
        return Err(format!("{flag} must be at least 1M, not {value:?}"));
    }
    Ok(bytes)
}

/// `20:5` is a burst of 20 then 5 per second; `off` disables the limit.
pub fn parse_rate_limit(flag: &str, value: &str) -> Result<Option<RateLimit>, String> {
    if value == "off" {
        return Ok(None);
    }
    let bad = || format!("{flag} takes BURST:PER_SECOND (e.g. 20:5) or off, not {value:?}");
    let (burst, rate) = value.split_once(':').ok_or_else(bad)?;
    let burst: u32 = burst.parse().map_err(|_| bad())?;
    let per_second: f64 = rate.parse().map_err(|_| bad())?;
    if burst == 0 || !(per_second > 0.0 && per_second.is_finite()) {
        return Err(bad());
    }
    Ok(Some(RateLimit { burst, per_second }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags_set_the_config() {
        let Ok(Command::Run { config, log_level }) = parse(&[
            "--addr",
            "0.0.0.0:8000",
            "--ws-addr=0.0.0.0:8001",
            "--history",
            "5",
            "--rate-limit",
            "off",
            "--allow-origin",
            "https://a.example",
            "--allow-origin",
            "https://b.example",
            "--ws-url",
            "wss://example.org/ws/",
            "--log-level",
            "warn",
            "--max-clients",
            "10",
            "--data",
            "/var/lib/chat",
            "--retain=50",
        ]) else {
            panic!("flags should parse");
        };
        assert_eq!(config.http_addr.port(), 8000);
        assert_eq!(config.ws_addr.port(), 8001);
        assert_eq!(config.history, 5);
        assert_eq!(config.rate_limit, None);
        assert_eq!(config.allowed_origins.len(), 2);
        assert_eq!(config.ws_url.as_deref(), Some("wss://example.org/ws"));
        for bad in [
            "wss://bücher.example/ws",
            "wss://a b/ws",
            "wss://x/ws;script-src *",
        ] {
            let err = parse_args(["--ws-url".to_owned(), bad.to_owned()]);
            assert!(err.is_err(), "{bad} was accepted");
        }
        assert_eq!(config.max_clients, 10);
        assert_eq!(config.data_dir, Some(PathBuf::from("/var/lib/chat")));
        assert_eq!(config.retain, 50);
        assert_eq!(log_level, log::LevelFilter::Warn);
    }

    #[test]
    fn bad_flags_are_errors() {
        for args in [
            &["--nope"][..],
            &["--addr"],
            &["--addr", "localhost"],
            &["--history", "-1"],
            &["--rate-limit", "5"],
            &["--rate-limit", "0:1"],
            &["--ws-url", "http://x"],
            &["--log-level", "loud"],
            &["--max-clients", "0"],
            &["--data"],
            &["--data", ""],
            &["--retain", "0"],
            &["--max-per-ip", "0"],
            &["--handshake-rate", "1"],
            &["--trust-proxy", "proxy.example"],
            &["--metrics-allow", "10.0.0.0/33"],
            &["--memory-budget", "12"],
            &["--max-disk", "lots"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
        assert!(matches!(parse(&["--help"]), Ok(Command::Help)));
        assert!(matches!(parse(&["-V"]), Ok(Command::Version)));
    }

    #[test]
    fn backup_takes_a_file_and_a_data_dir() {
        let Ok(Command::Backup { data_dir, dest }) =
            parse(&["backup", "/tmp/copy.db", "--data", "/srv/chat"])
        else {
            panic!("backup should parse");
        };
        assert_eq!(data_dir, PathBuf::from("/srv/chat"));
        assert_eq!(dest, PathBuf::from("/tmp/copy.db"));
        assert!(parse(&["backup"]).is_err());
        assert!(parse(&["backup", "a", "b"]).is_err());
    }

    #[test]
    fn data_defaults_to_a_directory_and_none_means_memory() {
        let Ok(Command::Run { config, .. }) = parse(&[]) else {
            panic!("no flags should parse");
        };
        assert_eq!(config.data_dir, Some(PathBuf::from(DEFAULT_DATA_DIR)));
        let Ok(Command::Run { config, .. }) = parse(&["--data", "none"]) else {
            panic!("--data none should parse");
        };
        assert_eq!(config.data_dir, None);
    }

    #[test]
    fn limits_and_sizes_parse() {
        let Ok(Command::Run { config, .. }) = parse(&[
            "--max-per-ip",
            "8",
            "--handshake-rate=off",
            "--trust-proxy",
            "10.0.0.1",
            "--metrics-allow",
            "10.0.0.0/8",
            "--memory-budget",
            "16M",
            "--max-disk",
            "2G",
        ]) else {
            panic!("flags should parse");
        };
        assert_eq!(config.max_per_address, Some(8));
        assert_eq!(config.handshake_rate, None);
        assert_eq!(
            config.trusted_proxies,
            ["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(config.memory_budget, 16 << 20);
        assert_eq!(config.max_disk, Some(2 << 30));
        // The first --metrics-allow replaces the loopback default.
        let allowed = |ip: &str| {
            let ip = ip.parse().unwrap();
            config.metrics_allow.iter().any(|r| r.contains(ip))
        };
        assert!(allowed("10.200.3.4"));
        assert!(!allowed("127.0.0.1"));
        assert!(!allowed("11.0.0.1"));
        assert_eq!(parse_size("x", "1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("x", "1048576"), Ok(1 << 20));
        let loopback = AddressRange::loopback();
        for ip in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            assert!(
                loopback.iter().any(|r| r.contains(ip.parse().unwrap())),
                "{ip}"
            );
        }
        assert!(!loopback
            .iter()
            .any(|r| r.contains("10.0.0.1".parse().unwrap())));
    }

    #[test]
    fn rate_limit_parses() {
        assert_eq!(
            parse_rate_limit("--rate-limit", "20:5").unwrap(),
            Some(RateLimit {
                burst: 20,
                per_second: 5.0
            })
        );
    }
}
