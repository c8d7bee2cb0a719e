//! Post-processing of a detector's scores: `likelihood` calibrates them, `onset_rows`
//! keeps only the start of an anomalous stretch.
//!
//! **Likelihood.** Raw scores mean different things on different series: a noisy series
//! scores high all the time. Following Numenta's anomaly likelihood (Ahmad et al., 2017),
//! the raw scores are averaged over the last `averaging_rows` rows, and that average is
//! compared with a normal distribution fitted to the earlier averages. The fit is a
//! running mean and variance, weighted equally over the first `history_rows` rows and
//! then exponentially with a memory of `history_rows` rows, so it costs a few numbers
//! per series rather than a window of averages (Numenta keeps the window; the scores on
//! NAB are the same). The fit in use is refreshed every `reestimate_rows` rows, and its
//! spread is at least [`MIN_LIKELIHOOD_SIGMA`]. The likelihood `L` is the probability that an average is
//! lower than this one, so a series scores high only when it is more surprising than it
//! usually is. `L` is put on a log scale, `ln(1 + 1e-10 - L) / ln(1e-10)`: 0.5 at
//! `L = 0.99999`, near 1 at `L = 1 - 1e-10`. The score blends that with the detector's
//! own: `(1 - raw_weight) * likelihood + raw_weight * raw`, so that one extreme row
//! still counts before the average catches up. While the first `learning_rows` rows of a
//! series are learnt, the likelihood part is 0. Unlike Numenta's, averages below the
//! mean are never unlikely: a series that becomes calmer is not an anomaly.
//!
//! **Onset.** A detector keeps scoring high while an anomaly lasts. Where the first
//! alarm is what matters, `onset_rows: N` keeps a row's score only when it beats every
//! score of the previous `N` rows, and scores the rest 0 (and not anomalies).

use std::collections::VecDeque;

use serde::Deserialize;

use super::{
    Detector, StateError, Verdict, check, load_state, save_state, score_threshold_problem,
};

/// The smallest spread of the fitted distribution, as in Numenta's implementation
/// (variance 0.0003), so a series that has always scored the same is not alarmed by a
/// tiny change.
pub const MIN_LIKELIHOOD_SIGMA: f64 = 0.017_320_508_075_688_77;

/// `ln(1e-10)`: the log-scaled likelihood reaches 1 at `L = 1 - 1e-10`.
const LN_LIKELIHOOD_FLOOR: f64 = -23.025_850_929_940_457;

/// The `likelihood` section of a detector's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LikelihoodConfig {
    /// Raw scores are averaged over this many rows.
    pub averaging_rows: usize,
    /// The memory of the fitted distribution, in rows.
    pub history_rows: u64,
    /// Rows a series scores 0 while the first distribution is learnt.
    pub learning_rows: u64,
    /// The distribution is refitted every this many rows.
    pub reestimate_rows: u64,
    /// The share of the detector's own score in the result (0..1).
    pub raw_weight: f64,
    /// The score from which a row is an anomaly (0..1).
    pub threshold: f64,
}

impl Default for LikelihoodConfig {
    fn default() -> Self {
        LikelihoodConfig {
            averaging_rows: 10,
            history_rows: 8640,
            learning_rows: 388,
            reestimate_rows: 100,
            raw_weight: 0.25,
            threshold: 0.5,
        }
    }
}

impl LikelihoodConfig {
    /// Every problem with the parameters, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.averaging_rows == 0 {
            problems.push(("averaging_rows", "averaging_rows must be at least 1".into()));
        }
        if self.history_rows < 2 {
            problems.push((
                "history_rows",
                "history_rows must be at least 2: a spread needs two values".into(),
            ));
        }
        if self.learning_rows < 2 {
            problems.push((
                "learning_rows",
                "learning_rows must be at least 2: a spread needs two values".into(),
            ));
        }
        if self.reestimate_rows == 0 {
            problems.push((
                "reestimate_rows",
                "reestimate_rows must be at least 1".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.raw_weight) {
            problems.push((
                "raw_weight",
                format!(
                    "raw_weight is a share between 0 and 1, not {}",
                    self.raw_weight
                ),
            ));
        }
        problems.extend(score_threshold_problem(self.threshold));
        problems
    }
}

/// A detector whose scores are replaced by their likelihood.
pub struct Likelihood {
    config: LikelihoodConfig,
    inner: Box<dyn Detector>,
    rows: u64,
    /// The last `averaging_rows` raw scores and their sum.
    recent: VecDeque<f64>,
    recent_sum: f64,
    /// The running mean and variance of the averages.
    running_mean: f64,
    running_variance: f64,
    /// The fitted mean and spread in use, once learnt.
    fitted: Option<(f64, f64)>,
    rows_since_fit: u64,
}

impl Likelihood {
    /// Wraps a fresh series' detector.
    pub fn new(config: &LikelihoodConfig, inner: Box<dyn Detector>) -> Self {
        Likelihood {
            config: config.clone(),
            inner,
            rows: 0,
            recent: VecDeque::with_capacity(config.averaging_rows),
            recent_sum: 0.0,
            running_mean: 0.0,
            running_variance: 0.0,
            fitted: None,
            rows_since_fit: 0,
        }
    }

    /// Adds an average to the running mean and variance (equal weights for the first
    /// `history_rows`, then exponential; West, 1979).
    fn learn(&mut self, average: f64) {
        let weight = 1.0 / (self.rows.min(self.config.history_rows) as f64);
        let diff = average - self.running_mean;
        self.running_mean += weight * diff;
        self.running_variance = (1.0 - weight) * (self.running_variance + weight * diff * diff);
    }
}

/// The log-scaled likelihood of an average `z` spreads above the fitted mean.
pub fn log_likelihood_score(z: f64) -> f64 {
    let likelihood = 1.0 - 0.5 * libm::erfc(z / std::f64::consts::SQRT_2);
    ((1.0 + 1e-10 - likelihood).ln() / LN_LIKELIHOOD_FLOOR).clamp(0.0, 1.0)
}

impl Detector for Likelihood {
    fn observe(&mut self, ts: i64, values: &[f64]) -> Verdict {
        let raw = self.inner.observe(ts, values).score;
        if self.recent.len() == self.config.averaging_rows
            && let Some(oldest) = self.recent.pop_front()
        {
            self.recent_sum -= oldest;
        }
        self.recent.push_back(raw);
        self.recent_sum += raw;
        let average = self.recent_sum / self.recent.len() as f64;
        self.rows += 1;
        self.learn(average);
        let raw_part = self.config.raw_weight * raw;
        if self.rows < self.config.learning_rows {
            return Verdict {
                score: raw_part,
                is_anomaly: raw_part >= self.config.threshold,
            };
        }
        if self.fitted.is_none() || self.rows_since_fit >= self.config.reestimate_rows {
            let sigma = self.running_variance.sqrt().max(MIN_LIKELIHOOD_SIGMA);
            self.fitted = Some((self.running_mean, sigma));
            self.rows_since_fit = 0;
        }
        self.rows_since_fit += 1;
        let (mean, sigma) = self.fitted.unwrap_or((0.0, MIN_LIKELIHOOD_SIGMA));
        let likelihood = log_likelihood_score((average - mean) / sigma);
        let score = (1.0 - self.config.raw_weight) * likelihood + raw_part;
        Verdict {
            score,
            is_anomaly: score >= self.config.threshold,
        }
    }

    fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.recent.capacity() * std::mem::size_of::<f64>()
            + self.inner.state_bytes()
    }

    fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        let averages = (self.rows, &self.recent, self.recent_sum);
        let fit = (self.running_mean, self.running_variance, self.fitted);
        save_state(&(averages, fit, self.rows_since_fit), out)?;
        self.inner.save(out)
    }

    fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
        type Saved = (
            (u64, VecDeque<f64>, f64),
            (f64, f64, Option<(f64, f64)>),
            u64,
        );
        let (((rows, recent, sum), (mean, variance, fitted), since), rest): (Saved, _) =
            load_state(bytes)?;
        check(
            recent.len() <= self.config.averaging_rows,
            "the likelihood holds more scores than averaging_rows",
        )?;
        (self.rows, self.recent_sum) = (rows, sum);
        self.recent.clear();
        self.recent.extend(recent);
        (self.running_mean, self.running_variance, self.fitted) = (mean, variance, fitted);
        self.rows_since_fit = since;
        self.inner.load(rest)
    }
}

/// A detector whose scores count only where they beat the recent ones.
pub struct Onset {
    rows: usize,
    inner: Box<dyn Detector>,
    seen: u64,
    /// (row number, raw score) of the rows that can still be the recent maximum: scores
    /// fall from front to back.
    maxima: VecDeque<(u64, f64)>,
}

impl Onset {
    /// Wraps a fresh series' detector, comparing with the previous `rows` rows.
    pub fn new(rows: usize, inner: Box<dyn Detector>) -> Self {
        Onset {
            rows,
            inner,
            seen: 0,
            maxima: VecDeque::new(),
        }
    }
}

impl Detector for Onset {
    fn observe(&mut self, ts: i64, values: &[f64]) -> Verdict {
        let verdict = self.inner.observe(ts, values);
        let row = self.seen;
        self.seen += 1;
        while self
            .maxima
            .front()
            .is_some_and(|&(at, _)| at + (self.rows as u64) < row)
        {
            self.maxima.pop_front();
        }
        let recent_max = self.maxima.front().map(|&(_, score)| score);
        while self
            .maxima
            .back()
            .is_some_and(|&(_, score)| score <= verdict.score)
        {
            self.maxima.pop_back();
        }
        self.maxima.push_back((row, verdict.score));
        match recent_max {
            Some(max) if verdict.score <= max => Verdict::NORMAL,
            _ => verdict,
        }
    }

    fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.maxima.capacity() * std::mem::size_of::<(u64, f64)>()
            + self.inner.state_bytes()
    }

    fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        save_state(&(self.seen, &self.maxima), out)?;
        self.inner.save(out)
    }

    fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
        let ((seen, maxima), rest): ((u64, VecDeque<(u64, f64)>), _) = load_state(bytes)?;
        check(
            maxima.len() <= self.rows + 1,
            "the onset holds more scores than onset_rows",
        )?;
        (self.seen, self.maxima) = (seen, maxima);
        self.inner.load(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A detector whose score is the value itself, an anomaly from 0.5.
    struct Echo;

    impl Detector for Echo {
        fn observe(&mut self, _ts: i64, values: &[f64]) -> Verdict {
            Verdict {
                score: values[0],
                is_anomaly: values[0] >= 0.5,
            }
        }

        fn state_bytes(&self) -> usize {
            0
        }

        /// An echo learns nothing.
        fn save(&self, _out: &mut Vec<u8>) -> Result<(), StateError> {
            Ok(())
        }

        fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
            Ok(bytes)
        }
    }

    fn scores(detector: &mut dyn Detector, values: &[f64]) -> Vec<f64> {
        values
            .iter()
            .map(|v| detector.observe(0, &[*v]).score)
            .collect()
    }

    #[test]
    fn onset_keeps_only_scores_that_beat_the_previous_rows() {
        let mut onset = Onset::new(3, Box::new(Echo));
        let out = scores(&mut onset, &[0.1, 0.9, 0.8, 0.9, 0.2, 0.3, 0.1, 0.7, 0.95]);
        // 0.8 and the second 0.9 do not beat the 0.9 before them; 0.2 and 0.3 are in
        // its shadow too; by row 7 the 0.9 is more than 3 rows back.
        assert_eq!(out, [0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7, 0.95]);
    }

    #[test]
    fn onset_matches_a_plain_window_maximum() {
        // Pseudo-random scores; the answer is checked against a direct scan.
        let values: Vec<f64> = (0..500u64)
            .map(|i| ((i * 7919 % 1000) as f64) / 1000.0)
            .collect();
        let mut onset = Onset::new(10, Box::new(Echo));
        let out = scores(&mut onset, &values);
        for (i, v) in values.iter().enumerate() {
            let beaten = values[i.saturating_sub(10)..i].iter().any(|p| p >= v);
            assert_eq!(out[i], if beaten { 0.0 } else { *v }, "row {i}");
        }
    }

    #[test]
    fn likelihood_is_quiet_on_usual_noise_and_high_on_a_new_level() {
        let config = LikelihoodConfig {
            learning_rows: 50,
            raw_weight: 0.0,
            ..LikelihoodConfig::default()
        };
        let mut detector = Likelihood::new(&config, Box::new(Echo));
        // A raw score that hops between 0.1 and 0.5: noisy, but the usual.
        let usual: Vec<f64> = (0..400)
            .map(|i| if i % 3 == 0 { 0.5 } else { 0.1 })
            .collect();
        let out = scores(&mut detector, &usual);
        assert!(out[..49].iter().all(|s| *s == 0.0), "learning rows score 0");
        assert!(out[100..].iter().all(|s| *s < 0.1), "usual noise stays low");
        // Ten rows of raw 0.9 lift the average far above its history.
        let out = scores(&mut detector, &[0.9; 10]);
        assert!(out[9] > 0.5, "{out:?}");
        // A calmer stretch is not unlikely.
        let out = scores(&mut detector, &[0.0; 20]);
        assert!(out[19] < 0.05, "{out:?}");
    }

    #[test]
    fn the_raw_score_is_blended_in_from_the_first_row() {
        let config = LikelihoodConfig {
            learning_rows: 50,
            ..LikelihoodConfig::default()
        };
        let mut detector = Likelihood::new(&config, Box::new(Echo));
        let out = scores(&mut detector, &[0.4; 60]);
        assert!(
            (out[0] - 0.1).abs() < 1e-12,
            "a quarter of 0.4 while learning"
        );
        // After learning, a constant raw score is exactly as likely as usual (L = 0.5).
        let expected = 0.75 * log_likelihood_score(0.0) + 0.1;
        assert!(
            (out[59] - expected).abs() < 1e-12,
            "{} vs {expected}",
            out[59]
        );
    }

    #[test]
    fn the_log_likelihood_score_is_half_at_five_nines() {
        // L = 0.99999 is 4.265 spreads above the mean.
        assert!((log_likelihood_score(4.264_890_8) - 0.5).abs() < 1e-3);
        // Three spreads below the mean: L = 0.00135, a score of 6e-5.
        assert!(log_likelihood_score(-3.0) < 1e-4);
        assert!(log_likelihood_score(40.0) > 0.999_999);
    }
}
