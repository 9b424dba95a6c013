//! Reading a process's CPU time, memory, threads and descriptors from /proc (Linux only).
//!
//! CPU is `utime + stime` from `/proc/PID/stat` (whole process, exited threads included), in
//! clock ticks converted to seconds. Memory is `VmRSS` from `/proc/PID/status`. Per thread,
//! [`thread_cpu`] reads `/proc/PID/task/TID/stat` (ticks) and `/proc/PID/task/TID/schedstat`
//! (nanoseconds on the CPU, when the kernel has it), found by the thread's name (`comm`).
//! [`meminfo`] reads the host's kernel memory from `/proc/meminfo`.

use crate::results::{KindCpu, SmapsDiff, SmapsGroup, ThreadStates, Wchan};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::sync::OnceLock;

/// Clock ticks per second for /proc/PID/stat (`getconf CLK_TCK`, 100 on Linux in practice).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(100.0)
    })
}

/// `pid` as a /proc path component; `None` means this process.
fn dir(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("/proc/{p}"),
        None => "/proc/self".to_string(),
    }
}

/// User + system CPU seconds of a process (this one with `None`).
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    stat_cpu_secs(&format!("{}/stat", dir(pid)))
}

/// `utime + stime` of a `stat` file (a process's or one thread's), in seconds.
fn stat_cpu_secs(path: &str) -> Option<f64> {
    let stat = fs::read_to_string(path).ok()?;
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck())
}

/// One look at a process's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Live threads.
    pub threads: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Memory maps (lines of /proc/PID/maps); only filled by [`sample_with_maps`].
    pub maps: u64,
}

/// RSS, threads and fds of `pid`; `None` if the process is gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut s = Sample::default();
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            s.rss_kib = first_num(v);
        } else if let Some(v) = line.strip_prefix("Threads:") {
            s.threads = first_num(v);
        }
    }
    s.fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(s)
}

/// [`sample`] plus the number of memory maps.
pub fn sample_with_maps(pid: u32) -> Option<Sample> {
    let mut s = sample(pid)?;
    s.maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()?
        .lines()
        .count() as u64;
    Some(s)
}

/// The host's kernel memory that grows with connections and threads, KiB (or KiB per client).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meminfo<T> {
    /// `KernelStack`: every thread's kernel stack (16 KiB each on x86-64).
    pub kernel_stack: T,
    /// `PageTables`: every process's page tables.
    pub page_tables: T,
    /// `Slab`: kernel objects, sockets among them (both ends of every local connection).
    pub slab: T,
}

/// `KernelStack`, `PageTables` and `Slab` from /proc/meminfo.
pub fn meminfo() -> Option<Meminfo<u64>> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':').map(first_num))
    };
    Some(Meminfo {
        kernel_stack: get("KernelStack")?,
        page_tables: get("PageTables")?,
        slab: get("Slab")?,
    })
}

/// The growth from `a` to `b`, per client.
pub fn meminfo_per_client(a: Meminfo<u64>, b: Meminfo<u64>, clients: u64) -> Meminfo<f64> {
    let per =
        |x: u64, y: u64| crate::stats::round((y as f64 - x as f64) / clients.max(1) as f64, 2);
    Meminfo {
        kernel_stack: per(a.kernel_stack, b.kernel_stack),
        page_tables: per(a.page_tables, b.page_tables),
        slab: per(a.slab, b.slab),
    }
}

fn first_num(s: &str) -> u64 {
    s.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// The threads of `pid`: (tid, name, kernel wait channel).
pub fn threads(pid: u32) -> Vec<(u32, String, String)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, String, String)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()))
        .map(|tid| {
            let read = |f: &str| {
                fs::read_to_string(format!("/proc/{pid}/task/{tid}/{f}"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            };
            (tid, read("comm"), read("wchan"))
        })
        .collect();
    out.sort();
    out
}

/// CPU used so far by the live threads of a process that share one name (or one kind, see
/// [`thread_kind`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadCpu {
    /// Live threads counted.
    pub threads: u64,
    /// `utime + stime`, seconds (clock-tick resolution).
    pub cpu_s: f64,
    /// Time on the CPU from `schedstat`, nanoseconds; `None` when the kernel lacks it.
    pub run_ns: Option<u64>,
    /// Time runnable but waiting for a CPU (`schedstat`'s second field), nanoseconds.
    pub wait_ns: Option<u64>,
    /// Times put on a CPU (`schedstat`'s third field): one per wake-up or preemption.
    pub slices: Option<u64>,
    /// Context switches from `/proc/PID/task/TID/status`: the thread blocked (voluntary) or
    /// was preempted (involuntary).
    pub voluntary: u64,
    pub involuntary: u64,
}

impl ThreadCpu {
    /// What `self` used since `before`.
    pub fn since(self, before: ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            threads: self.threads,
            cpu_s: (self.cpu_s - before.cpu_s).max(0.0),
            run_ns: self
                .run_ns
                .zip(before.run_ns)
                .map(|(a, b)| a.saturating_sub(b)),
            wait_ns: self
                .wait_ns
                .zip(before.wait_ns)
                .map(|(a, b)| a.saturating_sub(b)),
            slices: self
                .slices
                .zip(before.slices)
                .map(|(a, b)| a.saturating_sub(b)),
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }

    fn add(&mut self, cpu_s: f64, sched: Option<(u64, u64, u64)>, switches: (u64, u64)) {
        self.threads += 1;
        self.cpu_s += cpu_s;
        self.voluntary += switches.0;
        self.involuntary += switches.1;
        let sum = |mine: Option<u64>, theirs: Option<u64>| match (self.threads, mine, theirs) {
            (1, _, t) => t,
            (_, Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.run_ns = sum(self.run_ns, sched.map(|s| s.0));
        self.wait_ns = sum(self.wait_ns, sched.map(|s| s.1));
        self.slices = sum(self.slices, sched.map(|s| s.2));
    }
}

/// A thread's kind: its name without a trailing `-N` (`ws-writer-17` → `ws-writer`).
pub fn thread_kind(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((kind, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => kind,
        _ => name,
    }
}

/// CPU used so far by each kind of thread of `pid` (live threads only: a thread that has
/// exited takes its figures with it).
pub fn thread_cpu(pid: u32) -> BTreeMap<String, ThreadCpu> {
    let mut out: BTreeMap<String, ThreadCpu> = BTreeMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for tid in dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()))
    {
        let base = format!("/proc/{pid}/task/{tid}");
        let Ok(name) = fs::read_to_string(format!("{base}/comm")) else {
            continue;
        };
        let Some(cpu) = stat_cpu_secs(&format!("{base}/stat")) else {
            continue;
        };
        let sched = fs::read_to_string(format!("{base}/schedstat"))
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(|t| t.parse::<u64>().ok());
                Some((it.next()??, it.next()??, it.next()??))
            });
        let mut switches = (0, 0);
        for line in fs::read_to_string(format!("{base}/status"))
            .unwrap_or_default()
            .lines()
        {
            if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                switches.0 = first_num(v);
            } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                switches.1 = first_num(v);
            }
        }
        out.entry(thread_kind(name.trim()).to_string())
            .or_default()
            .add(cpu, sched, switches);
    }
    out
}

/// Per-kind CPU between two [`thread_cpu`] readings, per delivery.
pub fn thread_cpu_per_delivery(
    before: &BTreeMap<String, ThreadCpu>,
    after: &BTreeMap<String, ThreadCpu>,
    deliveries: u64,
) -> BTreeMap<String, KindCpu> {
    let per = |x: f64, scale: f64| crate::stats::round(x * scale / deliveries.max(1) as f64, 4);
    let kind = |d: ThreadCpu| KindCpu {
        cpu_us_per_delivery: per(d.cpu_s, 1e6),
        run_us_per_delivery: d.run_ns.map(|n| per(n as f64, 1e-3)),
        slices_per_1000_deliveries: d.slices.map(|n| per(n as f64, 1e3)),
    };
    let since = |k: &String, a: &ThreadCpu| a.since(before.get(k).copied().unwrap_or_default());
    after
        .iter()
        .map(|(k, a)| (k.clone(), kind(since(k, a))))
        .collect()
}

/// Samples one thread's scheduler state (`R`, `S`, `D`…) and kernel wait channel every
/// `every` on a plain thread of its own, until [`StateSampler::finish`]: a statistical split of
/// a thread's sleep into waiting for work (`S`) and waiting for the disk (`D`).
pub struct StateSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<BTreeMap<(String, String), u64>>,
}

impl StateSampler {
    /// Starts sampling `/proc/PID/task/TID/{stat,wchan}`; at most an hour.
    pub fn start(pid: u32, tid: u32, every: std::time::Duration) -> Option<StateSampler> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("state-sampler".into())
            .spawn(move || {
                let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
                let base = format!("/proc/{pid}/task/{tid}");
                let t0 = std::time::Instant::now();
                while !flag.load(Ordering::Relaxed)
                    && t0.elapsed() < std::time::Duration::from_secs(3600)
                {
                    let Ok(stat) = fs::read_to_string(format!("{base}/stat")) else {
                        break;
                    };
                    let state = stat
                        .rfind(')')
                        .and_then(|i| stat[i + 1..].split_whitespace().next())
                        .unwrap_or("?")
                        .to_string();
                    let wchan = fs::read_to_string(format!("{base}/wchan"))
                        .map(|w| w.trim().to_string())
                        .unwrap_or_default();
                    *counts.entry((state, wchan)).or_default() += 1;
                    std::thread::sleep(every);
                }
                counts
            })
            .ok()?;
        Some(StateSampler { stop, handle })
    }

    /// Stops sampling; the share of samples per state, and the most frequent wait channels.
    pub fn finish(self) -> ThreadStates {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let counts = self.handle.join().unwrap_or_default();
        let total: u64 = counts.values().sum();
        let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
        for ((state, _), n) in &counts {
            *by_state.entry(state.clone()).or_default() += n;
        }
        let mut top: Vec<(&(String, String), &u64)> = counts.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let share = |n: u64| (n as f64 / total.max(1) as f64 * 1000.0).round() / 1000.0;
        let wchan = |((state, wchan), n): (&(String, String), &u64)| Wchan {
            state: state.clone(),
            wchan: wchan.clone(),
            share: share(*n),
        };
        ThreadStates {
            share: by_state
                .iter()
                .map(|(k, n)| (k.clone(), share(*n)))
                .collect(),
            top: top.into_iter().take(6).map(wchan).collect(),
        }
    }
}

/// The id of the first thread of `pid` named `name`.
pub fn thread_id(pid: u32, name: &str) -> Option<u32> {
    threads(pid)
        .into_iter()
        .find(|(_, n, _)| n == name)
        .map(|(tid, _, _)| tid)
}

/// Whether `pid` still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rfind(')')
            .map(|i| s[i + 1..].trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Resident memory of a process grouped by kind of mapping, from /proc/PID/smaps.
///
/// Anonymous mappings are grouped by `(permissions, size)`: a thread stack, a signal stack and
/// their guard pages each have one size, so a group whose count grows by N with N clients is a
/// per-client mapping, and its RSS per client is measured, not assumed.
#[derive(Clone, Debug, Default)]
pub struct Smaps {
    /// `(perms, size KiB)` → (count, RSS KiB) for anonymous mappings.
    pub anon: BTreeMap<(String, u64), (u64, u64)>,
    /// Named mappings (`[heap]`, `[stack]`, files) → RSS KiB.
    pub named_rss_kib: u64,
    /// `[heap]` (the main malloc arena's brk heap) RSS KiB.
    pub heap_rss_kib: u64,
}

/// Reads and groups /proc/PID/smaps.
pub fn smaps(pid: u32) -> Option<Smaps> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut out = Smaps::default();
    let mut cur: Option<(String, u64, String)> = None; // perms, size, path
    let flush = |cur: &mut Option<(String, u64, String)>, rss: u64, out: &mut Smaps| {
        if let Some((perms, size, path)) = cur.take() {
            if path.is_empty() {
                let e = out.anon.entry((perms, size)).or_insert((0, 0));
                e.0 += 1;
                e.1 += rss;
            } else {
                out.named_rss_kib += rss;
                if path == "[heap]" {
                    out.heap_rss_kib += rss;
                }
            }
        }
    };
    let mut rss = 0u64;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some(first) = it.next() else { continue };
        if first.ends_with(':') {
            if first == "Size:" {
                if let Some((_, size, _)) = cur.as_mut() {
                    *size = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                }
            } else if first == "Rss:" {
                rss = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            continue;
        }
        if first.contains('-') {
            flush(&mut cur, rss, &mut out);
            rss = 0;
            let perms = it.next().unwrap_or("").to_string();
            let _offset = it.next();
            let _dev = it.next();
            let _inode = it.next();
            let path: Vec<&str> = it.collect();
            cur = Some((perms, 0, path.join(" ")));
        }
    }
    flush(&mut cur, rss, &mut out);
    Some(out)
}

/// The anonymous groups whose RSS grew most between `before` and `after`, per client.
pub fn smaps_diff(before: &Smaps, after: &Smaps, clients: u64) -> SmapsDiff {
    let per = |kib: i64| kib as f64 / clients.max(1) as f64;
    let mut rows: Vec<SmapsGroup> = Vec::new();
    let (mut anon_diff, mut per_client_maps_diff) = (0i64, 0i64);
    let keys = after
        .anon
        .keys()
        .chain(before.anon.keys().filter(|k| !after.anon.contains_key(*k)));
    for key in keys {
        let (c0, r0) = before.anon.get(key).copied().unwrap_or((0, 0));
        let (c1, r1) = after.anon.get(key).copied().unwrap_or((0, 0));
        let (dc, dr) = (c1 as i64 - c0 as i64, r1 as i64 - r0 as i64);
        anon_diff += dr;
        // Groups that gained about one mapping per client (or more): thread and signal stacks,
        // guard pages. The rest of the anonymous growth is malloc's arenas.
        if dc > 0 && dc as u64 * 2 >= clients {
            per_client_maps_diff += dr;
        }
        if dc.unsigned_abs() >= clients / 4 || dr.unsigned_abs() >= 1024 {
            let (perms, size_kib) = (key.0.clone(), key.1);
            let (count_before, count_after, rss_kib_per_client) = (c0, c1, per(dr));
            rows.push(SmapsGroup {
                perms,
                size_kib,
                count_before,
                count_after,
                rss_kib_per_client,
            });
        }
    }
    rows.sort_by(|a, b| {
        b.rss_kib_per_client
            .abs()
            .total_cmp(&a.rss_kib_per_client.abs())
    });
    rows.truncate(12);
    SmapsDiff {
        anon_groups: rows,
        per_client_mappings_rss_kib_per_client: per(per_client_maps_diff),
        other_anon_rss_kib_per_client: per(anon_diff - per_client_maps_diff),
        brk_heap_rss_kib_per_client: per(after.heap_rss_kib as i64 - before.heap_rss_kib as i64),
        named_rss_kib_per_client: per(after.named_rss_kib as i64 - before.named_rss_kib as i64),
    }
}
