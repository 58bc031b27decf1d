//! The cluster store against a real PostgreSQL 15 started for the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use portcullis_cluster::{connect, migrate, status, Beat, ClusterError, Registry, SCHEMA_VERSION};
use portcullis_testkit::Postgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_race_safely_and_the_registry_tracks_nodes() -> anyhow::Result<()> {
    let pg = Postgres::start(None)?;
    let url = pg.url();
    // Before any migration a node refuses to register, naming the command to run.
    let client = connect(&url, None).await?;
    let err = Registry::join(&client, "gw-a", "10.0.0.1:51820", "0.1.0")
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

    let a = Registry::join(&client, "gw-a", "10.0.0.1:51820", "0.1.0").await?;
    let b = Registry::join(&client, "gw-b", "10.0.0.2:51820", "0.1.0").await?;
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
        "UPDATE nodes SET heartbeat = now() - interval '10 seconds' WHERE node_id = 'gw-a'",
    )?;
    let nodes = status(&client).await?;
    assert_eq!(nodes[0].state, "down");
    assert_eq!(nodes[1].state, "stopped");
    // A beat brings it back.
    a.beat(&client, Beat::default()).await?;
    assert_eq!(status(&client).await?[0].state, "up");

    // The database refuses two devices on one pool address, whichever node asks.
    pg.psql("portcullis", "INSERT INTO devices VALUES ('00000000-0000-0000-0000-000000000001', 'alice', 'k1', '100.64.8.1', now(), '{}')")?;
    let dup = pg.psql("portcullis", "INSERT INTO devices VALUES ('00000000-0000-0000-0000-000000000002', 'bob', 'k2', '100.64.8.1', now(), '{}')");
    assert!(dup.unwrap_err().to_string().contains("duplicate key"));

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
