//! The history store's part of the report: chatroom with `--data DIR` (`chatroom_store`) against
//! chatroom with `--data none` (`chatroom`) on the same workload, paired by repetition; the
//! `store` thread's CPU per message; the rate it keeps up with (W7); and the checks: no key
//! figure more than 10% worse with the store on, nothing lost, every message written.

use crate::report::{cell, check, fmt_num, get_str, median, num, row, Better, Row};
use crate::stats;
use serde_json::Value;
use std::fmt::Write;

const MEM: &str = "chatroom";
const STORE: &str = "chatroom_store";
/// How much worse a key figure may get with the store on.
const TOLERANCE: f64 = 0.10;
/// W7: `unwritten` must be back to 0 this soon after sending stops.
const DRAIN_LIMIT_S: f64 = 1.0;

/// A figure compared between memory-only and store-on runs.
struct Metric {
    row: Row,
    /// Judged against [`TOLERANCE`].
    key: bool,
}

const fn m(
    label: &'static str,
    ptr: &'static str,
    scale: f64,
    decimals: usize,
    better: Better,
    key: bool,
) -> Metric {
    Metric {
        row: row(label, ptr, scale, decimals, better),
        key,
    }
}

const fn noise() -> Metric {
    m(
        "other processes' CPU share (noise)",
        "/suite/other_cpu_share",
        1.0,
        2,
        Better::Neither,
        false,
    )
}

fn metrics(id: &str) -> Vec<Metric> {
    use Better::{Higher, Lower, Neither};
    let ms = 1.0 / 1000.0;
    let mib = 1.0 / 1024.0;
    // The last rows of W1's and W2's tables.
    let tail = || {
        [
            m(
                "server threads",
                "/server/before/threads",
                1.0,
                0,
                Neither,
                false,
            ),
            m(
                "server RSS max (MiB)",
                "/server/rss_kib_max",
                mib,
                1,
                Lower,
                false,
            ),
            noise(),
        ]
    };
    match id {
        "w1" => vec![
            m(
                "**deliveries/s**",
                "/deliveries_per_s",
                1.0,
                0,
                Higher,
                true,
            ),
            m(
                "**server CPU per delivery (µs)**",
                "/server/cpu_us_per_delivery",
                1.0,
                3,
                Lower,
                true,
            ),
            m("latency p50 (ms)", "/latency/p50_us", ms, 2, Lower, false),
            m(
                "**latency p99 (ms)**",
                "/latency/p99_us",
                ms,
                2,
                Lower,
                true,
            ),
            m("latency max (ms)", "/latency/max_us", ms, 1, Lower, false),
            m(
                "server CPU (cores busy)",
                "/server/cpu_util",
                1.0,
                2,
                Neither,
                false,
            ),
            m(
                "load generator CPU (cores busy)",
                "/client/cpu_util",
                1.0,
                2,
                Neither,
                false,
            ),
            m("messages sent", "/sent", 1.0, 0, Neither, false),
            m("lost deliveries", "/lost", 1.0, 0, Lower, false),
            m(
                "clients closed by the server",
                "/clients_closed_early",
                1.0,
                0,
                Lower,
                false,
            ),
        ]
        .into_iter()
        .chain(tail())
        .collect(),
        "w2" => vec![
            m("messages sent/s", "/sent_per_s", 1.0, 0, Neither, false),
            m("latency p50 (ms)", "/latency/p50_us", ms, 3, Lower, false),
            m("latency p90 (ms)", "/latency/p90_us", ms, 3, Lower, false),
            m(
                "**latency p99 (ms)**",
                "/latency/p99_us",
                ms,
                3,
                Lower,
                true,
            ),
            m("latency max (ms)", "/latency/max_us", ms, 2, Lower, false),
            m(
                "**server CPU per delivery (µs)**",
                "/server/cpu_us_per_delivery",
                1.0,
                2,
                Lower,
                true,
            ),
            m(
                "server CPU (cores busy)",
                "/server/cpu_util",
                1.0,
                3,
                Lower,
                false,
            ),
            m("lost deliveries", "/lost", 1.0, 0, Lower, false),
        ]
        .into_iter()
        .chain(tail())
        .collect(),
        "w7" => vec![
            m(
                "messages/s (each delivered to its sender)",
                "/sent_per_s",
                1.0,
                0,
                Higher,
                false,
            ),
            m("latency p50 (ms)", "/latency/p50_us", ms, 3, Lower, false),
            m("latency p99 (ms)", "/latency/p99_us", ms, 3, Lower, false),
            m(
                "server CPU per message (µs)",
                "/server/cpu_us_per_delivery",
                1.0,
                2,
                Lower,
                false,
            ),
            m(
                "server CPU (cores busy)",
                "/server/cpu_util",
                1.0,
                2,
                Neither,
                false,
            ),
            m(
                "load generator CPU (cores busy)",
                "/client/cpu_util",
                1.0,
                2,
                Neither,
                false,
            ),
            m("lost deliveries", "/lost", 1.0, 0, Lower, false),
            m(
                "clients closed by the server",
                "/clients_closed_early",
                1.0,
                0,
                Lower,
                false,
            ),
            m(
                "server RSS max (MiB)",
                "/server/rss_kib_max",
                mib,
                1,
                Lower,
                false,
            ),
            noise(),
        ],
        _ => Vec::new(),
    }
}

/// The store's own figures, from the store-on runs.
fn cost_rows() -> Vec<(&'static str, &'static str, f64, usize)> {
    vec![
        (
            "messages sent by the load generator",
            "/store/sent_by_load_generator",
            1.0,
            0,
        ),
        (
            "messages written (`store.written` delta)",
            "/store/written_in_window",
            1.0,
            0,
        ),
        ("accepted/s while sending", "/store/accepted_per_s", 1.0, 0),
        ("written/s while sending", "/store/written_per_s", 1.0, 0),
        (
            "unwritten when sending stopped",
            "/store/unwritten_at_stop",
            1.0,
            0,
        ),
        (
            "unwritten back to 0, after sending stopped (ms)",
            "/store/drained_after_stop_s",
            1000.0,
            0,
        ),
        (
            "… after the last delivery (ms)",
            "/store/drained_after_deliveries_s",
            1000.0,
            0,
        ),
        (
            "**`store` thread CPU per message (µs)**",
            "/store/thread/cpu_us_per_message",
            1.0,
            2,
        ),
        (
            "… from schedstat's nanoseconds (µs)",
            "/store/thread/run_us_per_message",
            1.0,
            2,
        ),
        (
            "`store` thread CPU per delivery (µs)",
            "/store/thread/cpu_us_per_delivery",
            1.0,
            4,
        ),
        (
            "**`store` thread's share of the server's CPU (%)**",
            "/store/thread/share_of_server_cpu",
            100.0,
            1,
        ),
        (
            "`store` thread busy (% of one core)",
            "/store/thread/busy_share_of_a_core",
            100.0,
            1,
        ),
        (
            "`store` thread put on a CPU, per message",
            "/store/thread/slices_per_message",
            1.0,
            3,
        ),
        (
            "`store` thread runnable but waiting for a CPU (ms)",
            "/store/thread/runqueue_wait_ms",
            1.0,
            0,
        ),
        (
            "`store` thread sampled while sending: running or runnable (%)",
            "/store/thread_states_while_sending/share/R",
            100.0,
            0,
        ),
        (
            "… waiting for the disk, state D (%)",
            "/store/thread_states_while_sending/share/D",
            100.0,
            0,
        ),
        (
            "… idle, waiting for messages, state S (%)",
            "/store/thread_states_while_sending/share/S",
            100.0,
            0,
        ),
        ("messages dropped by the store", "/store/dropped", 1.0, 0),
        (
            "on disk after a clean stop (bytes per message)",
            "/suite/disk_bytes_per_message",
            1.0,
            0,
        ),
        (
            "on disk after a clean stop (MiB)",
            "/suite/store_disk_after_stop/total_bytes",
            1.0 / 1048576.0,
            1,
        ),
    ]
}

/// Per repetition, store-on ÷ memory-only for one figure (runs pair up by index: one of each
/// per repetition, errors included).
fn paired(r: &Value, id: &str, ptr: &str) -> Vec<Option<f64>> {
    let runs = |srv: &str| {
        r["workloads"][id][srv]["runs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let (a, b) = (runs(MEM), runs(STORE));
    a.iter()
        .zip(b.iter())
        .map(|(a, b)| {
            if a.get("error").is_some() || b.get("error").is_some() {
                return None;
            }
            let x = a.pointer(ptr).and_then(num)?;
            let y = b.pointer(ptr).and_then(num)?;
            (x > 0.0 && y > 0.0).then(|| y / x)
        })
        .collect()
}

fn median_of(v: &[Option<f64>]) -> Option<f64> {
    let mut xs: Vec<f64> = v.iter().flatten().copied().collect();
    stats::median(&mut xs)
}

/// How much worse a store ÷ memory ratio is (positive: worse).
fn worse_by(better: Better, ratio: f64) -> Option<f64> {
    match better {
        Better::Higher => Some(1.0 - ratio),
        Better::Lower => Some(ratio - 1.0),
        Better::Neither => None,
    }
}

/// `worse` (a fraction, positive when worse) in words.
fn change(worse: f64) -> String {
    if worse > 0.0 {
        format!("{:.1}% worse", worse * 100.0)
    } else {
        format!("{:.1}% better", -worse * 100.0)
    }
}

/// W7: the store kept up while sending if it wrote at least this share of what came in.
const KEEP_UP_SHARE: f64 = 0.95;

/// The store part of one run's progress line.
pub fn one_line(v: &Value) -> Option<String> {
    let st = &v["store"];
    let t = st.get("thread")?;
    let g = |x: &Value, d: usize| num(x).map(|x| fmt_num(x, d)).unwrap_or("-".into());
    Some(format!(
        "store {} µs/msg ({}% of server CPU), {} written/s, unwritten 0 after {} ms, written {} of {}",
        g(&t["cpu_us_per_message"], 2),
        num(&t["share_of_server_cpu"])
            .map(|x| format!("{:.1}", x * 100.0))
            .unwrap_or("-".into()),
        g(&st["written_per_s"], 0),
        num(&st["drained_after_stop_s"])
            .map(|x| format!("{:.0}", x * 1000.0))
            .unwrap_or("-".into()),
        g(&st["written_in_window"], 0),
        g(&st["sent_by_load_generator"], 0),
    ))
}

/// Whether every completed store-on run lost nothing, wrote every message and dropped none.
fn all_written(r: &Value, id: &str) -> (bool, String) {
    let mut ok = true;
    let mut n = 0;
    let mut worst = String::new();
    for run in r["workloads"][id][STORE]["runs"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if run.get("error").is_some() {
            ok = false;
            continue;
        }
        n += 1;
        let st = &run["store"];
        let lost = run["lost"].as_u64().unwrap_or(u64::MAX);
        let closed = run["clients_closed_early"].as_u64().unwrap_or(u64::MAX);
        let sent = st["sent_by_load_generator"].as_u64();
        let written = st["written_in_window"].as_u64();
        let dropped = st["dropped"].as_u64().unwrap_or(u64::MAX);
        let drained = st["drained"].as_bool() == Some(true);
        let good = lost == 0
            && closed == 0
            && sent.is_some()
            && sent == written
            && dropped == 0
            && drained
            && st["state"].as_str() == Some("ok");
        if !good && worst.is_empty() {
            worst = format!(
                " ({}: lost {lost}, closed {closed}, written {} of {}, dropped {dropped}, drained {drained}, state {})",
                get_str(run, "/suite/tag"),
                written.map(|x| x.to_string()).unwrap_or("-".into()),
                sent.map(|x| x.to_string()).unwrap_or("-".into()),
                get_str(st, "/state"),
            );
        }
        ok &= good;
    }
    let c = median(r, id, STORE);
    let text = format!(
        "{n} runs; median: lost {}, written {} of {} sent, dropped {}, state {}{worst}",
        num(&c["lost"]).map(|x| fmt_num(x, 0)).unwrap_or("-".into()),
        num(&c["store"]["written_in_window"])
            .map(|x| fmt_num(x, 0))
            .unwrap_or("-".into()),
        num(&c["store"]["sent_by_load_generator"])
            .map(|x| fmt_num(x, 0))
            .unwrap_or("-".into()),
        num(&c["store"]["dropped"])
            .map(|x| fmt_num(x, 0))
            .unwrap_or("-".into()),
        get_str(c, "/store/state"),
    );
    (ok && n > 0, text)
}

/// The store's checks, for every workload that ran in both variants.
pub fn checks(r: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    let has = |id: &str| !median(r, id, MEM).is_null() && !median(r, id, STORE).is_null();
    for id in ["w1", "w2"] {
        if !has(id) {
            continue;
        }
        let mut parts = Vec::new();
        let mut pass = Some(true);
        let mut names = Vec::new();
        for mt in metrics(id).iter().filter(|m| m.key) {
            let name = mt.row.label.trim_matches('*');
            names.push(name.to_string());
            match median_of(&paired(r, id, mt.row.ptr))
                .and_then(|x| Some((x, worse_by(mt.row.better, x)?)))
            {
                Some((ratio, worse)) => {
                    parts.push(format!("{name} {ratio:.3}× ({})", change(worse)));
                    if worse > TOLERANCE {
                        pass = Some(false);
                    }
                }
                None => {
                    parts.push(format!("{name} -"));
                    pass = pass.and(None);
                }
            }
        }
        out.push(check(
            id,
            &format!(
                "store on: no key figure more than 10% worse than memory-only ({}; store ÷ memory, median of paired runs)",
                names.join(", ")
            ),
            parts.join(", "),
            pass,
        ));
        let (ok, text) = all_written(r, id);
        out.push(check(
            id,
            "store on: nothing lost, every message written, none dropped, store ok",
            text,
            Some(ok),
        ));
    }
    if !median(r, "w7", STORE).is_null() {
        let c = median(r, "w7", STORE);
        let st = &c["store"];
        let drained = num(&st["drained_after_stop_s"]);
        let (ok, _) = all_written(r, "w7");
        let runs = w7_runs(r);
        let dropping = runs.iter().filter(|x| x.dropped > 0.0).count();
        let behind = runs
            .iter()
            .filter(|x| x.written < KEEP_UP_SHARE * x.accepted)
            .count();
        let n = runs.len();
        let slow_drain = runs
            .iter()
            .filter(|x| x.drained_s.is_none_or(|d| d > DRAIN_LIMIT_S))
            .count();
        let most_dropped = runs.iter().map(|x| x.dropped).fold(0.0, f64::max);
        let keeps_up = ok && n > 0 && behind == 0 && dropping == 0 && slow_drain == 0;
        out.push(check(
            "w7",
            &format!(
                "store keeps up at full speed: writes ≥ {:.0}% of what comes in while sending, none dropped, unwritten back to 0 within {DRAIN_LIMIT_S} s of the end of sending",
                KEEP_UP_SHARE * 100.0
            ),
            format!(
                "median {} accepted/s, {} written/s ({}), back to 0 after {} ms, {} µs CPU per message; behind in {behind} of {n} runs, dropped messages in {dropping} of {n} ({} dropped at most)",
                num(&st["accepted_per_s"])
                    .map(|x| fmt_num(x, 0))
                    .unwrap_or("-".into()),
                num(&st["written_per_s"])
                    .map(|x| fmt_num(x, 0))
                    .unwrap_or("-".into()),
                num(&st["written_per_s"])
                    .zip(num(&st["accepted_per_s"]))
                    .filter(|(_, a)| *a > 0.0)
                    .map(|(w, a)| format!("{:.1}%", w / a * 100.0))
                    .unwrap_or("-".into()),
                drained
                    .map(|x| format!("{:.0}", x * 1000.0))
                    .unwrap_or("-".into()),
                num(&st["thread"]["cpu_us_per_message"])
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or("-".into()),
                fmt_num(most_dropped, 0),
            ),
            Some(keeps_up),
        ));
    }
    out
}

/// The "store on" part of a workload's section: nothing for a workload without a store variant.
pub fn section(s: &mut String, id: &str, r: &Value) {
    let c = median(r, id, MEM);
    let st = median(r, id, STORE);
    if st.is_null() {
        return;
    }
    let _ = writeln!(s, "### With the store on\n");
    let _ = writeln!(
        s,
        "chatroom with `--data DIR` (SQLite, a fresh directory per run) against the same binary with \
         `--data none`, back to back in every repetition. Ratios are store-on ÷ memory-only within each \
         repetition; the table shows their median and every repetition's.{}\n",
        if metrics(id).iter().any(|m| m.key) {
            format!(
                " Key figures (bold) may be at most {:.0}% worse.",
                TOLERANCE * 100.0
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "| metric | memory only | store on | store ÷ memory | per repetition | |\n|---|---:|---:|---:|---|---|"
    );
    for mt in metrics(id) {
        let per = paired(r, id, mt.row.ptr);
        let med = median_of(&per);
        let verdict = match (mt.key, med.and_then(|x| worse_by(mt.row.better, x))) {
            (true, Some(w)) if w <= TOLERANCE => format!("✅ {}", change(w)),
            (true, Some(w)) => format!("❌ **{}**", change(w)),
            (true, None) => "n/a".to_string(),
            (false, _) => String::new(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            mt.row.label,
            cell(c, &mt.row).0,
            cell(st, &mt.row).0,
            med.map(|x| format!("{x:.3}×")).unwrap_or_default(),
            per.iter()
                .map(|x| x.map(|x| format!("{x:.3}")).unwrap_or("–".into()))
                .collect::<Vec<_>>()
                .join(", "),
            verdict
        );
    }
    let _ = writeln!(s, "\nThe store's own figures (store-on runs, medians):\n");
    let _ = writeln!(s, "| metric | store on | per run |\n|---|---:|---|");
    for (label, ptr, scale, d) in cost_rows() {
        let figure = row(label, ptr, scale, d, Better::Neither);
        let per: Vec<String> = r["workloads"][id][STORE]["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|run| cell(run, &figure).0)
            .collect();
        let _ = writeln!(
            s,
            "| {label} | {} | {} |",
            cell(st, &figure).0,
            per.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "| state at the end | {} | |",
        get_str(st, "/store/state")
    );
    let _ = writeln!(s);
    thread_table(s, c, st);
    if id == "w7" {
        w7_summary(s, r, c, st);
    }
}

/// Server CPU per delivery by kind of thread, memory-only against store-on: where the extra
/// CPU goes.
fn thread_table(s: &mut String, c: &Value, st: &Value) {
    let (Some(a), Some(b)) = (
        c["server"]["cpu_by_thread_kind"].as_object(),
        st["server"]["cpu_by_thread_kind"].as_object(),
    ) else {
        return;
    };
    let per = |v: &Value| num(&v["run_us_per_delivery"]).or_else(|| num(&v["cpu_us_per_delivery"]));
    let mut kinds: Vec<&String> = a.keys().chain(b.keys()).collect();
    kinds.sort();
    kinds.dedup();
    let slices = |v: &Value| num(&v["slices_per_1000_deliveries"]);
    let _ = writeln!(
        s,
        "Server CPU per delivery by kind of thread (µs of `schedstat` run time over the sending time, divided by \
         all deliveries), and how often those threads were put on a CPU (`schedstat` time slices, each a wake-up or \
         a preemption, per 1,000 deliveries); medians:\n"
    );
    let _ = writeln!(
        s,
        "| thread | µs, memory only | µs, store on | difference | slices, memory only | slices, store on |\n|---|---:|---:|---:|---:|---:|"
    );
    let (mut ta, mut tb) = (0.0, 0.0);
    for k in kinds {
        let x = a.get(k).and_then(per);
        let y = b.get(k).and_then(per);
        if x.unwrap_or(0.0) < 0.0005 && y.unwrap_or(0.0) < 0.0005 {
            continue;
        }
        ta += x.unwrap_or(0.0);
        tb += y.unwrap_or(0.0);
        let f = |v: Option<f64>, d: usize| v.map(|v| format!("{v:.d$}")).unwrap_or("–".into());
        let _ = writeln!(
            s,
            "| `{k}` | {} | {} | {} | {} | {} |",
            f(x, 4),
            f(y, 4),
            match (x, y) {
                (Some(x), Some(y)) => format!("{:+.4}", y - x),
                (None, Some(y)) => format!("{y:+.4}"),
                _ => String::new(),
            },
            f(a.get(k).and_then(slices), 1),
            f(b.get(k).and_then(slices), 1),
        );
    }
    let _ = writeln!(
        s,
        "| all of the above | {ta:.4} | {tb:.4} | {:+.4} | | |\n",
        tb - ta
    );
}

/// One W7 store-on run, as the summary judges it.
struct W7Run {
    accepted: f64,
    written: f64,
    dropped: f64,
    at_stop: f64,
    drained_s: Option<f64>,
}

fn w7_runs(r: &Value) -> Vec<W7Run> {
    r["workloads"]["w7"][STORE]["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|run| run.get("error").is_none())
        .filter_map(|run| {
            let st = &run["store"];
            Some(W7Run {
                accepted: num(&st["accepted_per_s"])?,
                written: num(&st["written_per_s"])?,
                dropped: num(&st["dropped"]).unwrap_or(0.0),
                at_stop: num(&st["unwritten_at_stop"]).unwrap_or(0.0),
                drained_s: num(&st["drained_after_stop_s"]),
            })
        })
        .collect()
}

/// `lo–hi` of some figure over the runs, rounded to whole numbers.
fn span(xs: impl Iterator<Item = f64>) -> String {
    let v: Vec<f64> = xs.collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.is_empty() {
        "–".into()
    } else if (hi - lo).abs() < 0.5 {
        fmt_num(lo, 0)
    } else {
        format!("{}–{}", fmt_num(lo, 0), fmt_num(hi, 0))
    }
}

fn w7_summary(s: &mut String, r: &Value, c: &Value, st: &Value) {
    let g = |v: &Value, p: &str| v.pointer(p).and_then(num);
    let f0 = |x: Option<f64>| x.map(|x| fmt_num(x, 0)).unwrap_or("–".into());
    let runs = w7_runs(r);
    if runs.is_empty() {
        return;
    }
    let mem = g(c, "/sent_per_s");
    let us = g(st, "/store/thread/cpu_us_per_message");
    let busy = g(st, "/store/thread/busy_share_of_a_core");
    let wait = g(st, "/store/thread/runqueue_wait_ms");
    let window = g(st, "/store/window_s");
    let threads = g(st, "/server/before/threads");
    let disk = g(st, "/store/thread_states_while_sending/share/D");
    let wchans: Vec<String> = st
        .pointer("/store/thread_states_while_sending/top")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t["state"].as_str() == Some("D"))
        .map(|t| {
            format!(
                "`{}` {:.0}%",
                get_str(t, "/wchan"),
                num(&t["share"]).unwrap_or(0.0) * 100.0
            )
        })
        .collect();
    let ceiling = us.filter(|u| *u > 0.0).map(|u| 1e6 / u);
    let n = runs.len();
    let behind: Vec<&W7Run> = runs
        .iter()
        .filter(|x| x.written < KEEP_UP_SHARE * x.accepted)
        .collect();
    let dropping: Vec<&W7Run> = runs.iter().filter(|x| x.dropped > 0.0).collect();
    let slow_drain = runs
        .iter()
        .filter(|x| x.drained_s.is_none_or(|d| d > DRAIN_LIMIT_S))
        .count();
    let _ = write!(
        s,
        "Over {n} runs with the store on, the hub accepted **{} messages/s** ({} without the store, median) \
         and the store wrote **{} messages/s** while they came in; `unwritten` stood at {} when sending \
         stopped and was back to 0 after {} ms. ",
        span(runs.iter().map(|x| x.accepted)),
        f0(mem),
        span(runs.iter().map(|x| x.written)),
        span(runs.iter().map(|x| x.at_stop)),
        span(runs.iter().filter_map(|x| x.drained_s).map(|d| d * 1000.0)),
    );
    if behind.is_empty() && dropping.is_empty() && slow_drain == 0 {
        let _ = writeln!(
            s,
            "It kept up with everything the hub accepted, so it sustains **at least {} messages/s** here: a \
             lower bound, set by the hub and the load generator. At {} µs of CPU per message its thread would \
             write about {} messages/s on a core of its own: an estimate, not a measurement.\n",
            span(runs.iter().map(|x| x.accepted)),
            us.map(|u| format!("{u:.2}")).unwrap_or("–".into()),
            f0(ceiling),
        );
        return;
    }
    let cause = match (disk, wait, window) {
        (Some(d), _, _) if d >= 0.3 => format!(
            "What held it back was the disk: sampled while sending, it was in uninterruptible sleep \
             (state D) {:.0}% of the time ({}).",
            d * 100.0,
            wchans.join(", ")
        ),
        (_, Some(w), Some(win)) if w / 1000.0 > 0.5 * win => format!(
            "What held it back was its share of the CPU, not the work per message or the disk: it ran {} of \
             one core and spent {:.1} s of the {win:.1} s window runnable but waiting for a CPU, one thread \
             among the server's {} on two cores shared with the load generator.",
            busy.map(|b| format!("{:.0}%", b * 100.0))
                .unwrap_or("–".into()),
            w / 1000.0,
            f0(threads)
        ),
        _ => "Neither its wait for a CPU nor for the disk explains the shortfall alone.".to_string(),
    };
    let _ = writeln!(
        s,
        "**It did not keep up at full speed**: in {} of {n} runs it wrote less than {:.0}% of what came in \
         (it fell behind by {} messages/s), and in {} of {n} runs `unwritten` reached the store's cap \
         (`MAX_UNWRITTEN`) and the hub dropped {} messages (broadcast, never written). So on this machine, \
         with the hub taking every message it can, the store sustains about **{} messages/s written**; it \
         keeps up with less than that. Once sending stopped it caught up at about {} messages/s, and at {} µs \
         of CPU per message a core of its own would allow about {} messages/s. {}\n",
        behind.len(),
        KEEP_UP_SHARE * 100.0,
        span(behind.iter().map(|x| x.accepted - x.written)),
        dropping.len(),
        span(dropping.iter().map(|x| x.dropped)),
        span(runs.iter().map(|x| x.written)),
        span(
            runs.iter()
                .filter_map(|x| x.drained_s.filter(|d| *d > 0.0).map(|d| x.at_stop / d))
        ),
        us.map(|u| format!("{u:.2}")).unwrap_or("–".into()),
        f0(ceiling),
        cause,
    );
}
