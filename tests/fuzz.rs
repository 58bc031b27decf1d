//! A fuzzer driven by `docs/openapi.json`, against a running gateway: every documented
//! operation, with path, query and body values drawn from the schema and from hostile
//! shapes (wrong types, huge and negative numbers, undecodable percent-escapes, NUL and
//! bidi characters, truncated JSON, deep nesting). Bounded in time and in requests. Any
//! 5xx, dropped connection, non-JSON error or status the document does not list fails.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use portcullis_e2e::Lab;

/// A small deterministic generator (xorshift64*), seeded per run and printed, so a
/// failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

struct Operation {
    method: String,
    path: String,
    statuses: BTreeSet<u16>,
    query: Vec<(String, Value)>,
    body: Option<Value>,
}

fn operations(doc: &Value) -> Vec<Operation> {
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().into_iter().flatten() {
        if path == "/openapi.json" {
            continue;
        }
        for (method, op) in ops.as_object().into_iter().flatten() {
            let statuses = op["responses"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.parse().ok())
                .collect();
            let query = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "query")
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or("").to_string(),
                        p["schema"].clone(),
                    )
                })
                .collect();
            let body = op["requestBody"]["content"]["application/json"]["schema"]
                .as_object()
                .map(|s| Value::Object(s.clone()));
            out.push(Operation {
                method: method.to_uppercase(),
                path: path.clone(),
                statuses,
                query,
                body,
            });
        }
    }
    out
}

const NASTY: &[&str] = &[
    // No live user's name: disabling alice would only slow the tunnel check at the end.
    "",
    "nobody",
    "a\u{200b}lice",
    "admin\u{202e}gnp.exe",
    "\u{0}",
    "line\nbreak",
    "../../etc/passwd",
    "%",
    "'; DROP TABLE events; --",
    "\"",
    "ä",
    "🦀",
    "-1",
    "0",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "1e309",
    "null",
    "true",
    "{}",
    "[]",
];

fn nasty_string(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => rng.pick(NASTY).to_string(),
        1 => "x".repeat(rng.below(3000)),
        2 => (0..rng.below(40))
            .map(|_| char::from_u32(rng.below(0x3000) as u32 + 1).unwrap_or('?'))
            .collect(),
        _ => format!("{:x}", rng.next()),
    }
}

/// Percent-encodes what a path or query may not carry, and sometimes adds undecodable
/// escapes on purpose.
fn encode(rng: &mut Rng, s: &str) -> String {
    let mut out: String = s
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    if rng.chance(10) {
        let bad: &[&str] = &["%ff%fe", "%zz", "%", "%c0%af"];
        let escape: &&str = rng.pick(bad);
        out.push_str(escape);
    }
    out
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
    {
        Some(name) => &doc["components"]["schemas"][name],
        None => schema,
    }
}

/// A value for `schema`: mostly well-typed, sometimes hostile.
fn value_for(rng: &mut Rng, doc: &Value, schema: &Value, depth: usize) -> Value {
    let schema = resolve(doc, schema);
    if depth > 6 || rng.chance(12) {
        return hostile_value(rng, depth);
    }
    match schema["type"].as_str() {
        Some("object") => {
            let mut m = Map::new();
            for (k, s) in schema["properties"].as_object().into_iter().flatten() {
                if rng.chance(75) {
                    m.insert(k.clone(), value_for(rng, doc, s, depth + 1));
                }
            }
            if let Some(extra) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for _ in 0..rng.below(3) {
                    m.insert(nasty_string(rng), value_for(rng, doc, extra, depth + 1));
                }
            }
            if rng.chance(5) {
                m.insert("unexpected".into(), json!(1));
            }
            Value::Object(m)
        }
        Some("array") => {
            let items = &schema["items"];
            Value::Array(
                (0..rng.below(4))
                    .map(|_| value_for(rng, doc, items, depth + 1))
                    .collect(),
            )
        }
        Some("integer") => json!(*rng.pick(&[
            0i64,
            1,
            60,
            300,
            86_400,
            -1,
            i64::MAX,
            i64::MIN,
            9_223_372_036_854_776
        ])),
        Some("boolean") => json!(rng.chance(50)),
        _ => Value::String(nasty_string(rng)),
    }
}

fn hostile_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(6) {
        0 => Value::Null,
        1 => json!(u64::MAX),
        2 => json!(-1.5e300),
        3 => Value::String(nasty_string(rng)),
        4 if depth < 3 => {
            let mut v = json!(1);
            for _ in 0..rng.below(60) {
                v = json!([v]);
            }
            v
        }
        _ => json!({"a": [1, "b", null]}),
    }
}

fn body_text(rng: &mut Rng, doc: &Value, schema: &Value) -> String {
    let v = value_for(rng, doc, schema, 0);
    let text = v.to_string();
    match rng.below(10) {
        0 => text
            .get(..rng.below(text.len() + 1))
            .unwrap_or("")
            .to_string(),
        1 => "{".repeat(rng.below(5_000)),
        2 => String::new(),
        _ => text,
    }
}

/// Runs the fuzzer for `budget` (at most 10,000 requests) through `/admin/v1`.
pub fn openapi_fuzz(lab: &Lab, token: &str, budget: Duration) {
    let doc: Value = serde_json::from_str(include_str!("../docs/openapi.json")).unwrap();
    let ops = operations(&doc);
    assert!(
        ops.len() >= 15,
        "the document lists {} operations",
        ops.len()
    );
    let seed = std::env::var("PORTCULLIS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 | 1)
        });
    println!("openapi fuzz: seed {seed} (PORTCULLIS_FUZZ_SEED replays it)");
    let mut rng = Rng(seed);
    let auth = format!("Bearer {token}");
    let start = Instant::now();
    let mut sent = 0;
    let mut seen: BTreeSet<(String, u16)> = BTreeSet::new();
    while start.elapsed() < budget && sent < 10_000 {
        let op = rng.pick(&ops);
        let mut path = op.path.clone();
        while let Some(open) = path.find('{') {
            let close = path[open..].find('}').map_or(path.len(), |c| open + c + 1);
            let value = match rng.below(3) {
                // A session id that names no live session: killing alice's would only
                // make the tunnel check at the end slower.
                0 => format!("{}", 1_000_000 + rng.below(1000)),
                1 => uuid_like(&mut rng),
                _ => nasty_string(&mut rng),
            };
            let value = encode(&mut rng, &value);
            path.replace_range(open..close, if value.is_empty() { "x" } else { &value });
        }
        let mut query = Vec::new();
        for (name, schema) in &op.query {
            if rng.chance(40) {
                let v = match value_for(&mut rng, &doc, schema, 5) {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                query.push(format!(
                    "{}={}",
                    encode(&mut rng, name),
                    encode(&mut rng, &v)
                ));
            }
        }
        if rng.chance(5) {
            let name = nasty_string(&mut rng);
            query.push(format!("{}=1", encode(&mut rng, &name)));
        }
        let target = if query.is_empty() {
            format!("/admin/v1{path}")
        } else {
            format!("/admin/v1{path}?{}", query.join("&"))
        };
        let body = op
            .body
            .as_ref()
            .map(|s| body_text(&mut rng, &doc, s))
            .unwrap_or_default();
        let mut headers = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        if op.method == "PUT" && rng.chance(30) {
            headers.push((
                "If-Match",
                *rng.pick(&["*", "\"nope\"", "W/\"x\", \"y\"", ""]),
            ));
        }
        let answer = lab.http_with(&op.method, &target, &headers, &body);
        sent += 1;
        let (status, json) = match answer {
            Ok(a) => a,
            Err(e) => panic!(
                "{} {target}: no answer ({e}); body {:.300}",
                op.method, body
            ),
        };
        assert!(
            status < 500,
            "{} {target}: {status} {json}; body {body:.300}",
            op.method
        );
        assert!(
            op.statuses.contains(&status),
            "{} {target}: status {status} is not in the document ({:?}): {json}; body {body:.300}",
            op.method,
            op.statuses
        );
        if status >= 400 {
            assert!(
                json["error"].is_string(),
                "{} {target}: {status} without a JSON error: {json}",
                op.method
            );
        }
        seen.insert((format!("{} {}", op.method, op.path), status));
    }
    println!(
        "openapi fuzz: {sent} requests in {:?}; (operation, status) seen: {}",
        start.elapsed(),
        seen.len()
    );
    assert!(sent >= 100, "only {sent} requests in {budget:?}");
}

fn uuid_like(rng: &mut Rng) -> String {
    let a = rng.next();
    let b = rng.next();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}
