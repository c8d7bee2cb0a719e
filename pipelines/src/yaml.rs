//! Reading YAML text into the located [`ConfigValue`] tree that the rest of the crate and
//! every operator factory work on.
//!
//! serde-saphyr reports where each node was written only through its `Spanned` wrapper,
//! and only when the wrapper is deserialized straight from the YAML reader. So the tree is
//! read with a hand-written visitor that asks for `Spanned` keys and values at every
//! level, instead of through a derived (and location-losing) untagged enum.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Options, Spanned};
use weir_engine::config::{ConfigError, ConfigValue, Key, Location, Value};

/// Parses one YAML document into a located tree.
///
/// Duplicate keys, multiple documents and syntax errors are reported with the parser's
/// location. Booleans follow YAML 1.2 (`true`/`false` only), so `no` or `on` stay strings.
pub fn parse(text: &str) -> Result<ConfigValue, ConfigError> {
    let mut options = Options::default();
    options.with_snippet = false;
    options.strict_booleans = true;
    // Keep spellings that would change meaning as numbers (`0012`, `1_000`) as strings.
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    let root: Spanned<Node> =
        serde_saphyr::from_str_with_options(text, options).map_err(|error| {
            let location = error.location().map(location).unwrap_or_default();
            let (message, mut hint) = syntax_message(&error.to_string());
            // `{` is YAML syntax inside flow collections, so `{a: ${VAR}}` fails to parse;
            // say so rather than leave users puzzling over brackets.
            let line = text.lines().nth((location.line as usize).saturating_sub(1));
            if line.is_some_and(|line| line.contains("${")) {
                hint =
                    "inside {...} or [...], quote values that use ${...}, e.g. {port: \"${PORT}\"}"
                        .to_owned();
            }
            ConfigError::new("", location, message).with_hint(hint)
        })?;
    Ok(ConfigValue {
        value: root.value.0,
        location: location(root.referenced),
    })
}

/// The parser's message in our words, with a hint. The parser appends a location and
/// advice about its own API; the diagnostic carries the location and the advice is not
/// for users.
fn syntax_message(text: &str) -> (String, String) {
    let first = text.lines().next().unwrap_or_default().trim();
    let first = match first.rfind(" at line ") {
        Some(at) => &first[..at],
        None => first,
    };
    let first = first.trim_end_matches('.').trim();
    if let Some(rest) = first.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest);
        return (
            format!("duplicate key '{key}'"),
            "each key may appear once in a mapping: remove or rename one".to_owned(),
        );
    }
    if first.starts_with("multiple YAML documents") {
        return (
            "the file holds more than one YAML document".to_owned(),
            "put each pipeline in a file of its own".to_owned(),
        );
    }
    let mut chars = first.chars();
    let message = match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => "invalid YAML".to_owned(),
    };
    (message, "fix the YAML syntax at this place".to_owned())
}

fn location(location: serde_saphyr::Location) -> Location {
    Location {
        line: u32::try_from(location.line()).unwrap_or(u32::MAX),
        column: u32::try_from(location.column()).unwrap_or(u32::MAX),
    }
}

/// A YAML node without its own location; the enclosing `Spanned` carries that.
struct Node(Value);

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node(Value::Int(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        // Beyond i64 a YAML integer can only be kept approximately.
        Ok(Node(
            i64::try_from(v).map_or(Value::Float(v as f64), Value::Int),
        ))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        Ok(Node(
            i64::try_from(v).map_or(Value::Float(v as f64), Value::Int),
        ))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        Ok(Node(
            i64::try_from(v).map_or(Value::Float(v as f64), Value::Int),
        ))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node(Value::Float(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node(Value::String(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node(Value::String(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node(Value::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node(Value::Null))
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        Node::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element::<Spanned<Node>>()? {
            items.push(ConfigValue {
                value: item.value.0,
                location: location(item.referenced),
            });
        }
        Ok(Node(Value::Seq(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let value = map.next_value::<Spanned<Node>>()?;
            let key = Key {
                name: key.value,
                location: location(key.referenced),
            };
            let value = ConfigValue {
                value: value.value.0,
                location: location(value.referenced),
            };
            entries.push((key, value));
        }
        Ok(Node(Value::Map(entries)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: u32, column: u32) -> Location {
        Location { line, column }
    }

    #[test]
    fn keeps_the_location_of_every_key_and_value() {
        let text = "version: 1\nsources:\n  s:\n    kind: gen\n    config:\n    list: [1, 2.5, true, no, ~, '7', 0012]\n";
        let root = parse(text).unwrap();
        assert_eq!(root.location, at(1, 1));
        let (key, version) = root.entry("version").unwrap();
        assert_eq!(
            (key.location, version),
            (at(1, 1), &ConfigValue::int(1).at(at(1, 10)))
        );
        let node = root.get("sources").unwrap().get("s").unwrap();
        assert_eq!(node.entry("kind").unwrap().0.location, at(4, 5));
        assert_eq!(
            node.get("kind").unwrap(),
            &ConfigValue::string("gen").at(at(4, 11))
        );
        assert_eq!(node.get("config").unwrap().value, Value::Null);
        let Value::Seq(items) = &node.get("list").unwrap().value else {
            panic!("not a list");
        };
        let values: Vec<&Value> = items.iter().map(|item| &item.value).collect();
        assert_eq!(
            values,
            [
                &Value::Int(1),
                &Value::Float(2.5),
                &Value::Bool(true),
                // YAML 1.2 booleans only, and numbers whose spelling matters stay text.
                &Value::String("no".into()),
                &Value::Null,
                &Value::String("7".into()),
                &Value::String("0012".into()),
            ]
        );
        assert_eq!(items[1].location, at(6, 15));
    }

    #[test]
    fn syntax_errors_carry_the_parser_location() {
        let error = parse("a: [1, 2\n").unwrap_err();
        assert_eq!(error.location, at(1, 4));
        assert_eq!(error.message, "unclosed bracket '['");
        let error = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(error.location, at(2, 1));
        assert_eq!(error.message, "duplicate key 'a'");
        let error = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(error.message, "the file holds more than one YAML document");
    }

    #[test]
    fn unquoted_references_in_flow_collections_get_a_hint() {
        let error = parse("a: {port: ${PORT}}\n").unwrap_err();
        assert_eq!(
            error.hint.as_deref(),
            Some("inside {...} or [...], quote values that use ${...}, e.g. {port: \"${PORT}\"}")
        );
        // In block style no quotes are needed.
        assert_eq!(
            parse("port: ${PORT}\n")
                .unwrap()
                .get("port")
                .unwrap()
                .as_str(),
            Some("${PORT}")
        );
    }

    #[test]
    fn an_empty_file_is_null() {
        assert_eq!(parse("").unwrap().value, Value::Null);
    }
}
