//! The W1 reference: a hand-written single-threaded aggregation, and the tools to compare
//! Weir's output with it.
//!
//! [`aggregate`] is both the benchmark's *floor* (the fastest simple program a competent
//! engineer would write for W1 without a stream processor: read lines, parse with serde into
//! a struct borrowing the device name, fold into a hash map keyed by device and window) and
//! the oracle that Weir's output must equal. Keeping one piece of code for both roles means
//! the figure we compare against is the same computation we check correctness with.
//!
//! Shared by the benchmark and `tests/w1.rs` through `#[path]`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The W1 window: 10 s tumbling windows aligned to the epoch, as in `pipeline.yaml`.
pub const WINDOW_MS: i64 = 10_000;

/// The zscore rule of the W1 `anomaly` column: a window is an anomaly when its device has
/// at least this many earlier windows ...
pub const ANOMALY_MIN_HISTORY: u64 = 2;
/// ... and its mean temperature lies more than this many population standard deviations
/// from the mean of the device's earlier windows' means.
pub const ANOMALY_THRESHOLD: f64 = 3.0;

/// How near the threshold (relative) a window's deviation may be for the two sides to
/// disagree on its `anomaly` flag: near the line, the last bits of the means decide.
pub const ANOMALY_MARGIN: f64 = 1e-6;

/// The relative tolerance for floats: averages are sums divided by counts, and a sum's last
/// bits depend on the order rows were added in, which a parallel or batched engine changes.
pub const REL_TOLERANCE: f64 = 1e-9;

/// One output row: the aggregate of one device over one window.
#[derive(Clone, Debug, Serialize)]
pub struct WindowRow {
    /// The device name, e.g. `dev-0042`.
    pub device: String,
    /// Inclusive window start, epoch milliseconds.
    pub window_start: i64,
    /// Exclusive window end, epoch milliseconds.
    pub window_end: i64,
    /// How many readings fell into the window.
    pub count: u64,
    /// Mean temperature.
    pub avg_temperature: f64,
    /// Lowest temperature.
    pub min_temperature: f64,
    /// Highest temperature.
    pub max_temperature: f64,
    /// Mean humidity.
    pub avg_humidity: f64,
    /// The zscore rule over the device's earlier windows (see [`ANOMALY_THRESHOLD`]).
    pub anomaly: bool,
    /// How far the deviation is from the threshold, relative; NaN when not known (rows
    /// read back from Weir's output).
    #[serde(skip)]
    pub anomaly_margin: f64,
}

/// Rows are equal when every output field is; the margin is bookkeeping, not output.
impl PartialEq for WindowRow {
    fn eq(&self, other: &Self) -> bool {
        self.device == other.device
            && self.window_start == other.window_start
            && self.window_end == other.window_end
            && self.count == other.count
            && self.avg_temperature == other.avg_temperature
            && self.min_temperature == other.min_temperature
            && self.max_temperature == other.max_temperature
            && self.avg_humidity == other.avg_humidity
            && self.anomaly == other.anomaly
    }
}

/// One input line. The device borrows from the line buffer, so parsing does not allocate.
#[derive(Deserialize)]
struct Reading<'a> {
    device: &'a str,
    ts: i64,
    temperature: f64,
    humidity: f64,
}

/// The running aggregate of one (device, window).
struct Acc {
    count: u64,
    sum_temperature: f64,
    min_temperature: f64,
    max_temperature: f64,
    sum_humidity: f64,
}

impl Acc {
    fn new() -> Self {
        Acc {
            count: 0,
            sum_temperature: 0.0,
            min_temperature: f64::INFINITY,
            max_temperature: f64::NEG_INFINITY,
            sum_humidity: 0.0,
        }
    }

    fn add(&mut self, reading: &Reading<'_>) {
        self.count += 1;
        self.sum_temperature += reading.temperature;
        self.min_temperature = self.min_temperature.min(reading.temperature);
        self.max_temperature = self.max_temperature.max(reading.temperature);
        self.sum_humidity += reading.humidity;
    }
}

/// Aggregates W1 JSON lines per device and per tumbling window of `window_ms`.
///
/// Rows come out sorted by window start, then device. Blank lines are skipped; any other
/// line that is not a W1 reading is an error naming its line number.
pub fn aggregate(mut input: impl BufRead, window_ms: i64) -> Result<Vec<WindowRow>> {
    if window_ms <= 0 {
        bail!("window size must be positive, got {window_ms} ms");
    }
    // Devices are interned once, so the hot map is keyed by two integers and the line
    // buffer can be reused without copying the name out of it.
    let mut device_ids: HashMap<String, u32> = HashMap::new();
    let mut device_names: Vec<String> = Vec::new();
    let mut windows: HashMap<(u32, i64), Acc> = HashMap::new();
    let mut line = Vec::with_capacity(128);
    let mut number = 0u64;
    loop {
        line.clear();
        if input
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read input line {}", number + 1))?
            == 0
        {
            break;
        }
        number += 1;
        if line.trim_ascii().is_empty() {
            continue;
        }
        let reading: Reading<'_> = serde_json::from_slice(&line).with_context(|| {
            format!(
                "input line {number} is not a w1 reading: {}",
                String::from_utf8_lossy(&line).trim_end()
            )
        })?;
        let device = match device_ids.get(reading.device) {
            Some(&id) => id,
            None => {
                let id = u32::try_from(device_names.len()).context("more than 2^32 devices")?;
                device_ids.insert(reading.device.to_owned(), id);
                device_names.push(reading.device.to_owned());
                id
            }
        };
        let start = reading.ts - reading.ts.rem_euclid(window_ms);
        windows
            .entry((device, start))
            .or_insert_with(Acc::new)
            .add(&reading);
    }
    let mut rows: Vec<WindowRow> = windows
        .into_iter()
        .map(|((device, start), acc)| WindowRow {
            device: device_names[device as usize].clone(),
            window_start: start,
            window_end: start + window_ms,
            count: acc.count,
            avg_temperature: acc.sum_temperature / acc.count as f64,
            min_temperature: acc.min_temperature,
            max_temperature: acc.max_temperature,
            avg_humidity: acc.sum_humidity / acc.count as f64,
            anomaly: false,
            anomaly_margin: f64::NAN,
        })
        .collect();
    rows.sort_by(|a, b| (a.window_start, &a.device).cmp(&(b.window_start, &b.device)));
    flag_anomalies(&mut rows);
    Ok(rows)
}

/// Sets each row's `anomaly` by the zscore rule, walking the windows in time order with a
/// running mean and variance per device (Welford).
fn flag_anomalies(rows: &mut [WindowRow]) {
    let mut history: HashMap<String, (u64, f64, f64)> = HashMap::new();
    for row in rows.iter_mut() {
        let (count, mean, m2) = history.entry(row.device.clone()).or_insert((0, 0.0, 0.0));
        let x = row.avg_temperature;
        if *count >= ANOMALY_MIN_HISTORY {
            let limit = ANOMALY_THRESHOLD * (*m2 / *count as f64).max(0.0).sqrt();
            let deviation = (x - *mean).abs();
            row.anomaly = deviation > limit;
            row.anomaly_margin = (deviation - limit) / deviation.max(limit).max(f64::MIN_POSITIVE);
        }
        *count += 1;
        let delta = x - *mean;
        *mean += delta / *count as f64;
        *m2 += delta * (x - *mean);
    }
}

/// [`aggregate`] over a file.
pub fn aggregate_file(path: &Path, window_ms: i64) -> Result<Vec<WindowRow>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    aggregate(BufReader::with_capacity(1 << 20, file), window_ms)
        .with_context(|| format!("in {}", path.display()))
}

/// Writes rows as JSON lines, the shape Weir's file sink writes with `timestamps: epoch_ms`.
pub fn write_rows(rows: &[WindowRow], out: impl Write) -> Result<()> {
    let mut out = BufWriter::new(out);
    for row in rows {
        serde_json::to_writer(&mut out, row)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Reads output rows written by Weir (or by [`write_rows`]): JSON lines, fields in any order,
/// extra fields rejected so a stray column is noticed.
pub fn read_rows(input: impl BufRead) -> Result<Vec<WindowRow>> {
    let mut rows = Vec::new();
    for (index, line) in input.lines().enumerate() {
        let number = index + 1;
        let line = line.with_context(|| format!("cannot read output line {number}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = parse_row(&line).with_context(|| format!("output line {number}: {line}"))?;
        rows.push(row);
    }
    Ok(rows)
}

/// [`read_rows`] over a file.
pub fn read_rows_file(path: &Path) -> Result<Vec<WindowRow>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    read_rows(BufReader::new(file)).with_context(|| format!("in {}", path.display()))
}

fn parse_row(line: &str) -> Result<WindowRow> {
    let value: serde_json::Value = serde_json::from_str(line).context("not json")?;
    let Some(object) = value.as_object() else {
        bail!("not a json object");
    };
    const FIELDS: [&str; 9] = [
        "device",
        "window_start",
        "window_end",
        "count",
        "avg_temperature",
        "min_temperature",
        "max_temperature",
        "avg_humidity",
        "anomaly",
    ];
    if let Some(extra) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        bail!("unexpected field '{extra}': the w1 output has exactly {FIELDS:?}");
    }
    let field = |name: &str| {
        object
            .get(name)
            .with_context(|| format!("field '{name}' is missing"))
    };
    let int = |name: &str| -> Result<i64> {
        field(name)?.as_i64().with_context(|| {
            format!(
                "field '{name}' is not an integer (window bounds must be written as epoch \
                 milliseconds: set `timestamps: epoch_ms` on the file sink)"
            )
        })
    };
    let float = |name: &str| -> Result<f64> {
        field(name)?
            .as_f64()
            .with_context(|| format!("field '{name}' is not a number"))
    };
    Ok(WindowRow {
        device: field("device")?
            .as_str()
            .context("field 'device' is not a string")?
            .to_owned(),
        window_start: int("window_start")?,
        window_end: int("window_end")?,
        count: u64::try_from(int("count")?).context("field 'count' is negative")?,
        avg_temperature: float("avg_temperature")?,
        min_temperature: float("min_temperature")?,
        max_temperature: float("max_temperature")?,
        avg_humidity: float("avg_humidity")?,
        anomaly: field("anomaly")?
            .as_bool()
            .context("field 'anomaly' is not a boolean")?,
        anomaly_margin: f64::NAN,
    })
}

/// How two outputs differ: every problem counted, the first few spelled out.
#[derive(Debug, Default)]
pub struct Mismatch {
    /// Rows expected and absent from the actual output.
    pub missing: usize,
    /// Rows in the actual output that were not expected.
    pub unexpected: usize,
    /// Keys that appear more than once in the actual output.
    pub duplicated: usize,
    /// Rows present on both sides whose values differ.
    pub different: usize,
    /// Descriptions of the first problems found.
    pub examples: Vec<String>,
}

impl Mismatch {
    const MAX_EXAMPLES: usize = 10;

    fn note(&mut self, example: String) {
        if self.examples.len() < Self::MAX_EXAMPLES {
            self.examples.push(example);
        }
    }

    fn is_empty(&self) -> bool {
        self.missing + self.unexpected + self.duplicated + self.different == 0
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outputs differ: {} rows missing, {} unexpected, {} duplicated, {} with other values",
            self.missing, self.unexpected, self.duplicated, self.different
        )?;
        for example in &self.examples {
            write!(f, "\n  {example}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Mismatch {}

/// Whether two floats agree within `rel_tol` of the larger magnitude.
pub fn close(a: f64, b: f64, rel_tol: f64) -> bool {
    a == b || (a - b).abs() <= rel_tol * a.abs().max(b.abs())
}

/// Checks that `actual` holds the same rows as `expected`, in any order: keys, window end and
/// count exactly, floats within `rel_tol` relative.
pub fn compare(expected: &[WindowRow], actual: &[WindowRow], rel_tol: f64) -> Result<(), Mismatch> {
    let mut mismatch = Mismatch::default();
    let mut wanted: BTreeMap<(&str, i64), &WindowRow> = BTreeMap::new();
    for row in expected {
        wanted.insert((row.device.as_str(), row.window_start), row);
    }
    let mut seen: BTreeMap<(&str, i64), ()> = BTreeMap::new();
    for row in actual {
        let key = (row.device.as_str(), row.window_start);
        if seen.insert(key, ()).is_some() {
            mismatch.duplicated += 1;
            mismatch.note(format!("duplicated: {row:?}"));
            continue;
        }
        let Some(want) = wanted.get(&key) else {
            mismatch.unexpected += 1;
            mismatch.note(format!("unexpected: {row:?}"));
            continue;
        };
        let floats = [
            ("avg_temperature", want.avg_temperature, row.avg_temperature),
            ("min_temperature", want.min_temperature, row.min_temperature),
            ("max_temperature", want.max_temperature, row.max_temperature),
            ("avg_humidity", want.avg_humidity, row.avg_humidity),
        ];
        let mut problems = Vec::new();
        if want.window_end != row.window_end {
            problems.push(format!(
                "window_end {} != {}",
                row.window_end, want.window_end
            ));
        }
        if want.count != row.count {
            problems.push(format!("count {} != {}", row.count, want.count));
        }
        // NaN (no margin known) counts as far from the line.
        let near_the_line = want.anomaly_margin.abs() <= ANOMALY_MARGIN;
        if want.anomaly != row.anomaly && !near_the_line {
            problems.push(format!("anomaly {} != {}", row.anomaly, want.anomaly));
        }
        for (name, want, got) in floats {
            if !close(want, got, rel_tol) {
                problems.push(format!("{name} {got} != {want}"));
            }
        }
        if !problems.is_empty() {
            mismatch.different += 1;
            mismatch.note(format!(
                "{} window {}: {} (actual != expected)",
                row.device,
                row.window_start,
                problems.join(", ")
            ));
        }
    }
    for (key, row) in &wanted {
        if !seen.contains_key(key) {
            mismatch.missing += 1;
            mismatch.note(format!("missing: {row:?}"));
        }
    }
    if mismatch.is_empty() {
        Ok(())
    } else {
        Err(mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &str = r#"{"device":"a","ts":10000,"temperature":20.0,"humidity":50.0}
{"device":"b","ts":10005,"temperature":30.5,"humidity":40.0}
{"device":"a","ts":19999,"temperature":22.0,"humidity":54.0}

{"device":"a","ts":20000,"temperature":-1.0,"humidity":10.0}
{"device":"a","ts":-1,"temperature":5.0,"humidity":1.0}
"#;

    fn row(device: &str, start: i64, count: u64, t: [f64; 3], h: f64) -> WindowRow {
        WindowRow {
            device: device.to_owned(),
            window_start: start,
            window_end: start + WINDOW_MS,
            count,
            avg_temperature: t[0],
            min_temperature: t[1],
            max_temperature: t[2],
            avg_humidity: h,
            anomaly: false,
            anomaly_margin: f64::NAN,
        }
    }

    #[test]
    fn aggregates_per_device_and_window_sorted() {
        let rows = aggregate(INPUT.as_bytes(), WINDOW_MS).unwrap();
        assert_eq!(
            rows,
            vec![
                row("a", -10_000, 1, [5.0, 5.0, 5.0], 1.0),
                row("a", 10_000, 2, [21.0, 20.0, 22.0], 52.0),
                row("b", 10_000, 1, [30.5, 30.5, 30.5], 40.0),
                row("a", 20_000, 1, [-1.0, -1.0, -1.0], 10.0),
            ]
        );
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let input = "{\"device\":\"a\",\"ts\":1,\"temperature\":1.0,\"humidity\":1.0}\n{\"device\":\"a\"}\n";
        let message = format!("{:#}", aggregate(input.as_bytes(), WINDOW_MS).unwrap_err());
        assert!(message.contains("input line 2"), "{message}");
        assert!(aggregate(INPUT.as_bytes(), 0).is_err());
    }

    #[test]
    fn written_rows_read_back_equal() {
        let rows = aggregate(INPUT.as_bytes(), WINDOW_MS).unwrap();
        let mut text = Vec::new();
        write_rows(&rows, &mut text).unwrap();
        let back = read_rows(text.as_slice()).unwrap();
        assert!(compare(&rows, &back, 0.0).is_ok());
        assert_eq!(back.len(), rows.len());
    }

    #[test]
    fn a_window_far_from_its_devices_earlier_windows_is_an_anomaly() {
        let mut input = String::new();
        for (window, temperature) in [20.0, 21.0, 20.0, 20.5, 35.0].into_iter().enumerate() {
            let ts = window as i64 * WINDOW_MS;
            input.push_str(&format!(
                "{{\"device\":\"a\",\"ts\":{ts},\"temperature\":{temperature},\"humidity\":1.0}}\n"
            ));
        }
        let rows = aggregate(input.as_bytes(), WINDOW_MS).unwrap();
        let flags: Vec<bool> = rows.iter().map(|r| r.anomaly).collect();
        // 20 after [20, 21] is within 3 sigma (0.5 from the mean, sigma 0.5); 35 is not.
        assert_eq!(flags, [false, false, false, false, true]);
        let mut flipped = rows.clone();
        flipped[4].anomaly = false;
        let text = compare(&rows, &flipped, REL_TOLERANCE)
            .unwrap_err()
            .to_string();
        assert!(text.contains("anomaly false != true"), "{text}");
    }

    #[test]
    fn reading_accepts_any_field_order_and_rejects_wrong_shapes() {
        let line = r#"{"count":2,"avg_humidity":1.5,"window_end":20,"window_start":10,"device":"x","max_temperature":3,"min_temperature":1,"avg_temperature":2,"anomaly":false}"#;
        let rows = read_rows(line.as_bytes()).unwrap();
        assert_eq!(rows[0].device, "x");
        assert_eq!((rows[0].window_start, rows[0].count), (10, 2));

        let stamped = line.replace("\"window_start\":10", "\"window_start\":\"1970-01-01\"");
        let message = format!("{:#}", read_rows(stamped.as_bytes()).unwrap_err());
        assert!(message.contains("epoch_ms"), "{message}");

        let extra = line.replace("\"count\":2", "\"count\":2,\"n\":1");
        let message = format!("{:#}", read_rows(extra.as_bytes()).unwrap_err());
        assert!(message.contains("unexpected field 'n'"), "{message}");
    }

    #[test]
    fn compare_finds_every_kind_of_difference() {
        let expected = aggregate(INPUT.as_bytes(), WINDOW_MS).unwrap();
        let mut actual = expected.clone();
        actual.reverse(); // order does not matter
        actual[0].avg_temperature *= 1.0 + 1e-12; // within tolerance
        assert!(compare(&expected, &actual, REL_TOLERANCE).is_ok());

        actual[1].count += 1;
        actual[2].max_temperature += 0.001;
        actual.remove(3);
        actual.push(row("z", 0, 1, [1.0, 1.0, 1.0], 1.0));
        actual.push(actual[0].clone());
        let mismatch = compare(&expected, &actual, REL_TOLERANCE).unwrap_err();
        assert_eq!(
            (
                mismatch.missing,
                mismatch.unexpected,
                mismatch.duplicated,
                mismatch.different
            ),
            (1, 1, 1, 2)
        );
        let text = mismatch.to_string();
        assert!(text.contains("b window 10000: count 2 != 1"), "{text}");
        assert!(text.contains("max_temperature"), "{text}");
    }

    #[test]
    fn closeness_is_relative() {
        assert!(close(1e6, 1e6 + 1e-4, 1e-9));
        assert!(!close(1.0, 1.0 + 1e-6, 1e-9));
        assert!(close(0.0, 0.0, 0.0));
    }
}
