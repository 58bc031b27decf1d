//! Native evaluation of the common condition shapes, compiled once at load.
//!
//! Cedar's interpreter costs ~0.9 µs per policy and parsing a `datetime` or `ip` context
//! value 5–6 µs (measured). Most conditions are a few comparisons on the port and protocol,
//! tag checks, group membership, an expiry on `context.now` or a range on
//! `context.dst_ip`: these compile to a small expression tree evaluated in nanoseconds.
//!
//! The subset is chosen so that it cannot error at run time for a strictly validated
//! policy (no arithmetic, no attribute that may be missing, literals checked here), which
//! makes "Cedar would have errored" impossible inside it. Anything else — `like`, `if`,
//! arithmetic, entity equality, other extension calls, unusual literals — returns `None`
//! and that policy is evaluated by Cedar. The differential test holds the two identical.

use std::net::IpAddr;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use ipnet::IpNet;
use portcullis_model::Principal;
use serde_json::Value;

/// What a compiled condition reads.
pub(crate) struct Env<'a> {
    pub user: &'a Principal,
    pub network_tags: &'a [String],
    pub dst_ip: IpAddr,
    pub src_ip: IpAddr,
    pub dst_port: i64,
    pub protocol: &'a str,
    pub device: &'a str,
    /// `context.now` in milliseconds since the epoch (Cedar's datetime resolution).
    pub now_ms: i64,
    pub mfa: bool,
    pub auth_age_secs: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn of(op: &str) -> Option<Cmp> {
        Some(match op {
            "==" => Cmp::Eq,
            "!=" => Cmp::Ne,
            "<" => Cmp::Lt,
            "<=" => Cmp::Le,
            ">" => Cmp::Gt,
            ">=" => Cmp::Ge,
            _ => return None,
        })
    }

    fn flip(self) -> Cmp {
        match self {
            Cmp::Lt => Cmp::Gt,
            Cmp::Le => Cmp::Ge,
            Cmp::Gt => Cmp::Lt,
            Cmp::Ge => Cmp::Le,
            other => other,
        }
    }

    fn apply<T: Ord>(self, a: &T, b: &T) -> bool {
        match self {
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Long {
    Lit(i64),
    DstPort,
    AuthAge,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Str {
    Lit(String),
    Protocol,
    Device,
    Email,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tags {
    Principal,
    Resource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Addr {
    Dst,
    Src,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Expr {
    Bool(bool),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    LongCmp(Cmp, Long, Long),
    StrCmp(bool, Str, Str),
    LongIn(Vec<i64>, Long),
    StrIn(Vec<String>, Str),
    TagsContain(Tags, String),
    /// `principal in E` or `principal in [E, …]`: (type, id) pairs.
    PrincipalIn(Vec<(String, String)>),
    NowCmp(Cmp, i64),
    InRange(Addr, IpNet),
    /// `context.mfa`, or `context.mfa == <b>` (`!=` is its negation).
    MfaIs(bool),
}

/// A policy's conditions, compiled: satisfied when every `when` holds and no `unless` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Compiled {
    whens: Vec<Expr>,
    unlesses: Vec<Expr>,
}

impl Compiled {
    /// Compiles the `conditions` of a policy's JSON form; `None` when any part is outside
    /// the subset.
    pub fn of(policy_json: &Value) -> Option<Compiled> {
        let mut c = Compiled {
            whens: Vec::new(),
            unlesses: Vec::new(),
        };
        for cond in policy_json.get("conditions")?.as_array()? {
            let body = compile(cond.get("body")?)?;
            match cond.get("kind")?.as_str()? {
                "when" => c.whens.push(body),
                "unless" => c.unlesses.push(body),
                _ => return None,
            }
        }
        Some(c)
    }

    pub fn satisfied(&self, env: &Env<'_>) -> bool {
        self.whens.iter().all(|e| e.eval(env)) && !self.unlesses.iter().any(|e| e.eval(env))
    }
}

impl Expr {
    fn eval(&self, env: &Env<'_>) -> bool {
        match self {
            Expr::Bool(b) => *b,
            Expr::And(a, b) => a.eval(env) && b.eval(env),
            Expr::Or(a, b) => a.eval(env) || b.eval(env),
            Expr::Not(a) => !a.eval(env),
            Expr::LongCmp(op, a, b) => op.apply(&long(a, env), &long(b, env)),
            Expr::StrCmp(eq, a, b) => (string(a, env) == string(b, env)) == *eq,
            Expr::LongIn(set, x) => set.contains(&long(x, env)),
            Expr::StrIn(set, x) => {
                let x = string(x, env);
                set.iter().any(|s| s == x)
            }
            Expr::TagsContain(Tags::Principal, t) => env.user.tags.iter().any(|x| x == t),
            Expr::TagsContain(Tags::Resource, t) => env.network_tags.iter().any(|x| x == t),
            Expr::PrincipalIn(targets) => targets.iter().any(|(ty, id)| {
                (ty == "User" && *id == env.user.name)
                    || (ty == "Group" && env.user.groups.iter().any(|g| g == id))
            }),
            Expr::NowCmp(op, ms) => op.apply(&env.now_ms, ms),
            Expr::InRange(Addr::Dst, net) => net.contains(&env.dst_ip),
            Expr::InRange(Addr::Src, net) => net.contains(&env.src_ip),
            Expr::MfaIs(b) => env.mfa == *b,
        }
    }
}

fn long(l: &Long, env: &Env<'_>) -> i64 {
    match l {
        Long::Lit(v) => *v,
        Long::DstPort => env.dst_port,
        Long::AuthAge => env.auth_age_secs,
    }
}

fn string<'a>(s: &'a Str, env: &'a Env<'_>) -> &'a str {
    match s {
        Str::Lit(v) => v,
        Str::Protocol => env.protocol,
        Str::Device => env.device,
        Str::Email => &env.user.email,
    }
}

fn binary(v: &Value) -> Option<(&Value, &Value)> {
    Some((v.get("left")?, v.get("right")?))
}

/// `context.<attr>` / `principal.<attr>` / `resource.<attr>`: (var, attr).
fn attr(v: &Value) -> Option<(&str, &str)> {
    let dot = v.get(".")?;
    let var = dot.get("left")?.get("Var")?.as_str()?;
    Some((var, dot.get("attr")?.as_str()?))
}

fn long_term(v: &Value) -> Option<Long> {
    if let Some(n) = v.get("Value").and_then(Value::as_i64) {
        return Some(Long::Lit(n));
    }
    match attr(v)? {
        ("context", "dst_port") => Some(Long::DstPort),
        ("context", "auth_age_secs") => Some(Long::AuthAge),
        _ => None,
    }
}

fn str_term(v: &Value) -> Option<Str> {
    if let Some(s) = v.get("Value").and_then(Value::as_str) {
        return Some(Str::Lit(s.to_string()));
    }
    match attr(v)? {
        ("context", "protocol") => Some(Str::Protocol),
        ("context", "device") => Some(Str::Device),
        ("principal", "email") => Some(Str::Email),
        _ => None,
    }
}

fn is_mfa(v: &Value) -> bool {
    attr(v) == Some(("context", "mfa"))
}

fn is_now(v: &Value) -> bool {
    attr(v) == Some(("context", "now"))
}

fn datetime_literal(v: &Value) -> Option<i64> {
    let args = v.get("datetime")?.as_array()?;
    let [arg] = args.as_slice() else { return None };
    parse_datetime(arg.get("Value")?.as_str()?)
}

/// The forms Cedar documents for `datetime("…")` in UTC; anything else is left to Cedar.
fn parse_datetime(s: &str) -> Option<i64> {
    let dt: DateTime<Utc> = match s.len() {
        10 => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .ok()?
            .and_hms_opt(0, 0, 0)?
            .and_utc(),
        20 => NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%SZ")
            .ok()?
            .and_utc(),
        24 => NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.3fZ")
            .ok()?
            .and_utc(),
        _ => return None,
    };
    Some(dt.timestamp_millis())
}

fn ip_literal(v: &Value) -> Option<IpNet> {
    let args = v.get("ip")?.as_array()?;
    let [arg] = args.as_slice() else { return None };
    let s = arg.get("Value")?.as_str()?;
    let net = if s.contains('/') {
        s.parse::<IpNet>().ok()?
    } else {
        IpNet::from(s.parse::<IpAddr>().ok()?)
    };
    // Only canonical network literals: Cedar and ipnet agree on those for certain.
    (net.trunc() == net).then_some(net)
}

fn entity(v: &Value) -> Option<(String, String)> {
    let e = v.get("Value")?.get("__entity")?;
    Some((
        e.get("type")?.as_str()?.to_string(),
        e.get("id")?.as_str()?.to_string(),
    ))
}

fn compile(v: &Value) -> Option<Expr> {
    let obj = v.as_object()?;
    if obj.len() != 1 {
        return None;
    }
    let (op, body) = obj.iter().next()?;
    Some(match op.as_str() {
        "Value" => Expr::Bool(body.as_bool()?),
        // A bare attribute: only `context.mfa` is a Bool among them.
        "." if is_mfa(v) => Expr::MfaIs(true),
        "&&" | "||" => {
            let (l, r) = binary(body)?;
            let (l, r) = (Box::new(compile(l)?), Box::new(compile(r)?));
            if op == "&&" {
                Expr::And(l, r)
            } else {
                Expr::Or(l, r)
            }
        }
        "!" => Expr::Not(Box::new(compile(body.get("arg")?)?)),
        "==" | "!=" | "<" | "<=" | ">" | ">=" => {
            let cmp = Cmp::of(op)?;
            let (l, r) = binary(body)?;
            let bool_lit = |x: &Value| x.get("Value").and_then(Value::as_bool);
            let mfa_vs = match (is_mfa(l), is_mfa(r)) {
                (true, false) => bool_lit(r),
                (false, true) => bool_lit(l),
                _ => None,
            };
            if let Some(b) = mfa_vs {
                match cmp {
                    Cmp::Eq => Expr::MfaIs(b),
                    Cmp::Ne => Expr::MfaIs(!b),
                    _ => return None,
                }
            } else if is_now(l) {
                Expr::NowCmp(cmp, datetime_literal(r)?)
            } else if is_now(r) {
                Expr::NowCmp(cmp.flip(), datetime_literal(l)?)
            } else if let (Some(a), Some(b)) = (long_term(l), long_term(r)) {
                Expr::LongCmp(cmp, a, b)
            } else if let (Some(a), Some(b), true) =
                (str_term(l), str_term(r), matches!(cmp, Cmp::Eq | Cmp::Ne))
            {
                Expr::StrCmp(cmp == Cmp::Eq, a, b)
            } else {
                return None;
            }
        }
        "contains" => {
            let (l, r) = binary(body)?;
            if let Some(items) = l.get("Set").and_then(Value::as_array) {
                if let Some(x) = long_term(r) {
                    Expr::LongIn(
                        items
                            .iter()
                            .map(|i| i.get("Value")?.as_i64())
                            .collect::<Option<_>>()?,
                        x,
                    )
                } else if let Some(x) = str_term(r) {
                    let set = items
                        .iter()
                        .map(|i| i.get("Value")?.as_str().map(str::to_string))
                        .collect::<Option<_>>()?;
                    Expr::StrIn(set, x)
                } else {
                    return None;
                }
            } else {
                let tag = r.get("Value")?.as_str()?.to_string();
                match attr(l)? {
                    ("principal", "tags") => Expr::TagsContain(Tags::Principal, tag),
                    ("resource", "tags") => Expr::TagsContain(Tags::Resource, tag),
                    _ => return None,
                }
            }
        }
        "in" => {
            let (l, r) = binary(body)?;
            if l.get("Var")?.as_str()? != "principal" {
                return None;
            }
            let targets = match r.get("Set").and_then(Value::as_array) {
                Some(items) => items.iter().map(entity).collect::<Option<Vec<_>>>()?,
                None => vec![entity(r)?],
            };
            Expr::PrincipalIn(targets)
        }
        "has" => {
            // Every context attribute and every User attribute is always present.
            let var = body.get("left")?.get("Var")?.as_str()?;
            let a = body.get("attr")?.as_str()?;
            let known = match var {
                "context" => matches!(
                    a,
                    "dst_ip"
                        | "dst_port"
                        | "protocol"
                        | "src_ip"
                        | "now"
                        | "device"
                        | "mfa"
                        | "auth_age_secs"
                ),
                "principal" => matches!(a, "email" | "tags"),
                "resource" => a == "tags",
                _ => false,
            };
            if !known {
                return None;
            }
            Expr::Bool(true)
        }
        "isInRange" => {
            let args = body.as_array()?;
            let [addr, range] = args.as_slice() else {
                return None;
            };
            let which = match attr(addr)? {
                ("context", "dst_ip") => Addr::Dst,
                ("context", "src_ip") => Addr::Src,
                _ => return None,
            };
            Expr::InRange(which, ip_literal(range)?)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cedar_policy::Policy;

    fn compiled(src: &str) -> Option<Compiled> {
        let p = Policy::parse(None, src).unwrap_or_else(|e| panic!("{e}"));
        Compiled::of(&p.to_json().unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn the_common_shapes_compile_and_others_fall_back() {
        for ok in [
            r#"permit(principal, action, resource);"#,
            r#"permit(principal, action, resource) when { context.protocol == "tcp" && [22, 443].contains(context.dst_port) };"#,
            r#"forbid(principal, action, resource) unless { principal.tags.contains("x") && principal in Group::"a" || principal in [Group::"b"] };"#,
            r#"permit(principal, action, resource) when { context.now < datetime("2026-12-31T00:00:00Z") && context.dst_ip.isInRange(ip("10.1.2.0/24")) && resource.tags.contains("pci") && !(context.dst_port >= 1024) && context has device };"#,
            r#"forbid(principal, action, resource) unless { context.mfa && context.auth_age_secs < 43200 && context has mfa };"#,
            r#"permit(principal, action, resource) when { context.mfa == true && false != context.mfa && 600 >= context.auth_age_secs };"#,
        ] {
            assert!(compiled(ok).is_some(), "{ok}");
        }
        for fallback in [
            r#"permit(principal, action, resource) when { principal.email like "*@example.com" };"#,
            r#"permit(principal, action, resource) when { context.dst_port * 2 > 0 };"#,
            r#"permit(principal, action, resource) when { context.now < datetime("2026-12-31T00:00:00+0100") };"#,
            r#"permit(principal, action, resource) when { context.dst_ip.isInRange(ip("10.1.2.3/24")) };"#,
            r#"permit(principal, action, resource) when { if context.dst_port == 1 then true else false };"#,
            r#"permit(principal, action, resource) when { context.auth_age_secs - 60 < 3600 };"#,
            r#"permit(principal, action, resource) when { context.mfa == context.mfa };"#,
        ] {
            assert!(compiled(fallback).is_none(), "{fallback}");
        }
    }

    #[test]
    fn evaluation_follows_cedar() {
        let user = Principal {
            name: "alice".into(),
            email: "alice@example.com".into(),
            groups: vec!["sre".into()],
            tags: vec!["oncall".into()],
        };
        let tags = vec!["pci".to_string()];
        let env = Env {
            user: &user,
            network_tags: &tags,
            dst_ip: IpAddr::from([10, 1, 2, 3]),
            src_ip: IpAddr::from([100, 64, 0, 2]),
            dst_port: 443,
            protocol: "tcp",
            device: "k",
            now_ms: parse_datetime("2026-12-30T23:59:59.999Z").unwrap_or(0),
            mfa: true,
            auth_age_secs: 3600,
        };
        let yes = |src: &str| {
            compiled(src)
                .unwrap_or_else(|| panic!("not compiled: {src}"))
                .satisfied(&env)
        };
        assert!(yes(
            r#"permit(principal, action, resource) when { context.now < datetime("2026-12-31") };"#
        ));
        assert!(!yes(
            r#"permit(principal, action, resource) when { context.now >= datetime("2026-12-31T00:00:00Z") };"#
        ));
        assert!(yes(
            r#"permit(principal, action, resource) when { context.dst_ip.isInRange(ip("10.1.0.0/16")) && resource.tags.contains("pci") };"#
        ));
        assert!(!yes(
            r#"permit(principal, action, resource) when { context.dst_ip.isInRange(ip("fd00::/8")) };"#
        ));
        assert!(yes(
            r#"permit(principal, action, resource) when { principal in Group::"sre" && principal in User::"alice" };"#
        ));
        assert!(!yes(
            r#"permit(principal, action, resource) unless { principal.tags.contains("oncall") };"#
        ));
        assert!(yes(
            r#"permit(principal, action, resource) when { context.protocol != "udp" && 1000 > context.dst_port };"#
        ));
        assert!(yes(
            r#"permit(principal, action, resource) when { context.mfa && context.auth_age_secs < 43200 };"#
        ));
        assert!(!yes(
            r#"permit(principal, action, resource) when { context.mfa != true || 3600 < context.auth_age_secs };"#
        ));
        assert!(yes(
            r#"permit(principal, action, resource) when { context.mfa == true && context.auth_age_secs <= 3600 };"#
        ));
    }
}
