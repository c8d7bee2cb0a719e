//! The `ewma` detector: an exponentially weighted control chart.
//!
//! The series' mean and variance are exponentially weighted moving averages, so recent
//! values count most and the chart follows slow drift. A value is an anomaly when the
//! series has at least `min_history` earlier values and it lies more than `threshold`
//! weighted standard deviations from the weighted mean of the values before it. The score
//! is `erf(|z| / sqrt(2))`, as for `zscore`.

use serde::Deserialize;

use super::{
    Detector, StateError, Verdict, load_state, normal_score, save_state, spread_threshold_problem,
};

/// The `ewma` section of an `anomaly` transform's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EwmaConfig {
    /// The weight of the newest value, between 0 and 1: larger forgets faster.
    pub alpha: f64,
    /// Earlier values a series needs before any of its rows can be an anomaly.
    pub min_history: u64,
    /// How many weighted standard deviations from the weighted mean make an anomaly.
    pub threshold: f64,
}

impl Default for EwmaConfig {
    fn default() -> Self {
        EwmaConfig {
            alpha: 0.1,
            min_history: 10,
            threshold: 3.0,
        }
    }
}

impl EwmaConfig {
    /// Every problem with the parameters, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            problems.push((
                "alpha",
                format!(
                    "alpha must be between 0 and 1 (exclusive), not {}",
                    self.alpha
                ),
            ));
        }
        if self.min_history < 2 {
            problems.push((
                "min_history",
                "min_history must be at least 2: a deviation needs two values".to_owned(),
            ));
        }
        problems.extend(spread_threshold_problem(self.threshold));
        problems
    }
}

/// One series' control chart.
#[derive(Clone, Debug)]
pub struct Ewma {
    alpha: f64,
    min_history: u64,
    threshold: f64,
    count: u64,
    mean: f64,
    variance: f64,
}

impl Ewma {
    /// A fresh series.
    pub fn new(config: &EwmaConfig) -> Self {
        Ewma {
            alpha: config.alpha,
            min_history: config.min_history,
            threshold: config.threshold,
            count: 0,
            mean: 0.0,
            variance: 0.0,
        }
    }
}

impl Detector for Ewma {
    fn observe(&mut self, _ts: i64, values: &[f64]) -> Verdict {
        let value = values[0];
        let verdict = if self.count < self.min_history {
            Verdict::NORMAL
        } else {
            normal_score(value - self.mean, self.variance.sqrt(), self.threshold)
        };
        if self.count == 0 {
            self.mean = value;
        } else {
            // Incremental exponentially weighted mean and variance (Finch, 2009).
            let diff = value - self.mean;
            let increment = self.alpha * diff;
            self.mean += increment;
            self.variance = (1.0 - self.alpha) * (self.variance + diff * increment);
        }
        self.count += 1;
        verdict
    }

    fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
    }

    fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        save_state(&(self.count, self.mean, self.variance), out)
    }

    fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
        let ((count, mean, variance), rest) = load_state(bytes)?;
        (self.count, self.mean, self.variance) = (count, mean, variance);
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(detector: &mut Ewma, values: &[f64]) -> Vec<bool> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| detector.observe(i as i64, &[*v]).is_anomaly)
            .collect()
    }

    #[test]
    fn a_spike_is_flagged_and_slow_drift_is_followed() {
        let mut detector = Ewma::new(&EwmaConfig::default());
        // Alternating noise around 10, then a spike.
        let mut values: Vec<f64> = (0..50)
            .map(|i| 10.0 + if i % 2 == 0 { 0.5 } else { -0.5 })
            .collect();
        values.push(20.0);
        let flags = feed(&mut detector, &values);
        assert!(!flags[..50].iter().any(|f| *f));
        assert!(flags[50]);
        // A slow ramp: each step is small against the weighted spread, so nothing fires.
        let mut drifting = Ewma::new(&EwmaConfig::default());
        let ramp: Vec<f64> = (0..300)
            .map(|i| i as f64 * 0.01 + if i % 2 == 0 { 0.5 } else { -0.5 })
            .collect();
        assert!(!feed(&mut drifting, &ramp).iter().any(|f| *f));
    }

    #[test]
    fn too_little_history_is_never_an_anomaly() {
        let mut detector = Ewma::new(&EwmaConfig::default());
        let flags = feed(&mut detector, &[1.0, 100.0, -50.0, 7.0]);
        assert_eq!(flags, [false; 4]);
    }

    #[test]
    fn bad_parameters_are_named() {
        let config = EwmaConfig {
            alpha: 1.5,
            min_history: 0,
            threshold: 0.0,
        };
        let fields: Vec<&str> = config.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["alpha", "min_history", "threshold"]);
    }
}
