//! Errors located in a source file: `file:line:col: message` plus a caret excerpt.

use std::fmt;
use std::path::{Path, PathBuf};

/// One error (or warning) in a policy-directory file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub col: usize,
    pub message: String,
    /// The offending source line, for the caret excerpt.
    pub excerpt: String,
}

impl SourceError {
    pub fn at(file: &Path, src: &str, line: usize, col: usize, message: String) -> Self {
        SourceError {
            file: file.to_path_buf(),
            line,
            col,
            message,
            excerpt: src
                .lines()
                .nth(line.saturating_sub(1))
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// An error about a whole file (unreadable, too large).
    pub fn file(file: &Path, message: String) -> Self {
        SourceError {
            file: file.to_path_buf(),
            line: 0,
            col: 0,
            message,
            excerpt: String::new(),
        }
    }

    /// Converts a miette diagnostic from Cedar into located errors, one per label
    /// (or one at 1:1 when Cedar gave no location).
    pub fn from_diagnostic(
        file: &Path,
        src: &str,
        diag: &dyn miette::Diagnostic,
        base_offset: usize,
    ) -> SourceError {
        let mut message = diag.to_string();
        if let Some(help) = diag.help() {
            message.push_str(&format!(" (help: {help})"));
        }
        let offset = diag
            .labels()
            .and_then(|mut l| l.next())
            .map(|l| l.offset())
            .unwrap_or(0);
        let (line, col) = line_col(src, base_offset + offset);
        SourceError::at(file, src, line, col, message)
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        writeln!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )?;
        let gutter = self.line.to_string().len();
        // A long line (a generated policy on one line) shows a window around the column.
        const WINDOW: usize = 120;
        let chars: Vec<char> = self.excerpt.chars().collect();
        let at = self.col.saturating_sub(1);
        let (start, end) = if chars.len() > WINDOW {
            let start = at.saturating_sub(WINDOW / 2).min(chars.len() - WINDOW);
            (start, start + WINDOW)
        } else {
            (0, chars.len())
        };
        let shown: String = chars.get(start..end).unwrap_or_default().iter().collect();
        let (before, after) = (
            if start > 0 { "…" } else { "" },
            if end < chars.len() { "…" } else { "" },
        );
        writeln!(f, "{:gutter$} |", "")?;
        writeln!(f, "{} | {before}{shown}{after}", self.line)?;
        write!(
            f,
            "{:gutter$} | {:pad$}^",
            "",
            "",
            pad = at - start + usize::from(start > 0)
        )
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = src[line_start..offset].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let s = "ab\ncdé\nx";
        assert_eq!(line_col(s, 0), (1, 1));
        assert_eq!(line_col(s, 3), (2, 1));
        assert_eq!(line_col(s, 7), (2, 4));
        assert_eq!(line_col(s, 999), (3, 2));
    }

    #[test]
    fn display_has_caret_under_column() {
        let e = SourceError::at(Path::new("p.cedar"), "permit(x);", 1, 8, "bad".into());
        let text = e.to_string();
        assert!(text.starts_with("p.cedar:1:8: bad"), "{text}");
        assert!(text.ends_with("  |        ^"), "{text:?}");
    }
}
