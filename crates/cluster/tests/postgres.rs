//! The cluster store against a real PostgreSQL 15 started for the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use portcullis_cluster::{connect, migrate, status, Beat, ClusterError, Registry, SCHEMA_VERSION};
use portcullis_testkit::Postgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_race_safely_and_the_registry_tracks_nodes() -> anyhow::Result<()> {
    let pg = Postgres::start(None)?;
    let url = pg.url();
    // Before any migration a node refuses to register, naming the command to run.
    let mut client = connect(&url, None).await?;
    let err = Registry::join(&mut client, "gw-a", "10.0.0.1:51820", "0.1.0", true)
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::TooOld { found: 0 }), "{err}");
    assert!(err.to_string().contains("portcullis cluster migrate"));
    // Three nodes migrating at once: one applies the steps, every one ends current.
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut c = connect(&url, None).await.unwrap();
                migrate(&mut c).await.unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for r in runs {
        outcomes.push(r.await?);
    }
    assert!(outcomes.iter().all(|(_, after)| *after == SCHEMA_VERSION));
    assert_eq!(
        pg.psql("portcullis", "SELECT version FROM portcullis_schema")?,
        SCHEMA_VERSION.to_string()
    );
    // Migrating again changes nothing.
    let mut c = connect(&url, None).await?;
    assert_eq!(migrate(&mut c).await?, (SCHEMA_VERSION, SCHEMA_VERSION));

    let (a, none) = Registry::join(&mut client, "gw-a", "10.0.0.1:51820", "0.1.0", true).await?;
    assert_eq!(none, None, "a first run has no previous one");
    let (b, _) = Registry::join(&mut client, "gw-b", "10.0.0.2:51820", "0.1.0", true).await?;
    a.beat(
        &client,
        Beat {
            sessions: 3,
            flows: 9,
            applied_change: 0,
        },
    )
    .await?;
    b.beat(&client, Beat::default()).await?;
    pg.psql("portcullis", "INSERT INTO changes (node_id, kind, body) VALUES ('gw-a', 'user', '{}'), ('gw-a', 'user', '{}')")?;
    let nodes = status(&client).await?;
    assert_eq!(nodes.len(), 2);
    assert_eq!(
        (nodes[0].node_id.as_str(), nodes[0].sessions, nodes[0].flows),
        ("gw-a", 3, 9)
    );
    assert_eq!(nodes[0].lag, 2);
    assert!(nodes.iter().all(|n| n.state == "up"), "{nodes:?}");
    // A clean exit shows as stopped; a node that stops beating shows as down.
    b.leave(&client).await?;
    pg.psql(
        "portcullis",
        "UPDATE nodes SET heartbeat = now() - interval '7 seconds' WHERE node_id = 'gw-a'",
    )?;
    let nodes = status(&client).await?;
    assert_eq!(nodes[0].state, "down");
    assert_eq!(nodes[1].state, "stopped");
    // A beat after the clean exit does not undo it.
    b.beat(&client, Beat::default()).await?;
    assert_eq!(status(&client).await?[1].state, "stopped");
    // Down is not dead: no repair yet. Dead for DEAD_AFTER: claimed once, by one node;
    // the stopped node never.
    use portcullis_cluster::repair::{claim_dead, unclaim};
    assert_eq!(claim_dead(&client).await?, vec![]);
    pg.psql(
        "portcullis",
        "UPDATE nodes SET heartbeat = now() - interval '20 seconds'",
    )?;
    let claimed = claim_dead(&client).await?;
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(
        (
            claimed[0].node_id.as_str(),
            claimed[0].sessions,
            claimed[0].reason
        ),
        ("gw-a", 3, "no_heartbeat")
    );
    assert_eq!(claim_dead(&client).await?, vec![], "at most once");
    // A claim whose event could not be recorded is given back and claimed again.
    unclaim(&client, &claimed[0]).await?;
    assert_eq!(claim_dead(&client).await?.len(), 1);
    // A restart after the repair: nothing left to repair.
    let (a, previous) =
        Registry::join(&mut client, "gw-a", "10.0.0.1:51820", "0.1.0", true).await?;
    assert_eq!(previous, None);
    // A reconnection of the same run is not a restart.
    let (_, previous) =
        Registry::join(&mut client, "gw-a", "10.0.0.1:51820", "0.1.0", false).await?;
    assert_eq!(previous, None);
    // Killed and restarted before anyone noticed: the node repairs its previous run.
    let (_, previous) =
        Registry::join(&mut client, "gw-a", "10.0.0.1:51820", "0.1.0", true).await?;
    assert_eq!(previous.map(|p| p.reason), Some("restarted"));
    // A clean exit, then a restart: nothing to repair.
    a.leave(&client).await?;
    let (a, previous) =
        Registry::join(&mut client, "gw-a", "10.0.0.1:51820", "0.1.0", true).await?;
    assert_eq!(previous, None);
    // A beat brings it back.
    a.beat(&client, Beat::default()).await?;
    assert_eq!(status(&client).await?[0].state, "up");

    // The database refuses two devices on one pool address, whichever node asks.
    pg.psql("portcullis", "INSERT INTO devices VALUES ('00000000-0000-0000-0000-000000000001', 'alice', 'k1', '100.64.8.1', now(), '{}')")?;
    let dup = pg.psql("portcullis", "INSERT INTO devices VALUES ('00000000-0000-0000-0000-000000000002', 'bob', 'k2', '100.64.8.1', now(), '{}')");
    assert!(dup.unwrap_err().to_string().contains("duplicate key"));

    // A sync consumer's saved mirror: deltas applied in order, a replace forgets the
    // rest, sources kept apart.
    use portcullis_cluster::sync_state::{load, save, Delta, Saved};
    use serde_json::json;
    assert_eq!(load(&client, "ldap|a").await?, None);
    let entry = |k: &str, u: &str, v: serde_json::Value| (k.to_string(), u.to_string(), v);
    save(
        &mut client,
        "ldap|a",
        &Delta {
            cookies: json!({"users": [1], "groups": null}),
            replace: false,
            upserts: vec![
                entry("users", "u1", json!({"dn": "uid=a"})),
                entry("users", "u2", json!({"dn": "uid=b"})),
                entry("groups", "g1", json!({"dn": "cn=g"})),
            ],
            removes: vec![],
        },
    )
    .await?;
    save(
        &mut client,
        "ldap|a",
        &Delta {
            cookies: json!({"users": [2], "groups": [7]}),
            replace: false,
            upserts: vec![entry("users", "u1", json!({"dn": "uid=a2"}))],
            removes: vec![
                ("users".into(), "u2".into()),
                ("users".into(), "nope".into()),
            ],
        },
    )
    .await?;
    save(
        &mut client,
        "ldap|b",
        &Delta {
            cookies: json!({}),
            replace: true,
            upserts: vec![entry("users", "x", json!({}))],
            removes: vec![],
        },
    )
    .await?;
    let mut got = load(&client, "ldap|a").await?.unwrap();
    got.entries.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(
        got,
        Saved {
            cookies: json!({"users": [2], "groups": [7]}),
            entries: vec![
                entry("groups", "g1", json!({"dn": "cn=g"})),
                entry("users", "u1", json!({"dn": "uid=a2"})),
            ],
        }
    );
    save(
        &mut client,
        "ldap|a",
        &Delta {
            cookies: json!({"users": null, "groups": null}),
            replace: true,
            upserts: vec![entry("users", "u9", json!({"dn": "uid=z"}))],
            removes: vec![],
        },
    )
    .await?;
    let got = load(&client, "ldap|a").await?.unwrap();
    assert_eq!(
        got.entries,
        vec![entry("users", "u9", json!({"dn": "uid=z"}))]
    );
    assert_eq!(load(&client, "ldap|b").await?.unwrap().entries.len(), 1);

    // A schema newer than this gateway's is refused, not written over.
    pg.psql("portcullis", "UPDATE portcullis_schema SET version = 99")?;
    let mut c = connect(&url, None).await?;
    assert!(matches!(
        migrate(&mut c).await,
        Err(ClusterError::TooNew { found: 99 })
    ));
    assert!(matches!(
        status(&client).await,
        Err(ClusterError::TooNew { found: 99 })
    ));
    Ok(())
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error() {
    let port = portcullis_testkit::free_port().unwrap();
    let err = connect(
        &format!("postgres://portcullis@127.0.0.1:{port}/portcullis"),
        Some("secret-password"),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("postgresql: connecting:"), "{text}");
    assert!(!text.contains("secret-password"), "{text}");
    let err = connect("mysql://x", None).await.unwrap_err();
    assert!(matches!(err, ClusterError::Url(_)), "{err}");
}
