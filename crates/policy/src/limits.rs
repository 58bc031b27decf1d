//! Size and depth limits on policy-directory text, checked before and after parsing.
//!
//! Cedar's parser, validator, evaluator and even its `Drop` of an expression tree recurse
//! once per level of nesting. A policy of 145 nested parentheses, a 3,305-term `||` chain
//! or 2,000 nested `Set<` in a schema overflowed a 2 MiB thread stack (the process aborts:
//! no error, no unwinding), and a ~1,930-term `||` forbid parsed but then errored on
//! every evaluation ("recursion limit reached"), which Cedar answers by skipping the
//! policy: a forbid that silently stops applying. So, in order:
//!
//! 1. [`lexical`] scans each file before Cedar sees it: bracket nesting (`( [ {`, and
//!    `<` in the schema) at most [`MAX_NESTING`], and per statement at most
//!    [`MAX_CHAIN_OPERATORS`] of the tokens that build left-nested chains (`||`, `&&`,
//!    `+`, `-`, `*`, `.`, `if`). Strings and comments are skipped. This bounds every
//!    recursion Cedar does while parsing.
//! 2. Parsing and validation run on a thread with a [`PARSE_STACK_BYTES`] stack (only
//!    touched pages are committed), far above what step 1 lets through.
//! 3. [`expression_depth`] measures each parsed policy's tree (iteratively) and refuses
//!    one deeper than [`MAX_EXPR_DEPTH`]: every accepted policy evaluates on a 2 MiB
//!    stack in a debug build with room to spare (a test holds this), so no validated set
//!    can hit Cedar's evaluation limit.
//!
//! The way out for a long list of addresses is a network in `networks.toml` (or a set
//! literal with `.contains`), which is flat: the error says so.

use std::path::Path;

use serde_json::Value;

use crate::diagnostics::{line_col, SourceError};

/// Deepest bracket nesting accepted in a policy or schema file.
pub const MAX_NESTING: usize = 64;
/// Most chain-building operators in one policy statement (or schema declaration).
pub const MAX_CHAIN_OPERATORS: usize = 1_000;
/// Deepest expression tree accepted in a policy (levels of the JSON form of its
/// condition, about two per operator).
pub const MAX_EXPR_DEPTH: usize = 200;
/// Stack of the thread that parses and validates.
pub const PARSE_STACK_BYTES: usize = 256 << 20;

const HINT: &str = "split the condition, use a set literal with .contains(…), or declare the addresses as a network in networks.toml";

/// Which grammar a file is in (the schema's `<` nests, the policies' `<` compares).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grammar {
    Policy,
    Schema,
}

/// Checks bracket nesting and chain length in `src` without parsing it. Cedar has `//`
/// comments only; strings take `\` escapes.
pub fn lexical(file: &Path, src: &str, grammar: Grammar) -> Result<(), SourceError> {
    let b = src.as_bytes();
    let mut depth = 0usize;
    let mut operators = 0usize;
    let mut i = 0usize;
    let fail = |offset: usize, message: String| {
        let (line, col) = line_col(src, offset);
        Err(SourceError::at(file, src, line, col, message))
    };
    while let Some(&c) = b.get(i) {
        if let Some(next) = skip_comment_or_string(b, i) {
            i = next;
            continue;
        }
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b'<' if grammar == Grammar::Schema => depth += 1,
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'>' if grammar == Grammar::Schema => depth = depth.saturating_sub(1),
            b';' if depth == 0 => operators = 0,
            b'|' | b'&' if grammar == Grammar::Policy && b.get(i + 1) == Some(&c) => {
                operators += 1;
                i += 1;
            }
            b'+' | b'-' | b'*' | b'.' if grammar == Grammar::Policy => operators += 1,
            b'i' if grammar == Grammar::Policy
                && b.get(i + 1) == Some(&b'f')
                && !b.get(i + 2).is_some_and(|x| is_ident(*x))
                && !i
                    .checked_sub(1)
                    .and_then(|p| b.get(p))
                    .is_some_and(|x| is_ident(*x)) =>
            {
                operators += 1
            }
            _ => {}
        }
        if depth > MAX_NESTING {
            return fail(
                i,
                format!("nesting deeper than {MAX_NESTING} levels of brackets"),
            );
        }
        if operators > MAX_CHAIN_OPERATORS {
            return fail(
                i,
                format!(
                    "more than {MAX_CHAIN_OPERATORS} chained operators in one statement ({HINT})"
                ),
            );
        }
        i += 1;
    }
    Ok(())
}

/// At `i`, a `//` comment (Cedar has no other) or a `"…"` string with `\` escapes: the
/// index just after it. Anything else: `None`.
pub(crate) fn skip_comment_or_string(b: &[u8], i: usize) -> Option<usize> {
    match (b.get(i), b.get(i + 1)) {
        (Some(b'/'), Some(b'/')) => {
            let mut j = i;
            while b.get(j).is_some_and(|&c| c != b'\n') {
                j += 1;
            }
            Some(j)
        }
        (Some(b'"'), _) => {
            let mut j = i + 1;
            while let Some(&s) = b.get(j) {
                j += if s == b'\\' { 2 } else { 1 };
                if s == b'"' {
                    break;
                }
            }
            Some(j)
        }
        _ => None,
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Depth of a JSON tree, without recursion.
pub fn json_depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|x| (x, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    deepest
}

/// The error for a policy whose tree is deeper than [`MAX_EXPR_DEPTH`], if it is.
pub fn expression_depth(
    file: &Path,
    src: &str,
    offset: usize,
    id: &str,
    json: &Value,
) -> Option<SourceError> {
    let depth = json_depth(json);
    (depth > MAX_EXPR_DEPTH).then(|| {
        let (line, col) = line_col(src, offset);
        SourceError::at(
            file,
            src,
            line,
            col,
            format!(
                "policy {id:?} nests {depth} levels deep, over the limit of {MAX_EXPR_DEPTH}: Cedar could not evaluate it reliably ({HINT})"
            ),
        )
    })
}

/// Runs `f` on a thread with a [`PARSE_STACK_BYTES`] stack; `None` if that thread could
/// not start or `f` panicked.
pub fn on_parse_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::Builder::new()
        .name("policy-parse".into())
        .stack_size(PARSE_STACK_BYTES)
        .spawn(f)
        .ok()?
        .join()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(src: &str, g: Grammar) -> Result<(), SourceError> {
        lexical(Path::new("x.cedar"), src, g)
    }

    #[test]
    fn nesting_and_chains_are_bounded_and_located() {
        let deep = format!(
            "permit(principal, action, resource) when {{ {}true{} }};",
            "(".repeat(65),
            ")".repeat(65)
        );
        let e = check(&deep, Grammar::Policy)
            .err()
            .map(|e| (e.line, e.message));
        assert!(matches!(e, Some((1, m)) if m.contains("nesting deeper than 64")));
        let ok = format!(
            "permit(principal, action, resource) when {{ {}true{} }};",
            "(".repeat(60),
            ")".repeat(60)
        );
        assert!(check(&ok, Grammar::Policy).is_ok());
        let chain = format!(
            "permit(principal, action, resource) when {{ {}true }};",
            "true || ".repeat(1001)
        );
        assert!(check(&chain, Grammar::Policy)
            .is_err_and(
                |e| e.message.contains("chained operators") && e.message.contains("networks.toml")
            ));
        // The count restarts per statement; strings and comments do not count.
        let many = "permit(principal, action, resource) when { true || true };\n".repeat(2000);
        assert!(check(&many, Grammar::Policy).is_ok());
        let quoted = format!(
            "// {}\npermit(principal, action, resource) when {{ \"{}\" == \"\" }};",
            "||".repeat(5000),
            ").(".repeat(5000)
        );
        assert!(check(&quoted, Grammar::Policy).is_ok());
        let sets = format!(
            "entity A {{ x: {}Long{} }};",
            "Set<".repeat(65),
            ">".repeat(65)
        );
        assert!(check(&sets, Grammar::Schema).is_err());
        // `<` compares in policies.
        let cmp = format!(
            "permit(principal, action, resource) when {{ {} }};",
            vec!["1 < 2"; 200].join(" && ")
        );
        assert!(check(&cmp, Grammar::Policy).is_ok());
    }

    #[test]
    fn json_depth_counts_levels() {
        assert_eq!(json_depth(&serde_json::json!(1)), 1);
        assert_eq!(json_depth(&serde_json::json!({"a": [1, {"b": 2}]})), 4);
    }
}
