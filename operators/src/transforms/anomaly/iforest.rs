//! The `iforest` detector: an isolation forest over one or more value columns and their
//! recent values, retrained as the series goes.
//!
//! Each row becomes a point: the values of all value columns over the last `shingle`
//! rows (oldest first), so both unusual combinations of columns and unusual shapes in
//! time stand out. A series keeps its last `window_rows` points. Once it has
//! `min_history` of them, and again every `retrain_rows` rows, it grows `trees` isolation
//! trees, each on `sample_size` points drawn from the window (Liu, Ting and Zhou, 2008):
//! a tree splits on a random coordinate at a random value between that coordinate's
//! minimum and maximum, until a point is alone or the tree is `log2(sample_size)` deep.
//! Anomalies are isolated in few splits. A new row is scored against the trees grown
//! from earlier rows, `2^(-E[h] / c(sample_size))` where `E[h]` is its mean path length,
//! so about 0.5 for a typical point and towards 1 for one that is easy to isolate. A row
//! that lies outside the points a node was grown on can be cut off at that node, with
//! the probability a random cut over the widened range would have (see
//! [`path_length`]), so points beyond the training data score high.
//!
//! The forest is deterministic: every series draws from its own generator seeded with
//! `seed`, so the same rows and seed give the same scores. Splits are on raw values, so
//! columns of any scale mix without normalising them first.

use std::collections::VecDeque;

use ndarray::{Array2, ArrayView1};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    Detector, StateError, Verdict, check, load_state, save_state, score_threshold_problem,
};

/// The `iforest` section of an `anomaly` transform's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IforestConfig {
    /// Rows of each value column in one point (1: the current row only).
    pub shingle: usize,
    /// Trees in the forest.
    pub trees: usize,
    /// Points each tree is grown on.
    pub sample_size: usize,
    /// Recent points the samples are drawn from.
    pub window_rows: usize,
    /// The forest is regrown every this many rows.
    pub retrain_rows: u64,
    /// Points a series needs before the first forest is grown; rows score 0 until then.
    pub min_history: usize,
    /// The score from which a row is an anomaly (0..1).
    pub threshold: f64,
    /// The random generator's seed: the same rows and seed give the same scores.
    pub seed: u64,
}

impl Default for IforestConfig {
    fn default() -> Self {
        IforestConfig {
            shingle: 4,
            trees: 50,
            sample_size: 128,
            window_rows: 1024,
            retrain_rows: 256,
            min_history: 256,
            threshold: 0.65,
            seed: 42,
        }
    }
}

impl IforestConfig {
    /// Every problem with the parameters, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let mut at_least = |field: &'static str, value: usize, least: usize| {
            if value < least {
                problems.push((field, format!("{field} must be at least {least}")));
            }
        };
        at_least("shingle", self.shingle, 1);
        at_least("trees", self.trees, 1);
        at_least("sample_size", self.sample_size, 2);
        at_least("window_rows", self.window_rows, self.sample_size.max(2));
        at_least("retrain_rows", self.retrain_rows as usize, 1);
        at_least("min_history", self.min_history, 2);
        if self.min_history > self.window_rows {
            problems.push((
                "min_history",
                format!(
                    "min_history ({}) cannot exceed window_rows ({}): the window holds the history",
                    self.min_history, self.window_rows
                ),
            ));
        }
        problems.extend(score_threshold_problem(self.threshold));
        problems
    }
}

/// One node of a tree: a leaf when `feature` is [`LEAF`]. A tree's nodes follow it in
/// `nodes` (its children come after it), so a tree cannot loop.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Node {
    split: f64,
    /// The range of the split coordinate among the node's training points.
    low: f64,
    high: f64,
    feature: u32,
    left: u32,
    right: u32,
    /// Training points that reached a leaf.
    size: u32,
}

const LEAF: u32 = u32::MAX;

/// `c(n)`: the mean path length of an unsuccessful search in a binary search tree of `n`
/// points, which normalises path lengths.
fn average_path(n: usize) -> f64 {
    match n {
        0 | 1 => 0.0,
        2 => 1.0,
        n => {
            let n = n as f64;
            const EULER_GAMMA: f64 = 0.577_215_664_901_532_9;
            2.0 * ((n - 1.0).ln() + EULER_GAMMA) - 2.0 * (n - 1.0) / n
        }
    }
}

/// Grows one tree on the window rows `sample`, appending its nodes to `nodes`.
fn grow(
    window: &Array2<f64>,
    sample: &mut [usize],
    depth: usize,
    max_depth: usize,
    rng: &mut ChaCha8Rng,
    nodes: &mut Vec<Node>,
) -> u32 {
    let at = nodes.len();
    nodes.push(Node {
        split: 0.0,
        low: 0.0,
        high: 0.0,
        feature: LEAF,
        left: 0,
        right: 0,
        size: sample.len() as u32,
    });
    if sample.len() <= 1 || depth >= max_depth {
        return at as u32;
    }
    // A random coordinate that still varies among these points (a few tries, as a
    // coordinate that is constant here cannot split them).
    let dims = window.ncols();
    for _ in 0..dims.min(8) {
        let feature = rng.random_range(0..dims);
        let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
        for &row in sample.iter() {
            let v = window[[row, feature]];
            low = low.min(v);
            high = high.max(v);
        }
        if low >= high {
            continue;
        }
        let split = rng.random_range(low..high);
        let mut left_len = 0;
        for i in 0..sample.len() {
            if window[[sample[i], feature]] < split {
                sample.swap(i, left_len);
                left_len += 1;
            }
        }
        let (left, right) = sample.split_at_mut(left_len);
        let left = grow(window, left, depth + 1, max_depth, rng, nodes);
        let right = grow(window, right, depth + 1, max_depth, rng, nodes);
        nodes[at] = Node {
            split,
            low,
            high,
            feature: feature as u32,
            left,
            right,
            size: 0,
        };
        return at as u32;
    }
    at as u32
}

/// The expected path length of `point` in the tree rooted at `root`.
///
/// A point inside every node's training range follows the splits, as in Liu et al. A
/// point outside a node's range along its split coordinate, by `gap`, would be cut off
/// there with probability `gap / (high - low + gap)` by a random cut over the range
/// widened to include it (as random cut forests reason); it counts as isolated one level
/// down with that probability and follows the split otherwise. Without this, a point
/// far outside the training data would descend to the training points nearest to it
/// and score like them.
fn path_length(nodes: &[Node], root: u32, point: ArrayView1<'_, f64>) -> f64 {
    let mut node = nodes[root as usize];
    let mut depth = 0.0;
    let mut expected = 0.0;
    let mut still_here = 1.0;
    while node.feature != LEAF {
        let value = point[node.feature as usize];
        let gap = (node.low - value).max(value - node.high).max(0.0);
        if gap > 0.0 {
            let cut_off = gap / (node.high - node.low + gap);
            expected += still_here * cut_off * (depth + 1.0);
            still_here *= 1.0 - cut_off;
        }
        depth += 1.0;
        let next = if value < node.split {
            node.left
        } else {
            node.right
        };
        node = nodes[next as usize];
    }
    expected + still_here * (depth + average_path(node.size as usize))
}

/// One series' forest.
pub struct Iforest {
    config: IforestConfig,
    columns: usize,
    /// The last `shingle` rows' values, oldest first, flattened.
    recent: VecDeque<f64>,
    /// The current point, copied out of `recent`.
    point: Vec<f64>,
    /// The last `window_rows` points, one per row, written round-robin.
    window: Array2<f64>,
    filled: usize,
    next: usize,
    /// All trees' nodes, and each tree's root.
    nodes: Vec<Node>,
    roots: Vec<u32>,
    /// `c(n)` of the points each tree was grown on.
    normaliser: f64,
    rows_since_growth: u64,
    rng: ChaCha8Rng,
}

impl Iforest {
    /// A fresh series over `columns` value columns.
    pub fn new(config: &IforestConfig, columns: usize) -> Self {
        let dims = config.shingle * columns;
        Iforest {
            config: config.clone(),
            columns,
            recent: VecDeque::with_capacity(dims),
            point: Vec::with_capacity(dims),
            window: Array2::zeros((0, dims)),
            filled: 0,
            next: 0,
            nodes: Vec::new(),
            roots: Vec::new(),
            normaliser: 1.0,
            rows_since_growth: 0,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
        }
    }

    fn remember(&mut self, point: &[f64]) {
        if self.window.nrows() == 0 {
            // Allocated on first use, so idle series cost little.
            self.window = Array2::zeros((self.config.window_rows, point.len()));
        }
        self.window
            .row_mut(self.next)
            .iter_mut()
            .zip(point)
            .for_each(|(slot, v)| *slot = *v);
        self.next = (self.next + 1) % self.config.window_rows;
        self.filled = (self.filled + 1).min(self.config.window_rows);
    }

    fn grow_forest(&mut self) {
        let sample_size = self.config.sample_size.min(self.filled);
        let max_depth = (sample_size as f64).log2().ceil() as usize;
        self.nodes.clear();
        self.roots.clear();
        for _ in 0..self.config.trees {
            let mut sample =
                rand::seq::index::sample(&mut self.rng, self.filled, sample_size).into_vec();
            let root = grow(
                &self.window,
                &mut sample,
                0,
                max_depth,
                &mut self.rng,
                &mut self.nodes,
            );
            self.roots.push(root);
        }
        self.normaliser = average_path(sample_size).max(f64::MIN_POSITIVE);
        self.rows_since_growth = 0;
    }

    fn score(&self, point: &[f64]) -> f64 {
        let point = ArrayView1::from(point);
        let total: f64 = self
            .roots
            .iter()
            .map(|&root| path_length(&self.nodes, root, point))
            .sum();
        let mean = total / self.roots.len() as f64;
        2f64.powf(-mean / self.normaliser)
    }
}

impl Detector for Iforest {
    fn observe(&mut self, _ts: i64, values: &[f64]) -> Verdict {
        let dims = self.config.shingle * self.columns;
        if self.recent.len() == dims {
            self.recent.drain(..self.columns);
        }
        self.recent.extend(values.iter().copied());
        if self.recent.len() < dims {
            return Verdict::NORMAL;
        }
        // The point is scored and stored from a reused buffer: no allocation per row.
        let mut point = std::mem::take(&mut self.point);
        point.clear();
        point.extend(self.recent.iter().copied());
        let verdict = if self.roots.is_empty() {
            Verdict::NORMAL
        } else {
            let score = self.score(&point);
            Verdict {
                score,
                is_anomaly: score >= self.config.threshold,
            }
        };
        self.remember(&point);
        self.point = point;
        self.rows_since_growth += 1;
        let due = if self.roots.is_empty() {
            self.filled >= self.config.min_history
        } else {
            self.rows_since_growth >= self.config.retrain_rows
        };
        if due {
            self.grow_forest();
        }
        verdict
    }

    fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + (self.recent.capacity() + self.point.capacity()) * std::mem::size_of::<f64>()
            + self.window.len() * std::mem::size_of::<f64>()
            + self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.roots.capacity() * std::mem::size_of::<u32>()
    }

    /// The window, the forest and the random generator's position in its stream, so
    /// the forests grown after a restore are those that would have grown without it.
    fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        let window: Vec<f64> = self.window.iter().copied().collect();
        let points = (
            &self.recent,
            self.window.nrows(),
            window,
            self.filled,
            self.next,
        );
        let forest = (&self.nodes, &self.roots, self.normaliser);
        save_state(
            &(
                points,
                forest,
                self.rows_since_growth,
                self.rng.get_word_pos(),
            ),
            out,
        )
    }

    fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
        type Points = (VecDeque<f64>, usize, Vec<f64>, usize, usize);
        type Forest = (Vec<Node>, Vec<u32>, f64);
        type Saved = (Points, Forest, u64, u128);
        let (((recent, rows, window, filled, next), (nodes, roots, normaliser), since, word), rest): (Saved, _) =
            load_state(bytes)?;
        let dims = self.config.shingle * self.columns;
        let window_rows = self.config.window_rows;
        check(
            recent.len() <= dims && recent.len() % self.columns.max(1) == 0,
            "the iforest's recent values do not fit its shingle",
        )?;
        check(
            (rows == 0 && filled == 0 && next == 0 && window.is_empty())
                || (rows == window_rows && filled <= rows && next < rows),
            "the iforest's window does not fit window_rows",
        )?;
        let window = Array2::from_shape_vec((rows, if rows == 0 { 0 } else { dims }), window)
            .map_err(|_| StateError::Mismatch("the iforest's window is not rows × dimensions"))?;
        let len = nodes.len();
        let well_formed = nodes.iter().enumerate().all(|(at, node)| {
            node.feature == LEAF
                || ((node.feature as usize) < dims
                    && (at + 1..len).contains(&(node.left as usize))
                    && (at + 1..len).contains(&(node.right as usize)))
        });
        check(
            well_formed && roots.iter().all(|&root| (root as usize) < len),
            "the iforest's trees are malformed",
        )?;
        check(
            normaliser.is_finite() && normaliser > 0.0,
            "the iforest's normaliser is not a positive number",
        )?;
        self.recent.clear();
        self.recent.extend(recent);
        (self.window, self.filled, self.next) = (window, filled, next);
        (self.nodes, self.roots, self.normaliser) = (nodes, roots, normaliser);
        self.rows_since_growth = since;
        self.rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        self.rng.set_word_pos(word);
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use weir_testkit::noise;

    use super::*;

    fn config() -> IforestConfig {
        IforestConfig {
            shingle: 1,
            ..IforestConfig::default()
        }
    }

    /// The highest score of `n` more usual rows from `next`, then the score of `odd`.
    fn usual_max_then(
        forest: &mut Iforest,
        from: u64,
        n: u64,
        next: impl Fn(u64) -> Vec<f64>,
        odd: &[f64],
    ) -> (f64, f64) {
        let usual = (from..from + n)
            .map(|i| forest.observe(i as i64, &next(i)).score)
            .fold(0.0, f64::max);
        (usual, forest.observe((from + n) as i64, odd).score)
    }

    #[test]
    fn a_point_off_the_joint_pattern_outscores_every_usual_one() {
        // Two columns in two regimes: both low (about 2) or both high (about 8). (2, 8)
        // has a common value in each column, but never that pair.
        let mut forest = Iforest::new(&config(), 2);
        let row = |i: u64| {
            let centre = if noise(i, 1) < 0.5 { 2.0 } else { 8.0 };
            vec![centre + noise(i, 2) - 0.5, centre + noise(i, 3) - 0.5]
        };
        for i in 0..2000 {
            forest.observe(i as i64, &row(i));
        }
        let (usual, odd) = usual_max_then(&mut forest, 2000, 500, row, &[2.0, 8.0]);
        assert!(odd > usual + 0.05, "odd {odd} vs usual at most {usual}");
        assert!(odd >= config().threshold, "{odd}");
    }

    #[test]
    fn the_same_seed_gives_the_same_scores_and_another_seed_does_not() {
        let run = |seed: u64| -> Vec<f64> {
            let mut forest = Iforest::new(
                &IforestConfig {
                    seed,
                    ..IforestConfig::default()
                },
                1,
            );
            (0..1500u64)
                .map(|i| forest.observe(i as i64, &[noise(i, 3)]).score)
                .collect()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn rows_score_zero_until_the_first_forest_is_grown() {
        let mut forest = Iforest::new(&IforestConfig::default(), 1);
        // shingle 4: the first point is complete at row 3; min_history 256 points.
        for i in 0..259u64 {
            assert_eq!(forest.observe(i as i64, &[noise(i, 4)]), Verdict::NORMAL);
        }
        assert!(forest.observe(259, &[noise(259, 4)]).score > 0.0);
    }

    #[test]
    fn a_shape_never_seen_outscores_every_usual_one() {
        // A sawtooth; then a step back up in the middle of a tooth: each value is
        // common, the run of four is not.
        let mut forest = Iforest::new(&IforestConfig::default(), 1);
        let tooth = |i: u64| vec![(i % 10) as f64 + noise(i, 5) * 0.1];
        for i in 0..3000 {
            forest.observe(i as i64, &tooth(i));
        }
        // Rows 3000.. continue the tooth; the odd row follows 3000 + 500 = ..0 with 8.
        let (usual, odd) = usual_max_then(&mut forest, 3000, 500, tooth, &[8.0]);
        assert!(odd > usual, "odd {odd} vs usual at most {usual}");
    }

    #[test]
    fn average_path_matches_the_paper() {
        assert_eq!(average_path(1), 0.0);
        assert_eq!(average_path(2), 1.0);
        // c(256) = 2 H(255) - 2 * 255 / 256 = 10.2448 (Liu et al.)
        assert!((average_path(256) - 10.2448).abs() < 1e-3);
    }

    #[test]
    fn bad_parameters_are_named() {
        let config = IforestConfig {
            shingle: 0,
            trees: 0,
            sample_size: 1,
            window_rows: 1,
            threshold: 0.0,
            ..IforestConfig::default()
        };
        let fields: Vec<&str> = config.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "shingle",
                "trees",
                "sample_size",
                "window_rows",
                "min_history",
                "threshold"
            ]
        );
    }
}
