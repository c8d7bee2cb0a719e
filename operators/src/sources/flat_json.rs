//! A fast path for JSON lines of flat objects: each line is deserialized by sonic-rs (SIMD
//! JSON) straight into the Arrow builders of a schema of scalar columns.
//!
//! arrow-json stays the reference decoder. This one only speeds up input whose meaning is
//! plain, and declines everything else, so the caller decodes that region with arrow-json
//! and gets exactly what it always got, bad-line reports included. It accepts a region
//! only when every non-blank line is one JSON object whose schema fields hold:
//! - a string, for `utf8` and `large_utf8` columns;
//! - `true` or `false`, for `bool`;
//! - an integer in range, for the integer types and timestamps (a count of the column's
//!   unit since the epoch);
//! - a number, for `float64`;
//! - `null`, or nothing at all, for a nullable column.
//!
//! Other fields are skipped whatever they hold, as arrow-json skips them. A duplicated
//! field, a string timestamp or a second object on a line is declined, not guessed at.
//! Schemas with other types (`float32`, whose rounding from text arrow-json does on its
//! own, `binary`, `date32`) or more than 64 columns never take this path.

use std::fmt;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Array, Int64Builder, LargeStringBuilder,
    RecordBatch, StringBuilder, UInt64Array, UInt64Builder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// The most columns a flat schema may have: which ones a row has set is a `u64` mask.
const MAX_COLUMNS: usize = 64;

/// Decodes JSON lines of flat objects for one schema.
#[derive(Debug, Clone)]
pub(crate) struct FlatJson {
    schema: SchemaRef,
    names: Vec<String>,
    kinds: Vec<Kind>,
    nullable: u64,
    batch_rows: usize,
}

/// What a column accepts, and how its values are built.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Utf8,
    LargeUtf8,
    Boolean,
    Float64,
    /// Integers in `min..=max`, built as `i64` and cast to the column's type.
    Signed {
        min: i64,
        max: i64,
    },
    /// Integers in `0..=max`, built as `u64` and cast to the column's type.
    Unsigned {
        max: u64,
    },
}

impl Kind {
    fn of(data_type: &DataType) -> Option<Kind> {
        Some(match data_type {
            DataType::Utf8 => Kind::Utf8,
            DataType::LargeUtf8 => Kind::LargeUtf8,
            DataType::Boolean => Kind::Boolean,
            DataType::Float64 => Kind::Float64,
            DataType::Int8 => Kind::Signed {
                min: i8::MIN.into(),
                max: i8::MAX.into(),
            },
            DataType::Int16 => Kind::Signed {
                min: i16::MIN.into(),
                max: i16::MAX.into(),
            },
            DataType::Int32 => Kind::Signed {
                min: i32::MIN.into(),
                max: i32::MAX.into(),
            },
            DataType::Int64 | DataType::Timestamp(_, _) => Kind::Signed {
                min: i64::MIN,
                max: i64::MAX,
            },
            DataType::UInt8 => Kind::Unsigned {
                max: u8::MAX.into(),
            },
            DataType::UInt16 => Kind::Unsigned {
                max: u16::MAX.into(),
            },
            DataType::UInt32 => Kind::Unsigned {
                max: u32::MAX.into(),
            },
            DataType::UInt64 => Kind::Unsigned { max: u64::MAX },
            _ => return None,
        })
    }

    fn builder(self, capacity: usize) -> Column {
        match self {
            Kind::Utf8 => Column::Utf8(StringBuilder::with_capacity(capacity, capacity * 16)),
            Kind::LargeUtf8 => {
                Column::LargeUtf8(LargeStringBuilder::with_capacity(capacity, capacity * 16))
            }
            Kind::Boolean => Column::Boolean(BooleanBuilder::with_capacity(capacity)),
            Kind::Float64 => Column::Float64(Float64Builder::with_capacity(capacity)),
            Kind::Signed { min, max } => Column::Signed {
                values: Int64Builder::with_capacity(capacity),
                min,
                max,
            },
            Kind::Unsigned { max } => Column::Unsigned {
                values: UInt64Builder::with_capacity(capacity),
                max,
            },
        }
    }
}

/// One column's values so far.
enum Column {
    Utf8(StringBuilder),
    LargeUtf8(LargeStringBuilder),
    Boolean(BooleanBuilder),
    Float64(Float64Builder),
    Signed {
        values: Int64Builder,
        min: i64,
        max: i64,
    },
    Unsigned {
        values: UInt64Builder,
        max: u64,
    },
}

impl Column {
    fn append_null(&mut self) {
        match self {
            Column::Utf8(b) => b.append_null(),
            Column::LargeUtf8(b) => b.append_null(),
            Column::Boolean(b) => b.append_null(),
            Column::Float64(b) => b.append_null(),
            Column::Signed { values, .. } => values.append_null(),
            Column::Unsigned { values, .. } => values.append_null(),
        }
    }

    /// The column so far as an array of `data_type`, emptying the builder.
    fn finish(&mut self, data_type: &DataType) -> Option<ArrayRef> {
        let array: ArrayRef = match self {
            Column::Utf8(b) => Arc::new(b.finish()),
            Column::LargeUtf8(b) => Arc::new(b.finish()),
            Column::Boolean(b) => Arc::new(b.finish()),
            Column::Float64(b) => Arc::new(b.finish()),
            Column::Signed { values, .. } => {
                let values: Int64Array = values.finish();
                if *data_type == DataType::Int64 {
                    Arc::new(values)
                } else {
                    // Every value is in the type's range, so the cast cannot fail or lose.
                    return cast(&values, data_type).ok();
                }
            }
            Column::Unsigned { values, .. } => {
                let values: UInt64Array = values.finish();
                if *data_type == DataType::UInt64 {
                    Arc::new(values)
                } else {
                    return cast(&values, data_type).ok();
                }
            }
        };
        Some(array)
    }
}

impl FlatJson {
    /// The fast path for `schema`, or `None` when a column's type is not one it builds.
    pub(crate) fn new(schema: &SchemaRef, batch_rows: usize) -> Option<FlatJson> {
        if schema.fields().is_empty() || schema.fields().len() > MAX_COLUMNS {
            return None;
        }
        let kinds = schema
            .fields()
            .iter()
            .map(|field| Kind::of(field.data_type()))
            .collect::<Option<Vec<_>>>()?;
        let nullable = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, field)| field.is_nullable())
            .fold(0u64, |mask, (i, _)| mask | 1 << i);
        Some(FlatJson {
            schema: Arc::clone(schema),
            names: schema.fields().iter().map(|f| f.name().clone()).collect(),
            kinds,
            nullable,
            batch_rows: batch_rows.max(1),
        })
    }

    /// Decodes `region`, whole JSON lines, into batches of at most `batch_rows` rows, or
    /// `None` when some line is not one this path accepts (see the module docs).
    pub(crate) fn decode(&self, region: &[u8]) -> Option<Vec<RecordBatch>> {
        let all = if self.names.len() == MAX_COLUMNS {
            u64::MAX
        } else {
            (1u64 << self.names.len()) - 1
        };
        // arrow-json rejects bad UTF-8 anywhere, in the fields it skips too. Checked once
        // for the region, so that lines are parsed as text sonic-rs need not check again.
        let Ok(text) = simdutf8::basic::from_utf8(region) else {
            return None;
        };
        let capacity = self.batch_rows.min(region.len() / 16 + 1);
        let mut columns = self.builders(capacity);
        let mut batches = Vec::new();
        let mut rows = 0;
        let mut start = 0;
        let ends = memchr::memchr_iter(b'\n', region).chain(std::iter::once(region.len()));
        for end in ends {
            // A newline is always a character boundary.
            let line = text.get(start..end)?;
            start = end + 1;
            // JSON's whitespace only: arrow-json rejects a form feed, so this path must.
            if line.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\r')) {
                continue;
            }
            let mut row = Row {
                names: &self.names,
                columns: &mut columns,
                nullable: self.nullable,
                set: 0,
                next: 0,
            };
            let mut json = sonic_rs::Deserializer::from_str(line);
            (&mut row).deserialize(&mut json).ok()?;
            json.end().ok()?;
            let unset = all & !row.set;
            if unset & !self.nullable != 0 {
                return None;
            }
            if unset != 0 {
                for (i, column) in columns.iter_mut().enumerate() {
                    if unset & (1 << i) != 0 {
                        column.append_null();
                    }
                }
            }
            rows += 1;
            if rows == self.batch_rows {
                batches.push(self.finish(&mut columns)?);
                rows = 0;
            }
        }
        if rows > 0 {
            batches.push(self.finish(&mut columns)?);
        }
        Some(batches)
    }

    fn builders(&self, capacity: usize) -> Vec<Column> {
        self.kinds
            .iter()
            .map(|kind| kind.builder(capacity))
            .collect()
    }

    fn finish(&self, columns: &mut [Column]) -> Option<RecordBatch> {
        let arrays = columns
            .iter_mut()
            .zip(self.schema.fields())
            .map(|(column, field)| column.finish(field.data_type()))
            .collect::<Option<Vec<_>>>()?;
        RecordBatch::try_new(Arc::clone(&self.schema), arrays).ok()
    }
}

/// Deserializes one object into the columns, noting which it set.
struct Row<'a> {
    names: &'a [String],
    columns: &'a mut [Column],
    nullable: u64,
    set: u64,
    /// The column after the last one set: fields usually come in the same order.
    next: usize,
}

/// Why a line was declined; never shown, the line goes to arrow-json instead.
const DECLINED: &str = "not a flat line";

impl<'de> DeserializeSeed<'de> for &mut Row<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for &mut Row<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(column) = map.next_key_seed(FieldName {
            names: self.names,
            next: self.next,
        })? {
            let Some(i) = column else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if self.set & (1 << i) != 0 {
                return Err(de::Error::custom(DECLINED));
            }
            self.set |= 1 << i;
            self.next = i + 1;
            map.next_value_seed(Value {
                column: &mut self.columns[i],
                nullable: self.nullable & (1 << i) != 0,
            })?;
        }
        Ok(())
    }
}

/// A field name, as the index of its column (`None`: not in the schema).
struct FieldName<'a> {
    names: &'a [String],
    next: usize,
}

impl<'de> DeserializeSeed<'de> for FieldName<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldName<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
        let name = name.as_bytes();
        if self
            .names
            .get(self.next)
            .is_some_and(|n| same_name(n.as_bytes(), name))
        {
            return Ok(Some(self.next));
        }
        Ok(self
            .names
            .iter()
            .position(|n| same_name(n.as_bytes(), name)))
    }
}

/// Whether two field names are equal, compared inline eight bytes at a time: names are
/// short, and a call to `memcmp` for each field of each row cost W1 a twentieth.
#[inline]
fn same_name(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (mut a_words, mut b_words) = (a.chunks_exact(8), b.chunks_exact(8));
    let words_equal = a_words.by_ref().zip(b_words.by_ref()).all(|(x, y)| {
        u64::from_ne_bytes(x.try_into().unwrap_or_default())
            == u64::from_ne_bytes(y.try_into().unwrap_or_default())
    });
    words_equal
        && a_words
            .remainder()
            .iter()
            .zip(b_words.remainder())
            .all(|(x, y)| x == y)
}

/// One field's value, appended to its column.
struct Value<'a> {
    column: &'a mut Column,
    nullable: bool,
}

impl<'de> DeserializeSeed<'de> for Value<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Value<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a scalar of the column's type")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<(), E> {
        match self.column {
            Column::Utf8(b) => b.append_value(value),
            Column::LargeUtf8(b) => b.append_value(value),
            _ => return Err(E::custom(DECLINED)),
        }
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        match self.column {
            Column::Boolean(b) => b.append_value(value),
            _ => return Err(E::custom(DECLINED)),
        }
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        match self.column {
            Column::Signed { values, min, max } if (*min..=*max).contains(&value) => {
                values.append_value(value)
            }
            Column::Unsigned { values, max } if u64::try_from(value).is_ok_and(|v| v <= *max) => {
                values.append_value(value as u64)
            }
            // Exact: a JSON integer that fits an i64 is one f64 rounding away, as from text.
            Column::Float64(b) => b.append_value(value as f64),
            _ => return Err(E::custom(DECLINED)),
        }
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        match self.column {
            Column::Signed { values, max, .. } if i64::try_from(value).is_ok_and(|v| v <= *max) => {
                values.append_value(value as i64)
            }
            Column::Unsigned { values, max } if value <= *max => values.append_value(value),
            Column::Float64(b) => b.append_value(value as f64),
            _ => return Err(E::custom(DECLINED)),
        }
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        match self.column {
            Column::Float64(b) => b.append_value(value),
            _ => return Err(E::custom(DECLINED)),
        }
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        if !self.nullable {
            return Err(E::custom(DECLINED));
        }
        self.column.append_null();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::{Field, Schema, TimeUnit};

    use super::*;
    use crate::sources::file::decode_json_lines;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("t", DataType::Float64, false),
            Field::new("ok", DataType::Boolean, true),
            Field::new("n", DataType::Int16, true),
            Field::new("u", DataType::UInt32, true),
            Field::new("note", DataType::LargeUtf8, true),
        ]))
    }

    fn arrow_json(schema: &SchemaRef, text: &str, batch_rows: usize) -> Vec<RecordBatch> {
        decode_json_lines(schema, batch_rows, text.as_bytes()).unwrap()
    }

    #[test]
    fn flat_lines_decode_as_arrow_json_decodes_them() {
        let text = concat!(
            r#"{"device":"dev-1","ts":1767225600010,"t":21.37,"ok":true,"n":-7,"u":7,"note":"a"}"#,
            "\n",
            // Another field order, unknown fields of every shape, escapes, no optional columns.
            r#"{"t":-0.5e-3,"extra":{"deep":[1,{"x":null}]},"ts":0,"device":"d\"\u00e9\n","more":[]}"#,
            "\n\n   \n",
            // Integers for a float, explicit nulls, the extreme integers of each type.
            r#"{"device":"","ts":-1,"t":12345678901234567890,"ok":null,"n":32767,"u":4294967295,"note":null}"#,
            "\r\n",
            r#"  {"device":"x","ts":9223372036854775807,"t":1e308,"n":-32768,"u":0}  "#,
            "\n",
            r#"{"device":"ünï😀","ts":5,"t":3,"ok":false}"#,
        );
        let schema = schema();
        for batch_rows in [1, 2, 3, 8192] {
            let fast = FlatJson::new(&schema, batch_rows).unwrap();
            let decoded = fast
                .decode(text.as_bytes())
                .expect("flat lines are accepted");
            assert_eq!(
                decoded,
                arrow_json(&schema, text, batch_rows),
                "batch_rows {batch_rows}"
            );
        }
    }

    #[test]
    fn what_is_not_plainly_flat_is_declined_for_arrow_json() {
        let schema = schema();
        let fast = FlatJson::new(&schema, 8192).unwrap();
        let good = r#"{"device":"d","ts":1,"t":1.5}"#;
        assert!(fast.decode(good.as_bytes()).is_some());
        for (why, line) in [
            (
                "a string timestamp",
                r#"{"device":"d","ts":"2026-01-01T00:00:00Z","t":1.5}"#,
            ),
            (
                "a float for a timestamp",
                r#"{"device":"d","ts":1.0,"t":1.5}"#,
            ),
            ("a string for a float", r#"{"device":"d","ts":1,"t":"1.5"}"#),
            ("a number for a string", r#"{"device":7,"ts":1,"t":1.5}"#),
            ("out of range", r#"{"device":"d","ts":1,"t":1.5,"n":32768}"#),
            (
                "negative unsigned",
                r#"{"device":"d","ts":1,"t":1.5,"u":-1}"#,
            ),
            (
                "a duplicated field",
                r#"{"device":"d","ts":1,"t":1.5,"t":2.5}"#,
            ),
            ("a missing required field", r#"{"device":"d","ts":1}"#),
            ("a null required field", r#"{"device":null,"ts":1,"t":1.5}"#),
            (
                "two objects on a line",
                r#"{"device":"d","ts":1,"t":1.5} {"device":"d","ts":1,"t":1.5}"#,
            ),
            (
                "an object over lines",
                "{\"device\":\"d\",\n\"ts\":1,\"t\":1.5}",
            ),
            ("not an object", r#"[1,2]"#),
            ("not JSON", r#"{"device":"d","ts":1,"t":1.5"#),
            (
                "a nested value for a column",
                r#"{"device":{"id":"d"},"ts":1,"t":1.5}"#,
            ),
            ("a form feed line", "\u{c}"),
            ("NaN", r#"{"device":"d","ts":1,"t":NaN}"#),
        ] {
            let text = format!("{good}\n{line}\n{good}\n");
            assert!(fast.decode(text.as_bytes()).is_none(), "{why}: {line}");
        }
        // Bad UTF-8 in a field no column reads.
        let mut text = br#"{"device":"d","ts":1,"t":1.5,"skipped":""#.to_vec();
        text.extend_from_slice(&[0xff, 0xfe]);
        text.extend_from_slice(b"\"}\n");
        assert!(fast.decode(&text).is_none(), "bad UTF-8");
    }

    #[test]
    fn field_names_compare_equal_only_when_every_byte_is() {
        for (a, b, equal) in [
            ("", "", true),
            ("ts", "ts", true),
            ("temperature", "temperature", true),
            ("temperature", "temperaturf", false),
            ("temperaturx", "temperature", false),
            ("abcdefgh", "abcdefgh", true),
            ("abcdefgh", "abcdefgi", false),
            ("xbcdefgh", "abcdefgh", false),
            ("ts", "tsx", false),
            ("device", "Device", false),
        ] {
            assert_eq!(same_name(a.as_bytes(), b.as_bytes()), equal, "{a} vs {b}");
        }
    }

    #[test]
    fn schemas_with_other_types_never_take_the_fast_path() {
        for data_type in [DataType::Float32, DataType::Binary, DataType::Date32] {
            let schema = Arc::new(Schema::new(vec![
                Field::new("a", DataType::Utf8, false),
                Field::new("b", data_type.clone(), false),
            ]));
            assert!(FlatJson::new(&schema, 8).is_none(), "{data_type}");
        }
        let wide = Arc::new(Schema::new(
            (0..65)
                .map(|i| Field::new(format!("c{i}"), DataType::Int64, true))
                .collect::<Vec<_>>(),
        ));
        assert!(FlatJson::new(&wide, 8).is_none());
        let widest = Arc::new(Schema::new(
            (0..64)
                .map(|i| Field::new(format!("c{i}"), DataType::Int64, true))
                .collect::<Vec<_>>(),
        ));
        let fast = FlatJson::new(&widest, 8).unwrap();
        let text = r#"{"c0":1,"c63":2}"#;
        assert_eq!(
            fast.decode(text.as_bytes()).unwrap(),
            arrow_json(&widest, text, 8)
        );
    }
}
