//! Environment interpolation in string values: `${VAR}`, `${VAR:-default}`, and `$$` for a
//! literal `$`.
//!
//! The environment is passed in as a lookup function so tests (and the hub, which renders
//! pipelines for other devices) decide what it contains. Keys are never interpolated, only
//! string values, so the shape of a document does not depend on the environment.

use weir_engine::config::{ConfigError, ConfigValue, Value};

/// Looks up one environment variable.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, for callers that want the real one.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Interpolates every string value under `value`, whose path is `path`, in place.
///
/// Every problem is collected into `errors`; a string with a problem is left as written.
pub(crate) fn interpolate_tree(
    value: &mut ConfigValue,
    path: &str,
    env: EnvLookup<'_>,
    errors: &mut Vec<ConfigError>,
) {
    match &mut value.value {
        Value::String(text) => {
            if !text.contains('$') {
                return;
            }
            match interpolate(text, env) {
                Ok(expanded) => *text = expanded,
                Err(problems) => errors.extend(problems.into_iter().map(|(message, hint)| {
                    ConfigError::new(path, value.location, message).with_hint(hint)
                })),
            }
        }
        Value::Seq(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                interpolate_tree(item, &format!("{path}[{index}]"), env, errors);
            }
        }
        Value::Map(entries) => {
            for (key, item) in entries.iter_mut() {
                let child = if path.is_empty() {
                    key.name.clone()
                } else {
                    format!("{path}.{}", key.name)
                };
                interpolate_tree(item, &child, env, errors);
            }
        }
        Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_) => {}
    }
}

/// Expands one string, or returns every problem in it as (message, hint).
fn interpolate(text: &str, env: EnvLookup<'_>) -> Result<String, Vec<(String, String)>> {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(close) = body.find('}') else {
                problems.push((
                    format!("unterminated '${{' in {text:?}"),
                    "close it with '}', or write '$$' for a literal '$'".to_owned(),
                ));
                break;
            };
            let reference = &body[..close];
            rest = &body[close + 1..];
            let (name, default) = match reference.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (reference, None),
            };
            if !is_variable_name(name) {
                problems.push((
                    format!("invalid environment variable name '{name}'"),
                    "names are letters, digits and '_', e.g. ${MQTT_URL}; write '$$' for a \
                     literal '$'"
                        .to_owned(),
                ));
                continue;
            }
            // Like the shell's `:-`, an empty variable takes the default too.
            match (
                env(name).filter(|v| !v.is_empty() || default.is_none()),
                default,
            ) {
                (Some(found), _) => out.push_str(&found),
                (None, Some(default)) => out.push_str(default),
                (None, None) => problems.push((
                    format!("environment variable '{name}' is not set"),
                    format!("set {name} or write ${{{name}:-default}}"),
                )),
            }
        } else {
            // A `$` that starts no reference (`$1` in SQL, a price) is kept as written.
            out.push('$');
            rest = after;
        }
    }
    if problems.is_empty() {
        out.push_str(rest);
        Ok(out)
    } else {
        Err(problems)
    }
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use weir_engine::config::Location;

    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("broker".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_defaults_and_escapes() {
        assert_eq!(
            interpolate("mqtt://${HOST}:${PORT:-1883}/$$x $1", &env).unwrap(),
            "mqtt://broker:1883/$x $1"
        );
        assert_eq!(interpolate("${EMPTY:-d}|${EMPTY}|", &env).unwrap(), "d||");
        assert_eq!(interpolate("${HOST:-}", &env).unwrap(), "broker");
        assert_eq!(interpolate("${NOPE:-}", &env).unwrap(), "");
    }

    #[test]
    fn reports_every_problem_in_a_string() {
        let problems = interpolate("${A}-${B}-${bad name}-${C", &env).unwrap_err();
        let messages: Vec<_> = problems.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(
            messages,
            [
                "environment variable 'A' is not set",
                "environment variable 'B' is not set",
                "invalid environment variable name 'bad name'",
                "unterminated '${' in \"${A}-${B}-${bad name}-${C\"",
            ]
        );
        assert_eq!(problems[0].1, "set A or write ${A:-default}");
    }

    #[test]
    fn interpolates_nested_values_and_locates_problems() {
        let here = Location { line: 3, column: 9 };
        let mut tree = ConfigValue::map([
            ("url", ConfigValue::string("${HOST}")),
            (
                "topics",
                ConfigValue::seq([ConfigValue::string("${TOPIC}").at(here)]),
            ),
        ]);
        let mut errors = Vec::new();
        interpolate_tree(&mut tree, "sources.s.config", &env, &mut errors);
        assert_eq!(tree.get("url"), Some(&ConfigValue::string("broker")));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "sources.s.config.topics[0]");
        assert_eq!(errors[0].location, here);
        assert_eq!(errors[0].message, "environment variable 'TOPIC' is not set");
    }
}
