//! Where a TOML error is: line, column and the dotted key, named for the table the error
//! is about (an error on a table header is about that table).

use std::path::Path;

use crate::ConfigError;

/// Turns a toml error into file:line:col, the dotted key and the reason.
pub(crate) fn toml_error(path: &Path, src: &str, e: &toml::de::Error) -> ConfigError {
    let (line, col, key) = match e.span() {
        Some(span) => {
            let before = src.get(..span.start).unwrap_or_default();
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            let this_line = src.lines().nth(line - 1).unwrap_or_default().trim();
            let header = |l: &str| -> Option<String> {
                l.strip_prefix('[').map(|h| {
                    h.split(']')
                        .next()
                        .unwrap_or_default()
                        .trim_matches(|c| c == '[' || c == ']')
                        .trim()
                        .to_string()
                })
            };
            // An error on a table header (a missing field, an unknown table) is about
            // that table; otherwise about the key on the line, in the table above it.
            let key = match header(this_line) {
                Some(table) => table,
                None => {
                    // The lines above this one (`before` ends inside this line, or at
                    // its start when the error is at column 1).
                    let above = before
                        .get(..before.rfind('\n').map_or(0, |i| i + 1))
                        .unwrap_or_default();
                    let table = above.lines().rev().map(str::trim).find_map(header);
                    let key_name = this_line.split_once('=').map(|(k, _)| k.trim().to_string());
                    match (table, key_name) {
                        (Some(t), Some(k)) => format!("{t}.{k}"),
                        (Some(t), None) => t,
                        (None, Some(k)) => k,
                        (None, None) => String::new(),
                    }
                }
            };
            (line, col, key)
        }
        None => (1, 1, String::new()),
    };
    // `unknown field `x`` at the top level or in a table: name the field itself.
    let unknown = e
        .message()
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next());
    let key = match unknown {
        Some(field) if !key.ends_with(field) && !key.is_empty() => format!("{key}.{field}"),
        Some(field) if key.is_empty() => field.to_string(),
        _ if key.is_empty() => "-".into(),
        _ => key,
    };
    ConfigError {
        file: path.to_path_buf(),
        key,
        reason: e.message().trim().to_string(),
        line: Some((line, col)),
    }
}
