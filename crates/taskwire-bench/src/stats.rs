//! Latency histograms and the little arithmetic the reports need.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The largest latency recorded, in µs (one hour); longer ones are clamped so a
/// stuck request can never make `record` fail.
const MAX_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds (HDR, 3 significant digits).
#[derive(Debug, Clone)]
pub struct LatencyHist {
    hist: Histogram<u64>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    /// An empty histogram covering 1 µs ..= 1 h.
    pub fn new() -> Self {
        // Bounds and precision are constants that hdrhistogram accepts, so this
        // cannot fail; fall back to an auto-resizing histogram all the same.
        let hist = Histogram::new_with_bounds(1, MAX_US, 3)
            .or_else(|_| Histogram::new(3))
            .unwrap_or_else(|_| unreachable!("3 significant digits is always valid"));
        Self { hist }
    }

    /// Records one latency (clamped to 1 µs ..= 1 h).
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(MAX_US);
        self.hist.saturating_record(us.clamp(1, MAX_US));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &LatencyHist) {
        // Both histograms have the same bounds, so `add` cannot fail; if it ever
        // did, fall back to re-recording every value.
        if self.hist.add(&other.hist).is_err() {
            for v in other.hist.iter_recorded() {
                self.hist
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Percentiles in milliseconds, or `None` when empty.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.hist.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(LatencySummary {
            count: self.hist.len(),
            min_ms: ms(self.hist.min()),
            mean_ms: self.hist.mean() / 1000.0,
            p50_ms: ms(self.hist.value_at_quantile(0.50)),
            p90_ms: ms(self.hist.value_at_quantile(0.90)),
            p99_ms: ms(self.hist.value_at_quantile(0.99)),
            p999_ms: ms(self.hist.value_at_quantile(0.999)),
            max_ms: ms(self.hist.max()),
        })
    }
}

/// A latency distribution in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Smallest sample.
    pub min_ms: f64,
    /// Arithmetic mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

/// `a / b`, or `None` when `b` is zero or either is not finite.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    if b == 0.0 || !a.is_finite() || !b.is_finite() {
        None
    } else {
        Some(a / b)
    }
}

/// Least-squares slope of `ys` over `xs` (units of y per unit of x), `None` with
/// fewer than two distinct x values.
pub fn slope(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let n = xs.len().min(ys.len());
    if n < 2 {
        return None;
    }
    let mean_x = xs[..n].iter().sum::<f64>() / n as f64;
    let mean_y = ys[..n].iter().sum::<f64>() / n as f64;
    let mut num = 0.0;
    let mut den = 0.0;
    for i in 0..n {
        num += (xs[i] - mean_x) * (ys[i] - mean_y);
        den += (xs[i] - mean_x) * (xs[i] - mean_x);
    }
    if den == 0.0 {
        None
    } else {
        Some(num / den)
    }
}

/// The median of `values` (sorted copy), `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Milliseconds of a duration, as f64.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-9)
    }

    #[test]
    fn empty_histogram_has_no_summary() {
        assert!(LatencyHist::new().summary().is_none());
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut h = LatencyHist::new();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary().unwrap_or_else(|| unreachable!());
        assert_eq!(s.count, 10_000);
        // 3 significant digits: within 0.1 % of the exact quantile.
        assert!(close(s.p50_ms, 5.0, 0.002), "{s:?}");
        assert!(close(s.p99_ms, 9.9, 0.002), "{s:?}");
        assert!(close(s.p999_ms, 9.99, 0.002), "{s:?}");
        assert!(close(s.max_ms, 10.0, 0.002), "{s:?}");
        assert!(close(s.min_ms, 0.001, 0.002), "{s:?}");
        assert!(close(s.mean_ms, 5.0005, 0.002), "{s:?}");
    }

    #[test]
    fn extremes_are_clamped_not_lost() {
        let mut h = LatencyHist::new();
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(10 * 3600));
        let s = h.summary().unwrap_or_else(|| unreachable!());
        assert_eq!(s.count, 2);
        assert!(close(s.max_ms, 3_600_000.0, 0.002), "{s:?}");
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = LatencyHist::new();
        let mut b = LatencyHist::new();
        for _ in 0..10 {
            a.record(Duration::from_millis(1));
            b.record(Duration::from_millis(3));
        }
        a.merge(&b);
        assert_eq!(a.summary().map(|s| s.count), Some(20));
        let s = a.summary().unwrap_or_else(|| unreachable!());
        assert!(close(s.max_ms, 3.0, 0.002));
        assert!(close(s.min_ms, 1.0, 0.002));
    }

    #[test]
    fn ratio_slope_median() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
        let xs = [0.0, 1.0, 2.0, 3.0];
        let ys = [1.0, 3.0, 5.0, 7.0];
        assert_eq!(slope(&xs, &ys), Some(2.0));
        assert_eq!(slope(&[1.0], &[1.0]), None);
        assert_eq!(slope(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
