//! The serde `Deserializer` over a [`ConfigValue`] tree: it walks the tree, tracks the
//! document path, and turns serde's errors into [`ConfigError`]s that say where.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, Visitor};

use super::{
    ConfigError, ConfigValue, Key, Location, Value, child_path, choices_hint, quote_excerpt,
};

/// Deserializes `value`, found at `path` in the document, into a `T`.
///
/// `also_valid` names fields that belong to the same map in the document but are read
/// by another type (see [`ConfigValue::deserialize_split`]); hints for unknown fields
/// offer them too.
pub(super) fn deserialize<T: DeserializeOwned>(
    value: &ConfigValue,
    path: &str,
    also_valid: &[&str],
) -> Result<T, ConfigError> {
    T::deserialize(ValueDeserializer::new(value, path.to_owned())).map_err(|error| {
        error
            .offering(also_valid)
            .into_config_error(path, value.location)
    })
}

/// The field names a struct deriving `Deserialize` reads, as serde's derive lists them.
///
/// Asks the type to deserialize itself from a deserializer that only records the field
/// list serde hands to `deserialize_struct`. Empty for types that are not structs.
pub(super) fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    match T::deserialize(FieldNames) {
        Err(FieldList(Some(fields))) => fields,
        _ => &[],
    }
}

/// The deserializer behind [`field_names`]: it fails every request, carrying the field
/// list out when the request is for a struct.
struct FieldNames;

/// The error of [`FieldNames`]: the field list, when one was seen.
#[derive(Debug)]
struct FieldList(Option<&'static [&'static str]>);

impl fmt::Display for FieldList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field names requested")
    }
}

impl std::error::Error for FieldList {}

impl de::Error for FieldList {
    fn custom<T: fmt::Display>(_: T) -> Self {
        FieldList(None)
    }
}

impl<'de> de::Deserializer<'de> for FieldNames {
    type Error = FieldList;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, FieldList> {
        Err(FieldList(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, FieldList> {
        Err(FieldList(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// A deserialization error on its way up the tree.
///
/// Serde creates most errors without knowing where they are; the innermost node that
/// sees the error pass through stamps its path and location on it, which is the node the
/// error is about.
#[derive(Debug)]
struct DeError {
    path: Option<String>,
    location: Option<Location>,
    message: String,
    hint: Option<String>,
    /// For an unknown field: its name and the fields the type expected, so the hint can
    /// be rebuilt when other types read fields of the same map.
    unknown_field: Option<Box<(String, &'static [&'static str])>>,
}

impl DeError {
    fn bare(message: String) -> Self {
        DeError {
            path: None,
            location: None,
            message,
            hint: None,
            unknown_field: None,
        }
    }

    /// Widens an unknown-field hint with fields that other types read from the same map.
    fn offering(mut self, also_valid: &[&str]) -> Self {
        if let Some((field, expected)) = self.unknown_field.as_deref()
            && !also_valid.is_empty()
        {
            let mut valid: Vec<&str> = expected.to_vec();
            valid.extend(also_valid.iter().filter(|name| !expected.contains(name)));
            self.hint = Some(choices_hint(field, &valid, "valid fields"));
        }
        self
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Fills in the path and location when no inner node has.
    fn stamp(mut self, path: &str, location: Location) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_owned());
            self.location = Some(location);
        }
        self
    }

    fn into_config_error(self, path: &str, location: Location) -> ConfigError {
        ConfigError {
            path: self.path.unwrap_or_else(|| path.to_owned()),
            location: self.location.unwrap_or(location),
            message: self.message,
            hint: self.hint,
        }
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

/// Says what an unexpected value is, in the words [`ConfigValue::describe`] uses.
fn describe_unexpected(unexpected: de::Unexpected<'_>) -> String {
    use de::Unexpected as U;
    match unexpected {
        U::Bool(b) => format!("a boolean {b}"),
        U::Unsigned(n) => format!("an integer {n}"),
        U::Signed(n) => format!("an integer {n}"),
        U::Float(n) => format!("a number {n}"),
        U::Char(c) => format!("a string {:?}", c.to_string()),
        U::Str(text) => format!("a string {}", quote_excerpt(text)),
        U::Bytes(_) => "bytes".to_owned(),
        U::Unit | U::Option => "null".to_owned(),
        U::Seq => "a list".to_owned(),
        U::Map => "a map".to_owned(),
        other => other.to_string(),
    }
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        DeError::bare(message.to_string())
    }

    fn invalid_type(unexpected: de::Unexpected<'_>, expected: &dyn de::Expected) -> Self {
        DeError::bare(format!(
            "expected {expected}, found {}",
            describe_unexpected(unexpected)
        ))
    }

    fn invalid_value(unexpected: de::Unexpected<'_>, expected: &dyn de::Expected) -> Self {
        DeError::bare(format!(
            "expected {expected}, found {}",
            describe_unexpected(unexpected)
        ))
    }

    fn invalid_length(length: usize, expected: &dyn de::Expected) -> Self {
        DeError::bare(format!("expected {expected}, found {length} elements"))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::bare(format!("unknown value '{variant}'")).hint(choices_hint(
            variant,
            expected,
            "valid values",
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let mut error = DeError::bare(format!("unknown field '{field}'"));
        error.unknown_field = Some(Box::new((field.to_owned(), expected)));
        if expected.is_empty() {
            error.hint("this value takes no fields")
        } else {
            error.hint(choices_hint(field, expected, "valid fields"))
        }
    }

    fn missing_field(field: &'static str) -> Self {
        DeError::bare(format!("missing field '{field}'"))
    }

    fn duplicate_field(field: &'static str) -> Self {
        DeError::bare(format!("field '{field}' is given more than once"))
    }
}

/// A serde deserializer over one node of the tree, knowing its path in the document.
///
/// It never lends out borrowed strings, so it implements `Deserializer<'de>` for every
/// `'de`; that lets mapping keys be deserialized through a short-lived string node.
struct ValueDeserializer<'a> {
    value: &'a ConfigValue,
    path: String,
}

impl<'a> ValueDeserializer<'a> {
    fn new(value: &'a ConfigValue, path: String) -> Self {
        ValueDeserializer { value, path }
    }

    /// An error about this node.
    fn error(&self, message: String) -> DeError {
        DeError::bare(message).stamp(&self.path, self.value.location)
    }

    /// A type error: `expected an integer, found a string "abc"`.
    fn mismatch(&self, expected: &str) -> DeError {
        let error = self.error(format!(
            "expected {expected}, found {}",
            self.value.describe()
        ));
        let scalar = matches!(
            self.value.value,
            Value::Bool(_) | Value::Int(_) | Value::Float(_)
        );
        if expected == "a string" && scalar {
            error.hint("put the value in quotes to make it a string")
        } else {
            error
        }
    }

    /// The value as an integer; strings that hold one are parsed.
    fn integer(&self) -> Result<i64, DeError> {
        match &self.value.value {
            Value::Int(n) => Ok(*n),
            Value::String(text) => text.trim().parse().map_err(|_| self.mismatch("an integer")),
            _ => Err(self.mismatch("an integer")),
        }
    }

    /// The value as an integer of type `T`, with a clear message when out of range.
    fn integer_in<T: TryFrom<i64>>(&self, min: i128, max: i128) -> Result<T, DeError> {
        let n = self.integer()?;
        T::try_from(n).map_err(|_| {
            let range = if min == 0 && max >= i128::from(i64::MAX) {
                "a non-negative integer".to_owned()
            } else if min == 0 {
                format!("a non-negative integer up to {max}")
            } else {
                format!("an integer from {min} to {max}")
            };
            self.error(format!("expected {range}, found {n}"))
        })
    }

    fn float(&self) -> Result<f64, DeError> {
        match &self.value.value {
            Value::Float(n) => Ok(*n),
            // Integers stand in for floats; beyond 2^53 they round, as in every YAML reader.
            Value::Int(n) => Ok(*n as f64),
            Value::String(text) => text.trim().parse().map_err(|_| self.mismatch("a number")),
            _ => Err(self.mismatch("a number")),
        }
    }

    fn boolean(&self) -> Result<bool, DeError> {
        match &self.value.value {
            Value::Bool(b) => Ok(*b),
            Value::String(text) => match text.trim() {
                "true" | "True" | "TRUE" => Ok(true),
                "false" | "False" | "FALSE" => Ok(false),
                _ => Err(self.mismatch("a boolean (true or false)")),
            },
            _ => Err(self.mismatch("a boolean (true or false)")),
        }
    }

    fn string(&self) -> Result<&'a str, DeError> {
        match &self.value.value {
            Value::String(text) => Ok(text),
            _ => Err(self.mismatch("a string")),
        }
    }

    /// Visits a sequence, then checks the visitor took every element.
    fn visit_items<'de, V: Visitor<'de>>(
        &self,
        items: &'a [ConfigValue],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let mut access = SeqAccess {
            items: items.iter(),
            index: 0,
            path: &self.path,
        };
        let value = visitor.visit_seq(&mut access)?;
        let left = access.items.len();
        if left > 0 {
            return Err(self.error(format!(
                "expected a list of {} elements, found {}",
                access.index,
                access.index + left
            )));
        }
        Ok(value)
    }

    fn visit_entries<'de, V: Visitor<'de>>(
        &self,
        entries: &'a [(Key, ConfigValue)],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_map(MapAccess {
            entries: entries.iter(),
            pending: None,
            path: &self.path,
        })
    }
}

/// Deserializes integers of one type, range-checked.
macro_rules! deserialize_integer {
    ($method:ident, $visit:ident, $ty:ty) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let n: $ty = self.integer_in(<$ty>::MIN as i128, <$ty>::MAX as i128)?;
            visitor
                .$visit(n)
                .map_err(|e: DeError| e.stamp(&self.path, self.value.location))
        }
    };
}

impl<'de> de::Deserializer<'de> for ValueDeserializer<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.value.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(n) => visitor.visit_i64(*n),
            Value::Float(n) => visitor.visit_f64(*n),
            Value::String(text) => visitor.visit_str(text),
            Value::Seq(items) => self.visit_items(items, visitor),
            Value::Map(entries) => self.visit_entries(entries, visitor),
        };
        result.map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let b = self.boolean()?;
        visitor
            .visit_bool(b)
            .map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    deserialize_integer!(deserialize_i8, visit_i8, i8);
    deserialize_integer!(deserialize_i16, visit_i16, i16);
    deserialize_integer!(deserialize_i32, visit_i32, i32);
    deserialize_integer!(deserialize_i64, visit_i64, i64);
    deserialize_integer!(deserialize_u8, visit_u8, u8);
    deserialize_integer!(deserialize_u16, visit_u16, u16);
    deserialize_integer!(deserialize_u32, visit_u32, u32);
    deserialize_integer!(deserialize_u64, visit_u64, u64);

    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let n = self.integer()?;
        visitor
            .visit_i128(i128::from(n))
            .map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let n: u64 = self.integer_in(0, i128::from(u64::MAX))?;
        visitor
            .visit_u128(u128::from(n))
            .map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let n = self.float()?;
        visitor
            .visit_f32(n as f32)
            .map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let n = self.float()?;
        visitor
            .visit_f64(n)
            .map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = self.string()?;
        let mut chars = text.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => visitor
                .visit_char(c)
                .map_err(|e: DeError| e.stamp(&self.path, self.value.location)),
            _ => Err(self.mismatch("a single character")),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = self.string()?;
        visitor
            .visit_str(text)
            .map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = self.string()?;
        visitor
            .visit_bytes(text.as_bytes())
            .map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let (path, location) = (self.path.clone(), self.value.location);
        let result = match self.value.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        };
        result.map_err(|e: DeError| e.stamp(&path, location))
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value.value {
            Value::Null => visitor
                .visit_unit()
                .map_err(|e: DeError| e.stamp(&self.path, self.value.location)),
            _ => Err(self.mismatch("null")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let (path, location) = (self.path.clone(), self.value.location);
        visitor
            .visit_newtype_struct(self)
            .map_err(|e: DeError| e.stamp(&path, location))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.value.value {
            Value::Seq(items) => self.visit_items(items, visitor),
            // A mapping read as a list yields its (key, value) pairs in document order,
            // so `Vec<(String, T)>` keeps the order a user wrote.
            Value::Map(entries) => visitor.visit_seq(PairsAccess {
                entries: entries.iter(),
                path: &self.path,
                map_location: self.value.location,
            }),
            _ => Err(self.mismatch("a list")),
        };
        result.map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.value.value {
            Value::Map(entries) => self.visit_entries(entries, visitor),
            Value::Null => self.visit_entries(&[], visitor),
            _ => Err(self.mismatch("a map")),
        };
        result.map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let result = match &self.value.value {
            Value::String(_) => visitor.visit_enum(EnumAccess {
                variant: Cow::Borrowed(self.value),
                path: self.path.clone(),
                value: None,
            }),
            Value::Map(entries) if entries.len() == 1 => {
                let (key, value) = &entries[0];
                visitor.visit_enum(EnumAccess {
                    variant: Cow::Owned(ConfigValue::string(&key.name).at(key.location)),
                    path: child_path(&self.path, &key.name),
                    value: Some(value),
                })
            }
            Value::Map(entries) => Err(self.error(format!(
                "expected exactly one of {}, found {} keys",
                variants.join(", "),
                entries.len()
            ))),
            _ => Err(self.mismatch(&format!("one of {}", variants.join(", ")))),
        };
        result.map_err(|e: DeError| e.stamp(&self.path, self.value.location))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

/// Deserializes one child node. Errors a type raises after it has read its input (a
/// custom `Deserialize` that validates, like [`HumanDuration`]) surface here, so they are
/// stamped with the child's place rather than the parent's.
fn deserialize_child<'de, T: DeserializeSeed<'de>>(
    seed: T,
    value: &ConfigValue,
    path: String,
) -> Result<T::Value, DeError> {
    let location = value.location;
    match seed.deserialize(ValueDeserializer::new(value, path.clone())) {
        Ok(value) => Ok(value),
        Err(error) => Err(error.stamp(&path, location)),
    }
}

/// Hands out the elements of a sequence, each with its `[index]` path.
struct SeqAccess<'a, 'p> {
    items: std::slice::Iter<'a, ConfigValue>,
    index: usize,
    path: &'p str,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{}]", self.path, self.index);
        self.index += 1;
        deserialize_child(seed, item, path).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// Hands out the entries of a mapping; each key is a string node at the key's location.
struct MapAccess<'a, 'p> {
    entries: std::slice::Iter<'a, (Key, ConfigValue)>,
    pending: Option<&'a (Key, ConfigValue)>,
    path: &'p str,
}

impl<'de> de::MapAccess<'de> for MapAccess<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        self.pending = Some(entry);
        let key = ConfigValue::string(&entry.0.name).at(entry.0.location);
        let path = child_path(self.path, &entry.0.name);
        deserialize_child(seed, &key, path).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (key, value) = self
            .pending
            .take()
            .ok_or_else(|| DeError::bare("internal error: value asked before key".to_owned()))?;
        deserialize_child(seed, value, child_path(self.path, &key.name))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// Hands out a mapping's entries as `(key, value)` pairs, for maps read as lists.
struct PairsAccess<'a, 'p> {
    entries: std::slice::Iter<'a, (Key, ConfigValue)>,
    path: &'p str,
    map_location: Location,
}

impl<'de> de::SeqAccess<'de> for PairsAccess<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        seed.deserialize(PairDeserializer {
            key,
            value,
            path: child_path(self.path, &key.name),
            map_path: self.path,
            map_location: self.map_location,
        })
        .map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// One mapping entry seen as a two-element list `[key, value]`.
struct PairDeserializer<'a, 'p> {
    key: &'a Key,
    value: &'a ConfigValue,
    path: String,
    map_path: &'p str,
    map_location: Location,
}

/// Anything but a tuple asked of a pair means a list was wanted and a map was written.
macro_rules! pair_mismatch {
    ($($method:ident),*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            Err(<DeError as de::Error>::invalid_type(de::Unexpected::Map, &visitor)
                .stamp(self.map_path, self.map_location))
        })*
    };
}

impl<'de> de::Deserializer<'de> for PairDeserializer<'_, '_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let key = ConfigValue::string(&self.key.name).at(self.key.location);
        let mut access = PairAccess {
            key: Some(ValueDeserializer::new(&key, self.path.clone())),
            value: Some(ValueDeserializer::new(self.value, self.path.clone())),
        };
        visitor.visit_seq(&mut access)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_some(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    pair_mismatch!(
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_unit,
        deserialize_map,
        deserialize_identifier
    );
}

/// The two elements of a [`PairDeserializer`].
struct PairAccess<'a> {
    key: Option<ValueDeserializer<'a>>,
    value: Option<ValueDeserializer<'a>>,
}

impl<'de> de::SeqAccess<'de> for PairAccess<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.key.take().or_else(|| self.value.take()) {
            Some(element) => {
                let (path, location) = (element.path.clone(), element.value.location);
                match seed.deserialize(element) {
                    Ok(value) => Ok(Some(value)),
                    Err(error) => Err(error.stamp(&path, location)),
                }
            }
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(usize::from(self.key.is_some()) + usize::from(self.value.is_some()))
    }
}

/// An enum written as a string (`json`) or as a one-key map (`{hopping: {...}}`).
struct EnumAccess<'a> {
    /// The node naming the variant: the string itself, or a string node for the key.
    variant: Cow<'a, ConfigValue>,
    /// The path of the variant's value.
    path: String,
    /// The variant's value, when written as a map.
    value: Option<&'a ConfigValue>,
}

impl<'de, 'a> de::EnumAccess<'de> for EnumAccess<'a> {
    type Error = DeError;
    type Variant = VariantAccess<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, VariantAccess<'a>), DeError> {
        let variant = deserialize_child(seed, &self.variant, self.path.clone())?;
        let access = VariantAccess {
            name: self.variant.as_str().unwrap_or_default().to_owned(),
            name_location: self.variant.location,
            path: self.path,
            value: self.value,
        };
        Ok((variant, access))
    }
}

/// The value of one enum variant.
struct VariantAccess<'a> {
    name: String,
    name_location: Location,
    path: String,
    value: Option<&'a ConfigValue>,
}

impl VariantAccess<'_> {
    fn needs_value(&self) -> DeError {
        DeError::bare(format!("'{}' needs a value", self.name))
            .hint(format!("write it as {}: VALUE", self.name))
            .stamp(&self.path, self.name_location)
    }
}

impl<'de> de::VariantAccess<'de> for VariantAccess<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        match self.value {
            None
            | Some(ConfigValue {
                value: Value::Null, ..
            }) => Ok(()),
            Some(value) => Err(DeError::bare(format!("'{}' takes no value", self.name))
                .hint(format!("write just '{}'", self.name))
                .stamp(&self.path, value.location)),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        match self.value {
            Some(value) => deserialize_child(seed, value, self.path),
            None => Err(self.needs_value()),
        }
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Some(value) => {
                de::Deserializer::deserialize_seq(ValueDeserializer::new(value, self.path), visitor)
            }
            None => Err(self.needs_value()),
        }
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.value {
            Some(value) => {
                de::Deserializer::deserialize_map(ValueDeserializer::new(value, self.path), visitor)
            }
            None => Err(self.needs_value()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::Deserialize;

    use super::*;
    use crate::config::{HumanDuration, closest_match};

    fn loc(line: u32, column: u32) -> Location {
        Location { line, column }
    }

    /// A mapping whose keys sit at the given places; values carry their own locations.
    fn map_at(line: u32, column: u32, entries: Vec<(&str, u32, u32, ConfigValue)>) -> ConfigValue {
        let entries = entries
            .into_iter()
            .map(|(name, line, column, value)| {
                let key = Key {
                    name: name.to_owned(),
                    location: loc(line, column),
                };
                (key, value)
            })
            .collect();
        ConfigValue::new(Value::Map(entries)).at(loc(line, column))
    }

    fn s(text: &str, line: u32, column: u32) -> ConfigValue {
        ConfigValue::string(text).at(loc(line, column))
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Mqtt {
        url: String,
        topics: Vec<String>,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        format: Format,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Format {
        #[default]
        Json,
        Csv,
    }

    fn mqtt(extra: Vec<(&str, u32, u32, ConfigValue)>) -> ConfigValue {
        let mut entries = vec![
            ("url", 2, 3, s("mqtt://x", 2, 8)),
            (
                "topics",
                3,
                3,
                ConfigValue::seq([s("a/b", 3, 12)]).at(loc(3, 11)),
            ),
        ];
        entries.extend(extra);
        map_at(2, 3, entries)
    }

    #[test]
    fn reads_a_struct_and_parses_numbers_from_strings() {
        let value = mqtt(vec![
            ("port", 4, 3, s(" 1883", 4, 9)),
            ("format", 5, 3, s("csv", 5, 11)),
        ]);
        let config: Mqtt = value.deserialize_into("sources.s.config").unwrap();
        assert_eq!(
            config,
            Mqtt {
                url: "mqtt://x".into(),
                topics: vec!["a/b".into()],
                port: Some(1883),
                format: Format::Csv,
            }
        );
    }

    #[test]
    fn unknown_field_points_at_the_key_and_suggests_the_nearest() {
        let value = mqtt(vec![("tpoics", 4, 3, ConfigValue::seq([]).at(loc(4, 11)))]);
        let error = value
            .deserialize_into::<Mqtt>("sources.s.config")
            .unwrap_err();
        assert_eq!(error.path, "sources.s.config.tpoics");
        assert_eq!(error.location, loc(4, 3));
        assert_eq!(error.message, "unknown field 'tpoics'");
        assert_eq!(
            error.hint.as_deref(),
            Some("did you mean 'topics'? valid fields: url, topics, port, format")
        );
    }

    /// Fields that several operators share, written flat beside each one's own.
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Credentials {
        username: String,
        #[serde(default)]
        password_env: Option<String>,
    }

    #[test]
    fn field_names_come_from_the_derive() {
        assert_eq!(field_names::<Mqtt>(), &["url", "topics", "port", "format"]);
        assert_eq!(field_names::<String>(), &[] as &[&str]);
    }

    #[test]
    fn a_split_map_feeds_both_types_and_hints_offer_both() {
        let value = mqtt(vec![("username", 4, 3, s("ada", 4, 13))]);
        let (credentials, own): (Credentials, Mqtt) =
            value.deserialize_split("sinks.s.config").unwrap();
        assert_eq!(credentials.username, "ada");
        assert_eq!(own.topics, vec!["a/b".to_owned()]);

        // A typo of a shared field is caught by the operator's type, hinted from both.
        let value = mqtt(vec![
            ("username", 4, 3, s("ada", 4, 13)),
            ("pasword_env", 5, 3, s("PW", 5, 16)),
        ]);
        let errors = value
            .deserialize_split::<Credentials, Mqtt>("sinks.s.config")
            .unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "sinks.s.config.pasword_env");
        assert_eq!(errors[0].location, loc(5, 3));
        assert_eq!(
            errors[0].hint.as_deref(),
            Some(
                "did you mean 'password_env'? valid fields: url, topics, port, format, \
                 username, password_env"
            )
        );

        // Both parts report their own problems in one go.
        let value = map_at(2, 3, vec![("port", 3, 3, s("x", 3, 9))]);
        let errors = value
            .deserialize_split::<Credentials, Mqtt>("c")
            .unwrap_err();
        let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].contains("missing field 'username'"),
            "{messages:?}"
        );
    }

    #[test]
    fn unknown_field_far_from_every_name_lists_them_without_a_guess() {
        let value = mqtt(vec![("zzzzzz", 4, 3, ConfigValue::null())]);
        let error = value.deserialize_into::<Mqtt>("c").unwrap_err();
        assert_eq!(
            error.hint.as_deref(),
            Some("valid fields: url, topics, port, format")
        );
    }

    #[test]
    fn missing_field_points_at_the_enclosing_map() {
        let value = map_at(7, 5, vec![("url", 7, 5, s("mqtt://x", 7, 10))]);
        let error = value
            .deserialize_into::<Mqtt>("sources.s.config")
            .unwrap_err();
        assert_eq!(error.path, "sources.s.config");
        assert_eq!(error.location, loc(7, 5));
        assert_eq!(error.message, "missing field 'topics'");
    }

    #[test]
    fn null_reads_as_an_empty_map() {
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct AllDefault {
            #[serde(default)]
            rows: u32,
        }
        let null = ConfigValue::null().at(loc(3, 1));
        assert_eq!(
            null.deserialize_into::<AllDefault>("c").unwrap(),
            AllDefault { rows: 0 }
        );
        let error = null
            .deserialize_into::<Mqtt>("sinks.out.config")
            .unwrap_err();
        assert_eq!(
            (error.location, error.message.as_str()),
            (loc(3, 1), "missing field 'url'")
        );
    }

    #[test]
    fn wrong_type_names_what_was_expected_and_found() {
        let value = mqtt(vec![("port", 4, 3, s("abc", 4, 9))]);
        let error = value
            .deserialize_into::<Mqtt>("sources.s.config")
            .unwrap_err();
        assert_eq!(error.path, "sources.s.config.port");
        assert_eq!(error.location, loc(4, 9));
        assert_eq!(error.message, "expected an integer, found a string \"abc\"");
        assert_eq!(error.hint, None);
    }

    #[test]
    fn number_where_a_string_is_wanted_suggests_quotes() {
        let value = map_at(
            1,
            1,
            vec![
                ("url", 1, 1, s("x", 1, 6)),
                (
                    "topics",
                    2,
                    1,
                    ConfigValue::seq([s("a", 2, 10), ConfigValue::int(5).at(loc(2, 13))]),
                ),
            ],
        );
        let error = value
            .deserialize_into::<Mqtt>("sources.s.config")
            .unwrap_err();
        assert_eq!(error.path, "sources.s.config.topics[1]");
        assert_eq!(error.location, loc(2, 13));
        assert_eq!(error.message, "expected a string, found an integer 5");
        assert_eq!(
            error.hint.as_deref(),
            Some("put the value in quotes to make it a string")
        );
    }

    #[test]
    fn integer_range_errors_say_the_range() {
        let negative = ConfigValue::int(-1).at(loc(2, 2));
        let error = negative.deserialize_into::<u32>("x.rows").unwrap_err();
        assert_eq!(
            error.message,
            "expected a non-negative integer up to 4294967295, found -1"
        );
        assert_eq!((error.path.as_str(), error.location), ("x.rows", loc(2, 2)));
        let error = negative.deserialize_into::<u64>("x").unwrap_err();
        assert_eq!(error.message, "expected a non-negative integer, found -1");
        let error = ConfigValue::string("300")
            .deserialize_into::<i8>("x")
            .unwrap_err();
        assert_eq!(
            error.message,
            "expected an integer from -128 to 127, found 300"
        );
        let error = ConfigValue::float(1.5)
            .deserialize_into::<i64>("x")
            .unwrap_err();
        assert_eq!(error.message, "expected an integer, found a number 1.5");
    }

    #[test]
    fn floats_and_bools_accept_integers_and_strings() {
        assert_eq!(
            ConfigValue::int(3).deserialize_into::<f64>("x").unwrap(),
            3.0
        );
        assert_eq!(
            ConfigValue::string("2.5")
                .deserialize_into::<f32>("x")
                .unwrap(),
            2.5
        );
        assert!(
            ConfigValue::string("true")
                .deserialize_into::<bool>("x")
                .unwrap()
        );
        let error = ConfigValue::string("yes")
            .deserialize_into::<bool>("x")
            .unwrap_err();
        assert_eq!(
            error.message,
            "expected a boolean (true or false), found a string \"yes\""
        );
    }

    #[test]
    fn unknown_enum_value_lists_the_valid_ones() {
        let value = mqtt(vec![("format", 4, 3, s("jsno", 4, 11))]);
        let error = value
            .deserialize_into::<Mqtt>("sources.s.config")
            .unwrap_err();
        assert_eq!(error.path, "sources.s.config.format");
        assert_eq!(error.location, loc(4, 11));
        assert_eq!(error.message, "unknown value 'jsno'");
        assert_eq!(
            error.hint.as_deref(),
            Some("did you mean 'json'? valid values: json, csv")
        );
        let error = ConfigValue::int(4)
            .deserialize_into::<Format>("f")
            .unwrap_err();
        assert_eq!(
            error.message,
            "expected one of json, csv, found an integer 4"
        );
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    enum Window {
        Tumbling(HumanDuration),
        Hopping {
            size: HumanDuration,
            slide: HumanDuration,
        },
        Session,
    }

    #[test]
    fn externally_tagged_enums_read_one_key_maps() {
        let hopping = map_at(
            1,
            9,
            vec![(
                "hopping",
                1,
                10,
                map_at(
                    1,
                    20,
                    vec![
                        ("size", 1, 20, s("1m", 1, 26)),
                        ("slide", 1, 30, s("10s", 1, 37)),
                    ],
                ),
            )],
        );
        assert_eq!(
            hopping.deserialize_into::<Window>("w").unwrap(),
            Window::Hopping {
                size: HumanDuration(Duration::from_secs(60)),
                slide: HumanDuration(Duration::from_secs(10)),
            }
        );
        assert_eq!(
            ConfigValue::string("session")
                .deserialize_into::<Window>("w")
                .unwrap(),
            Window::Session
        );

        let typo = map_at(1, 9, vec![("tumblin", 1, 10, s("1m", 1, 19))]);
        let error = typo
            .deserialize_into::<Window>("transforms.t.window")
            .unwrap_err();
        assert_eq!(error.path, "transforms.t.window.tumblin");
        assert_eq!(error.location, loc(1, 10));
        assert_eq!(error.message, "unknown value 'tumblin'");
        assert_eq!(
            error.hint.as_deref(),
            Some("did you mean 'tumbling'? valid values: tumbling, hopping, session")
        );

        let bare = ConfigValue::string("tumbling").at(loc(4, 4));
        let error = bare.deserialize_into::<Window>("w").unwrap_err();
        assert_eq!(
            (error.message.as_str(), error.location),
            ("'tumbling' needs a value", loc(4, 4))
        );
    }

    #[test]
    fn errors_inside_custom_types_point_at_the_value() {
        let value = map_at(1, 1, vec![("tumbling", 1, 1, s("5 parsecs", 1, 11))]);
        let error = value
            .deserialize_into::<Window>("transforms.t.window")
            .unwrap_err();
        assert_eq!(error.path, "transforms.t.window.tumbling");
        assert_eq!(error.location, loc(1, 11));
        assert!(
            error.message.starts_with("invalid duration '5 parsecs'"),
            "{}",
            error.message
        );
    }

    #[test]
    fn paths_grow_through_maps_of_structs() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Field {
            #[allow(dead_code)]
            base: f64,
        }
        #[derive(Debug, Deserialize)]
        struct Generator {
            #[allow(dead_code)]
            fields: BTreeMap<String, Field>,
        }
        let value = map_at(
            5,
            5,
            vec![(
                "fields",
                5,
                5,
                map_at(
                    6,
                    7,
                    vec![(
                        "temperature",
                        6,
                        7,
                        map_at(6, 20, vec![("base", 6, 21, s("warm", 6, 27))]),
                    )],
                ),
            )],
        );
        let error = value
            .deserialize_into::<Generator>("sources.g.config")
            .unwrap_err();
        assert_eq!(error.path, "sources.g.config.fields.temperature.base");
        assert_eq!(error.location, loc(6, 27));
        assert_eq!(error.message, "expected a number, found a string \"warm\"");
    }

    #[test]
    fn maps_read_as_lists_keep_document_order() {
        let value = map_at(
            1,
            1,
            vec![
                ("z", 1, 1, ConfigValue::int(1)),
                ("a", 2, 1, ConfigValue::int(2)),
            ],
        );
        let pairs: Vec<(String, i32)> = value.deserialize_into("x").unwrap();
        assert_eq!(pairs, vec![("z".to_owned(), 1), ("a".to_owned(), 2)]);
        let error = value.deserialize_into::<Vec<String>>("x").unwrap_err();
        assert_eq!(error.message, "expected a string, found a map");
        assert_eq!(error.location, loc(1, 1));
    }

    #[test]
    fn fixed_length_lists_reject_extra_elements() {
        let value = ConfigValue::seq([
            ConfigValue::int(1),
            ConfigValue::int(2),
            ConfigValue::int(3),
        ])
        .at(loc(9, 3));
        let error = value.deserialize_into::<(f64, f64)>("c.point").unwrap_err();
        assert_eq!(error.message, "expected a list of 2 elements, found 3");
        assert_eq!(
            (error.path.as_str(), error.location),
            ("c.point", loc(9, 3))
        );
    }

    #[test]
    fn untagged_enums_and_newtypes_work() {
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(untagged)]
        enum Either {
            Number(i64),
            Text(String),
        }
        #[derive(Debug, Deserialize, PartialEq)]
        struct Rows(u32);
        assert_eq!(
            ConfigValue::int(5).deserialize_into::<Either>("x").unwrap(),
            Either::Number(5)
        );
        assert_eq!(
            ConfigValue::string("five")
                .deserialize_into::<Either>("x")
                .unwrap(),
            Either::Text("five".into())
        );
        assert_eq!(
            ConfigValue::string("7")
                .deserialize_into::<Rows>("x")
                .unwrap(),
            Rows(7)
        );
        let error = ConfigValue::bool(true)
            .at(loc(2, 3))
            .deserialize_into::<Either>("x")
            .unwrap_err();
        assert_eq!(error.location, loc(2, 3));
        assert!(
            error.message.contains("did not match any variant"),
            "{}",
            error.message
        );
    }

    #[test]
    fn closest_match_only_suggests_likely_typos() {
        let kinds = ["generator", "file", "mqtt"];
        assert_eq!(closest_match("genrator", kinds), Some("generator"));
        assert_eq!(closest_match("MQTT", kinds), Some("mqtt"));
        assert_eq!(closest_match("kafka", kinds), None);
        assert_eq!(closest_match("x", ["y"]), None);
    }
}
