//! The column types a source's `schema` may declare, and reading a declared schema.
//!
//! The vocabulary is small on purpose: the types every operator and the hub handle. A
//! trailing `?` makes a column nullable; columns are otherwise non-nullable, so a source
//! that meets a missing value reports it instead of passing nulls on silently.

use std::sync::Arc;

use weir_engine::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use weir_engine::config::{ConfigError, ConfigValue, Value, choices_hint};

/// Every type name a schema may use, in the order they are listed to users.
pub const TYPE_NAMES: &[&str] = &[
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float32",
    "float64",
    "utf8",
    "string",
    "large_utf8",
    "binary",
    "date32",
    "timestamp_s",
    "timestamp_ms",
    "timestamp_us",
    "timestamp_ns",
];

/// The Arrow type a schema type name stands for.
pub fn data_type(name: &str) -> Option<DataType> {
    Some(match name {
        "bool" => DataType::Boolean,
        "int8" => DataType::Int8,
        "int16" => DataType::Int16,
        "int32" => DataType::Int32,
        "int64" => DataType::Int64,
        "uint8" => DataType::UInt8,
        "uint16" => DataType::UInt16,
        "uint32" => DataType::UInt32,
        "uint64" => DataType::UInt64,
        "float32" => DataType::Float32,
        "float64" => DataType::Float64,
        "utf8" | "string" => DataType::Utf8,
        "large_utf8" => DataType::LargeUtf8,
        "binary" => DataType::Binary,
        "date32" => DataType::Date32,
        "timestamp_s" => DataType::Timestamp(TimeUnit::Second, None),
        "timestamp_ms" => DataType::Timestamp(TimeUnit::Millisecond, None),
        "timestamp_us" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "timestamp_ns" => DataType::Timestamp(TimeUnit::Nanosecond, None),
        _ => return None,
    })
}

/// The name a schema would use for an Arrow type, or Arrow's own name for types outside
/// the vocabulary (which operators may still produce, e.g. SQL decimals).
pub fn type_name(data_type: &DataType) -> String {
    TYPE_NAMES
        .iter()
        .find(|name| self::data_type(name).as_ref() == Some(data_type))
        .map_or_else(|| data_type.to_string(), |name| (*name).to_owned())
}

/// Reads a `schema` mapping (`{column: type}` in column order) at `path`, collecting every
/// problem into `errors`. Returns the schema when it had none.
pub(crate) fn parse_schema(
    value: &ConfigValue,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<SchemaRef> {
    let entries = match &value.value {
        Value::Map(entries) if !entries.is_empty() => entries,
        Value::Map(_) | Value::Null => {
            errors.push(
                ConfigError::new(path, value.location, "the schema declares no columns").with_hint(
                    "write it as {column: type, ...}, e.g. {device: utf8, ts: timestamp_ms}",
                ),
            );
            return None;
        }
        _ => {
            errors.push(
                ConfigError::new(
                    path,
                    value.location,
                    format!(
                        "expected a map of column names to types, found {}",
                        value.describe()
                    ),
                )
                .with_hint(
                    "write it as {column: type, ...}, e.g. {device: utf8, ts: timestamp_ms}",
                ),
            );
            return None;
        }
    };
    let before = errors.len();
    let mut fields = Vec::with_capacity(entries.len());
    for (key, spec) in entries {
        let column_path = format!("{path}.{}", key.name);
        let Some(text) = spec.as_str() else {
            errors.push(
                ConfigError::new(
                    column_path,
                    spec.location,
                    format!(
                        "expected a type name such as utf8 or float64, found {}",
                        spec.describe()
                    ),
                )
                .with_hint(format!("valid types: {}", TYPE_NAMES.join(", "))),
            );
            continue;
        };
        let text = text.trim();
        let (name, nullable) = match text.strip_suffix('?') {
            Some(name) => (name.trim_end(), true),
            None => (text, false),
        };
        match data_type(name) {
            Some(data_type) => fields.push(Field::new(&key.name, data_type, nullable)),
            None => errors.push(
                ConfigError::new(column_path, spec.location, format!("unknown type '{name}'"))
                    .with_hint(format!(
                        "{}; add '?' to make a column nullable",
                        choices_hint(name, TYPE_NAMES, "valid types")
                    )),
            ),
        }
    }
    (errors.len() == before).then(|| Arc::new(Schema::new(fields)))
}

#[cfg(test)]
mod tests {
    use weir_engine::config::Location;

    use super::*;

    #[test]
    fn reads_types_in_order_with_nullability() {
        let value = ConfigValue::map([
            ("device", ConfigValue::string("string")),
            ("ts", ConfigValue::string("timestamp_ms")),
            ("note", ConfigValue::string("utf8?")),
        ]);
        let mut errors = Vec::new();
        let schema = parse_schema(&value, "sources.s.schema", &mut errors).unwrap();
        assert!(errors.is_empty());
        let fields: Vec<_> = schema
            .fields()
            .iter()
            .map(|f| (f.name().as_str(), f.data_type().clone(), f.is_nullable()))
            .collect();
        assert_eq!(
            fields,
            [
                ("device", DataType::Utf8, false),
                (
                    "ts",
                    DataType::Timestamp(TimeUnit::Millisecond, None),
                    false
                ),
                ("note", DataType::Utf8, true),
            ]
        );
    }

    #[test]
    fn reports_every_bad_type_with_the_valid_ones() {
        let at = Location {
            line: 5,
            column: 20,
        };
        let value = ConfigValue::map([
            ("a", ConfigValue::string("flaot64").at(at)),
            ("b", ConfigValue::int(3)),
        ]);
        let mut errors = Vec::new();
        assert!(parse_schema(&value, "sources.s.schema", &mut errors).is_none());
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].path, "sources.s.schema.a");
        assert_eq!(errors[0].location, at);
        assert_eq!(errors[0].message, "unknown type 'flaot64'");
        assert!(
            errors[0]
                .hint
                .as_deref()
                .unwrap()
                .starts_with("did you mean 'float64'? valid types: bool, int8,")
        );
        assert_eq!(
            errors[1].message,
            "expected a type name such as utf8 or float64, found an integer 3"
        );
    }

    #[test]
    fn names_types_in_the_schema_vocabulary() {
        assert_eq!(type_name(&DataType::Utf8), "utf8");
        assert_eq!(
            type_name(&DataType::Timestamp(TimeUnit::Second, None)),
            "timestamp_s"
        );
        assert_eq!(type_name(&DataType::Decimal128(10, 2)), "Decimal128(10, 2)");
    }
}
