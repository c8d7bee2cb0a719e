//! The `forecast` detector: how far a value lies from a seasonal Holt-Winters forecast.
//!
//! Each series keeps an additive Holt-Winters model: a level, an optional trend and one
//! seasonal offset per time-of-season bin (e.g. per 5 minutes of the day). The forecast
//! for a row is `level + trend + season[bin]`; the residual is the value minus that. The
//! residuals can be averaged over the last `smooth` rows (1 by default), so one noisy
//! reading counts less than a run of them; the result is compared with its own
//! exponentially weighted spread. The score is the two-sided normal tail probability `p`
//! of that deviation on a log scale, `min(1, -log10(p) / 20)`: 0.025 at one spread, 0.13
//! at three, 0.35 (the default threshold) at 5.3 and 1 from about 9.3 spreads on
//! (p = 1e-20). A logarithmic score keeps far-out rows apart instead of crowding them all
//! just under 1, so one threshold works across series.
//!
//! Seasons are found from event time: the bin width is the series' sampling interval
//! (the median of its first [`STEP_SAMPLES`] intervals), and a season of `season` holds
//! `season / interval` bins, at most [`MAX_SEASON_BINS`] (faster series share bins).
//! Without an event-time column, or with `season: null`, the model has no season.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weir_engine::config::HumanDuration;

use super::{
    Detector, StateError, Verdict, check, load_state, save_state, score_threshold_problem,
};

/// Intervals between a series' first rows that decide its sampling interval.
pub const STEP_SAMPLES: usize = 32;
/// The most season bins one series keeps (a day of 1-minute bins).
pub const MAX_SEASON_BINS: usize = 1440;
/// The score of a tail probability of 1e-20 and anything rarer.
const LOG10_P_AT_SCORE_ONE: f64 = 20.0;

/// The `forecast` section of an `anomaly` transform's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForecastConfig {
    /// The length of one season, e.g. `1d` or `1w`; `null` for none.
    pub season: Option<HumanDuration>,
    /// How fast the level follows the values (0..1): larger forgets faster.
    pub alpha: f64,
    /// How fast the trend follows the level's changes (0..1); 0 means no trend.
    pub beta: f64,
    /// How fast each season bin follows its values (0..1); a bin learns once a season.
    pub gamma: f64,
    /// The residual is averaged over this many rows before it is scored.
    pub smooth: usize,
    /// The weight of the newest smoothed residual in the spread (0..1).
    pub variance_alpha: f64,
    /// Rows a series needs before any of its rows gets a score.
    pub min_history: u64,
    /// The score from which a row is an anomaly (0..1).
    pub threshold: f64,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        ForecastConfig {
            season: Some(HumanDuration(Duration::from_secs(86_400))),
            alpha: 0.01,
            beta: 0.0,
            gamma: 0.3,
            smooth: 1,
            variance_alpha: 0.01,
            min_history: 50,
            threshold: 0.35,
        }
    }
}

impl ForecastConfig {
    /// Every problem with the parameters, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for (field, rate, zero_allowed) in [
            ("alpha", self.alpha, false),
            ("beta", self.beta, true),
            ("gamma", self.gamma, false),
            ("variance_alpha", self.variance_alpha, false),
        ] {
            let low_ok = if zero_allowed {
                rate >= 0.0
            } else {
                rate > 0.0
            };
            if !(low_ok && rate < 1.0) {
                let range = if zero_allowed {
                    "0 <= x < 1"
                } else {
                    "0 < x < 1"
                };
                problems.push((field, format!("{field} must be in {range}, not {rate}")));
            }
        }
        if self.season.is_some_and(|s| s.0.as_millis() < 2) {
            problems.push((
                "season",
                "season must be longer than that: e.g. 1d, or null for none".to_owned(),
            ));
        }
        if self.smooth == 0 {
            problems.push(("smooth", "smooth must be at least 1 row".to_owned()));
        }
        problems.extend(score_threshold_problem(self.threshold));
        problems
    }
}

/// The score of a deviation of `z` spreads: the two-sided normal tail probability on a
/// log scale, reaching 1 at p = 1e-20.
pub fn log_tail_score(z: f64) -> f64 {
    let p = libm::erfc(z.abs() / std::f64::consts::SQRT_2).max(f64::MIN_POSITIVE);
    (-p.log10() / LOG10_P_AT_SCORE_ONE).clamp(0.0, 1.0)
}

/// How a series' timestamps map to season bins, once its sampling interval is known.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Seasons {
    period_ms: i64,
    bin_ms: i64,
    offsets: Vec<f64>,
    /// Whether each bin has seen a value yet.
    seen: Vec<bool>,
}

impl Seasons {
    fn new(period_ms: i64, step_ms: i64) -> Seasons {
        let bins = (period_ms as f64 / step_ms as f64)
            .round()
            .clamp(1.0, MAX_SEASON_BINS as f64) as usize;
        let bin_ms = (period_ms / bins as i64).max(1);
        Seasons {
            period_ms,
            bin_ms,
            offsets: vec![0.0; bins],
            seen: vec![false; bins],
        }
    }

    fn bin(&self, ts: i64) -> usize {
        ((ts.rem_euclid(self.period_ms) / self.bin_ms) as usize).min(self.offsets.len() - 1)
    }
}

/// One series' model.
#[derive(Clone, Debug)]
pub struct Forecast {
    config: ForecastConfig,
    rows: u64,
    level: f64,
    trend: f64,
    /// The season bins, once the sampling interval is known.
    seasons: Option<Seasons>,
    /// The first intervals, until they decide the sampling interval.
    intervals: Vec<i64>,
    last_ts: Option<i64>,
    /// The last `smooth` residuals, oldest first, and their sum.
    residuals: VecDeque<f64>,
    residual_sum: f64,
    /// The spread of the smoothed residual (an exponentially weighted variance).
    variance: Option<f64>,
}

impl Forecast {
    /// A fresh series.
    pub fn new(config: &ForecastConfig) -> Self {
        Forecast {
            config: config.clone(),
            rows: 0,
            level: 0.0,
            trend: 0.0,
            seasons: None,
            intervals: Vec::new(),
            last_ts: None,
            residuals: VecDeque::with_capacity(config.smooth),
            residual_sum: 0.0,
            variance: None,
        }
    }

    /// Learns the sampling interval from the first rows' timestamps.
    fn learn_interval(&mut self, ts: i64) {
        let Some(period) = self.config.season else {
            return;
        };
        if self.seasons.is_some() {
            return;
        }
        if let Some(last) = self.last_ts
            && ts > last
        {
            self.intervals.push(ts - last);
        }
        self.last_ts = Some(ts);
        if self.intervals.len() == STEP_SAMPLES {
            self.intervals.sort_unstable();
            let step = self.intervals[STEP_SAMPLES / 2];
            self.seasons = Some(Seasons::new(period.0.as_millis() as i64, step));
            self.intervals = Vec::new();
        }
    }

    /// The residual of `value` against the forecast, then the model's update.
    fn residual_and_learn(&mut self, ts: i64, value: f64) -> f64 {
        let ForecastConfig {
            alpha, beta, gamma, ..
        } = self.config;
        if self.rows == 0 {
            self.level = value;
            return 0.0;
        }
        let bin = self.seasons.as_ref().map(|s| (s.bin(ts), s));
        let offset = match bin {
            Some((bin, seasons)) if seasons.seen[bin] => seasons.offsets[bin],
            _ => 0.0,
        };
        let residual = value - (self.level + self.trend + offset);
        let level = alpha * (value - offset) + (1.0 - alpha) * (self.level + self.trend);
        self.trend = beta * (level - self.level) + (1.0 - beta) * self.trend;
        self.level = level;
        if let Some(seasons) = self.seasons.as_mut() {
            let bin = seasons.bin(ts);
            let deseasoned = value - self.level;
            if seasons.seen[bin] {
                seasons.offsets[bin] = gamma * deseasoned + (1.0 - gamma) * seasons.offsets[bin];
            } else {
                seasons.offsets[bin] = deseasoned;
                seasons.seen[bin] = true;
            }
        }
        residual
    }
}

impl Detector for Forecast {
    fn observe(&mut self, ts: i64, values: &[f64]) -> Verdict {
        let value = values[0];
        self.learn_interval(ts);
        let residual = self.residual_and_learn(ts, value);
        self.rows += 1;
        if self.residuals.len() == self.config.smooth
            && let Some(oldest) = self.residuals.pop_front()
        {
            self.residual_sum -= oldest;
        }
        self.residuals.push_back(residual);
        self.residual_sum += residual;
        let smoothed = self.residual_sum / self.residuals.len() as f64;
        let Some(variance) = self.variance else {
            self.variance = Some(smoothed * smoothed);
            return Verdict::NORMAL;
        };
        let sigma = variance.sqrt();
        let score = if self.rows <= self.config.min_history {
            0.0
        } else if sigma > 0.0 {
            log_tail_score(smoothed / sigma)
        } else if smoothed != 0.0 {
            1.0
        } else {
            0.0
        };
        let a = self.config.variance_alpha;
        self.variance = Some((1.0 - a) * variance + a * smoothed * smoothed);
        Verdict {
            score,
            is_anomaly: score >= self.config.threshold,
        }
    }

    fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.residuals.capacity() * std::mem::size_of::<f64>()
            + self.intervals.capacity() * std::mem::size_of::<i64>()
            + self
                .seasons
                .as_ref()
                .map_or(0, |s| s.offsets.capacity() * 9)
    }

    fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        let learnt = (self.rows, self.level, self.trend, &self.seasons);
        let pending = (&self.intervals, self.last_ts, &self.residuals);
        save_state(&(learnt, pending, self.residual_sum, self.variance), out)
    }

    fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
        type Learnt = (u64, f64, f64, Option<Seasons>);
        type Pending = (Vec<i64>, Option<i64>, VecDeque<f64>);
        type Saved = (Learnt, Pending, f64, Option<f64>);
        let (((rows, level, trend, seasons), (intervals, last_ts, residuals), sum, variance), rest): (Saved, _) =
            load_state(bytes)?;
        if let Some(seasons) = &seasons {
            check(
                self.config.season.is_some(),
                "the forecast has seasons but its config has no season",
            )?;
            let bins = seasons.offsets.len();
            check(
                seasons.period_ms > 0
                    && seasons.bin_ms > 0
                    && (1..=MAX_SEASON_BINS).contains(&bins)
                    && seasons.seen.len() == bins,
                "the forecast's season bins are malformed",
            )?;
        }
        check(
            intervals.len() < STEP_SAMPLES && residuals.len() <= self.config.smooth,
            "the forecast holds more intervals or residuals than it keeps",
        )?;
        (self.rows, self.level, self.trend, self.seasons) = (rows, level, trend, seasons);
        (self.intervals, self.last_ts) = (intervals, last_ts);
        self.residuals.clear();
        self.residuals.extend(residuals);
        (self.residual_sum, self.variance) = (sum, variance);
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    /// An hourly series with a daily shape: low at night, high by day.
    fn daily(hour: i64) -> f64 {
        if (8..18).contains(&(hour % 24)) {
            80.0
        } else {
            20.0
        }
    }

    #[test]
    fn a_learned_daily_shape_is_not_an_anomaly_but_a_break_in_it_is() {
        let mut detector = Forecast::new(&ForecastConfig::default());
        let mut flagged = Vec::new();
        for hour in 0..24 * 20 {
            let noise = if hour % 2 == 0 { 0.5 } else { -0.5 };
            if detector
                .observe(hour * HOUR, &[daily(hour) + noise])
                .is_anomaly
            {
                flagged.push(hour);
            }
        }
        // After the first days the daily steps are forecast, so nothing fires.
        assert!(
            flagged.iter().all(|&h| h < 24 * 5),
            "flagged after learning: {flagged:?}"
        );
        // Day 20 stays at the night value through the day: the forecast expects 80.
        let verdicts: Vec<Verdict> = (24 * 20 + 8..24 * 20 + 12)
            .map(|hour| detector.observe(hour * HOUR, &[20.0]))
            .collect();
        assert!(verdicts.iter().any(|v| v.is_anomaly), "{verdicts:?}");
    }

    #[test]
    fn without_a_season_a_daily_step_keeps_surprising() {
        let config = ForecastConfig {
            season: None,
            ..ForecastConfig::default()
        };
        let mut seasonal = Forecast::new(&ForecastConfig::default());
        let mut flat = Forecast::new(&config);
        let (mut seasonal_late, mut flat_late) = (0.0_f64, 0.0_f64);
        for hour in 0..24 * 20 {
            let value = daily(hour) + if hour % 2 == 0 { 0.5 } else { -0.5 };
            let s = seasonal.observe(hour * HOUR, &[value]).score;
            let f = flat.observe(hour * HOUR, &[value]).score;
            if hour >= 24 * 15 {
                seasonal_late = seasonal_late.max(s);
                flat_late = flat_late.max(f);
            }
        }
        assert!(seasonal_late < 0.2, "seasonal model: {seasonal_late}");
        assert!(flat_late > seasonal_late, "{flat_late} vs {seasonal_late}");
    }

    #[test]
    fn season_bins_are_capped_and_cover_the_period() {
        let seasons = Seasons::new(86_400_000, 1_000);
        assert_eq!(seasons.offsets.len(), MAX_SEASON_BINS);
        assert_eq!(seasons.bin(0), 0);
        assert_eq!(seasons.bin(86_399_999), MAX_SEASON_BINS - 1);
        assert_eq!(seasons.bin(86_400_000), 0);
        assert_eq!(seasons.bin(-1), MAX_SEASON_BINS - 1);
    }

    #[test]
    fn the_log_tail_score_grows_with_the_deviation_and_saturates() {
        assert_eq!(log_tail_score(0.0), 0.0);
        let scores: Vec<f64> = [1.0, 3.0, 5.0, 8.0].map(log_tail_score).to_vec();
        assert!(scores.windows(2).all(|w| w[0] < w[1]), "{scores:?}");
        assert!((log_tail_score(1.0) - 0.0249).abs() < 1e-3);
        assert!((log_tail_score(5.3) - 0.347).abs() < 1e-3);
        assert_eq!(log_tail_score(10.0), 1.0);
        assert_eq!(log_tail_score(1e6), 1.0);
    }

    #[test]
    fn bad_parameters_are_named() {
        let config = ForecastConfig {
            alpha: 0.0,
            beta: -0.1,
            gamma: 1.0,
            smooth: 0,
            threshold: 2.0,
            ..ForecastConfig::default()
        };
        let fields: Vec<&str> = config.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["alpha", "beta", "gamma", "smooth", "threshold"]);
    }
}
