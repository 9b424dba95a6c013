//! Latency histograms and small statistics helpers.

use crate::results::Latency;
use hdrhistogram::Histogram;

/// A latency histogram in nanoseconds (1 ns … 60 s, two significant figures: ~1% error).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("valid histogram bounds")
}

/// Records `ns`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.max(1));
}

/// p50/p90/p99/max in microseconds, plus the count (all 0 for an empty histogram).
pub fn latency(h: &Histogram<u64>) -> Latency {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    match h.is_empty() {
        true => Latency::default(),
        false => Latency {
            count: h.len(),
            p50_us: us(0.5),
            p90_us: us(0.9),
            p99_us: us(0.99),
            max_us: h.max() as f64 / 1000.0,
        },
    }
}

/// `b - a` for two optional readings.
pub fn delta(a: Option<f64>, b: Option<f64>) -> f64 {
    a.zip(b).map(|(a, b)| b - a).unwrap_or(0.0)
}

/// Median of a slice (average of the two middle values for even lengths).
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Rounds to `d` decimals (for readable JSON).
pub fn round(x: f64, d: i32) -> f64 {
    let p = 10f64.powi(d);
    (x * p).round() / p
}
