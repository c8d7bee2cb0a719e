//! The `zscore` detector: how many standard deviations a value lies from the mean of the
//! series' earlier values.
//!
//! A row is an anomaly when its series has at least `min_history` earlier values and
//! `|x - mean(earlier)| > threshold * stddev_pop(earlier)`. The earlier values are all of
//! them by default, or the last `window_rows` values, or those of the last
//! `window_duration` of event time. The score is `erf(|z| / sqrt(2))`: the probability
//! that a normal value lies closer to the mean, so 0 at the mean and near 1 far out.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Deserialize;
use weir_engine::config::HumanDuration;

use super::{
    Detector, StateError, Verdict, check, load_state, normal_score, save_state,
    spread_threshold_problem,
};

/// The `zscore` section of an `anomaly` transform's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZscoreConfig {
    /// Compare with only the last this many values of the series.
    pub window_rows: Option<usize>,
    /// Compare with only the values of the last this much event time.
    pub window_duration: Option<HumanDuration>,
    /// Earlier values a series needs before any of its rows can be an anomaly.
    pub min_history: usize,
    /// How many standard deviations from the mean make an anomaly.
    pub threshold: f64,
}

impl Default for ZscoreConfig {
    fn default() -> Self {
        ZscoreConfig {
            window_rows: None,
            window_duration: None,
            min_history: 2,
            threshold: 3.0,
        }
    }
}

impl ZscoreConfig {
    /// Every problem with the parameters, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.window_rows.is_some() && self.window_duration.is_some() {
            problems.push((
                "window_duration",
                "give window_rows or window_duration, not both".to_owned(),
            ));
        }
        if self.window_rows == Some(0) {
            problems.push(("window_rows", "window_rows must be at least 1".to_owned()));
        }
        if self.window_duration.is_some_and(|d| d.0.is_zero()) {
            problems.push((
                "window_duration",
                "window_duration must be longer than 0s".to_owned(),
            ));
        }
        if self.min_history < 2 {
            problems.push((
                "min_history",
                "min_history must be at least 2: a standard deviation needs two values".to_owned(),
            ));
        }
        problems.extend(spread_threshold_problem(self.threshold));
        problems
    }
}

/// Which earlier values count.
#[derive(Clone, Copy, Debug)]
enum Span {
    All,
    Rows(usize),
    Millis(i64),
}

/// One series' zscore state.
#[derive(Clone, Debug)]
pub struct Zscore {
    span: Span,
    min_history: usize,
    threshold: f64,
    /// The values compared with: count, mean and sum of squared deviations (Welford).
    count: u64,
    mean: f64,
    m2: f64,
    /// Bounded spans: the values in the span, with their event times.
    values: VecDeque<(i64, f64)>,
    /// Bounded spans: values that left the span since `mean` and `m2` were last summed
    /// afresh. Each departure is undone incrementally, which drifts by a rounding error;
    /// summing afresh once per window's worth of departures bounds the drift at O(1)
    /// amortised cost per row.
    departed: usize,
}

impl Zscore {
    /// A fresh series.
    pub fn new(config: &ZscoreConfig) -> Self {
        let span = match (config.window_rows, config.window_duration) {
            (Some(rows), _) => Span::Rows(rows),
            (None, Some(duration)) => Span::Millis(millis(duration.0)),
            (None, None) => Span::All,
        };
        Zscore {
            span,
            min_history: config.min_history,
            threshold: config.threshold,
            count: 0,
            mean: 0.0,
            m2: 0.0,
            values: VecDeque::new(),
            departed: 0,
        }
    }

    /// Mean and population standard deviation of the earlier values in the span, with
    /// their count.
    fn moments(&mut self, ts: i64) -> (usize, f64, f64) {
        if let Span::Millis(span) = self.span {
            while self.values.front().is_some_and(|(t, _)| *t < ts - span) {
                self.depart();
            }
        }
        let n = match self.span {
            Span::All => self.count as usize,
            Span::Rows(_) | Span::Millis(_) => self.values.len(),
        };
        if n == 0 {
            return (0, 0.0, 0.0);
        }
        let variance = (self.m2 / n as f64).max(0.0);
        (n, self.mean, variance.sqrt())
    }

    /// Adds `value` to the running mean and sum of squared deviations (Welford).
    fn include(&mut self, value: f64) {
        self.count += 1;
        let delta = value - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (value - self.mean);
    }

    /// Drops the oldest value of a bounded span, undoing its Welford step.
    fn depart(&mut self) {
        let Some((_, value)) = self.values.pop_front() else {
            return;
        };
        self.count -= 1;
        if self.count == 0 {
            (self.mean, self.m2) = (0.0, 0.0);
            return;
        }
        let delta = value - self.mean;
        self.mean -= delta / self.count as f64;
        self.m2 -= delta * (value - self.mean);
        self.departed += 1;
        if self.departed >= self.values.len().max(64) {
            self.resum();
        }
    }

    /// Sums the bounded span afresh in two passes: exact, and free of drift.
    fn resum(&mut self) {
        self.departed = 0;
        let n = self.values.len() as f64;
        self.mean = self.values.iter().map(|(_, v)| v).sum::<f64>() / n;
        self.m2 = self
            .values
            .iter()
            .map(|(_, v)| (v - self.mean) * (v - self.mean))
            .sum::<f64>();
    }

    fn remember(&mut self, ts: i64, value: f64) {
        match self.span {
            Span::All => {}
            Span::Rows(rows) => {
                if self.values.len() == rows {
                    self.depart();
                }
                self.values.push_back((ts, value));
            }
            Span::Millis(_) => self.values.push_back((ts, value)),
        }
        self.include(value);
    }
}

impl Detector for Zscore {
    fn observe(&mut self, ts: i64, values: &[f64]) -> Verdict {
        let value = values[0];
        let (n, mean, stddev) = self.moments(ts);
        let verdict = if n < self.min_history {
            Verdict::NORMAL
        } else {
            normal_score(value - mean, stddev, self.threshold)
        };
        self.remember(ts, value);
        verdict
    }

    fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.values.capacity() * std::mem::size_of::<(i64, f64)>()
    }

    fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        save_state(
            &(self.count, self.mean, self.m2, &self.values, self.departed),
            out,
        )
    }

    fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
        type Saved = (u64, f64, f64, VecDeque<(i64, f64)>, usize);
        let ((count, mean, m2, values, departed), rest): (Saved, _) = load_state(bytes)?;
        let fits = match self.span {
            Span::All => values.is_empty(),
            Span::Rows(rows) => values.len() <= rows && values.len() as u64 == count,
            Span::Millis(_) => values.len() as u64 == count,
        };
        check(fits, "the zscore values do not fit its span")?;
        (self.count, self.mean, self.m2, self.values, self.departed) =
            (count, mean, m2, values, departed);
        Ok(rest)
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule, computed the plain way: two passes over every earlier value.
    fn oracle(values: &[f64], min_history: usize, threshold: f64) -> Vec<bool> {
        (0..values.len())
            .map(|i| {
                let earlier = &values[..i];
                if earlier.len() < min_history {
                    return false;
                }
                let n = earlier.len() as f64;
                let mean = earlier.iter().sum::<f64>() / n;
                let var = earlier.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                (values[i] - mean).abs() > threshold * var.sqrt()
            })
            .collect()
    }

    fn series() -> Vec<f64> {
        // A deterministic wobble with spikes, and a flat start (stddev 0).
        let mut values = vec![5.0, 5.0, 5.0];
        for i in 0..400u32 {
            let wobble = ((i * 37 % 101) as f64 - 50.0) / 25.0;
            let spike = if i % 97 == 50 { 40.0 } else { 0.0 };
            values.push(20.0 + wobble + spike);
        }
        values
    }

    #[test]
    fn all_earlier_values_reproduce_the_rule_exactly() {
        let values = series();
        let mut detector = Zscore::new(&ZscoreConfig::default());
        let flags: Vec<bool> = values
            .iter()
            .enumerate()
            .map(|(i, v)| detector.observe(i as i64, &[*v]).is_anomaly)
            .collect();
        assert_eq!(flags, oracle(&values, 2, 3.0));
        assert!(
            flags.iter().filter(|f| **f).count() >= 4,
            "spikes are found"
        );
    }

    #[test]
    fn scores_grow_with_distance_and_stay_in_range() {
        let mut detector = Zscore::new(&ZscoreConfig::default());
        for (i, v) in [10.0, 12.0, 10.0, 12.0].into_iter().enumerate() {
            detector.observe(i as i64, &[v]);
        }
        let near = detector.clone().observe(9, &[11.5]).score;
        let far = detector.clone().observe(9, &[30.0]).score;
        assert!((0.0..1.0).contains(&near) && near < far && far <= 1.0);
        assert!(detector.observe(9, &[30.0]).is_anomaly);
        // Too little history: never an anomaly.
        let mut fresh = Zscore::new(&ZscoreConfig::default());
        assert_eq!(fresh.observe(0, &[1.0]), Verdict::NORMAL);
        assert_eq!(fresh.observe(1, &[1000.0]), Verdict::NORMAL);
    }

    #[test]
    fn bounded_windows_forget_old_values() {
        let rows = ZscoreConfig {
            window_rows: Some(3),
            ..ZscoreConfig::default()
        };
        let mut detector = Zscore::new(&rows);
        for (i, v) in [100.0, 1.0, 2.0, 1.0].into_iter().enumerate() {
            detector.observe(i as i64, &[v]);
        }
        // The 100 has left the window of 3, so 1.5 is normal and 50 is not.
        assert!(!detector.clone().observe(4, &[1.5]).is_anomaly);
        assert!(detector.observe(4, &[50.0]).is_anomaly);

        let time = ZscoreConfig {
            window_duration: Some(HumanDuration(Duration::from_millis(10))),
            ..ZscoreConfig::default()
        };
        let mut detector = Zscore::new(&time);
        for (ts, v) in [(0, 1.0), (1, 1000.0), (20, 5.0), (21, 6.0)] {
            detector.observe(ts, &[v]);
        }
        // Only ts 20 and 21 are within 10 ms of 25.
        assert!(detector.observe(25, &[20.0]).is_anomaly);
    }

    #[test]
    fn running_window_moments_match_two_passes_over_the_window() {
        // Large offsets and long runs are where an incremental variance drifts.
        let values: Vec<f64> = (0..5000u32)
            .map(|i| {
                1.0e6 + ((i * 7919 % 1009) as f64) / 10.0 + if i % 613 == 0 { 900.0 } else { 0.0 }
            })
            .collect();
        for window in [1usize, 2, 7, 100, 1000] {
            let mut detector = Zscore::new(&ZscoreConfig {
                window_rows: Some(window),
                ..ZscoreConfig::default()
            });
            for (i, &value) in values.iter().enumerate() {
                let (n, mean, stddev) = detector.moments(i as i64);
                let earlier = &values[i.saturating_sub(window)..i];
                assert_eq!(n, earlier.len());
                if n > 0 {
                    let plain_mean = earlier.iter().sum::<f64>() / n as f64;
                    let plain_var = earlier
                        .iter()
                        .map(|v| (v - plain_mean).powi(2))
                        .sum::<f64>()
                        / n as f64;
                    assert!(
                        (mean - plain_mean).abs() <= 1e-9 * plain_mean.abs(),
                        "window {window} row {i}"
                    );
                    assert!(
                        (stddev - plain_var.sqrt()).abs() <= 1e-6 * (1.0 + plain_var.sqrt()),
                        "window {window} row {i}: {stddev} vs {}",
                        plain_var.sqrt()
                    );
                }
                detector.remember(i as i64, value);
            }
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        let config = ZscoreConfig {
            window_rows: Some(0),
            window_duration: Some(HumanDuration(Duration::ZERO)),
            min_history: 1,
            threshold: -1.0,
        };
        let fields: Vec<&str> = config.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "window_duration",
                "window_rows",
                "window_duration",
                "min_history",
                "threshold"
            ]
        );
    }
}
