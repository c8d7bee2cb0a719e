//! Located configuration values: the format-neutral tree that operator configs are
//! deserialized from, with errors that point back into the source document.
//!
//! The pipeline loader turns a YAML document into a [`ConfigValue`] tree (keeping the
//! line and column of every node). An operator factory then deserializes its typed
//! config struct from the tree with [`ConfigValue::deserialize_into`]; any error carries
//! the path inside the document, the location and a hint.
//!
//! The deserializer is strict where YAML is loose: a quoted `"5"` is accepted where a
//! number is wanted (values interpolated from environment variables arrive as strings),
//! but a bare `5` is not accepted where a string is wanted, because the YAML reader has
//! already turned it into a number and its original spelling (`0012`, `1.10`) is lost.

use std::fmt;

use serde::de::DeserializeOwned;

/// A position in a source document; both numbers are 1-based. `0:0` means unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1.
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A mapping key together with where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    /// The key text.
    pub name: String,
    /// Where the key was written.
    pub location: Location,
}

/// The shape of a configuration value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An explicit null, or an absent value.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    String(String),
    /// A sequence of values.
    Seq(Vec<ConfigValue>),
    /// A mapping, in document order.
    Map(Vec<(Key, ConfigValue)>),
}

/// A configuration value with the location it was written at.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigValue {
    /// The value.
    pub value: Value,
    /// Where the value starts in the document.
    pub location: Location,
}

/// One problem found in a configuration, pointing at where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The path inside the document, e.g. `transforms.per_minute.config.query`.
    pub path: String,
    /// Where in the document; `0:0` when unknown.
    pub location: Location,
    /// What is wrong, lower-case, without a trailing period.
    pub message: String,
    /// What to do about it, e.g. the valid kinds or the nearest field name.
    pub hint: Option<String>,
}

impl ConfigError {
    /// A problem at `path` and `location` with no hint.
    pub fn new(path: impl Into<String>, location: Location, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            location,
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.location, self.path, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one configuration, so users fix them all in one pass.
pub type ConfigErrors = Vec<ConfigError>;

/// A duration written as a human string: `250ms`, `5s`, `1m`, `2h 30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub std::time::Duration);

impl<'de> serde::Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid duration '{text}': write a number and a unit, e.g. 500ms, 5s, 1m or 2h"
                ))
            })
    }
}

impl From<HumanDuration> for std::time::Duration {
    fn from(value: HumanDuration) -> Self {
        value.0
    }
}

/// A size in bytes written as `64MiB`, `512MB`, `1.5GB` or a plain number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanSize(pub u64);

impl<'de> serde::Deserialize<'de> for HumanSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Written {
            Bytes(u64),
            Text(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Bytes(bytes) => Ok(HumanSize(bytes)),
            Written::Text(text) => text
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|size| HumanSize(size.as_u64()))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "invalid size '{text}': write a number and a unit, e.g. 64MiB, 512MB \
                         or 2GiB"
                    ))
                }),
        }
    }
}

/// Constructors for building trees by hand, mostly in tests.
impl ConfigValue {
    /// A value at an unknown location.
    pub fn new(value: Value) -> Self {
        ConfigValue {
            value,
            location: Location::default(),
        }
    }

    /// A null value at an unknown location, used where a node has no `config`.
    pub fn null() -> Self {
        ConfigValue::new(Value::Null)
    }

    /// A string at an unknown location.
    pub fn string(text: impl Into<String>) -> Self {
        ConfigValue::new(Value::String(text.into()))
    }

    /// An integer at an unknown location.
    pub fn int(number: i64) -> Self {
        ConfigValue::new(Value::Int(number))
    }

    /// A mapping at an unknown location.
    pub fn map<'a>(entries: impl IntoIterator<Item = (&'a str, ConfigValue)>) -> Self {
        ConfigValue::new(Value::Map(
            entries
                .into_iter()
                .map(|(name, value)| {
                    (
                        Key {
                            name: name.to_owned(),
                            location: Location::default(),
                        },
                        value,
                    )
                })
                .collect(),
        ))
    }

    /// A boolean at an unknown location.
    pub fn bool(value: bool) -> Self {
        ConfigValue::new(Value::Bool(value))
    }

    /// A floating-point number at an unknown location.
    pub fn float(number: f64) -> Self {
        ConfigValue::new(Value::Float(number))
    }

    /// A sequence at an unknown location.
    pub fn seq(items: impl IntoIterator<Item = ConfigValue>) -> Self {
        ConfigValue::new(Value::Seq(items.into_iter().collect()))
    }

    /// The same value, placed at `location`.
    pub fn at(mut self, location: Location) -> Self {
        self.location = location;
        self
    }

    /// The value under `key`, when this is a mapping that has it. A sequence's items are
    /// found by their index written as text (`"0"`, `"1"`, ...), so that error paths such
    /// as `members.1.alpha` can be followed to their location.
    pub fn get(&self, key: &str) -> Option<&ConfigValue> {
        match &self.value {
            Value::Seq(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => self.entry(key).map(|(_, v)| v),
        }
    }

    /// The key and value under `key`, when this is a mapping that has it. The key carries
    /// the location errors about the entry as a whole point at.
    pub fn entry(&self, key: &str) -> Option<(&Key, &ConfigValue)> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.name == key)
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }

    /// The string, when this is one.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::String(text) => Some(text),
            _ => None,
        }
    }

    /// Says what this value is, for messages: `a string "abc"`, `an integer 5`, `a map`.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "null".to_owned(),
            Value::Bool(b) => format!("a boolean {b}"),
            Value::Int(i) => format!("an integer {i}"),
            Value::Float(f) => format!("a number {f}"),
            Value::String(text) => format!("a string {}", quote_excerpt(text)),
            Value::Seq(_) => "a list".to_owned(),
            Value::Map(_) => "a map".to_owned(),
        }
    }

    /// Deserializes a typed value (usually an operator's config struct) from this tree.
    ///
    /// `path` is where this value sits in the document, e.g. `sources.sensors.config`; the
    /// paths in errors grow from it (`sources.sensors.config.topics[0]`). The error points
    /// at the node that could not be deserialized: the key of an unknown field (with the
    /// nearest valid name as a hint), the enclosing map of a missing field, the value of
    /// the wrong type. `Null` deserializes as an empty map, so a node without `config`
    /// gets its defaults or a `missing field` error rather than a type error.
    pub fn deserialize_into<T: DeserializeOwned>(&self, path: &str) -> Result<T, ConfigError> {
        de::deserialize(self, path, &[])
    }

    /// Deserializes one map into two typed values: the entries whose keys `A` reads go to
    /// `A`, the rest to `B`.
    ///
    /// This lets operators share a group of fields that users write flat in the same
    /// `config` map as the operator's own (serde cannot combine `flatten` with
    /// `deny_unknown_fields`). Both types should deny unknown fields: a key neither reads
    /// is reported by `B`, with a hint that offers the fields of both. Every error of both
    /// parts is returned.
    pub fn deserialize_split<A: DeserializeOwned, B: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(A, B), ConfigErrors> {
        let shared = de::field_names::<A>();
        let (first, second) = match &self.value {
            Value::Map(entries) => {
                let (a, b): (Vec<_>, Vec<_>) = entries
                    .iter()
                    .cloned()
                    .partition(|(key, _)| shared.contains(&key.name.as_str()));
                let part = |entries| ConfigValue {
                    value: Value::Map(entries),
                    location: self.location,
                };
                (part(a), part(b))
            }
            // Not a map: let both parts report it (null still means "all defaults").
            _ => (self.clone(), self.clone()),
        };
        let a = de::deserialize::<A>(&first, path, &[]);
        let b = de::deserialize::<B>(&second, path, shared);
        match (a, b) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            (Err(error), Ok(_)) | (Ok(_), Err(error)) => Err(vec![error]),
            (Err(first), Err(second)) if first == second => Err(vec![first]),
            (Err(first), Err(second)) => Err(vec![first, second]),
        }
    }
}

/// The candidate closest to `word`, when it is close enough to be a likely typo.
///
/// Comparison ignores case and counts swapped letters as one edit; a candidate qualifies
/// when it is at most a third of its length (and at least one edit) away.
pub fn closest_match<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = word.to_lowercase();
    candidates
        .into_iter()
        .map(|candidate| {
            let distance = strsim::damerau_levenshtein(&word, &candidate.to_lowercase());
            (distance, candidate)
        })
        .filter(|&(distance, candidate)| {
            let length = candidate.chars().count();
            distance < length && distance <= (length / 3).max(1)
        })
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// A hint that suggests the candidate nearest to `word` (when close) and lists them all:
/// `did you mean 'topics'? valid fields: format, topics, url`.
pub fn choices_hint(word: &str, candidates: &[&str], label: &str) -> String {
    let listed = if candidates.is_empty() {
        "none".to_owned()
    } else {
        candidates.join(", ")
    };
    match closest_match(word, candidates.iter().copied()) {
        Some(nearest) => format!("did you mean '{nearest}'? {label}: {listed}"),
        None => format!("{label}: {listed}"),
    }
}

/// A string for messages, in quotes, shortened when long.
fn quote_excerpt(text: &str) -> String {
    const LIMIT: usize = 40;
    if text.chars().count() <= LIMIT {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(LIMIT).collect();
        format!("{:?}...", head)
    }
}

/// Joins a path inside the document with a mapping key.
fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

mod de;
