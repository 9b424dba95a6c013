//! Reading a process's CPU time, memory, threads and descriptors from /proc (Linux only).
//!
//! CPU is `utime + stime` from `/proc/PID/stat` (whole process, exited threads included), in
//! clock ticks converted to seconds. Memory is `VmRSS` from `/proc/PID/status`. Per thread,
//! [`thread_cpu`] reads `/proc/PID/task/TID/stat` (ticks) and `/proc/PID/task/TID/schedstat`
//! (nanoseconds on the CPU, when the kernel has it), grouped by the thread's name (`comm`).
//! [`meminfo`] reads the host's kernel memory from `/proc/meminfo`, [`smaps`] the process's
//! mappings.

use crate::client::round;
use crate::results::{KindCpu, Meminfo, Sample, SmapsDiff, SmapsGroup};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;
use std::sync::OnceLock;

/// Clock ticks per second for /proc/PID/stat (`getconf CLK_TCK`, 100 on Linux in practice).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output();
        let out = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let tck = out.unwrap_or_default().trim().parse().unwrap_or(100.0);
        if tck > 0.0 {
            tck
        } else {
            100.0
        }
    })
}

/// The fields after the command name (which is in parentheses and may hold spaces) of a
/// `stat` file: the state is the first, utime and stime the 12th and 13th.
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let stat = fs::read_to_string(path).ok()?;
    let fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    Some(fields.map(String::from).collect())
}

/// `utime + stime` of a `stat` file (a process's or one thread's), in seconds.
fn stat_cpu_secs(path: &str) -> Option<f64> {
    let f = stat_fields(path)?;
    let (utime, stime): (u64, u64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    Some((utime + stime) as f64 / clk_tck())
}

/// User + system CPU seconds of a process (this one with `None`).
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let pid = pid.map_or("self".into(), |p| p.to_string());
    stat_cpu_secs(&format!("/proc/{pid}/stat"))
}

/// The CPU seconds `pid` used since `before` (a [`cpu_secs`] reading); 0 when a reading failed.
pub fn cpu_since(pid: u32, before: Option<f64>) -> f64 {
    let after = cpu_secs(Some(pid));
    round(before.zip(after).map_or(0.0, |(a, b)| b - a), 3)
}

/// Whether `pid` still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    let state = stat_fields(&format!("/proc/{pid}/stat")).and_then(|f| f.first().cloned());
    state.is_some_and(|s| s != "Z")
}

/// The whitespace-separated numbers at the start of `s`.
fn numbers(s: &str) -> Vec<u64> {
    s.split_whitespace().map_while(|t| t.parse().ok()).collect()
}

/// The value of `key:` in a file of `key: value` lines, such as /proc/PID/status.
fn field(text: &str, key: &str) -> Option<u64> {
    let key = format!("{key}:");
    let value = text.lines().find_map(|l| l.strip_prefix(&key))?;
    numbers(value).first().copied()
}

/// RSS, threads, fds and memory maps of `pid`; `None` if the process is gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let maps = maps.lines().count() as u64;
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample {
        rss_kib: field(&status, "VmRSS")?,
        threads: field(&status, "Threads")?,
        fds,
        maps,
    })
}

/// The [`sample`]s of several processes added up; `None` if one is gone.
pub fn sample_sum(pids: &[u32]) -> Option<Sample> {
    let add = |t: Sample, s: Sample| Sample {
        rss_kib: t.rss_kib + s.rss_kib,
        threads: t.threads + s.threads,
        fds: t.fds + s.fds,
        maps: t.maps + s.maps,
    };
    pids.iter()
        .try_fold(Sample::default(), |t, &p| Some(add(t, sample(p)?)))
}

/// A process's name (`/proc/PID/comm`: `chatroom`, `redis-server`); empty if it is gone.
pub fn comm(pid: u32) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    text.trim().to_string()
}

/// `KernelStack`, `PageTables` and `Slab` from /proc/meminfo, KiB.
pub fn meminfo() -> Option<Meminfo> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let get = |k| field(&text, k).map(|v| v as f64);
    Some(Meminfo {
        kernel_stack: get("KernelStack")?,
        page_tables: get("PageTables")?,
        slab: get("Slab")?,
    })
}

/// The growth from `a` to `b`, per client.
pub fn meminfo_per_client(a: Meminfo, b: Meminfo, clients: u64) -> Meminfo {
    let per = |x: f64, y: f64| round((y - x) / clients.max(1) as f64, 2);
    Meminfo {
        kernel_stack: per(a.kernel_stack, b.kernel_stack),
        page_tables: per(a.page_tables, b.page_tables),
        slab: per(a.slab, b.slab),
    }
}

/// The threads of `pid`: (tid, name, kernel wait channel).
pub fn threads(pid: u32) -> Vec<(u32, String, String)> {
    let dir = fs::read_dir(format!("/proc/{pid}/task"));
    let tid = |e: fs::DirEntry| e.file_name().to_str()?.parse().ok();
    let tids = dir.into_iter().flatten().flatten().filter_map(tid);
    let read = |tid: u32, f: &str| {
        let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/{f}")).unwrap_or_default();
        text.trim().to_string()
    };
    let thread = |tid: u32| (tid, read(tid, "comm"), read(tid, "wchan"));
    let mut out: Vec<_> = tids.map(thread).collect();
    out.sort();
    out
}

/// A thread's kind: its name without a trailing `-N` (`ws-reader-17` → `ws-reader`).
pub fn thread_kind(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((kind, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => kind,
        _ => name,
    }
}

/// CPU used so far by the live threads of one kind (a thread that has exited takes its
/// figures with it): `utime + stime` in seconds (clock-tick resolution) and, when the kernel
/// keeps `schedstat`, nanoseconds on a CPU and time slices (each a wake-up or a preemption).
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadCpu {
    pub cpu_s: f64,
    pub sched: Option<[u64; 2]>,
}

impl ThreadCpu {
    /// What `self` used since `before` (no schedstat figures if there was no `before`).
    pub fn since(self, before: Option<&ThreadCpu>) -> ThreadCpu {
        let b = before.copied().unwrap_or_default();
        let minus = |(x, y): ([u64; 2], [u64; 2])| [0, 1].map(|i| x[i].saturating_sub(y[i]));
        let sched = self.sched.zip(b.sched).map(minus);
        ThreadCpu {
            cpu_s: (self.cpu_s - b.cpu_s).max(0.0),
            sched,
        }
    }
}

/// CPU used so far by each kind of thread of the processes `pids`, together.
pub fn thread_cpu(pids: &[u32]) -> BTreeMap<String, ThreadCpu> {
    let mut out: BTreeMap<String, ThreadCpu> = BTreeMap::new();
    let of = |&pid: &u32| threads(pid).into_iter().map(move |t| (pid, t.0, t.1));
    for (pid, tid, name) in pids.iter().flat_map(of) {
        let base = format!("/proc/{pid}/task/{tid}");
        let Some(cpu_s) = stat_cpu_secs(&format!("{base}/stat")) else {
            continue;
        };
        // `schedstat`: nanoseconds on a CPU, nanoseconds waiting for one, time slices.
        let text = fs::read_to_string(format!("{base}/schedstat")).unwrap_or_default();
        let v = numbers(&text);
        let sched = (v.len() >= 3).then(|| [v[0], v[2]]);
        let e = out.entry(thread_kind(&name).into()).or_insert(ThreadCpu {
            cpu_s: 0.0,
            sched: Some([0; 2]),
        });
        e.cpu_s += cpu_s;
        e.sched = e.sched.zip(sched).map(|(a, b)| [a[0] + b[0], a[1] + b[1]]);
    }
    out
}

/// Per-kind CPU between two [`thread_cpu`] readings, per delivery.
pub fn thread_cpu_per_delivery(
    before: &BTreeMap<String, ThreadCpu>,
    after: &BTreeMap<String, ThreadCpu>,
    deliveries: u64,
) -> BTreeMap<String, KindCpu> {
    let per = |x: f64| round(x / deliveries.max(1) as f64, 4);
    let kind = |(k, a): (&String, &ThreadCpu)| {
        let d = a.since(before.get(k));
        let cpu = KindCpu {
            cpu_us_per_delivery: per(d.cpu_s * 1e6),
            run_us_per_delivery: d.sched.map(|s| per(s[0] as f64 / 1e3)),
            slices_per_1000_deliveries: d.sched.map(|s| per(s[1] as f64 * 1e3)),
        };
        (k.clone(), cpu)
    };
    after.iter().map(kind).collect()
}

/// Resident memory of a process grouped by kind of mapping, from /proc/PID/smaps.
///
/// Anonymous mappings are grouped by `(permissions, size KiB)` → (count, RSS KiB): a thread
/// stack, a signal stack and their guard pages each have one size, so a group whose count grows
/// by N with N clients is a per-client mapping, and its RSS per client is measured, not assumed.
/// Named mappings (`[heap]`, `[stack]`, files) are summed, and `[heap]` (the main malloc
/// arena's brk heap) on its own too.
#[derive(Clone, Debug, Default)]
pub struct Smaps {
    anon: BTreeMap<(String, u64), (u64, u64)>,
    named_rss_kib: u64,
    heap_rss_kib: u64,
}

/// Reads and groups /proc/PID/smaps.
pub fn smaps(pid: u32) -> Option<Smaps> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    // Each mapping: its header line (`start-end perms offset dev inode [path]`), then its
    // fields, among them `Size:` and `Rss:`.
    let mut maps: Vec<(Vec<&str>, u64, u64)> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = || words.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        match (words.first(), maps.last_mut()) {
            (Some(&"Size:"), Some(m)) => m.1 = num(),
            (Some(&"Rss:"), Some(m)) => m.2 = num(),
            (Some(w), _) if w.contains('-') && !w.ends_with(':') => maps.push((words, 0, 0)),
            _ => {}
        }
    }
    let mut out = Smaps::default();
    for (header, size, rss) in maps {
        match header.get(5..).unwrap_or_default().join(" ").as_str() {
            "" => {
                let e = out.anon.entry((header[1].to_string(), size)).or_default();
                *e = (e.0 + 1, e.1 + rss);
            }
            path => {
                out.named_rss_kib += rss;
                out.heap_rss_kib += if path == "[heap]" { rss } else { 0 };
            }
        }
    }
    Some(out)
}

/// The anonymous groups whose count or RSS grew most between `before` and `after`, per client.
pub fn smaps_diff(before: &Smaps, after: &Smaps, clients: u64) -> SmapsDiff {
    let per = |kib: i64| round(kib as f64 / clients.max(1) as f64, 2);
    let (mut groups, mut anon, mut per_client_maps) = (Vec::new(), 0i64, 0i64);
    let keys: BTreeSet<&(String, u64)> = after.anon.keys().chain(before.anon.keys()).collect();
    for key in keys {
        let (c0, r0) = before.anon.get(key).copied().unwrap_or_default();
        let (c1, r1) = after.anon.get(key).copied().unwrap_or_default();
        let (dc, dr) = (c1 as i64 - c0 as i64, r1 as i64 - r0 as i64);
        anon += dr;
        // Groups that gained about one mapping per client (or more): thread and signal stacks,
        // guard pages. The rest of the anonymous growth is malloc's arenas.
        if dc > 0 && dc as u64 * 2 >= clients {
            per_client_maps += dr;
        }
        if dc.unsigned_abs() >= clients / 4 || dr.unsigned_abs() >= 1024 {
            groups.push(SmapsGroup {
                perms: key.0.clone(),
                size_kib: key.1,
                count_before: c0,
                count_after: c1,
                rss_kib_per_client: per(dr),
            });
        }
    }
    let size = |g: &SmapsGroup| g.rss_kib_per_client.abs();
    groups.sort_by(|a, b| size(b).total_cmp(&size(a)));
    groups.truncate(12);
    let growth = |a: u64, b: u64| per(b as i64 - a as i64);
    SmapsDiff {
        anon_groups: groups,
        per_client_mappings_rss_kib_per_client: per(per_client_maps),
        other_anon_rss_kib_per_client: per(anon - per_client_maps),
        brk_heap_rss_kib_per_client: growth(before.heap_rss_kib, after.heap_rss_kib),
        named_rss_kib_per_client: growth(before.named_rss_kib, after.named_rss_kib),
    }
}
