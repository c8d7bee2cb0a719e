//! One problem found in a pipeline file, as users see it: file, line, column, the path
//! inside the document, what is wrong and what to do about it.

use std::fmt;
use std::path::{Path, PathBuf};

use weir_engine::config::{ConfigError, Location};

/// A problem found while loading or validating a pipeline file.
///
/// Displays as `FILE:LINE:COL: PATH: MESSAGE`, followed by `  hint: HINT` on its own
/// line when there is a hint. Parts that are unknown (no location, no path) are left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The pipeline file.
    pub file: PathBuf,
    /// The path inside the document, e.g. `sources.sensors.schema.ts`; empty for problems
    /// with the file as a whole.
    pub path: String,
    /// Where in the file; `0:0` when unknown.
    pub location: Location,
    /// What is wrong, lower-case, without a trailing period.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// A configuration error found in `file`.
    pub fn from_config_error(file: &Path, error: ConfigError) -> Self {
        Diagnostic {
            file: file.to_owned(),
            path: error.path,
            location: error.location,
            message: error.message,
            hint: error.hint,
        }
    }

    /// A problem with `file` as a whole, such as failing to read it.
    pub fn file_error(file: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_owned(),
            path: String::new(),
            location: Location::default(),
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

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.location.line > 0 {
            write!(f, ":{}:{}", self.location.line, self.location.column)?;
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}

/// Orders diagnostics by file and position, keeping the order they were found in for
/// problems at the same place.
pub(crate) fn sort(diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by(|a, b| (&a.file, a.location).cmp(&(&b.file, b.location)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_file_position_path_message_and_hint() {
        let error = ConfigError::new(
            "sources.s.kind",
            Location {
                line: 4,
                column: 11,
            },
            "oops",
        )
        .with_hint("do this");
        let diagnostic = Diagnostic::from_config_error(Path::new("p.yaml"), error);
        assert_eq!(
            diagnostic.to_string(),
            "p.yaml:4:11: sources.s.kind: oops\n  hint: do this"
        );
        let whole = Diagnostic::file_error(Path::new("p.yaml"), "cannot read the file");
        assert_eq!(whole.to_string(), "p.yaml: cannot read the file");
    }
}
