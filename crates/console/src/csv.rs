//! An audit search as CSV (the format is in the crate doc).

use serde_json::Value;

/// One cell as the CLI's table shows it.
pub fn cell_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// A cell as written: neutralised against spreadsheet formulas, then quoted if needed.
pub fn field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// The whole document: the column names, then one line per row.
pub fn write(columns: &[String], rows: &[Vec<Value>]) -> String {
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = String>| {
        out.push_str(&cells.map(|c| field(&c)).collect::<Vec<_>>().join(","));
        out.push_str("\r\n");
    };
    line(&mut out, &mut columns.iter().cloned());
    for r in rows {
        line(&mut out, &mut r.iter().map(cell_text));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// A minimal RFC 4180 reader, to check that what is written reads back.
    fn read(doc: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut row = Vec::new();
        let mut cell = String::new();
        let mut quoted = false;
        let mut chars = doc.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    cell.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => cell.push(c),
                (false, '"') => quoted = true,
                (false, ',') => row.push(std::mem::take(&mut cell)),
                (false, '\r') if chars.peek() == Some(&'\n') => {
                    chars.next();
                    row.push(std::mem::take(&mut cell));
                    rows.push(std::mem::take(&mut row));
                }
                (false, c) => cell.push(c),
            }
        }
        rows
    }

    #[test]
    fn cells_are_the_cli_s_and_formulas_are_neutralised() {
        let doc = write(
            &["user".into(), "policy_ids".into(), "port".into()],
            &[
                vec![json!("bob"), json!(["a", "b"]), json!(5432)],
                vec![json!("=HYPERLINK(\"x\")"), json!([]), json!(null)],
            ],
        );
        assert_eq!(
            doc,
            "user,policy_ids,port\r\nbob,\"a,b\",5432\r\n\"'=HYPERLINK(\"\"x\"\")\",,null\r\n"
        );
    }

    proptest! {
        #[test]
        fn any_table_reads_back_cell_for_cell(
            rows in proptest::collection::vec(proptest::collection::vec(".*", 3), 0..8)
        ) {
            let columns = vec!["a".to_string(), "b".into(), "c".into()];
            let values: Vec<Vec<Value>> = rows
                .iter()
                .map(|r| r.iter().map(|s| Value::String(s.clone())).collect())
                .collect();
            let back = read(&write(&columns, &values));
            prop_assert_eq!(back.len(), rows.len() + 1);
            for (got, want) in back.iter().skip(1).zip(&rows) {
                for (g, w) in got.iter().zip(want) {
                    let w = if w.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                        format!("'{w}")
                    } else {
                        w.clone()
                    };
                    prop_assert_eq!(g, &w);
                }
            }
        }
    }
}
