//! The deterministic W1 input: JSON lines of sensor readings from many devices.
//!
//! Each line is `{"device":"dev-0042","ts":<epoch ms>,"temperature":<f64>,"humidity":<f64>}`.
//! Devices are interleaved tick by tick: every tick of event time (10 ms at the default
//! 100 readings/s) carries exactly one reading per device, so the stream looks like a
//! gateway multiplexing a fleet. Values wander around a per-device mean with a seeded
//! generator of our own, so the same [`W1Spec`] always yields the same bytes, on any
//! machine, without pulling a crate into the benchmark.
//!
//! [`W1Spec::shuffle_within_ms`] permutes lines inside blocks of event time to prove that a
//! pipeline tolerates out-of-order input: no line moves by `shuffle_within_ms` or more of
//! event time, so a source declaring `max_out_of_order` of that size must produce the same
//! result as on the ordered input.
//!
//! This file is shared by the benchmark and `tests/w1.rs` through `#[path]`; it depends on
//! nothing but `std`.

use std::io::{self, Write};

/// The first event time of every W1 input: 2026-01-01T00:00:00Z in epoch milliseconds.
///
/// It is a multiple of every window size we use, so windows start exactly at the input's
/// start and the first window is full.
pub const W1_EPOCH_MS: i64 = 1_767_225_600_000;

/// What to generate. [`W1Spec::default`] is the full benchmark input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W1Spec {
    /// How many devices report; they are named `dev-0000`, `dev-0001`, ...
    pub devices: u32,
    /// Readings per device per second of event time; each tick is `1000 / rate` ms long.
    pub readings_per_device_per_second: u32,
    /// How many lines to write in total; the last tick may be partial.
    pub lines: u64,
    /// Seeds every value, so different seeds give different but equally shaped data.
    pub seed: u64,
    /// When non-zero, lines are shuffled inside blocks of event time this long, so no line
    /// is displaced by this much event time or more. Blocks are offset by half their length
    /// so that they straddle window boundaries (sizes that divide a window would otherwise
    /// never mix two windows' rows).
    pub shuffle_within_ms: u64,
}

impl Default for W1Spec {
    fn default() -> Self {
        W1Spec {
            devices: 1000,
            readings_per_device_per_second: 100,
            lines: 5_000_000,
            seed: 42,
            shuffle_within_ms: 0,
        }
    }
}

/// Why a [`W1Spec`] cannot be generated.
#[derive(Debug)]
pub enum SpecError {
    /// `devices` is zero.
    NoDevices,
    /// The rate is zero or above 1000/s, which would need ticks shorter than a millisecond.
    BadRate(u32),
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpecError::NoDevices => write!(f, "w1 input needs at least one device"),
            SpecError::BadRate(rate) => write!(
                f,
                "w1 input rate {rate} readings/s per device is out of range: use 1 to 1000"
            ),
        }
    }
}

impl std::error::Error for SpecError {}

impl From<SpecError> for io::Error {
    fn from(error: SpecError) -> Self {
        io::Error::new(io::ErrorKind::InvalidInput, error)
    }
}

/// One generated reading.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    /// Index of the device, `0..devices`.
    pub device: u32,
    /// Event time in epoch milliseconds.
    pub ts: i64,
    /// Degrees Celsius, two decimals.
    pub temperature: f64,
    /// Relative humidity in percent, two decimals.
    pub humidity: f64,
}

impl Reading {
    /// Appends the reading as one JSON line (with its trailing newline).
    pub fn write_json_line(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(
            out,
            r#"{{"device":"dev-{:04}","ts":{},"temperature":{:.2},"humidity":{:.2}}}"#,
            self.device, self.ts, self.temperature, self.humidity
        )
    }
}

impl W1Spec {
    /// Checks that the spec can be generated.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.devices == 0 {
            return Err(SpecError::NoDevices);
        }
        if self.readings_per_device_per_second == 0 || self.readings_per_device_per_second > 1000 {
            return Err(SpecError::BadRate(self.readings_per_device_per_second));
        }
        Ok(())
    }

    /// The event time of tick `tick`. Integer arithmetic keeps rates that do not divide
    /// 1000 exact over long inputs instead of drifting.
    fn tick_ts(&self, tick: u64) -> i64 {
        let offset = tick * 1000 / u64::from(self.readings_per_device_per_second);
        W1_EPOCH_MS + offset as i64
    }

    /// The readings in generation order (event time ascending, devices interleaved).
    ///
    /// Fails only when the spec is invalid.
    pub fn readings(&self) -> Result<Readings, SpecError> {
        self.validate()?;
        let mut means = SplitMix64::new(self.seed ^ 0xA5A5_A5A5_A5A5_A5A5);
        let device_means = (0..self.devices)
            .map(|_| (means.uniform(12.0, 32.0), means.uniform(30.0, 70.0)))
            .collect();
        Ok(Readings {
            spec: *self,
            values: SplitMix64::new(self.seed),
            device_means,
            emitted: 0,
        })
    }

    /// Writes the whole input as JSON lines and returns how many bytes were written.
    ///
    /// With `shuffle_within_ms` set, at most one block of event time is held in memory.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<u64> {
        let mut out = CountingWriter {
            inner: out,
            bytes: 0,
        };
        let readings = self.readings()?;
        if self.shuffle_within_ms == 0 {
            for reading in readings {
                reading.write_json_line(&mut out)?;
            }
        } else {
            let block_ms = self.shuffle_within_ms as i64;
            // Half a block of offset makes blocks straddle window boundaries.
            let block_of = |ts: i64| (ts - W1_EPOCH_MS + block_ms / 2).div_euclid(block_ms);
            // A separate stream, so the shuffled input carries exactly the same readings.
            let mut rng = SplitMix64::new(self.seed ^ 0x5A5A_5A5A_5A5A_5A5A);
            let mut block: Vec<Reading> = Vec::new();
            let mut current = None;
            for reading in readings {
                let id = block_of(reading.ts);
                if current != Some(id) {
                    flush_shuffled(&mut block, &mut rng, &mut out)?;
                    current = Some(id);
                }
                block.push(reading);
            }
            flush_shuffled(&mut block, &mut rng, &mut out)?;
        }
        out.flush()?;
        Ok(out.bytes)
    }
}

/// Writes `block` in a random order (Fisher-Yates) and empties it.
fn flush_shuffled(
    block: &mut Vec<Reading>,
    rng: &mut SplitMix64,
    out: &mut impl Write,
) -> io::Result<()> {
    for i in (1..block.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        block.swap(i, j);
    }
    for reading in block.drain(..) {
        reading.write_json_line(out)?;
    }
    Ok(())
}

/// The iterator returned by [`W1Spec::readings`].
#[derive(Debug)]
pub struct Readings {
    spec: W1Spec,
    values: SplitMix64,
    /// (temperature, humidity) mean of each device.
    device_means: Vec<(f64, f64)>,
    emitted: u64,
}

impl Iterator for Readings {
    type Item = Reading;

    fn next(&mut self) -> Option<Reading> {
        if self.emitted >= self.spec.lines {
            return None;
        }
        let devices = u64::from(self.spec.devices);
        let tick = self.emitted / devices;
        let device = (self.emitted % devices) as u32;
        self.emitted += 1;
        let (mean_t, mean_h) = self.device_means[device as usize];
        // Sums of two uniforms: a cheap bell shape, so min/max differ visibly from the mean.
        let temperature = mean_t + self.values.uniform(-2.5, 2.5) + self.values.uniform(-2.5, 2.5);
        let humidity = mean_h + self.values.uniform(-5.0, 5.0) + self.values.uniform(-5.0, 5.0);
        Some(Reading {
            device,
            ts: self.spec.tick_ts(tick),
            temperature: round2(temperature),
            humidity: round2(humidity.clamp(0.0, 100.0)),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.spec.lines - self.emitted).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

/// Rounds to two decimals, so the value read back from the printed line is the same f64
/// that [`Reading`] holds.
fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// SplitMix64 (Steele, Lea and Flood): tiny, fast and good enough for test data.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float in `[low, high)` from the top 53 bits.
    fn uniform(&mut self, low: f64, high: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        low + unit * (high - low)
    }

    /// An integer in `0..bound` (`bound > 0`); the modulo bias is irrelevant for shuffling.
    fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// Counts bytes on their way to the inner writer.
struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    bytes: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(shuffle_within_ms: u64) -> W1Spec {
        W1Spec {
            devices: 7,
            readings_per_device_per_second: 20,
            lines: 7 * 20 * 5 + 3,
            seed: 9,
            shuffle_within_ms,
        }
    }

    fn lines_of(spec: &W1Spec) -> Vec<String> {
        let mut bytes = Vec::new();
        let written = spec.write_to(&mut bytes).unwrap();
        assert_eq!(written, bytes.len() as u64);
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn ts_of(line: &str) -> i64 {
        let rest = &line[line.find(r#""ts":"#).unwrap() + 5..];
        rest[..rest.find(',').unwrap()].parse().unwrap()
    }

    #[test]
    fn same_spec_gives_same_bytes_and_seed_changes_them() {
        let spec = small(0);
        assert_eq!(lines_of(&spec), lines_of(&spec));
        let other = W1Spec { seed: 10, ..spec };
        assert_ne!(lines_of(&spec), lines_of(&other));
    }

    #[test]
    fn lines_interleave_devices_tick_by_tick() {
        let spec = small(0);
        let lines = lines_of(&spec);
        assert_eq!(lines.len() as u64, spec.lines);
        assert!(lines[0].starts_with(r#"{"device":"dev-0000","ts":1767225600000,"temperature":"#));
        assert!(lines[8].starts_with(r#"{"device":"dev-0001","ts":1767225600050,"#));
        // The last tick is partial: 3 lines of devices 0..3.
        assert!(lines.last().unwrap().starts_with(r#"{"device":"dev-0002""#));
        let ts: Vec<i64> = lines.iter().map(|l| ts_of(l)).collect();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn rates_that_do_not_divide_a_second_stay_exact() {
        let spec = W1Spec {
            devices: 1,
            readings_per_device_per_second: 3,
            lines: 7,
            ..W1Spec::default()
        };
        let ts: Vec<i64> = spec
            .readings()
            .unwrap()
            .map(|r| r.ts - W1_EPOCH_MS)
            .collect();
        assert_eq!(ts, vec![0, 333, 666, 1000, 1333, 1666, 2000]);
    }

    #[test]
    fn values_stay_plausible_and_printed_values_read_back_exactly() {
        for reading in small(0).readings().unwrap() {
            assert!((7.0..37.0).contains(&reading.temperature), "{reading:?}");
            assert!((0.0..=100.0).contains(&reading.humidity), "{reading:?}");
            let mut line = Vec::new();
            reading.write_json_line(&mut line).unwrap();
            let line = String::from_utf8(line).unwrap();
            let text = format!("{:.2}", reading.temperature);
            assert_eq!(text.parse::<f64>().unwrap(), reading.temperature);
            assert!(line.contains(&text));
        }
    }

    #[test]
    fn shuffle_keeps_every_line_and_bounds_displacement() {
        let ordered = lines_of(&small(0));
        let shuffled = lines_of(&small(1000));
        assert_ne!(ordered, shuffled);
        let mut a = ordered.clone();
        let mut b = shuffled.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "shuffling must only reorder lines");

        // Every line arrives less than 1000 ms of event time behind the newest line before it.
        let mut newest = ts_of(&shuffled[0]);
        let mut out_of_order = 0;
        for line in &shuffled {
            let ts = ts_of(line);
            assert!(newest - ts < 1000, "{line} arrives {} ms late", newest - ts);
            out_of_order += usize::from(ts < newest);
            newest = newest.max(ts);
        }
        assert!(out_of_order > shuffled.len() / 4, "too little shuffling");
    }

    #[test]
    fn shuffle_blocks_straddle_window_boundaries() {
        // A row of the second 10 s window must be able to precede a row of the first.
        let spec = W1Spec {
            lines: 7 * 20 * 12,
            ..small(1000)
        };
        let lines = lines_of(&spec);
        let boundary = W1_EPOCH_MS + 10_000;
        let first_late = lines.iter().position(|l| ts_of(l) >= boundary).unwrap();
        assert!(lines[first_late..].iter().any(|l| ts_of(l) < boundary));
    }

    #[test]
    fn invalid_specs_are_rejected_with_a_reason() {
        let none = W1Spec {
            devices: 0,
            ..W1Spec::default()
        };
        assert!(none.readings().is_err());
        let fast = W1Spec {
            readings_per_device_per_second: 1001,
            ..W1Spec::default()
        };
        let message = fast.write_to(&mut Vec::new()).unwrap_err().to_string();
        assert!(message.contains("1001"), "{message}");
    }
}
