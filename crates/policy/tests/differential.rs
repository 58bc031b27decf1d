//! The fast path (slices, minimal context, decision cache) against plain
//! `Authorizer::is_authorized` over the whole set: same decision, same determining
//! policies, same errors, for ≥ 100,000 random requests over generated companies, with
//! identity changes interleaved so cache invalidation is exercised too.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use portcullis_policy::synth::{Company, Shape};
use portcullis_policy::Engine;
use std::sync::Arc;

fn run(shape: Shape, requests: usize) -> (usize, usize, usize) {
    let mut company = Company::generate(shape);
    let bundle = Arc::new(std::mem::replace(
        &mut company.bundle,
        Company::generate(Shape {
            policies: 1,
            ..shape
        })
        .bundle,
    ));
    let mut engine = Engine::new(bundle, company.users.clone()).expect("engine");
    let (mut allowed, mut with_errors, mut failed_closed) = (0, 0, 0);
    let forbids: Vec<String> = engine
        .bundle()
        .policies()
        .iter()
        .filter(|p| p.effect == "forbid")
        .map(|p| p.id.clone())
        .collect();
    for i in 0..requests {
        if i % 997 == 0 {
            // An identity change: new groups and tags for some user (epoch bump).
            let u = company.reshuffled_user(i % shape.users);
            engine.upsert_user(u).expect("upsert");
        }
        let (user, req, now) = company.request();
        let fast = engine.decide(&user, &req, now);
        let plain = engine.decide_plain(&user, &req, now);
        assert_eq!(*fast, plain, "request {i}: {user} {req:?} at {now}");
        allowed += usize::from(plain.allowed);
        // A forbid that errored denies and is named (fail closed, not Cedar's skip).
        for forbid in forbids.iter().filter(|f| {
            plain
                .errors
                .iter()
                .any(|e| e.contains(&format!("policy `{f}`")))
        }) {
            assert!(
                !plain.allowed && plain.policy_ids.contains(forbid),
                "request {i}: forbid {forbid} errored and did not deny: {plain:?}"
            );
            failed_closed += 1;
        }
        with_errors += usize::from(!plain.errors.is_empty());
    }
    (allowed, with_errors, failed_closed)
}

#[test]
fn fast_path_equals_plain_cedar_on_100k_random_requests() {
    let (mut total, mut closed) = (0, 0);
    for (seed, policies) in [(1, 150), (2, 40), (3, 400)] {
        let shape = Shape {
            policies,
            users: 80,
            groups: 30,
            networks: 12,
            seed,
        };
        let n = if policies >= 400 { 20_000 } else { 40_000 };
        let (allowed, errors, failed_closed) = run(shape, n);
        // The generated sets must exercise both outcomes and the error path.
        assert!(
            allowed > n / 50 && allowed < n - n / 50,
            "seed {seed}: {allowed} of {n} allowed"
        );
        assert!(errors > 0, "seed {seed}: no evaluation errors exercised");
        closed += failed_closed;
        total += n;
    }
    assert!(total >= 100_000);
    assert!(closed > 0, "no erroring forbid was exercised");
}

/// Temporary grants against the Cedar policies they mean: the fast path with a grant
/// table equals plain Cedar over the bundle with `grants::to_cedar` of every grant
/// appended (same decision, same deciding ids, grant ids among them).
#[test]
fn grants_decide_as_the_cedar_permits_they_render_to() {
    use portcullis_policy::grants::{to_cedar, Grants};
    use portcullis_policy::PolicyBundle;
    for (seed, policies) in [(11, 150), (12, 40)] {
        let shape = Shape {
            policies,
            users: 40,
            groups: 30,
            networks: 12,
            seed,
        };
        let mut company = Company::generate(shape);
        let grants = company.grants(300);
        let mut sources = company.sources.clone();
        sources.policies.push((
            "grants.cedar".into(),
            grants.iter().map(to_cedar).collect::<String>(),
        ));
        let rendered = PolicyBundle::from_sources(sources).expect("rendered grants validate");
        let plain = Engine::new(Arc::new(rendered), company.users.clone()).expect("engine");
        let bundle = Arc::new(std::mem::replace(
            &mut company.bundle,
            Company::generate(Shape {
                policies: 1,
                ..shape
            })
            .bundle,
        ));
        let mut fast = Engine::new(bundle, company.users.clone()).expect("engine");
        fast.set_grants(Grants::new(grants.clone()));
        let (mut by_grant, mut n) = (0, 0);
        for i in 0..30_000 {
            let (user, req, now) = company.request();
            let f = fast.decide(&user, &req, now);
            let p = plain.decide_plain(&user, &req, now);
            assert_eq!(*f, p, "request {i}: {user} {req:?} at {now}");
            by_grant +=
                usize::from(p.allowed && p.policy_ids.iter().any(|id| id.starts_with("grant-")));
            n += 1;
        }
        assert!(
            by_grant > n / 200,
            "seed {seed}: only {by_grant} of {n} allowed by a grant"
        );
    }
}
