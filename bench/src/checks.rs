//! The target checks, judged on chatroom's medians: [`PAIRED`], ratios of two servers' paired
//! runs (chatroom against the build before issue 10, the store on against memory only), and
//! [`checks`]' lists per workload, each a target, the figure measured and whether it passes.
//! "Nothing lost" is judged on every run, not on the median.
//! `make bench` exits 1 when any check fails.

use crate::report::{fmt, label, median_of, paired, total_per_client, Figures};
use crate::results::{Capacity, Churn, Results, Run, Soak, Store, Traffic, Workload};

/// A target check's outcome; `NotApplicable`: not judged, and the value says why.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Verdict {
    Pass,
    Fail,
    NotApplicable,
}
use Verdict::{Fail, NotApplicable, Pass};

impl Verdict {
    pub fn word(self) -> &'static str {
        ["PASS", "FAIL", "n/a"][self as usize]
    }
    pub fn markdown(self) -> &'static str {
        ["✅ pass", "❌ **fail**", "n/a"][self as usize]
    }
}

fn ok(pass: bool) -> Verdict {
    if pass {
        Pass
    } else {
        Fail
    }
}

/// One target check: the workload, the target, what was measured, and the verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub workload: &'static str,
    pub target: String,
    pub value: String,
    pub verdict: Verdict,
}

fn check(workload: &'static str, target: impl Into<String>, value: String, v: Verdict) -> Check {
    let (target, verdict) = (target.into(), v);
    Check {
        workload,
        target,
        value,
        verdict,
    }
}

/// Ratio checks: (workload, baseline server, compared server, row of the workload's table,
/// lowest and highest allowed median of compared ÷ baseline, what the bound means). "No worse"
/// allows 10% of noise: run to run, CPU per delivery varies by about ±10% here (bench/NOTES.md).
pub type Paired = (Str, Str, Str, Str, f64, f64, Str);
type Str = &'static str;

/// `paired![workload: baseline => compared, "row", lowest, highest, "meaning"; …]`.
macro_rules! paired {
    ($($id:literal: $base:literal => $other:literal, $row:literal, $lo:expr, $hi:expr, $means:literal;)*) => {
        &[$(($id, $base, $other, $row, $lo, $hi, $means)),*]
    };
}

pub const PAIRED: &[Paired] = paired![
    "w1": "chatroom_before" => "chatroom", "server CPU per delivery (µs)", 0.0, 1.10, "no worse than before";
    "w1": "chatroom_before" => "chatroom", "deliveries/s", 0.90, f64::INFINITY, "no lower than before";
    "w2": "chatroom_before" => "chatroom", "server CPU per delivery (µs)", 0.0, 0.50, "at least 2× lower than before";
    "w2": "chatroom_before" => "chatroom", "latency p99 (ms)", 0.0, 1.10, "no worse than before";
    "w1": "chatroom" => "chatroom_store", "deliveries/s", 0.90, f64::INFINITY, "store on: at most 10% worse";
    "w1": "chatroom" => "chatroom_store", "latency p99 (ms)", 0.0, 1.10, "store on: at most 10% worse";
    "w1": "chatroom" => "chatroom_store", "server CPU per delivery (µs)", 0.0, 1.10, "store on: at most 10% worse";
    "w2": "chatroom" => "chatroom_store", "latency p99 (ms)", 0.0, 1.10, "store on: at most 10% worse";
    "w2": "chatroom" => "chatroom_store", "server CPU per delivery (µs)", 0.0, 1.10, "store on: at most 10% worse";
];

/// A ratio's bounds in words: `≤ 1.10×`, `≥ 0.90×`.
pub fn bound(lo: f64, hi: f64) -> String {
    match hi.is_finite() {
        true => format!("≤ {}×", fmt(hi, 2)),
        false => format!("≥ {}×", fmt(lo, 2)),
    }
}

/// W7: `unwritten` must be back to 0 this soon after sending stops.
const DRAIN_LIMIT_S: f64 = 1.0;
/// W7: the store kept up while sending if it wrote at least this share of what came in.
const KEEP_UP_SHARE: f64 = 0.95;

/// W9: the p99 of two processes on one Redis may be this much above one process's (ms).
const CLUSTER_P99_MS: f64 = 2.0;

/// W8 (quick runs are too short for malloc's arenas to level off, so only a full run fails
/// this): the last third's mean may exceed the first third's by this share, plus [`FLAT_SLACK`]
/// threads or fds, or [`FLAT_SLACK_KIB`] of RSS (bench/NOTES.md explains the bound).
const FLAT_SHARE: f64 = 0.10;
const FLAT_SLACK: f64 = 4.0;
const FLAT_SLACK_KIB: f64 = 1024.0;

/// W8: whether `last` is within the bound of `first`.
fn flat(first: f64, last: f64, slack: f64) -> bool {
    last <= first * (1.0 + FLAT_SHARE) + slack
}

/// `check![out, "wN", workload, figures => target, value, verdict; …]`: the checks of one
/// workload, judged on chatroom's medians (none if it did not run; one failure if it ran and
/// no run completed, so that a workload that only errors can never pass).
macro_rules! check {
    ($out:ident, $id:literal, $w:expr, $c:ident => $($target:expr, $value:expr, $verdict:expr;)*) => {
        if let Some(series) = $w.as_ref().and_then(|w| w.servers.get("chatroom")) {
            match series.median.as_ref().and_then(Run::ok) {
                Some($c) => { $($out.push(check($id, $target, $value, $verdict));)* }
                None => $out.push(check($id, "chatroom completes a run", format!("0 of {} runs completed", series.runs.len()), Fail)),
            }
        }
    };
}

/// The targets.
pub fn checks<'a>(r: &'a Results) -> Vec<Check> {
    let (w, quick, mut out) = (&r.workloads, r.quick, Vec::new());
    let node = w.w1.as_ref().and_then(|w| w.ok("node"));
    let cpu = |t: &Traffic| t.server.cpu_us_per_delivery;
    let node_x = |c: &Traffic| node.map(|n| cpu(n) / cpu(c));
    check![out, "w1", w.w1, c =>
        "server CPU per delivery ≤ 1.0 µs", format!("{} µs", fmt(c.server.cpu_us_per_delivery, 3)), ok(c.server.cpu_us_per_delivery <= 1.0);
        "≥ 5× less server CPU per delivery than Node", node_x(c).map_or("no Node run".into(), |x| format!("{}×", fmt(x, 1))), node_x(c).map_or(NotApplicable, |x| ok(x >= 5.0));
        "nothing lost, nobody dropped", format!("lost {}, dropped {}", c.lost, c.clients_closed_early), ok(c.lost == 0 && c.clients_closed_early == 0);
    ];
    let w2 = w.w2.as_ref().and_then(|w| w.ok("chatroom"));
    let w2_p99 = w2.map(|c| c.latency.p99_us / 1000.0);
    check![out, "w2", w.w2, c =>
        "p99 ≤ 3 ms", format!("{} ms", fmt(c.latency.p99_us / 1000.0, 3)), ok(c.latency.p99_us <= 3000.0);
    ];
    let lost = |w| nothing_lost("w2", "nothing lost", w, "chatroom");
    out.extend(w.w2.as_ref().map(lost));
    let before = w.w3.as_ref().and_then(|w| w.ok("chatroom_before"));
    let was = |f: &dyn Fn(&Capacity) -> String| {
        before.map_or(String::new(), |b| format!(" (before: {})", f(b)))
    };
    let want = |c: &Capacity| if quick { c.clients_target } else { 14_000 };
    let scaled = if quick { " (quick: scaled down)" } else { "" };
    check![out, "w3", w.w3, c =>
        format!("≥ {} idle clients with default settings{scaled}", fmt(want(c), 0)), format!("{}{}", fmt(c.connected, 0), was(&|b| fmt(b.connected, 0))), ok(c.connected >= want(c));
        "over the cap: every extra gets 503, /healthz 200, an early client still served, nobody dropped",
            format!("{}/{} refused, healthz {}, probe {}, dropped {}", c.over_cap_refused_503, c.over_cap_attempted, fmt(c.healthz_status, 0), c.probe_received, c.dropped_by_server),
            ok(c.over_cap_refused_503 == c.over_cap_attempted && c.healthz_status == Some(200) && c.probe_received && c.dropped_by_server == 0);
        "one thread per idle client: (threads with N clients − threads idle) ÷ N ≤ 1.05", format!("{}{}", fmt(c.threads_per_client, 3), was(&|b| fmt(b.threads_per_client, 3))), ok(c.threads_per_client <= 1.05);
        "server total per idle client (RSS + KernelStack + PageTables) ≤ 36 KiB",
            format!("{} KiB at {} clients{}", fmt(total_per_client(c), 1), fmt(c.memory_at, 0), was(&|b| format!("{} KiB at {}", fmt(total_per_client(b), 1), fmt(b.memory_at, 0)))),
            ok(total_per_client(c) <= 36.0 && c.memory_at > 0);
    ];
    check![out, "w4", w.w4, c =>
        "all welcomed within 2 s", format!("{} of {} in {} s", c.welcomed, c.clients, fmt(c.all_welcomed_s, 3)), ok(c.all_welcomed_s <= 2.0 && c.welcomed == c.clients);
    ];
    let slow = |c: &Traffic| c.slow.clone().unwrap_or_default();
    let after = |a: f64| format!(" after {} s", fmt(a, 1));
    let after = |c: &Traffic| slow(c).left_seen_after_s.map_or(String::new(), after);
    // Quick runs are shorter than the detection takes.
    let closed = |c: &Traffic| match slow(c).closed_by_server && slow(c).left_seen {
        true => Pass,
        false if quick => NotApplicable,
        false => Fail,
    };
    let p99 = |c: &Traffic| slow(c).latency_other_rooms.p99_us / 1000.0;
    check![out, "w5", w.w5, c =>
        "others' p99 within 2× of workload 2's", w2_p99.map_or("W2 did not run".into(), |b| format!("{} ms vs {} ms", fmt(p99(c), 3), fmt(b, 3))), w2_p99.map_or(NotApplicable, |b| ok(p99(c) <= 2.0 * b && c.slow.is_some()));
        "the stalled reader is closed (and the room told it left)", format!("closed {}, left seen {}{}", slow(c).closed_by_server, slow(c).left_seen, after(c)), closed(c);
        "server memory bounded (growth ≤ 64 MiB)", format!("{} MiB", fmt(slow(c).rss_kib_growth_max as f64 / 1024.0, 1)), ok(slow(c).rss_kib_growth_max <= 64 * 1024 && c.slow.is_some());
        "nothing lost by the others", fmt(c.lost, 0), ok(c.lost == 0);
    ];
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let limit = |c: &Churn| (0.005 * mean(&c.rss_kib_by_round)).max(64.0);
    check![out, "w6", w.w6, c =>
        "threads and fds back to baseline after each round, no client errors", format!("back {}, errors {}", c.all_back_to_baseline, c.errors), ok(c.all_back_to_baseline && c.errors == 0);
        format!("RSS does not grow round over round (slope from round {} ≤ 0.5% of RSS or 64 KiB per round)", c.rss_slope_from_round),
            format!("{:+.0} KiB/round (limit {:.0})", c.rss_slope_kib_per_round, limit(c)), ok(c.rss_slope_kib_per_round <= limit(c));
    ];
    let f = |c: &Soak| c.first_third.clone();
    let l = |c: &Soak| c.last_third.clone();
    let flat_all = |c: &Soak| {
        let (f, l) = (f(c), l(c));
        let counts = flat(f.threads, l.threads, FLAT_SLACK) && flat(f.fds, l.fds, FLAT_SLACK);
        f.samples > 0 && l.samples > 0 && counts && flat(f.rss_kib, l.rss_kib, FLAT_SLACK_KIB)
    };
    check![out, "w8", w.w8, c =>
        format!("threads, fds and RSS flat under churning bad clients: last third's mean ≤ first third's × {} + {FLAT_SLACK} (RSS: + {} MiB), after a warm-up", fmt(1.0 + FLAT_SHARE, 2), fmt(FLAT_SLACK_KIB / 1024.0, 0)),
            format!("threads {} → {}, fds {} → {}, RSS {} → {} MiB over {} s, {} clients", fmt(f(c).threads, 1), fmt(l(c).threads, 1), fmt(f(c).fds, 1), fmt(l(c).fds, 1), fmt(f(c).rss_kib / 1024.0, 2), fmt(l(c).rss_kib / 1024.0, 2), fmt(c.duration_s, 0), fmt(c.clients, 0)),
            match flat_all(c) { true => Pass, false if quick => NotApplicable, false => Fail };
        "after the churn: no connection thread left, fds back to baseline, /healthz 200, every normal client served",
            format!("back {} (connection threads {}, fds {} → {}), healthz {}, normal clients failed {}", c.back_to_baseline, c.connection_threads_after, c.baseline.fds, c.after.fds, fmt(c.healthz_status, 0), c.normal_errors),
            ok(c.back_to_baseline && c.healthz_status == Some(200) && c.normal_errors == 0);
    ];
    // A ratio check against the before build is failed, not skipped, when that build did not
    // run (it says why); a store-on check only runs with the store-on server.
    let with = |wl: &'a Option<Workload<Traffic>>, s: &str| {
        wl.as_ref().filter(|w| w.servers.contains_key(s))
    };
    for p in PAIRED {
        let wl = if p.0 == "w1" { &w.w1 } else { &w.w2 };
        let wl = if p.1 == "chatroom_before" {
            wl.as_ref()
        } else {
            with(wl, p.2)
        };
        out.extend(wl.map(|wl| paired_check(p, wl)));
    }
    let target = "store on: nothing lost, every message written, none dropped, store ok";
    for (id, wl) in [("w1", &w.w1), ("w2", &w.w2), ("w7", &w.w7)] {
        out.extend(with(wl, "chatroom_store").map(|wl| all_written(id, target, wl)));
    }
    out.extend(with(&w.w7, "chatroom_store").map(w7_check));
    if let Some(w9) = with(&w.w9, "chatroom_redis") {
        out.extend(cluster_checks(w9));
    }
    out
}

/// W9: two processes on one Redis against one process, in the same run.
fn cluster_checks(w: &Workload<Traffic>) -> [Check; 2] {
    let p99 = |s| w.ok(s).map(|t| t.latency.p99_us / 1000.0);
    let max = fmt(CLUSTER_P99_MS, 0);
    let target = format!("two processes on one Redis: p99 ≤ one process's + {max} ms (same run)");
    let (value, verdict) = match (p99("chatroom_redis"), p99("chatroom")) {
        (Some(two), Some(one)) => {
            let (a, b, d) = (fmt(two, 3), fmt(one, 3), two - one);
            let value = format!("{a} ms vs {b} ms ({d:+.3} ms)");
            (value, ok(d <= CLUSTER_P99_MS))
        }
        _ => ("no completed run of both".into(), Fail),
    };
    let lost = "two processes on one Redis: nothing lost";
    let lost = nothing_lost("w9", lost, w, "chatroom_redis");
    [check("w9", target, value, verdict), lost]
}

/// Whether every run of `server` completed and lost nothing: "0 in each of N runs", or each
/// run's lost deliveries.
fn nothing_lost(id: &'static str, target: &str, w: &Workload<Traffic>, server: &str) -> Check {
    let runs = w.runs(server);
    let clean = !runs.is_empty() && runs.iter().all(|r| r.ok().is_some_and(|t| t.lost == 0));
    let lost = |r: &Run<Traffic>| r.ok().map_or("no figures".into(), |t| fmt(t.lost, 0));
    let each: Vec<String> = runs.iter().map(lost).collect();
    let value = match clean {
        true => format!("0 in each of {} runs", runs.len()),
        false => format!("per run: {}", each.join(", ")),
    };
    check(id, target, value, ok(clean))
}

/// One [`PAIRED`] check.
fn paired_check(p: &Paired, w: &Workload<Traffic>) -> Check {
    let (id, base, other, row, lo, hi, means) = *p;
    let (o, b) = (label(other), label(base));
    let bound = bound(lo, hi);
    let target = format!("{row}: {o} ÷ {b} {bound} ({means}; median of paired runs)");
    let Some(row) = Traffic::rows(id).into_iter().find(|r| r.label == row) else {
        return check(id, target, "no such row in the table".into(), Fail);
    };
    let per = paired(w, base, other, &row);
    let (value, verdict) = match median_of(&per) {
        None if !w.servers.contains_key(base) => (format!("{base} did not run"), NotApplicable),
        None => ("no complete pair".into(), Fail),
        Some(x) => {
            let pairs: Vec<String> = per.iter().map(|x| fmt(*x, 3)).collect();
            let value = format!("{}× (pairs {})", fmt(x, 3), pairs.join(", "));
            (value, ok(x >= lo && x <= hi))
        }
    };
    check(id, target, value, verdict)
}

/// Whether every store-on run completed, lost nothing, wrote every message and dropped none.
fn all_written(id: &'static str, target: &str, w: &Workload<Traffic>) -> Check {
    let runs = w.runs("chatroom_store");
    let good = |r: &Traffic| {
        r.store.as_ref().is_some_and(|st| {
            let all = st.sent_by_load_generator == st.written_in_window;
            let clean = r.lost == 0 && r.clients_closed_early == 0 && st.dropped == 0;
            all && clean && st.drained && st.state == "ok"
        })
    };
    let bad = runs.iter().find(|run| !run.ok().is_some_and(good));
    let worst = bad.map_or(String::new(), |run| match run.ok() {
        Some(r) => {
            let st = store_words(r.store.as_ref());
            let (tag, lost, closed) = (&run.tag, r.lost, r.clients_closed_early);
            format!(" ({tag}: lost {lost}, closed {closed}, {st})")
        }
        None => format!(" ({}: no figures)", run.tag),
    });
    let m = w.ok("chatroom_store");
    let lost = fmt(m.map(|m| m.lost), 0);
    let st = store_words(m.and_then(|m| m.store.as_ref()));
    let text = format!("{} runs; median: lost {lost}, {st}{worst}", runs.len());
    check(id, target, text, ok(bad.is_none() && !runs.is_empty()))
}

fn store_words(st: Option<&Store>) -> String {
    st.map_or("no store figures".into(), |s| {
        let (w, n) = (
            fmt(s.written_in_window, 0),
            fmt(s.sent_by_load_generator, 0),
        );
        let d = fmt(s.dropped, 0);
        format!("written {w} of {n} sent, dropped {d}, state {}", s.state)
    })
}

/// W7: the store keeps up at full speed in every run.
fn w7_check(w: &Workload<Traffic>) -> Check {
    let runs = w.runs("chatroom_store");
    let stores: Vec<&Store> = runs.iter().filter_map(|r| r.ok()?.store.as_ref()).collect();
    let count = |f: &dyn Fn(&Store) -> bool| stores.iter().filter(|s| f(s)).count();
    let behind = count(&|s| s.written_per_s < KEEP_UP_SHARE * s.accepted_per_s);
    let dropping = count(&|s| s.dropped > 0);
    let slow_drain = count(&|s| s.drained_after_stop_s.is_none_or(|d| d > DRAIN_LIMIT_S));
    let n = stores.len();
    let keeps_up = n == runs.len() && n > 0 && behind + dropping + slow_drain == 0;
    let target = format!(
        "store keeps up at full speed: writes ≥ {}% of what comes in while sending, none dropped, unwritten back to 0 within {DRAIN_LIMIT_S} s of the end of sending",
        fmt(KEEP_UP_SHARE * 100.0, 0)
    );
    let value = match w.ok("chatroom_store").and_then(|m| m.store.as_ref()) {
        None => "no completed store-on run".to_string(),
        Some(st) => format!(
            "median {} accepted/s, {} written/s, back to 0 after {} ms, {} µs CPU per message; behind in {behind} of {n} runs, dropped messages in {dropping}, slow to drain in {slow_drain}",
            fmt(st.accepted_per_s, 0),
            fmt(st.written_per_s, 0),
            fmt(st.drained_after_stop_s.map(|x| x * 1000.0), 0),
            fmt(st.cpu_us_per_message, 2),
        ),
    };
    check("w7", target, value, ok(keeps_up))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{merge, Series, SCHEMA};
    use serde_json::json;

    /// The committed results: they must parse, as typed, whatever run wrote them.
    fn committed() -> Results {
        Results::parse(include_str!("../results.json")).expect("bench/results.json parses")
    }

    /// chatroom's runs of a workload, to edit.
    fn chatroom<T>(w: &mut Option<Workload<T>>) -> &mut Series<T> {
        server_runs(w.as_mut().unwrap(), "chatroom")
    }

    /// One server's runs of a workload, to edit.
    fn server_runs<'a, T>(w: &'a mut Workload<T>, server: &str) -> &'a mut Series<T> {
        w.servers.get_mut(server).unwrap()
    }

    #[test]
    fn a_renamed_field_or_another_schema_fails_to_parse() {
        let text = committed().to_json();
        let renamed = text.replacen("\"deliveries_per_s\"", "\"deliveries_per_sec\"", 1);
        assert!(Results::parse(&renamed)
            .unwrap_err()
            .contains("deliveries_per_s"));
        let old = text.replacen(SCHEMA, "chatroom-bench/2", 1);
        assert!(Results::parse(&old).unwrap_err().contains("schema"));
    }

    #[test]
    fn a_failing_check_is_reported_and_fails_the_suite() {
        let mut r = committed();
        let median = chatroom(&mut r.workloads.w1).median.as_mut().unwrap();
        median.result.as_mut().unwrap().server.cpu_us_per_delivery = 2.0;
        let checks = checks(&r);
        let target = |c: &&Check| c.target == "server CPU per delivery ≤ 1.0 µs";
        let c = checks.iter().find(target).unwrap();
        assert_eq!((c.verdict, c.value.as_str()), (Fail, "2.000 µs"));
        assert!(checks.iter().any(|c| c.verdict == Fail));
        let md = crate::report::markdown(&r, &checks, None);
        assert!(md.contains("| w1 | server CPU per delivery ≤ 1.0 µs | 2.000 µs | ❌ **fail** |"));
    }

    #[test]
    fn a_workload_whose_runs_all_failed_fails_and_a_missing_baseline_is_not_judged() {
        let mut r = committed();
        chatroom(&mut r.workloads.w4).median = None;
        let w1 = r.workloads.w1.as_mut().unwrap();
        w1.servers.remove("chatroom_before");
        let checks = checks(&r);
        let c = checks.iter().find(|c| c.workload == "w4").unwrap();
        assert_eq!(
            (c.target.as_str(), c.verdict),
            ("chatroom completes a run", Fail)
        );
        let before = |c: &&Check| c.target.contains("chatroom before");
        let before = checks.iter().find(before).unwrap();
        assert_eq!(before.verdict, NotApplicable);
    }

    #[test]
    fn two_processes_fail_on_one_lost_delivery_or_a_p99_over_2_ms_above_one() {
        let mut r = committed();
        // W2's runs stand in for W9's: memory only as one process, store on as two.
        let mut w9 = r.workloads.w2.clone().unwrap();
        let two = w9.servers.remove("chatroom_store").unwrap();
        w9.servers.insert("chatroom_redis".into(), two);
        let p99 = |w: &mut Workload<Traffic>, server: &str, us: f64| {
            let median = server_runs(w, server).median.as_mut().unwrap();
            median.result.as_mut().unwrap().latency.p99_us = us;
        };
        p99(&mut w9, "chatroom", 1573.0);
        p99(&mut w9, "chatroom_redis", 1573.0 + 1999.0);
        r.workloads.w9 = Some(w9);
        let of_w9 = |r: &Results| checks(r).into_iter().filter(|c| c.workload == "w9");
        let verdicts = |r: &Results| of_w9(r).map(|c| c.verdict).collect::<Vec<_>>();
        assert_eq!(verdicts(&r), [Pass, Pass]);
        let w9 = r.workloads.w9.as_mut().unwrap();
        // The median lost nothing; one run lost one delivery.
        let two = server_runs(w9, "chatroom_redis");
        two.runs[1].result.as_mut().unwrap().lost = 1;
        p99(w9, "chatroom_redis", 1573.0 + 2001.0);
        assert_eq!(verdicts(&r), [Fail, Fail]);
        let values: Vec<String> = of_w9(&r).map(|c| c.value).collect();
        assert_eq!(values[0], "3.574 ms vs 1.573 ms (+2.001 ms)");
        assert!(values[1].starts_with("per run: 0, 1, 0"), "{}", values[1]);
    }

    #[test]
    fn every_paired_check_names_a_row_of_its_table() {
        for p in PAIRED {
            assert!(Traffic::rows(p.0).iter().any(|r| r.label == p.3), "{p:?}");
        }
    }

    #[test]
    fn the_json_round_trips_and_tables_show_the_medians() {
        let r = committed();
        assert_eq!(Results::parse(&r.to_json()).unwrap(), r);
        let md = crate::report::markdown(&r, &checks(&r), None);
        let w1 = r.workloads.w1.as_ref().unwrap().ok("chatroom").unwrap();
        let row = format!("| deliveries/s | {} |", fmt(w1.deliveries_per_s, 0));
        assert!(md.contains(&row));
        assert!(md.contains("## W7 — Store throughput"));
    }

    #[test]
    fn filing_the_committed_runs_again_gives_the_committed_medians() {
        let all = serde_json::to_value(committed().workloads).unwrap();
        for (id, w) in all.as_object().unwrap().iter().filter(|w| !w.1.is_null()) {
            for (server, series) in w["servers"].as_object().unwrap() {
                let runs = series["runs"].as_array().unwrap().iter().map(|r| {
                    let raw = crate::suite::RawRun {
                        tag: r["tag"].as_str().unwrap().into(),
                        noise: serde_json::from_value(r["noise"].clone()).unwrap(),
                        disk_bytes: r["disk"]["total_bytes"].as_u64(),
                        result: r["result"]["Ok"]
                            .as_object()
                            .map(|o| json!(o))
                            .ok_or_else(|| r["result"]["Err"].to_string()),
                    };
                    crate::report::typed(id, raw).0
                });
                assert_eq!(
                    &crate::results::series(runs.collect()),
                    series,
                    "{id} {server}"
                );
            }
        }
    }

    #[test]
    fn numbers_missing_values_and_medians_format_one_way() {
        let big = (fmt(1489604.0, 0), fmt(-12345.0, 0), fmt(7000u64, 0));
        assert_eq!(big, ("1,489,604".into(), "-12,345".into(), "7000".into()));
        let small = (fmt(0.5364, 3), fmt(true, 0), fmt(None::<f64>, 2));
        assert_eq!(small, ("0.536".into(), "1".into(), "–".into()));
        let runs = [
            json!({"a": 1, "b": 1.5, "c": true}),
            json!({"a": 4, "b": 2.5, "c": false}),
            json!({"a": 2, "b": null, "c": true}),
        ];
        assert_eq!(
            merge(&runs.iter().collect::<Vec<_>>()),
            json!({"a": 2, "b": 2.0, "c": false})
        );
    }
}
