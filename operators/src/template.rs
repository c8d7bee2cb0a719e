//! Text with `{column}` placeholders, rendered once per row: the mqtt sink's topics
//! (`alerts/{device}`) and the file sink's paths (`out/{device}/readings.jsonl`).
//!
//! A template is parsed once against the input schema, so a misspelt column, or a column
//! whose values cannot be shown as text, is a config error rather than a failure at the
//! first row. Values are shown as [`display_options`] shows them (timestamps in RFC 3339,
//! numbers as written by Arrow). A row whose placeholder value is null or empty has no
//! rendering: a topic or a path with a hole in it would silently merge different rows'
//! destinations. Each user adds its own rules for what a value may hold (no MQTT
//! wildcards in a topic, no `..` in a path).

use std::collections::HashMap;

use arrow::array::RecordBatch;
use arrow::compute::can_cast_types;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::util::display::ArrayFormatter;
use weir_engine::OperatorError;

use crate::format::display_options;

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Text written as is.
    Text(String),
    /// The value of the column at this index of the input schema.
    Column(usize),
}

/// A parsed template: text and `{column}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// As written, for messages.
    text: String,
    parts: Vec<Part>,
}

/// Each row's rendering, or why the row has none.
pub type Rendered = Vec<Result<String, String>>;

impl Template {
    /// Parses `template` against the input `schema`. `noun` names what the template is
    /// (`topic`, `path`) in the error, which says what is wrong.
    pub fn parse(noun: &str, template: &str, schema: &SchemaRef) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let (text, after) = rest.split_at(open);
            let close = after
                .find('}')
                .ok_or_else(|| format!("{noun} '{template}' has a '{{' without its '}}'"))?;
            let name = &after[1..close];
            if name.is_empty() || name.contains('{') {
                return Err(format!(
                    "{noun} '{template}': '{}' is not a {{column}} placeholder",
                    &after[..=close]
                ));
            }
            let index = schema.index_of(name).map_err(|_| {
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                format!(
                    "{noun} '{template}' names column '{name}', which the input does not have \
                     (it has {})",
                    names.join(", ")
                )
            })?;
            let data_type = schema.field(index).data_type();
            if !can_cast_types(data_type, &DataType::Utf8) {
                return Err(format!(
                    "{noun} '{template}' names column '{name}' of type {data_type}, whose values \
                     cannot be written as text"
                ));
            }
            if !text.is_empty() {
                parts.push(Part::Text(text.to_owned()));
            }
            parts.push(Part::Column(index));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        if parts
            .iter()
            .any(|part| matches!(part, Part::Text(text) if text.contains('}')))
        {
            return Err(format!("{noun} '{template}' has a '}}' without its '{{'"));
        }
        Ok(Template {
            text: template.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The text and placeholders, in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The text when the template names no column.
    pub fn fixed(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Text(text)] => Some(text),
            _ => None,
        }
    }

    /// The input columns the template names, each once, in order of first use.
    pub fn columns(&self) -> Vec<usize> {
        let mut columns = Vec::new();
        for part in &self.parts {
            if let Part::Column(index) = part
                && !columns.contains(index)
            {
                columns.push(*index);
            }
        }
        columns
    }

    /// The template with every placeholder replaced by `value`, to check at plan time what
    /// the text around the placeholders allows.
    pub fn sample(&self, value: &str) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Text(text) => text.as_str(),
                Part::Column(_) => value,
            })
            .collect()
    }

    /// Each row's rendering, or why it has none: a null or empty value, or what `check`
    /// says of a value (given the column's name and the value as text).
    pub fn render(
        &self,
        batch: &RecordBatch,
        check: impl Fn(&str, &str) -> Result<(), String>,
    ) -> Result<Rendered, OperatorError> {
        let rows = batch.num_rows();
        if let Some(text) = self.fixed() {
            return Ok(vec![Ok(text.to_owned()); rows]);
        }
        let options = display_options();
        let schema = batch.schema();
        let mut formatters = HashMap::new();
        for index in self.columns() {
            let formatter = ArrayFormatter::try_new(batch.column(index).as_ref(), &options)?;
            formatters.insert(index, formatter);
        }
        let mut rendered = Vec::with_capacity(rows);
        let mut value = String::new();
        for row in 0..rows {
            let mut text = String::new();
            let mut problem = None;
            for part in &self.parts {
                match part {
                    Part::Text(literal) => text.push_str(literal),
                    Part::Column(index) => {
                        let name = schema.field(*index).name();
                        if batch.column(*index).is_null(row) {
                            problem = Some(format!("column '{name}' is null"));
                            break;
                        }
                        value.clear();
                        formatters[index]
                            .value(row)
                            .write(&mut value)
                            .map_err(OperatorError::Arrow)?;
                        if value.is_empty() {
                            problem = Some(format!("column '{name}' is empty"));
                            break;
                        }
                        if let Err(why) = check(name, &value) {
                            problem = Some(why);
                            break;
                        }
                        text.push_str(&value);
                    }
                }
            }
            rendered.push(match problem {
                None => Ok(text),
                Some(problem) => Err(problem),
            });
        }
        Ok(rendered)
    }
}

/// The rows of a batch grouped by their rendering, groups in order of first appearance
/// and rows in their order; rows without a rendering are left out.
pub fn group_rows(rendered: Rendered) -> Vec<(String, Vec<u32>)> {
    let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (row, text) in rendered.into_iter().enumerate() {
        let Ok(text) = text else { continue };
        match index.get(&text) {
            Some(&group) => groups[group].1.push(row as u32),
            None => {
                index.insert(text.clone(), groups.len());
                groups.push((text, vec![row as u32]));
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{Field, Fields, Schema};

    use super::*;
    use crate::format::test_support::{readings, readings_schema};

    fn schema() -> SchemaRef {
        readings_schema()
    }

    fn batch(devices: &[Option<&str>]) -> RecordBatch {
        readings(devices)
    }

    #[test]
    fn templates_parse_against_the_input_schema() {
        let template =
            Template::parse("path", "plant/{device}/t-{ts}/{device}", &schema()).unwrap();
        assert_eq!(
            template.parts(),
            &[
                Part::Text("plant/".into()),
                Part::Column(0),
                Part::Text("/t-".into()),
                Part::Column(1),
                Part::Text("/".into()),
                Part::Column(0),
            ]
        );
        assert_eq!(template.columns(), vec![0, 1]);
        assert_eq!(template.sample("x"), "plant/x/t-x/x");
        assert_eq!(template.fixed(), None);
        assert_eq!(
            Template::parse("path", "out.csv", &schema())
                .unwrap()
                .fixed(),
            Some("out.csv")
        );
        let err = |t: &str| Template::parse("path", t, &schema()).unwrap_err();
        assert_eq!(
            err("a/{nope}"),
            "path 'a/{nope}' names column 'nope', which the input does not have \
             (it has device, ts, temperature)"
        );
        assert!(err("a/{device").contains("without its '}'"));
        assert!(err("a/device}").contains("without its '{'"));
        assert!(err("a/{}").contains("not a {column} placeholder"));
    }

    #[test]
    fn columns_that_cannot_be_text_are_refused() {
        let nested = DataType::Struct(Fields::from(vec![Field::new("x", DataType::Int32, true)]));
        let schema = Arc::new(Schema::new(vec![Field::new("s", nested, true)]));
        let error = Template::parse("topic", "t/{s}", &schema).unwrap_err();
        assert!(error.contains("cannot be written as text"), "{error}");
    }

    #[test]
    fn rows_render_their_text_and_bad_values_say_why() {
        let template = Template::parse("topic", "alerts/{device}", &schema()).unwrap();
        let no_plus = |name: &str, value: &str| {
            if value.contains('+') {
                Err(format!("column '{name}' holds a +"))
            } else {
                Ok(())
            }
        };
        let rendered = template
            .render(
                &batch(&[Some("d1"), None, Some(""), Some("a+b"), Some("d/2")]),
                no_plus,
            )
            .unwrap();
        assert_eq!(rendered[0].as_deref(), Ok("alerts/d1"));
        assert_eq!(rendered[1], Err("column 'device' is null".to_owned()));
        assert_eq!(rendered[2], Err("column 'device' is empty".to_owned()));
        assert_eq!(rendered[3], Err("column 'device' holds a +".to_owned()));
        assert_eq!(rendered[4].as_deref(), Ok("alerts/d/2"));
        let stamped = Template::parse("topic", "t/{ts}/{temperature}", &schema()).unwrap();
        assert_eq!(
            stamped.render(&batch(&[Some("x")]), |_, _| Ok(())).unwrap()[0].as_deref(),
            Ok("t/1970-01-01T00:00:00Z/20.0")
        );
    }

    #[test]
    fn groups_keep_first_appearance_and_row_order_and_skip_failures() {
        let rendered = vec![
            Ok("b".to_owned()),
            Ok("a".to_owned()),
            Err("bad".to_owned()),
            Ok("b".to_owned()),
        ];
        assert_eq!(
            group_rows(rendered),
            vec![("b".to_owned(), vec![0, 3]), ("a".to_owned(), vec![1])]
        );
    }
}
