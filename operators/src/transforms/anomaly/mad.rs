//! The `mad` detector: distance from the median in median absolute deviations, robust to
//! the outliers it looks for.
//!
//! Over the last `window_rows` values of the series, the modified z-score of a value is
//! `0.6745 * (x - median) / MAD` (Iglewicz and Hoaglin); the value is an anomaly when the
//! series has at least `min_history` earlier values and `|modified z| > threshold`. When
//! more than half the window holds one value (MAD 0), the mean absolute deviation,
//! scaled by 1.2533 to match a normal spread, stands in. The score is
//! `erf(|modified z| / sqrt(2))`.

use std::collections::VecDeque;

use serde::Deserialize;

use super::{
    Detector, StateError, Verdict, check, load_state, normal_score, save_state,
    spread_threshold_problem,
};

/// Scales a median absolute deviation to a normal standard deviation (1 / 1.4826).
const MAD_TO_SIGMA: f64 = 0.6745;
/// Scales a mean absolute deviation to a normal standard deviation (sqrt(pi / 2)).
const MEAN_AD_TO_SIGMA: f64 = 1.253_314;

/// The `mad` section of an `anomaly` transform's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MadConfig {
    /// How many of the series' latest values the median and MAD are taken over.
    pub window_rows: usize,
    /// Earlier values a series needs before any of its rows can be an anomaly.
    pub min_history: usize,
    /// The modified z-score beyond which a value is an anomaly.
    pub threshold: f64,
}

impl Default for MadConfig {
    fn default() -> Self {
        MadConfig {
            window_rows: 100,
            min_history: 10,
            threshold: 3.5,
        }
    }
}

impl MadConfig {
    /// Every problem with the parameters, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.window_rows < 3 {
            problems.push((
                "window_rows",
                "window_rows must be at least 3 for a median to mean something".to_owned(),
            ));
        }
        if self.min_history < 3 || self.min_history > self.window_rows.max(3) {
            problems.push((
                "min_history",
                format!(
                    "min_history must be at least 3 and at most window_rows ({})",
                    self.window_rows
                ),
            ));
        }
        problems.extend(spread_threshold_problem(self.threshold));
        problems
    }
}

/// One series' window of values, kept both in arrival order (to know which leaves next)
/// and sorted (so the median is an index and the MAD a short walk outwards from it).
#[derive(Clone, Debug)]
pub struct Mad {
    window_rows: usize,
    min_history: usize,
    threshold: f64,
    arrivals: VecDeque<f64>,
    sorted: Vec<f64>,
}

impl Mad {
    /// A fresh series.
    pub fn new(config: &MadConfig) -> Self {
        Mad {
            window_rows: config.window_rows,
            min_history: config.min_history,
            threshold: config.threshold,
            arrivals: VecDeque::with_capacity(config.window_rows),
            sorted: Vec::with_capacity(config.window_rows),
        }
    }

    /// The median of a sorted, non-empty slice.
    fn median(sorted: &[f64]) -> f64 {
        let n = sorted.len();
        if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        }
    }

    /// The median of `|v - median|` over a sorted, non-empty slice. The distances grow
    /// outwards from the median on both sides, so they are two sorted runs, and the
    /// wanted one is found by binary search over how many of it come from the lower
    /// side: O(log n) per row instead of sorting n distances.
    fn median_absolute_deviation(sorted: &[f64], median: f64) -> f64 {
        let n = sorted.len();
        let (below, above) = sorted.split_at(sorted.partition_point(|v| *v < median));
        let lower = |i: usize| median - below[below.len() - 1 - i];
        let upper = |j: usize| above[j] - median;
        // The n/2 + 1 smallest distances are lower[..i] and upper[..taken - i]: the
        // first i at which taking one more from below would pass over an upper one.
        let taken = n / 2 + 1;
        let (mut lo, mut hi) = (taken.saturating_sub(above.len()), taken.min(below.len()));
        while lo < hi {
            let i = lo + (hi - lo) / 2;
            if lower(i) < upper(taken - i - 1) {
                lo = i + 1;
            } else {
                hi = i;
            }
        }
        let (i, j) = (lo, taken - lo);
        let last_lower = i.checked_sub(1).map(lower);
        let last_upper = j.checked_sub(1).map(upper);
        let kth = larger(last_lower, last_upper);
        if n % 2 == 1 {
            return kth;
        }
        // The distance before it: the larger of what is left when the kth is taken away.
        let previous = if last_lower.is_some_and(|l| l == kth) {
            larger(i.checked_sub(2).map(lower), last_upper)
        } else {
            larger(last_lower, j.checked_sub(2).map(upper))
        };
        (previous + kth) / 2.0
    }

    fn remember(&mut self, value: f64) {
        if self.arrivals.len() == self.window_rows
            && let Some(oldest) = self.arrivals.pop_front()
        {
            let at = self
                .sorted
                .partition_point(|v| v.total_cmp(&oldest).is_lt());
            if self
                .sorted
                .get(at)
                .is_some_and(|v| v.total_cmp(&oldest).is_eq())
            {
                self.sorted.remove(at);
            }
        }
        self.arrivals.push_back(value);
        let at = self.sorted.partition_point(|v| v.total_cmp(&value).is_lt());
        self.sorted.insert(at, value);
    }
}

/// The larger of the values present (0 when neither is).
fn larger(a: Option<f64>, b: Option<f64>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => a.max(b),
        (Some(v), None) | (None, Some(v)) => v,
        (None, None) => 0.0,
    }
}

impl Detector for Mad {
    fn observe(&mut self, _ts: i64, values: &[f64]) -> Verdict {
        let value = values[0];
        let verdict = if self.sorted.len() < self.min_history {
            Verdict::NORMAL
        } else {
            let median = Self::median(&self.sorted);
            let mad = Self::median_absolute_deviation(&self.sorted, median);
            let sigma = if mad > 0.0 {
                mad / MAD_TO_SIGMA
            } else {
                let mean_ad = self.sorted.iter().map(|v| (v - median).abs()).sum::<f64>()
                    / self.sorted.len() as f64;
                mean_ad * MEAN_AD_TO_SIGMA
            };
            normal_score(value - median, sigma, self.threshold)
        };
        self.remember(value);
        verdict
    }

    fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + (self.arrivals.capacity() + self.sorted.capacity()) * std::mem::size_of::<f64>()
    }

    /// Only the window in arrival order: the sorted copy is rebuilt from it.
    fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        save_state(&self.arrivals, out)
    }

    fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
        let (arrivals, rest): (VecDeque<f64>, _) = load_state(bytes)?;
        check(
            arrivals.len() <= self.window_rows,
            "the mad window holds more values than window_rows",
        )?;
        self.sorted.clear();
        self.sorted.extend(arrivals.iter().copied());
        self.sorted.sort_by(f64::total_cmp);
        self.arrivals.clear();
        self.arrivals.extend(arrivals);
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The median of a copy, sorted: the plain way.
    fn plain_median(values: &[f64]) -> f64 {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Mad::median(&sorted)
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(Mad::median(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(Mad::median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
    }

    #[test]
    fn the_search_from_the_median_finds_the_plain_mad() {
        let mut state = 12345u64;
        // Many sizes, each with few distinct values (ties) and with many.
        let sizes = (1..40usize).chain([99, 100, 101, 256]);
        for (n, distinct) in sizes.flat_map(|n| [(n, 5u64), (n, 50), (n, 1 << 20)]) {
            let values: Vec<f64> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((state >> 40) % distinct) as f64 / 4.0
                })
                .collect();
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let median = Mad::median(&sorted);
            let deviations: Vec<f64> = values.iter().map(|v| (v - median).abs()).collect();
            assert_eq!(
                Mad::median_absolute_deviation(&sorted, median),
                plain_median(&deviations),
                "{values:?}"
            );
        }
    }

    #[test]
    fn the_sorted_window_follows_arrivals() {
        let mut detector = Mad::new(&MadConfig {
            window_rows: 4,
            min_history: 3,
            threshold: 3.5,
        });
        for (i, v) in [5.0, 1.0, 5.0, 3.0, 2.0, 5.0].into_iter().enumerate() {
            detector.observe(i as i64, &[v]);
        }
        // The window holds the last four arrivals, 5, 3, 2, 5, sorted.
        assert_eq!(detector.sorted, [2.0, 3.0, 5.0, 5.0]);
        assert_eq!(detector.arrivals, [5.0, 3.0, 2.0, 5.0]);
    }

    #[test]
    fn an_outlier_does_not_hide_the_next_one() {
        let mut detector = Mad::new(&MadConfig::default());
        let mut flags = Vec::new();
        for i in 0..60 {
            let value = if i == 40 || i == 41 {
                100.0
            } else {
                10.0 + (i % 5) as f64 * 0.2
            };
            flags.push(detector.observe(i, &[value]).is_anomaly);
        }
        // The first outlier does not inflate the spread: the second is flagged too.
        assert!(flags[40] && flags[41]);
        assert_eq!(flags.iter().filter(|f| **f).count(), 2);
    }

    #[test]
    fn a_flat_window_falls_back_to_the_mean_absolute_deviation() {
        let mut detector = Mad::new(&MadConfig {
            window_rows: 10,
            min_history: 5,
            threshold: 3.5,
        });
        for (i, v) in [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 9.0].into_iter().enumerate() {
            detector.observe(i as i64, &[v]);
        }
        // MAD is 0 (six fives), the mean absolute deviation is not: 5.5 is normal.
        assert!(!detector.clone().observe(7, &[5.5]).is_anomaly);
        assert!(detector.observe(7, &[40.0]).is_anomaly);
    }

    #[test]
    fn bad_parameters_are_named() {
        let config = MadConfig {
            window_rows: 2,
            min_history: 1,
            threshold: f64::NAN,
        };
        let fields: Vec<&str> = config.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["window_rows", "min_history", "threshold"]);
    }
}
