//! Module output split into log lines, the same way for containers and processes: a
//! module's bytes are not trusted to be UTF-8 or to end their lines.

use super::{LogLine, LogStream};

/// The longest log line passed on whole; a longer one (or output that never ends its
/// line) is cut into pieces of this size, so a module cannot grow Weir's memory by
/// printing without newlines.
pub(crate) const MAX_LOG_LINE: usize = 64 * 1024;

/// Splits output chunks into lines, one buffer per stream: a chunk may hold several
/// lines, or part of one.
#[derive(Default)]
pub(crate) struct LineSplitter {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl LineSplitter {
    /// Takes a chunk of `stream`, and passes the lines it completes to `emit`.
    pub(crate) fn push(&mut self, stream: LogStream, chunk: &[u8], mut emit: impl FnMut(LogLine)) {
        let buffer = match stream {
            LogStream::Stdout => &mut self.stdout,
            LogStream::Stderr => &mut self.stderr,
        };
        buffer.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(end) = buffer[start..].iter().position(|&b| b == b'\n') {
            emit(log_line(stream, &buffer[start..start + end]));
            start += end + 1;
        }
        buffer.drain(..start);
        while buffer.len() > MAX_LOG_LINE {
            // Cut on a character boundary so the pieces stay valid UTF-8.
            let mut cut = MAX_LOG_LINE;
            while cut > 0 && buffer[cut] & 0xC0 == 0x80 {
                cut -= 1;
            }
            if cut == 0 {
                cut = MAX_LOG_LINE;
            }
            emit(log_line(stream, &buffer[..cut]));
            buffer.drain(..cut);
        }
    }

    /// Passes what is left of unfinished lines to `emit`, once the output has ended.
    pub(crate) fn finish(&mut self, mut emit: impl FnMut(LogLine)) {
        for (stream, buffer) in [
            (LogStream::Stdout, &mut self.stdout),
            (LogStream::Stderr, &mut self.stderr),
        ] {
            if !buffer.is_empty() {
                emit(log_line(stream, buffer));
                buffer.clear();
            }
        }
    }
}

/// One line, without its `\r\n` or `\n`; bytes that are not UTF-8 become U+FFFD.
fn log_line(stream: LogStream, bytes: &[u8]) -> LogLine {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    LogLine {
        stream,
        line: String::from_utf8_lossy(bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_and_streams() {
        let mut lines = LineSplitter::default();
        let mut got = Vec::new();
        let mut keep = |line: LogLine| got.push((line.stream, line.line));
        lines.push(LogStream::Stdout, b"one\ntw", &mut keep);
        lines.push(LogStream::Stderr, b"err\r\n", &mut keep);
        lines.push(LogStream::Stdout, b"o\nthree", &mut keep);
        lines.finish(&mut keep);
        assert_eq!(
            got,
            vec![
                (LogStream::Stdout, "one".to_owned()),
                (LogStream::Stderr, "err".to_owned()),
                (LogStream::Stdout, "two".to_owned()),
                (LogStream::Stdout, "three".to_owned()),
            ]
        );
    }

    #[test]
    fn endless_lines_are_cut() {
        let mut lines = LineSplitter::default();
        let mut out = Vec::new();
        let long = "é".repeat(MAX_LOG_LINE); // two bytes each
        lines.push(LogStream::Stdout, long.as_bytes(), |line| out.push(line));
        assert!(lines.stdout.len() <= MAX_LOG_LINE);
        assert!(!out.is_empty());
        for line in &out {
            assert!(!line.line.contains('\u{FFFD}'));
            assert!(line.line.len() <= MAX_LOG_LINE);
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_become_replacement_characters() {
        let mut lines = LineSplitter::default();
        let mut out = Vec::new();
        lines.push(LogStream::Stderr, b"bad \xff\xfe byte\nnext\n", |line| {
            out.push(line.line)
        });
        assert_eq!(out, ["bad \u{FFFD}\u{FFFD} byte", "next"]);
    }
}
