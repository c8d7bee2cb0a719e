//! The `ensemble` detector: several detectors on the same rows, their scores combined.
//! Without `members` it is Weir's default detector (see [`EnsembleConfig::default`]).
//!
//! Members are written like the transform's own detector (`detector:` plus its section,
//! and optionally `likelihood` and `onset_rows`), so each can be tuned and
//! post-processed on its own. `combine: max` (the default) scores a row by its highest
//! member score and calls it an anomaly when any member does: members that catch
//! different kinds of anomaly add up. `combine: mean` averages the scores and calls a row
//! an anomaly when at least half of the members do: members that catch the same kind
//! vote.

use serde::Deserialize;

use super::{Detector, DetectorConfig, DetectorKind, LikelihoodConfig, StateError, Verdict};

/// The `ensemble` section of an `anomaly` transform's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnsembleConfig {
    /// The member detectors.
    pub members: Vec<DetectorConfig>,
    /// How member scores combine: `max` or `mean`.
    pub combine: Combine,
}

impl Default for EnsembleConfig {
    /// Weir's default detector, chosen on the Numenta Anomaly Benchmark: a `forecast`
    /// whose scores go through `likelihood` and `onset_rows: 100`, and a `range`, both
    /// with their default parameters, combined by `max`.
    fn default() -> Self {
        EnsembleConfig {
            members: vec![
                DetectorConfig {
                    detector: DetectorKind::Forecast,
                    likelihood: Some(LikelihoodConfig::default()),
                    onset_rows: DEFAULT_ONSET_ROWS,
                    ..DetectorConfig::default()
                },
                DetectorConfig {
                    detector: DetectorKind::Range,
                    ..DetectorConfig::default()
                },
            ],
            combine: Combine::Max,
        }
    }
}

/// The default ensemble's `onset_rows` for its `forecast` member.
pub const DEFAULT_ONSET_ROWS: usize = 100;

/// How an ensemble combines its members' verdicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The highest score; an anomaly when any member says so.
    #[default]
    Max,
    /// The mean score; an anomaly when at least half of the members say so.
    Mean,
}

/// One series' members.
pub struct Ensemble {
    combine: Combine,
    members: Vec<Box<dyn Detector>>,
}

impl Ensemble {
    /// A fresh series over fresh members.
    pub fn new(combine: Combine, members: Vec<Box<dyn Detector>>) -> Self {
        Ensemble { combine, members }
    }
}

impl Detector for Ensemble {
    fn observe(&mut self, ts: i64, values: &[f64]) -> Verdict {
        let mut best = 0.0_f64;
        let mut sum = 0.0;
        let mut flagged = 0;
        for member in &mut self.members {
            let verdict = member.observe(ts, values);
            best = best.max(verdict.score);
            sum += verdict.score;
            flagged += usize::from(verdict.is_anomaly);
        }
        let n = self.members.len().max(1);
        match self.combine {
            Combine::Max => Verdict {
                score: best,
                is_anomaly: flagged > 0,
            },
            Combine::Mean => Verdict {
                score: sum / n as f64,
                is_anomaly: 2 * flagged >= n,
            },
        }
    }

    fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.members.iter().map(|m| m.state_bytes()).sum::<usize>()
    }

    /// Each member's state in turn: the config fixes which members there are.
    fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        self.members.iter().try_for_each(|member| member.save(out))
    }

    fn load<'a>(&mut self, mut bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
        for member in &mut self.members {
            bytes = member.load(bytes)?;
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that replays fixed verdicts.
    struct Scripted(std::collections::VecDeque<(f64, bool)>);

    impl Detector for Scripted {
        fn observe(&mut self, _ts: i64, _values: &[f64]) -> Verdict {
            let (score, is_anomaly) = self.0.pop_front().unwrap_or((0.0, false));
            Verdict { score, is_anomaly }
        }

        fn state_bytes(&self) -> usize {
            100
        }

        fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
            super::super::save_state(&self.0, out)
        }

        fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
            let (script, rest) = super::super::load_state(bytes)?;
            self.0 = script;
            Ok(rest)
        }
    }

    fn ensemble(combine: Combine, scripts: &[&[(f64, bool)]]) -> Ensemble {
        Ensemble::new(
            combine,
            scripts
                .iter()
                .map(|s| Box::new(Scripted(s.iter().copied().collect())) as Box<dyn Detector>)
                .collect(),
        )
    }

    #[test]
    fn max_takes_the_highest_score_and_any_flag() {
        let mut e = ensemble(
            Combine::Max,
            &[&[(0.2, false), (0.9, true)], &[(0.4, false), (0.1, false)]],
        );
        assert_eq!(
            e.observe(0, &[1.0]),
            Verdict {
                score: 0.4,
                is_anomaly: false
            }
        );
        assert_eq!(
            e.observe(1, &[1.0]),
            Verdict {
                score: 0.9,
                is_anomaly: true
            }
        );
        assert_eq!(e.state_bytes(), std::mem::size_of::<Ensemble>() + 200);
    }

    #[test]
    fn mean_averages_and_needs_half_the_votes() {
        let mut e = ensemble(
            Combine::Mean,
            &[
                &[(0.9, true), (0.9, true)],
                &[(0.3, false), (0.6, true)],
                &[(0.0, false), (0.0, false)],
            ],
        );
        let first = e.observe(0, &[1.0]);
        assert!((first.score - 0.4).abs() < 1e-12);
        assert!(!first.is_anomaly, "one vote of three");
        assert!(e.observe(1, &[1.0]).is_anomaly, "two votes of three");
    }
}
