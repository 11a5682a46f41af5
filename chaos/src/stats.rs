//! Percentiles for reports.

use std::time::Duration;

use serde::Serialize;

/// Milliseconds at the median, the 99th percentile and the maximum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
    /// Number of samples.
    pub count: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (all zero when empty).
    pub fn of(samples: &[Duration]) -> Percentiles {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Self::of_ms(&mut ms)
    }

    /// Nearest-rank percentiles of millisecond values.
    pub fn of_ms(ms: &mut [f64]) -> Percentiles {
        if ms.is_empty() {
            return Percentiles::default();
        }
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        let round = |v: f64| (v * 1000.0).round() / 1000.0;
        Percentiles {
            p50: round(rank(0.50)),
            p90: round(rank(0.90)),
            p99: round(rank(0.99)),
            p999: round(rank(0.999)),
            max: round(ms[ms.len() - 1]),
            count: ms.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of_ms(&mut v);
        assert_eq!((p.p50, p.p99, p.max, p.count), (50.0, 99.0, 100.0, 100));
        assert_eq!(Percentiles::of_ms(&mut []), Percentiles::default());
        let mut one = [7.0];
        assert_eq!(Percentiles::of_ms(&mut one).p99, 7.0);
    }
}
