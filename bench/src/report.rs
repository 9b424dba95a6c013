//! Turning the suite's results into target checks and `BENCHMARKS.md` (the store-on comparisons
//! are in [`crate::storereport`]).

use crate::storereport;
use serde_json::{json, Value};
use std::fmt::Write;

/// Which way is better for a metric (for the ratio column).
#[derive(Clone, Copy, PartialEq)]
pub enum Better {
    Lower,
    Higher,
    Neither,
}

/// One figure of a table: where it is in a run's JSON, and how to show and compare it.
pub struct Row {
    pub label: &'static str,
    pub ptr: &'static str,
    pub scale: f64,
    pub decimals: usize,
    pub better: Better,
}

pub const fn row(
    label: &'static str,
    ptr: &'static str,
    scale: f64,
    decimals: usize,
    better: Better,
) -> Row {
    Row {
        label,
        ptr,
        scale,
        decimals,
        better,
    }
}

use Better::{Higher, Lower, Neither};

fn rows(id: &str) -> Vec<Row> {
    let mib = 1.0 / 1024.0;
    let ms = 1.0 / 1000.0;
    match id {
        "w1" => vec![
            row("deliveries/s", "/deliveries_per_s", 1.0, 0, Higher),
            row("latency p50 (ms)", "/latency/p50_us", ms, 2, Lower),
            row("latency p99 (ms)", "/latency/p99_us", ms, 2, Lower),
            row("latency max (ms)", "/latency/max_us", ms, 1, Lower),
            row(
                "**server CPU per delivery (µs)**",
                "/server/cpu_us_per_delivery",
                1.0,
                3,
                Lower,
            ),
            row(
                "server CPU (cores busy)",
                "/server/cpu_util",
                1.0,
                2,
                Neither,
            ),
            row(
                "load generator CPU per delivery (µs)",
                "/client/cpu_us_per_delivery",
                1.0,
                3,
                Neither,
            ),
            row(
                "load generator CPU (cores busy)",
                "/client/cpu_util",
                1.0,
                2,
                Neither,
            ),
            row("messages sent", "/sent", 1.0, 0, Neither),
            row("lost deliveries", "/lost", 1.0, 0, Lower),
            row("out-of-order deliveries", "/order_errors", 1.0, 0, Lower),
            row(
                "clients closed by the server",
                "/clients_closed_early",
                1.0,
                0,
                Lower,
            ),
            row("server threads", "/server/before/threads", 1.0, 0, Neither),
            row("server RSS max (MiB)", "/server/rss_kib_max", mib, 1, Lower),
            row(
                "other processes' CPU share (noise)",
                "/suite/other_cpu_share",
                1.0,
                2,
                Neither,
            ),
        ],
        "w2" => vec![
            row("messages sent/s", "/sent_per_s", 1.0, 0, Neither),
            row("deliveries/s", "/deliveries_per_s", 1.0, 0, Neither),
            row("latency p50 (ms)", "/latency/p50_us", ms, 3, Lower),
            row("latency p90 (ms)", "/latency/p90_us", ms, 3, Lower),
            row("**latency p99 (ms)**", "/latency/p99_us", ms, 3, Lower),
            row("latency max (ms)", "/latency/max_us", ms, 2, Lower),
            row("lost deliveries", "/lost", 1.0, 0, Lower),
            row(
                "server CPU per delivery (µs)",
                "/server/cpu_us_per_delivery",
                1.0,
                2,
                Lower,
            ),
            row("server CPU (cores busy)", "/server/cpu_util", 1.0, 3, Lower),
            row(
                "load generator CPU (cores busy)",
                "/client/cpu_util",
                1.0,
                3,
                Neither,
            ),
            row("server threads", "/server/before/threads", 1.0, 0, Neither),
            row("server RSS max (MiB)", "/server/rss_kib_max", mib, 1, Lower),
            row(
                "other processes' CPU share (noise)",
                "/suite/other_cpu_share",
                1.0,
                2,
                Neither,
            ),
        ],
        "w3" => vec![
            row("**clients connected**", "/connected", 1.0, 0, Higher),
            row("time to connect them all (s)", "/connect_s", 1.0, 2, Lower),
            row(
                "connects/s (64 at a time)",
                "/connects_per_s",
                1.0,
                0,
                Higher,
            ),
            row(
                "connect+welcome p99 (ms)",
                "/connect_latency/p99_us",
                ms,
                1,
                Lower,
            ),
            row(
                "server RSS idle (MiB)",
                "/server_before/rss_kib",
                mib,
                1,
                Lower,
            ),
            row(
                "server RSS with all clients (MiB)",
                "/server_full/rss_kib",
                mib,
                1,
                Lower,
            ),
            row(
                "**RSS per client (KiB)**",
                "/rss_kib_per_client",
                1.0,
                1,
                Lower,
            ),
            row(
                "RSS per client, slope after the first checkpoint (KiB)",
                "/rss_kib_per_client_slope",
                1.0,
                1,
                Lower,
            ),
            row(
                "server threads with all clients",
                "/server_full/threads",
                1.0,
                0,
                Lower,
            ),
            row("threads per client", "/threads_per_client", 1.0, 2, Lower),
            row(
                "server fds with all clients",
                "/server_full/fds",
                1.0,
                0,
                Lower,
            ),
            row("memory maps per client", "/maps_per_client", 1.0, 2, Lower),
            row(
                "server CPU to accept them (s)",
                "/server_cpu_s_connecting",
                1.0,
                2,
                Lower,
            ),
            row("over-cap attempts", "/over_cap/attempted", 1.0, 0, Neither),
            row(
                "over-cap refused with 503",
                "/over_cap/refused_503",
                1.0,
                0,
                Neither,
            ),
            row(
                "/healthz status afterwards",
                "/healthz_status",
                1.0,
                0,
                Neither,
            ),
            row(
                "early client got a new message (1 = yes)",
                "/probe_received",
                1.0,
                0,
                Neither,
            ),
            row("… within (ms)", "/probe_latency_ms", 1.0, 2, Lower),
            row(
                "clients dropped by the server",
                "/dropped_by_server",
                1.0,
                0,
                Lower,
            ),
        ],
        "w4" => vec![
            row("clients welcomed", "/welcomed", 1.0, 0, Higher),
            row(
                "**all welcomed after (s)**",
                "/all_welcomed_s",
                1.0,
                3,
                Lower,
            ),
            row("welcome p50 (ms)", "/welcome_latency/p50_us", ms, 1, Lower),
            row("welcome p99 (ms)", "/welcome_latency/p99_us", ms, 1, Lower),
            row("`joined` frames seen", "/joined_frames", 1.0, 0, Neither),
            row(
                "`joined` frames expected",
                "/joined_frames_expected",
                1.0,
                0,
                Neither,
            ),
            row(
                "every `joined` seen after (s)",
                "/all_joined_seen_s",
                1.0,
                3,
                Lower,
            ),
            row("server CPU (s)", "/server/cpu_s", 1.0, 2, Lower),
            row(
                "server threads after",
                "/server/after/threads",
                1.0,
                0,
                Neither,
            ),
            row(
                "server RSS after (MiB)",
                "/server/after/rss_kib",
                mib,
                1,
                Lower,
            ),
        ],
        "w5" => vec![
            row(
                "**p99, rooms without the stalled reader (ms)**",
                "/latency_other_rooms/p99_us",
                ms,
                3,
                Lower,
            ),
            row(
                "p50, rooms without the stalled reader (ms)",
                "/latency_other_rooms/p50_us",
                ms,
                3,
                Lower,
            ),
            row(
                "p99, the stalled reader's room (ms; 11 KiB frames)",
                "/latency_slow_room/p99_us",
                ms,
                2,
                Lower,
            ),
            row("lost deliveries (others)", "/lost", 1.0, 0, Lower),
            row(
                "others told it `left` (1 = yes)",
                "/slow/left_seen",
                1.0,
                0,
                Neither,
            ),
            row("… after (s)", "/slow/left_seen_after_s", 1.0, 2, Lower),
            row(
                "its connection ended by the server (1 = yes)",
                "/slow/closed_by_server",
                1.0,
                0,
                Neither,
            ),
            row("close code it got", "/slow/close_code", 1.0, 0, Neither),
            row(
                "server RSS growth, max during the run (MiB)",
                "/server/rss_kib_growth_max",
                mib,
                1,
                Lower,
            ),
            row("server CPU (cores busy)", "/server/cpu_util", 1.0, 3, Lower),
            row(
                "other processes' CPU share (noise)",
                "/suite/other_cpu_share",
                1.0,
                2,
                Neither,
            ),
        ],
        "w6" => vec![
            row(
                "**threads and fds back to baseline after every round (1 = yes)**",
                "/all_back_to_baseline",
                1.0,
                0,
                Neither,
            ),
            row("… judged on", "/judged_on", 1.0, 0, Neither),
            row("client errors", "/errors", 1.0, 0, Lower),
            row("baseline threads", "/baseline/threads", 1.0, 0, Neither),
            row("baseline fds", "/baseline/fds", 1.0, 0, Neither),
            row(
                "RSS growth, round 2 → last (MiB)",
                "/rss_growth_kib_round2_to_last",
                mib,
                2,
                Lower,
            ),
            row(
                "RSS trend from round 3 (KiB per round)",
                "/rss_slope_kib_per_round",
                1.0,
                0,
                Neither,
            ),
            row(
                "connect+welcome p99 (ms)",
                "/connect_latency/p99_us",
                ms,
                1,
                Lower,
            ),
            row(
                "server CPU for all rounds (s)",
                "/server_cpu_s",
                1.0,
                2,
                Lower,
            ),
            row("wall time (s)", "/wall_s", 1.0, 1, Lower),
        ],
        _ => Vec::new(),
    }
}

pub fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => v.as_f64(),
    }
}

pub fn fmt_num(x: f64, d: usize) -> String {
    let s = format!("{x:.d$}");
    // Thousands separators for big integers only.
    if d == 0 && x.abs() >= 10000.0 {
        let neg = s.starts_with('-');
        let digits: Vec<char> = s.trim_start_matches('-').chars().collect();
        let mut out = String::new();
        for (i, c) in digits.iter().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(*c);
        }
        return if neg { format!("-{out}") } else { out };
    }
    s
}

pub fn median<'a>(r: &'a Value, id: &str, server: &str) -> &'a Value {
    &r["workloads"][id][server]["median"]
}

/// One line per run for the suite's progress output.
pub fn one_line(id: &str, v: &Value) -> String {
    if let Some(e) = v.get("error") {
        return format!("ERROR {e}");
    }
    let g = |p: &str| {
        v.pointer(p)
            .and_then(num)
            .map(|x| fmt_num(x, 2))
            .unwrap_or_else(|| "-".into())
    };
    let line = match id {
        "w1" => format!(
            "{} deliveries/s, {} µs server CPU/delivery, p99 {} µs, lost {}",
            g("/deliveries_per_s"),
            g("/server/cpu_us_per_delivery"),
            g("/latency/p99_us"),
            g("/lost")
        ),
        "w2" => format!(
            "p99 {} µs, max {} µs, lost {}",
            g("/latency/p99_us"),
            g("/latency/max_us"),
            g("/lost")
        ),
        "w3" => format!(
            "{} connected, {} KiB/client, {} refused 503, healthz {}",
            g("/connected"),
            g("/rss_kib_per_client"),
            g("/over_cap/refused_503"),
            g("/healthz_status")
        ),
        "w4" => format!("{} welcomed in {} s", g("/welcomed"), g("/all_welcomed_s")),
        "w5" => format!(
            "others' p99 {} µs, slow closed {}, left seen after {} s",
            g("/latency_other_rooms/p99_us"),
            g("/slow/closed_by_server"),
            g("/slow/left_seen_after_s")
        ),
        "w6" => format!(
            "back to baseline {}, errors {}, RSS growth {} KiB",
            g("/all_back_to_baseline"),
            g("/errors"),
            g("/rss_growth_kib_round2_to_last")
        ),
        "w7" => format!(
            "{} messages/s, {} µs server CPU/message, p99 {} µs, lost {}",
            g("/sent_per_s"),
            g("/server/cpu_us_per_delivery"),
            g("/latency/p99_us"),
            g("/lost")
        ),
        _ => String::new(),
    };
    match storereport::one_line(v) {
        Some(st) => format!("{line}; {st}"),
        None => line,
    }
}

pub fn check(workload: &str, target: &str, value: String, pass: Option<bool>) -> Value {
    json!({"workload": workload, "target": target, "value": value, "pass": pass})
}

/// The targets, judged on chatroom's medians.
pub fn checks(r: &Value) -> Value {
    let quick = r["quick"].as_bool().unwrap_or(false);
    let mut out = Vec::new();
    let has = |id: &str| !median(r, id, "chatroom").is_null();
    let f = |id: &str, s: &str, p: &str| median(r, id, s).pointer(p).and_then(num);
    if has("w1") {
        let c = f("w1", "chatroom", "/server/cpu_us_per_delivery");
        let n = f("w1", "node", "/server/cpu_us_per_delivery");
        out.push(check(
            "w1",
            "server CPU per delivery ≤ 1.0 µs",
            c.map(|c| format!("{c:.3} µs")).unwrap_or("-".into()),
            c.map(|c| c <= 1.0),
        ));
        let ratio = match (c, n) {
            (Some(c), Some(n)) if c > 0.0 => Some(n / c),
            _ => None,
        };
        out.push(check(
            "w1",
            "≥ 5× less server CPU per delivery than Node",
            ratio.map(|x| format!("{x:.1}×")).unwrap_or("-".into()),
            ratio.map(|x| x >= 5.0),
        ));
        let lost = f("w1", "chatroom", "/lost");
        let closed = f("w1", "chatroom", "/clients_closed_early");
        out.push(check(
            "w1",
            "nothing lost, nobody dropped",
            format!(
                "lost {}, dropped {}",
                lost.map(|x| fmt_num(x, 0)).unwrap_or("-".into()),
                closed.map(|x| fmt_num(x, 0)).unwrap_or("-".into())
            ),
            lost.zip(closed).map(|(l, c)| l == 0.0 && c == 0.0),
        ));
    }
    if has("w2") {
        let p99 = f("w2", "chatroom", "/latency/p99_us");
        out.push(check(
            "w2",
            "p99 ≤ 3 ms",
            p99.map(|x| format!("{:.3} ms", x / 1000.0))
                .unwrap_or("-".into()),
            p99.map(|x| x <= 3000.0),
        ));
        let lost = f("w2", "chatroom", "/lost");
        out.push(check(
            "w2",
            "nothing lost",
            lost.map(|x| fmt_num(x, 0)).unwrap_or("-".into()),
            lost.map(|x| x == 0.0),
        ));
    }
    if has("w3") {
        let want = if quick {
            f("w3", "chatroom", "/clients_target").unwrap_or(7000.0)
        } else {
            7000.0
        };
        let conn = f("w3", "chatroom", "/connected");
        out.push(check(
            "w3",
            &format!(
                "≥ {} concurrent clients{}",
                fmt_num(want, 0),
                if quick { " (quick: scaled down)" } else { "" }
            ),
            conn.map(|x| fmt_num(x, 0)).unwrap_or("-".into()),
            conn.map(|x| x >= want),
        ));
        let rss = f("w3", "chatroom", "/rss_kib_per_client");
        out.push(check(
            "w3",
            "≤ 24 KiB RSS per idle client",
            rss.map(|x| format!("{x:.1} KiB")).unwrap_or("-".into()),
            rss.map(|x| x <= 24.0),
        ));
        let att = f("w3", "chatroom", "/over_cap/attempted").unwrap_or(0.0);
        let refused = f("w3", "chatroom", "/over_cap/refused_503");
        let health = f("w3", "chatroom", "/healthz_status");
        let probe = f("w3", "chatroom", "/probe_received");
        let dropped = f("w3", "chatroom", "/dropped_by_server");
        let ok = refused.map(|x| x == att) == Some(true)
            && health == Some(200.0)
            && probe == Some(1.0)
            && dropped == Some(0.0);
        out.push(check(
            "w3",
            "cap refusal clean: every extra gets 503, /healthz 200, an early client still served",
            format!(
                "{}/{} refused, healthz {}, probe {}, dropped {}",
                refused.map(|x| fmt_num(x, 0)).unwrap_or("-".into()),
                fmt_num(att, 0),
                health.map(|x| fmt_num(x, 0)).unwrap_or("-".into()),
                if probe == Some(1.0) {
                    "received"
                } else {
                    "MISSING"
                },
                dropped.map(|x| fmt_num(x, 0)).unwrap_or("-".into())
            ),
            Some(ok),
        ));
    }
    if has("w4") {
        let all = f("w4", "chatroom", "/all_welcomed_s");
        let welcomed = f("w4", "chatroom", "/welcomed");
        let n = f("w4", "chatroom", "/clients");
        out.push(check(
            "w4",
            "all welcomed within 2 s",
            format!(
                "{} of {} in {} s",
                welcomed.map(|x| fmt_num(x, 0)).unwrap_or("-".into()),
                n.map(|x| fmt_num(x, 0)).unwrap_or("-".into()),
                all.map(|x| format!("{x:.3}")).unwrap_or("-".into())
            ),
            match (all, welcomed, n) {
                (Some(a), Some(w), Some(n)) => Some(a <= 2.0 && w == n),
                _ => None,
            },
        ));
    }
    if has("w5") {
        let p99 = f("w5", "chatroom", "/latency_other_rooms/p99_us");
        let base = f("w2", "chatroom", "/latency/p99_us");
        out.push(check(
            "w5",
            "others' p99 within 2× of workload 2's",
            format!(
                "{} ms vs {} ms",
                p99.map(|x| format!("{:.3}", x / 1000.0))
                    .unwrap_or("-".into()),
                base.map(|x| format!("{:.3}", x / 1000.0))
                    .unwrap_or("-".into())
            ),
            p99.zip(base).map(|(a, b)| a <= 2.0 * b),
        ));
        let closed = f("w5", "chatroom", "/slow/closed_by_server");
        let left = f("w5", "chatroom", "/slow/left_seen");
        let after = f("w5", "chatroom", "/slow/left_seen_after_s");
        out.push(check(
            "w5",
            "the stalled reader is closed (and the room told it left)",
            format!(
                "closed {}, left seen {}{}",
                closed == Some(1.0),
                left == Some(1.0),
                after
                    .map(|a| format!(" after {a:.1} s"))
                    .unwrap_or_default()
            ),
            if closed == Some(1.0) && left == Some(1.0) {
                Some(true)
            } else if quick {
                None // quick runs are shorter than the detection takes
            } else {
                Some(false)
            },
        ));
        let growth = f("w5", "chatroom", "/server/rss_kib_growth_max");
        out.push(check(
            "w5",
            "server memory bounded (growth ≤ 64 MiB)",
            growth
                .map(|g| format!("{:.1} MiB", g / 1024.0))
                .unwrap_or("-".into()),
            growth.map(|g| g <= 65536.0),
        ));
        let lost = f("w5", "chatroom", "/lost");
        out.push(check(
            "w5",
            "nothing lost by the others",
            lost.map(|x| fmt_num(x, 0)).unwrap_or("-".into()),
            lost.map(|x| x == 0.0),
        ));
    }
    if has("w6") {
        let back = f("w6", "chatroom", "/all_back_to_baseline");
        let errors = f("w6", "chatroom", "/errors");
        out.push(check(
            "w6",
            "threads and fds back to baseline after each round, no client errors",
            format!(
                "back {}, errors {}",
                back == Some(1.0),
                errors.map(|x| fmt_num(x, 0)).unwrap_or("-".into())
            ),
            Some(back == Some(1.0) && errors == Some(0.0)),
        ));
        let slope = f("w6", "chatroom", "/rss_slope_kib_per_round");
        let from = f("w6", "chatroom", "/rss_slope_from_round").unwrap_or(3.0);
        let rss = &median(r, "w6", "chatroom")["rss_kib_by_round"];
        let vals: Vec<f64> = rss
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .collect();
        let mean = if vals.is_empty() {
            0.0
        } else {
            vals.iter().sum::<f64>() / vals.len() as f64
        };
        let limit = (0.005 * mean).max(64.0);
        out.push(check(
            "w6",
            &format!("RSS does not grow round over round (slope from round {from:.0} ≤ 0.5% of RSS or 64 KiB per round)"),
            slope
                .map(|x| format!("{x:+.0} KiB/round (limit {limit:.0})"))
                .unwrap_or("-".into()),
            slope.map(|x| x <= limit),
        ));
    }
    out.extend(storereport::checks(r));
    Value::Array(out)
}

/// A figure as shown (or "–"), and its value.
pub fn cell(v: &Value, r: &Row) -> (String, Option<f64>) {
    match v.pointer(r.ptr) {
        Some(Value::String(s)) => (s.clone(), None),
        Some(x) => match num(x) {
            Some(n) => (fmt_num(n * r.scale, r.decimals), Some(n * r.scale)),
            None => ("–".into(), None),
        },
        None => ("–".into(), None),
    }
}

fn ratio(r: &Row, c: Option<f64>, n: Option<f64>) -> String {
    match (r.better, c, n) {
        (Lower, Some(c), Some(n)) if c > 0.0 && n > 0.0 => format!("{:.2}×", n / c),
        (Higher, Some(c), Some(n)) if c > 0.0 && n > 0.0 => format!("{:.2}×", c / n),
        _ => String::new(),
    }
}

pub fn get_str(v: &Value, p: &str) -> String {
    match v.pointer(p) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "?".into(),
        Some(x) => x.to_string(),
    }
}

/// The whole BENCHMARKS.md.
pub fn markdown(r: &Value, notes: Option<&str>) -> String {
    let mut s = String::new();
    let quick = r["quick"].as_bool().unwrap_or(false);
    let m = &r["machine"];
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `{}` (`bench/run.sh{}`) on {}: {} repetition{} of each workload{}, medians shown; \
         {:.0} s in all. Raw figures, every run: [`{}`]({}).{}\n",
        if quick { "make bench-quick" } else { "make bench" },
        if quick { " --quick" } else { "" },
        get_str(r, "/generated"),
        r["reps"],
        if r["reps"].as_u64() == Some(1) { "" } else { "s" },
        match r["store_reps"].as_u64() {
            Some(n) if Some(n) > r["reps"].as_u64() =>
                format!(" ({n} for chatroom memory-only and store-on in W1 and W2, whose store check is a ratio of paired runs)"),
            _ => String::new(),
        },
        r["total_s"].as_f64().unwrap_or(0.0),
        get_str(r, "/json_link"),
        get_str(r, "/json_link"),
        if quick { " **Quick run: smaller and shorter than the real workloads; use `make bench` for figures to quote.**" } else { "" },
    );
    let _ = writeln!(s, "## Targets (chatroom)\n");
    let _ = writeln!(s, "| workload | target | measured | |\n|---|---|---|---|");
    for c in r["checks"].as_array().into_iter().flatten() {
        let pass = match c["pass"].as_bool() {
            Some(true) => "✅ pass",
            Some(false) => "❌ **fail**",
            None => "n/a",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            get_str(c, "/workload"),
            get_str(c, "/target"),
            get_str(c, "/value"),
            pass
        );
    }
    let _ = writeln!(s, "\n## Machine\n");
    let _ = writeln!(
        s,
        "- {} cores ({}), {} GiB, Linux {}; RLIMIT_NOFILE {}, vm.max_map_count {}, pid_max {}\n\
         - {}; Node {} with ws {}\n- chatroom at git {}{}",
        m["nproc"],
        get_str(m, "/cpu_model"),
        m["mem_gib"],
        get_str(m, "/kernel"),
        get_str(m, "/rlimit_nofile"),
        get_str(m, "/vm_max_map_count"),
        get_str(m, "/pid_max"),
        get_str(m, "/rustc"),
        get_str(m, "/node"),
        get_str(m, "/ws_package"),
        get_str(m, "/git_rev"),
        if m["git_dirty"].as_bool() == Some(true) {
            " (with uncommitted changes in src/)"
        } else {
            ""
        },
    );
    for srv in r["servers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "- `{}`: `{}`{}",
            get_str(srv, "/name"),
            get_str(srv, "/command"),
            if get_str(srv, "/name") == "chatroom_store" {
                format!(
                    " (DIR: a fresh directory under `{}` for each run, removed after it)",
                    get_str(r, "/store_data_root")
                )
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(s, "\n## Method\n");
    let pinned: Vec<&str> = r["pinned"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if pinned.is_empty() {
        let _ = writeln!(
            s,
            "- **Not pinned:** servers and the load generator share both cores in every workload."
        );
    } else {
        let _ = writeln!(
            s,
            "- **Pinned in {}:** the server runs on CPU 0 (`taskset -c 0`) and the load generator on CPU 1, so \
             neither steals the other's core and each server gets exactly one core (Node uses one anyway; chatroom's \
             threads share it), as in the design notes' fan-out measurements. The other workloads run unpinned, as a \
             deployment would (`--pin-all` / `--no-pin` change this).",
            pinned.join(", ").to_uppercase()
        );
    }
    let _ = writeln!(s, "{METHOD}");
    for id in IDS {
        let w = &r["workloads"][id];
        if w.is_null() {
            continue;
        }
        let c = median(r, id, "chatroom");
        let n = median(r, id, "node");
        let _ = writeln!(s, "## {} — {}\n", id.to_uppercase(), get_str(w, "/title"));
        let _ = writeln!(
            s,
            "`chatroom-bench {}`{}{}\n",
            get_str(w, "/command"),
            match w["chatroom_flags"].as_str() {
                Some(f) if !f.is_empty() => format!(" + chatroom: `{f}`"),
                _ => String::new(),
            },
            match w["node_flags"].as_str() {
                Some(f) if !f.is_empty() => format!(" + node: `{f}`"),
                _ => String::new(),
            }
        );
        if let Some(f) = w["chatroom_server_flags"]
            .as_str()
            .filter(|f| !f.is_empty())
        {
            let _ = writeln!(s, "chatroom started with `{f}`.\n");
        }
        // A workload without the Node peer (W7) has only its store-on table, below.
        let with_node = !w["node"].is_null();
        if with_node {
            let _ = writeln!(
                s,
                "| metric | chatroom | node (ws) | chatroom ahead by |\n|---|---:|---:|---:|"
            );
        }
        for row in rows(id).into_iter().filter(|_| with_node) {
            let (cs, cv) = cell(c, &row);
            let (ns, nv) = cell(n, &row);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                row.label,
                cs,
                ns,
                ratio(&row, cv, nv)
            );
        }
        let done: Vec<String> = SERVERS
            .iter()
            .filter(|srv| !w[**srv].is_null())
            .map(|srv| format!("{srv} {}", w[*srv]["ok_runs"].as_u64().unwrap_or(0)))
            .collect();
        let _ = writeln!(
            s,
            "{}Runs that completed: {}.",
            if with_node { "\n" } else { "" },
            done.join(", ")
        );
        for srv in SERVERS {
            for run in w[srv]["runs"].as_array().into_iter().flatten() {
                if let Some(e) = run.get("error") {
                    let _ = writeln!(s, "- {srv} run {}: error {e}", get_str(run, "/suite/tag"));
                }
                if let Some(samples) = run["error_samples"].as_array().filter(|a| !a.is_empty()) {
                    let _ = writeln!(
                        s,
                        "- {srv} {}: client errors, e.g. `{}`",
                        get_str(run, "/suite/tag"),
                        samples[0].as_str().unwrap_or("").replace('`', "'")
                    );
                }
            }
        }
        let _ = writeln!(s);
        extra_section(&mut s, id, r);
        storereport::section(&mut s, id, r);
    }
    noise_section(&mut s, r);
    if let Some(n) = notes {
        let _ = writeln!(s, "{}", n.trim_end());
    }
    s
}

fn extra_section(s: &mut String, id: &str, r: &Value) {
    match id {
        "w3" => {
            let c = median(r, "w3", "chatroom");
            if !c["checkpoints"].is_null() {
                let _ = writeln!(s, "Server growth while connecting (chatroom | node):\n");
                let _ = writeln!(s, "| clients | chatroom RSS (MiB) | threads | fds | node RSS (MiB) | node fds |\n|---:|---:|---:|---:|---:|---:|");
                let n = median(r, "w3", "node");
                for (i, cp) in c["checkpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let np = &n["checkpoints"][i];
                    let mib = |v: &Value| {
                        v.as_f64()
                            .map(|x| format!("{:.1}", x / 1024.0))
                            .unwrap_or("–".into())
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} |",
                        cp["clients"],
                        mib(&cp["rss_kib"]),
                        cp["threads"],
                        cp["fds"],
                        mib(&np["rss_kib"]),
                        np["fds"]
                    );
                }
                let _ = writeln!(s);
            }
            if let Some(groups) = c["smaps"]["anon_groups"].as_array() {
                let _ = writeln!(
                    s,
                    "### Where chatroom's per-client memory goes (measured)\n"
                );
                let _ = writeln!(s,
                    "From `/proc/PID/smaps` before and after connecting the clients. Anonymous mappings are grouped by \
                     permissions and size: thread stacks, signal stacks and guard pages each have one size, so a group whose \
                     count grows by about one per client is a per-client mapping, and its resident pages per client are \
                     measured. Memory that malloc hands out (tungstenite buffers, channel slots, `Arc`s, room state) lives in \
                     malloc's arenas: the main `[heap]` and the 64 MiB per-thread arenas (the `rw-p`/`---p` groups that do not \
                     grow by count).\n");
                let _ = writeln!(s, "| mapping (perms, size) | count before → after | RSS per client (KiB) |\n|---|---:|---:|");
                for g in groups {
                    let _ = writeln!(
                        s,
                        "| `{}` {} KiB | {} → {} | {:.2} |",
                        get_str(g, "/perms"),
                        g["size_kib"],
                        g["count_before"],
                        g["count_after"],
                        g["rss_kib_per_client"].as_f64().unwrap_or(0.0)
                    );
                }
                let sm = &c["smaps"];
                let _ = writeln!(
                    s,
                    "\nPer client: **{:.2} KiB in mappings that come one or more per client** (thread stacks; \
                     signal stacks and guard pages are mapped but not resident), **{:.2} KiB in the other anonymous \
                     mappings** (malloc's per-thread arenas), {:.2} KiB in the `[heap]` (main arena), {:.2} KiB in all \
                     named mappings (binary, libraries, `[heap]`). Total RSS per client: {} KiB; memory maps per \
                     client: {}.\n",
                    sm["per_client_mappings_rss_kib_per_client"].as_f64().unwrap_or(0.0),
                    sm["other_anon_rss_kib_per_client"].as_f64().unwrap_or(0.0),
                    sm["brk_heap_rss_kib_per_client"].as_f64().unwrap_or(0.0),
                    sm["named_rss_kib_per_client"].as_f64().unwrap_or(0.0),
                    c["rss_kib_per_client"],
                    c["maps_per_client"]
                );
            }
        }
        "w6" => {
            let c = median(r, "w6", "chatroom");
            let n = median(r, "w6", "node");
            if let Some(rounds) = c["per_round"].as_array() {
                let _ = writeln!(s, "Per round (median over repetitions):\n");
                let _ = writeln!(s, "| round | chatroom peak threads | connection threads after | all threads after | fds after | RSS after (MiB) | settle (ms) | node threads after | node fds after | node RSS after (MiB) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
                for (i, rd) in rounds.iter().enumerate() {
                    let nr = &n["per_round"][i];
                    let mib = |v: &Value| {
                        v.as_f64()
                            .map(|x| format!("{:.1}", x / 1024.0))
                            .unwrap_or("–".into())
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        rd["round"],
                        rd["peak"]["threads"],
                        rd["connection_threads"],
                        rd["threads"],
                        rd["fds"],
                        mib(&rd["rss_kib"]),
                        rd["settle_ms"],
                        nr["threads"],
                        nr["fds"],
                        mib(&nr["rss_kib"])
                    );
                }
                let _ = writeln!(s);
            }
        }
        _ => {}
    }
}

fn noise_section(s: &mut String, r: &Value) {
    let _ = writeln!(s, "## Noise\n");
    let _ = writeln!(s,
        "This machine is shared: other builds and test suites may run during the benchmark. For each run the suite \
         records the 1-minute load average before it and the CPU that every *other* process used while it ran \
         (`/proc/stat` busy time minus the server's and the load generator's CPU), as a share of the machine. \
         CPU per delivery is the steadiest figure under such noise; latency and throughput suffer first.\n");
    let _ = writeln!(
        s,
        "| run | load avg before | other processes' CPU share | wall (s) |\n|---|---:|---:|---:|"
    );
    for id in IDS {
        for srv in SERVERS {
            for run in r["workloads"][id][srv]["runs"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let g = |p: &str| {
                    run.pointer(p)
                        .and_then(Value::as_f64)
                        .map(|x| format!("{x:.2}"))
                        .unwrap_or("–".into())
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    get_str(run, "/suite/tag"),
                    g("/suite/loadavg_1m_before"),
                    g("/suite/other_cpu_share"),
                    g("/suite/wall_s")
                );
            }
        }
    }
    let _ = writeln!(s);
}

/// Every workload, in report order.
const IDS: [&str; 7] = ["w1", "w2", "w3", "w4", "w5", "w6", "w7"];

/// Every server variant, in report order.
const SERVERS: [&str; 3] = ["chatroom", "chatroom_store", "node"];

const METHOD: &str = "\
- `bench/run.sh` builds chatroom and the load generator in release mode, installs the Node peer's locked \
  dependencies (`npm ci`), and runs `chatroom-bench suite`. For every run of every workload it starts a **fresh \
  server** on port 0 (chatroom: `--rate-limit off --log-level warn --data none`, i.e. history in memory only, \
  default settings otherwise; Node peer: \
  `bench/peers/node-ws/server.js`, same contract, each broadcast serialized once), reads the bound port from its \
  first stdout line, runs the workload as a child process, and stops the server with SIGTERM (SIGKILL after 5 s) by \
  pid. Runs alternate between the servers so that noise hits both alike; the table shows the median of the runs.
- The load generator (`bench/`, tokio with 2 worker threads, tokio-tungstenite) holds every client as a task, \
  never a thread. A message's text is `b:<sender>:<seq>:<send time in ns>`; a receiver finds `\"text\":\"b:` in the \
  frame and reads three integers, so latency is send → delivery at each receiver, on one monotonic clock. Every \
  receiver must get every message of its room: lost = expected − received, per receiver, after a drain of up to 5 s.
- Server CPU is `utime + stime` of `/proc/PID/stat` (all threads, exited ones included) over the measurement window; \
  memory, threads and fds come from `/proc/PID/status` and `/proc/PID/fd`. The load generator reports its own CPU \
  the same way, so one can see which side was saturated.
- W1: 1 room, 100 clients, 10 of them senders, closed loop: each sender keeps at most 8 of its own messages \
  un-echoed. W2: 20 rooms × 20 clients, 2 senders per room at 20 messages/s each, open loop. W3: idle clients in \
  rooms of 100, opened 64 at a time, up to chatroom's default cap of 7,000, then 500 more; `/healthz`, then a \
  message from client 1 must reach client 0. The Node peer has no cap: same N, no 503 step. W4: 1,000 clients \
  connect and say hello at once to one room. W5: W2 plus one client that sends hello and never reads again; its \
  room's messages carry 3,900 extra `€` (≈ 11.7 KB frames) so that the kernel buffers between it and the server \
  fill within seconds rather than minutes. W6: rounds of 1,000 clients (rooms of 100, 200 connecting at once) that \
  each say one message, wait for its echo and close; after each round the suite waits up to 10 s for the server's \
  threads and fds to return to the idle baseline.
- **Store on** (`chatroom_store`, W1, W2 and W7): the same chatroom binary with `--data DIR` instead of \
  `--data none`, DIR a fresh directory under the temp dir (same disk as `/tmp`) created for the run and removed \
  after it; default `--retain`. In every repetition the memory-only and store-on runs go back to back, in \
  alternating order, so that noise hits both alike. \"store ÷ memory\" is the median over repetitions of the \
  ratio within each pair. The store's cost: CPU of the server's thread named `store` (`utime + stime` of \
  `/proc/PID/task/TID/stat`, cross-checked with `schedstat`'s nanoseconds) from the start of sending until \
  `/healthz` reports `unwritten` = 0 after the last delivery, divided by the messages written in that window \
  (the delta of `store.written`). Accepted = `written + unwritten + dropped`.
- W7: 100 rooms of one client each, every client a closed-loop sender (8 in flight), rate limit off, so the \
  server takes messages as fast as it can with the least fan-out: what the store must keep up with.
- \"chatroom ahead by\" is node ÷ chatroom for lower-is-better figures and chatroom ÷ node for higher-is-better \
  ones: above 1× chatroom is ahead.
";
