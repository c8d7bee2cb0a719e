//! The `range` detector: a value outside every value the series has seen before.
//!
//! A row is out of range when it lies above the maximum or below the minimum of the
//! series' earlier values by more than `tolerance` times the width of that range. The
//! `lag_rows` rows just before the row are left out of the range, so a fast ramp out of
//! the known range is caught even when each step alone is small (each value would
//! otherwise widen the range before the next is checked). Every out-of-range row is an
//! anomaly; the first of a run of them scores 1, the others 0, so a sensor that leaves
//! its range raises one alarm and not one per row. Nothing is out of range before the
//! range holds `min_history` values.
//!
//! It is the cheapest detector and catches what most others need a long history to see:
//! a sensor going somewhere it has never been. It never fires on a change inside the
//! known range, so it is best combined with `forecast` in an `ensemble` (the default).

use std::collections::VecDeque;

use serde::Deserialize;

use super::{Detector, StateError, Verdict, check, load_state, save_state};

/// The `range` section of an `anomaly` transform's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RangeConfig {
    /// How far beyond the range, as a fraction of its width, a value must lie.
    pub tolerance: f64,
    /// The rows just before a row that are left out of the range it is compared with.
    pub lag_rows: usize,
    /// Values the range needs before any row can be out of it.
    pub min_history: u64,
}

impl Default for RangeConfig {
    fn default() -> Self {
        RangeConfig {
            tolerance: 0.02,
            lag_rows: 3,
            min_history: 10,
        }
    }
}

impl RangeConfig {
    /// Every problem with the parameters, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            problems.push((
                "tolerance",
                format!(
                    "tolerance must be 0 or more (a fraction of the range), not {}",
                    self.tolerance
                ),
            ));
        }
        if self.min_history == 0 {
            problems.push((
                "min_history",
                "min_history must be at least 1: a range needs a value".to_owned(),
            ));
        }
        problems
    }
}

/// One series' range.
#[derive(Clone, Debug)]
pub struct Range {
    tolerance: f64,
    lag_rows: usize,
    min_history: u64,
    /// The current row and the `lag_rows` before it: not yet in the range.
    lagging: VecDeque<f64>,
    /// Values in the range, and its ends.
    count: u64,
    low: f64,
    high: f64,
    /// Whether the previous row was out of range.
    was_out: bool,
}

impl Range {
    /// A fresh series.
    pub fn new(config: &RangeConfig) -> Self {
        Range {
            tolerance: config.tolerance,
            lag_rows: config.lag_rows,
            min_history: config.min_history,
            lagging: VecDeque::with_capacity(config.lag_rows + 1),
            count: 0,
            low: f64::INFINITY,
            high: f64::NEG_INFINITY,
            was_out: false,
        }
    }
}

impl Detector for Range {
    fn observe(&mut self, _ts: i64, values: &[f64]) -> Verdict {
        let value = values[0];
        self.lagging.push_back(value);
        if self.lagging.len() > self.lag_rows + 1
            && let Some(settled) = self.lagging.pop_front()
        {
            self.low = self.low.min(settled);
            self.high = self.high.max(settled);
            self.count += 1;
        }
        let margin = self.tolerance * (self.high - self.low);
        let out = self.count >= self.min_history
            && (value > self.high + margin || value < self.low - margin);
        let first = out && !self.was_out;
        self.was_out = out;
        Verdict {
            score: if first { 1.0 } else { 0.0 },
            is_anomaly: out,
        }
    }

    fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.lagging.capacity() * std::mem::size_of::<f64>()
    }

    fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        save_state(
            &(&self.lagging, self.count, self.low, self.high, self.was_out),
            out,
        )
    }

    fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
        type Saved = (VecDeque<f64>, u64, f64, f64, bool);
        let ((lagging, count, low, high, was_out), rest): (Saved, _) = load_state(bytes)?;
        check(
            lagging.len() <= self.lag_rows + 1,
            "the range holds back more rows than lag_rows",
        )?;
        self.lagging.clear();
        self.lagging.extend(lagging);
        (self.count, self.low, self.high, self.was_out) = (count, low, high, was_out);
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(config: &RangeConfig, values: &[f64]) -> Vec<(f64, bool)> {
        let mut detector = Range::new(config);
        values
            .iter()
            .map(|v| {
                let verdict = detector.observe(0, &[*v]);
                (verdict.score, verdict.is_anomaly)
            })
            .collect()
    }

    fn flags(config: &RangeConfig, values: &[f64]) -> Vec<bool> {
        verdicts(config, values).into_iter().map(|v| v.1).collect()
    }

    #[test]
    fn only_values_beyond_the_range_and_its_tolerance_fire() {
        let config = RangeConfig {
            tolerance: 0.1,
            lag_rows: 0,
            min_history: 2,
        };
        // Range [0, 10] after two values: 10.5 is within its tolerance of 1; then 12 is
        // beyond the 1.05 of [0, 10.5]; -1 is within the 1.2 of [0, 12], and -3 beyond
        // the 1.3 of [-1, 12].
        assert_eq!(
            flags(&config, &[0.0, 10.0, 10.5, 12.0, 5.0, -1.0, -3.0]),
            [false, false, false, true, false, false, true]
        );
    }

    #[test]
    fn a_run_out_of_range_is_flagged_throughout_but_scores_once() {
        let config = RangeConfig {
            tolerance: 0.0,
            lag_rows: 0,
            min_history: 1,
        };
        // A ramp keeps leaving the range: every step is out, but only the first of each
        // run scores.
        let ramp = [0.0, 1.0, 0.5, 2.0, 3.0, 4.0, 1.0, 5.0];
        assert_eq!(
            verdicts(&config, &ramp),
            [
                (0.0, false),
                (1.0, true),
                (0.0, false),
                (1.0, true),
                (0.0, true),
                (0.0, true),
                (0.0, false),
                (1.0, true)
            ]
        );
    }

    #[test]
    fn a_lag_catches_a_ramp_of_steps_each_within_the_tolerance() {
        // Range [0, 10], tolerance 5; then steps of 2: each is within the tolerance of
        // the range as widened by the step before it.
        let values = [0.0, 10.0, 0.0, 10.0, 0.0, 10.0, 12.0, 14.0, 16.0, 18.0];
        let config = RangeConfig {
            tolerance: 0.5,
            lag_rows: 0,
            min_history: 2,
        };
        assert!(!flags(&config, &values).iter().any(|f| *f));
        // Leaving out the two rows before: 16 is compared with [0, 10] and is out; 18
        // with [0, 12], whose tolerance reaches 18.
        let lagged = RangeConfig {
            lag_rows: 2,
            ..config
        };
        let out = flags(&lagged, &values);
        assert_eq!(&out[6..], [false, false, true, false]);
        assert!(!out[..6].iter().any(|f| *f));
    }

    #[test]
    fn nothing_fires_before_min_history() {
        let config = RangeConfig::default();
        // The range trails by 4 rows and needs 10 values: rows up to 12 are quiet, and
        // row 13 (169) is compared with the range of rows 0..=9, [0, 81].
        let values: Vec<f64> = (0..14).map(|i| (i * i) as f64).collect();
        let out = flags(&config, &values);
        assert!(!out[..13].iter().any(|f| *f), "{out:?}");
        assert!(out[13]);
    }

    #[test]
    fn bad_parameters_are_named() {
        let config = RangeConfig {
            tolerance: -1.0,
            lag_rows: 0,
            min_history: 0,
        };
        let fields: Vec<&str> = config.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["tolerance", "min_history"]);
    }
}
