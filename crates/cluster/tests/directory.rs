//! The shared directory: three nodes' identity stores on one real PostgreSQL 15, each
//! with its listener and heartbeat, and a core that records what it is told.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use portcullis_cluster::node::{spawn, NodeInfo};
use portcullis_cluster::{connect, migrate, snapshot, ClusterStore, Target};
use portcullis_control::Command;
use portcullis_identity::{
    Device, DevicePolicy, Directory, Expect, Group, Identity, IdentityError, User,
};
use portcullis_testkit::Postgres;
use tokio::sync::mpsc;

/// What a node's core was told: users revoked (early cuts and access changes).
#[derive(Default)]
struct CoreLog {
    revoked: Vec<String>,
}

struct Node {
    identity: Arc<Identity>,
    core: Arc<Mutex<CoreLog>>,
}

fn policy() -> DevicePolicy {
    DevicePolicy {
        pool: "100.70.0.0/24".parse().unwrap(),
        reserved_addresses: BTreeSet::from(["100.70.0.1".parse().unwrap()]),
        reserved_keys: BTreeSet::new(),
        reserved_routes: Vec::new(),
        lifetime: TimeDelta::days(30),
        grace: TimeDelta::hours(1),
        persistent_keepalive: None,
        config_users: Vec::new(),
    }
}

/// Starts a node the way the gateway does: a snapshot, the store, the background work.
async fn node(url: &str, id: &str) -> Node {
    node_with(url, id, None, true).await
}

/// [`node`] with a pending-revocations file, and optionally without its listener and
/// heartbeat (it then applies and flushes only when asked to catch up).
async fn node_with(
    url: &str,
    id: &str,
    pending: Option<&std::path::Path>,
    background: bool,
) -> Node {
    let target = Target {
        url: url.to_string(),
        password: None,
    };
    let mut client = connect(url, None).await.unwrap();
    let snap = snapshot(&mut client).await.unwrap();
    let store = ClusterStore::new(target.clone(), id, &snap);
    let directory = Directory::from_records(snap.users.clone(), snap.groups.clone());
    let (tx, mut rx) = mpsc::channel::<Command>(1024);
    let core = Arc::new(Mutex::new(CoreLog::default()));
    let log = core.clone();
    tokio::spawn(async move {
        while let Some(c) = rx.recv().await {
            match c {
                Command::Apply(a) => {
                    let mut log = log.lock().unwrap();
                    for ch in &a.changes {
                        if ch.principal.is_none() {
                            log.revoked.push(ch.user.clone());
                        }
                    }
                    let _ = a.done.send(());
                }
                Command::Revoke(r) => log.lock().unwrap().revoked.extend(r.users),
                _ => {}
            }
        }
    });
    let mut identity = Identity::with_store(directory, Box::new(store), tx)
        .starting_at(snap.number)
        .with_devices(policy())
        .unwrap();
    if let Some(p) = pending {
        identity =
            identity.with_pending(portcullis_identity::pending::PendingFile::open(p).unwrap());
    }
    let identity = Arc::new(identity);
    if !background {
        return Node { identity, core };
    }
    spawn(
        target,
        NodeInfo {
            node_id: id.to_string(),
            address: format!("{id}:51820"),
            version: "test".into(),
        },
        identity.clone(),
        || (0, 0),
        // Repairs are the gateway's to record; these nodes never die unnoticed.
        tokio::sync::mpsc::unbounded_channel().0,
    );
    Node { identity, core }
}

fn user(name: &str) -> User {
    User {
        id: uuid::Uuid::nil(),
        user_name: name.to_string(),
        external_id: None,
        display_name: None,
        email: format!("{name}@example.com"),
        active: true,
        tags: vec![],
        source: "scim".into(),
        created: Utc::now(),
        modified: Utc::now(),
        version: 0,
    }
}

async fn create(n: &Node, name: &str) -> uuid::Uuid {
    let c = n
        .identity
        .change("scim", Instant::now(), Utc::now(), |d, now| {
            d.plan_create_user(user(name), now)
                .map_err(IdentityError::from)
        })
        .await
        .unwrap();
    c.users[0]
}

/// Adds `member` to group `group` (creating it) by read-modify-write on `n`'s view.
async fn join_group(n: &Node, group: &str, member: uuid::Uuid) {
    n.identity
        .change("scim", Instant::now(), Utc::now(), |d, now| {
            match d.groups().find(|g| g.display_name == group) {
                Some(g) => {
                    let mut g = g.clone();
                    g.members.insert(member);
                    d.plan_update_group(g, now).map_err(IdentityError::from)
                }
                None => d
                    .plan_create_group(
                        Group {
                            id: uuid::Uuid::nil(),
                            display_name: group.to_string(),
                            external_id: None,
                            members: BTreeSet::from([member]),
                            source: "scim".into(),
                            created: now,
                            modified: now,
                            version: 0,
                        },
                        now,
                    )
                    .map_err(IdentityError::from),
            }
        })
        .await
        .unwrap();
}

/// Users, groups and devices as comparable values.
fn state(n: &Node) -> (Vec<User>, Vec<Group>, Vec<Device>) {
    let (mut users, mut groups) = n.identity.read(|d| {
        (
            d.users().cloned().collect::<Vec<_>>(),
            d.groups().cloned().collect::<Vec<_>>(),
        )
    });
    let mut devices = n
        .identity
        .read_devices(|d| d.iter().cloned().collect::<Vec<_>>());
    users.sort_by_key(|u| u.id);
    groups.sort_by_key(|g| g.id);
    devices.sort_by_key(|d| d.id);
    (users, groups, devices)
}

async fn converged(nodes: &[&Node], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let first = state(nodes[0]);
        let applied: Vec<i64> = nodes.iter().map(|n| n.identity.applied_change()).collect();
        if nodes.iter().all(|n| state(n) == first) && applied.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not converge: applied {applied:?}, users {:?}",
            nodes.iter().map(|n| state(n).0.len()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn migrated() -> (Postgres, String) {
    let pg = Postgres::start(None).unwrap();
    let url = pg.url();
    migrate(&mut connect(&url, None).await.unwrap())
        .await
        .unwrap();
    (pg, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_any_node_reach_every_node_in_order_and_they_converge() {
    let (_pg, url) = migrated().await;
    let (a, b, c) = (
        node(&url, "gw-a").await,
        node(&url, "gw-b").await,
        node(&url, "gw-c").await,
    );
    // A change on A is applied by B and C from the notification, quickly.
    let alice = create(&a, "alice").await;
    let started = Instant::now();
    converged(&[&a, &b, &c], Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(b.identity.read(|d| d.user(&alice).is_some()));

    // Read-modify-write on all three nodes at once: no node's view is stale when it
    // plans, so no membership is lost.
    let mut members = Vec::new();
    for i in 0..30 {
        members.push(create([&a, &b, &c][i % 3], &format!("user{i}")).await);
    }
    let nodes = Arc::new([a, b, c]);
    let mut tasks = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let nodes = nodes.clone();
        let m = *m;
        tasks.push(tokio::spawn(async move {
            join_group(&nodes[i % 3], "sre", m).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let [a, b, c] = &*nodes;
    converged(&[a, b, c], Duration::from_secs(5)).await;
    let sre = a
        .identity
        .read(|d| d.groups().find(|g| g.display_name == "sre").cloned())
        .unwrap();
    assert_eq!(
        sre.members.len(),
        30,
        "a concurrent membership change was lost"
    );

    // A deactivation on A revokes on C (its core is told the user has no access).
    a.identity
        .change("scim", Instant::now(), Utc::now(), |d, now| {
            let mut u = d.user(&alice).cloned().unwrap();
            u.active = false;
            d.plan_update_user(u, now).map_err(IdentityError::from)
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !c
        .core
        .lock()
        .unwrap()
        .revoked
        .contains(&"alice".to_string())
    {
        assert!(Instant::now() < deadline, "C never revoked alice");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    converged(&[a, b, c], Duration::from_secs(5)).await;

    // The registry shows all three with the same applied change.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let client = connect(&url, None).await.unwrap();
    let o = portcullis_cluster::overview(&client).await.unwrap();
    assert_eq!(o.nodes.len(), 3);
    for n in &o.nodes {
        assert_eq!(n.state, "up", "{n:?}");
        assert_eq!(n.applied_change, o.last_change, "{n:?}");
        assert_eq!(n.lag, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_enrollments_over_three_nodes_never_share_an_address() {
    let (_pg, url) = migrated().await;
    let nodes = Arc::new([
        node(&url, "gw-a").await,
        node(&url, "gw-b").await,
        node(&url, "gw-c").await,
    ]);
    create(&nodes[0], "alice").await;
    converged(&[&nodes[0], &nodes[1], &nodes[2]], Duration::from_secs(5)).await;
    let mut tasks = Vec::new();
    for i in 0..50u8 {
        let nodes = nodes.clone();
        tasks.push(tokio::spawn(async move {
            let mut key = [7u8; 32];
            key[0] = i;
            nodes[usize::from(i) % 3]
                .identity
                .register_device(
                    "alice",
                    key,
                    &portcullis_identity::NewDevice {
                        name: format!("laptop {i}"),
                        ..Default::default()
                    },
                    Instant::now(),
                    Utc::now(),
                )
                .await
                .unwrap()
        }));
    }
    let mut addresses = BTreeSet::new();
    for t in tasks {
        assert!(
            addresses.insert(t.await.unwrap().address),
            "an address was handed out twice"
        );
    }
    assert_eq!(addresses.len(), 50);
    let [a, b, c] = &*nodes;
    converged(&[a, b, c], Duration::from_secs(5)).await;
    assert_eq!(state(a).2.len(), 50);
    // The database itself refuses a second device on one address.
    let client = connect(&url, None).await.unwrap();
    let err = client
        .batch_execute(
            "INSERT INTO devices (id, user_name, public_key, address, expires, record)
             SELECT gen_random_uuid(), user_name, 'other', address, expires, record FROM devices LIMIT 1",
        )
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.constraint(), Some("devices_address_key"), "{db:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_away_catches_up_and_a_trimmed_log_reloads() {
    let (mut pg, url) = migrated().await;
    let a = node(&url, "gw-a").await;
    create(&a, "early").await;
    // C starts now, then is "away": it applies nothing until it catches up.
    let c = node(&url, "gw-c").await;
    converged(&[&a, &c], Duration::from_secs(5)).await;
    // 1,000 changes while a node started later (B) has to catch up from its snapshot
    // and C follows live.
    let first = Instant::now();
    for i in 0..1000 {
        create(&a, &format!("u{i}")).await;
    }
    let rate = 1000.0 / first.elapsed().as_secs_f64();
    eprintln!("1000 changes on one node: {rate:.0}/s");
    converged(&[&a, &c], Duration::from_secs(10)).await;
    assert_eq!(state(&c).0.len(), 1001);

    // B's snapshot is older than the log's trimmed part: it reloads in full.
    let client = connect(&url, None).await.unwrap();
    let mut b_client = connect(&url, None).await.unwrap();
    let old = snapshot(&mut b_client).await.unwrap();
    create(&a, "after-snapshot").await;
    let gone = a
        .identity
        .read(|d| d.user_by_name("u5").map(|u| u.id))
        .unwrap();
    a.identity
        .change("scim", Instant::now(), Utc::now(), |d, now| {
            d.plan_delete_user(&gone, now).map_err(IdentityError::from)
        })
        .await
        .unwrap();
    client
        .batch_execute(&format!(
            "DELETE FROM changes WHERE number <= (SELECT max(number) FROM changes);
             INSERT INTO meta (key, value) VALUES ('changes.trimmed_through', '{}')
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            a.identity.applied_change()
        ))
        .await
        .unwrap();
    let target = Target {
        url: url.clone(),
        password: None,
    };
    let (tx, mut rx) = mpsc::channel::<Command>(64);
    tokio::spawn(async move {
        while let Some(c) = rx.recv().await {
            if let Command::Apply(a) = c {
                let _ = a.done.send(());
            }
        }
    });
    let b = Identity::with_store(
        Directory::from_records(old.users.clone(), old.groups.clone()),
        Box::new(ClusterStore::new(target, "gw-b", &old)),
        tx,
    )
    .starting_at(old.number);
    assert_eq!(b.catch_up().await.unwrap(), 1, "one reload");
    assert_eq!(b.applied_change(), a.identity.applied_change());
    let names = |i: &Identity| {
        i.read(|d| {
            d.users()
                .map(|u| u.user_name.clone())
                .collect::<BTreeSet<_>>()
        })
    };
    assert_eq!(names(&b), names(&a.identity));
    assert!(!names(&b).contains("u5"));

    // The database stops: a change is refused as unavailable (SCIM answers 503), and
    // nothing is applied; once it is back the change goes through.
    pg.stop();
    let err = a
        .identity
        .change("scim", Instant::now(), Utc::now(), |d, now| {
            d.plan_create_user(user("during-outage"), now)
                .map_err(IdentityError::from)
        })
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(a
        .identity
        .read(|d| d.user_by_name("during-outage").is_none()));
    pg.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = a
            .identity
            .change("scim", Instant::now(), Utc::now(), |d, now| {
                d.plan_create_user(user("during-outage"), now)
                    .map_err(IdentityError::from)
            })
            .await;
        match r {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                assert!(e.is_unavailable(), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the store did not reconnect: {e}"),
        }
    }
    converged(&[&a, &c], Duration::from_secs(10)).await;
}

async fn deactivate(n: &Node, id: uuid::Uuid) -> Result<(), IdentityError> {
    n.identity
        .change("scim", Instant::now(), Utc::now(), |d, now| {
            let mut u = d.user(&id).cloned().unwrap();
            u.active = false;
            d.plan_update_user(u, now).map_err(IdentityError::from)
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_during_an_outage_cuts_at_once_survives_a_crash_and_reaches_the_others() {
    let (mut pg, url) = migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pending.jsonl");
    let a = node_with(&url, "gw-a", Some(&file), false).await;
    let c = node(&url, "gw-c").await;
    let bob = create(&a, "bob").await;
    let carol = create(&a, "carol").await;
    converged(&[&a, &c], Duration::from_secs(5)).await;

    pg.stop();
    // A revocation goes ahead on A at once, kept in its file.
    deactivate(&a, bob).await.unwrap();
    assert!(a.core.lock().unwrap().revoked.contains(&"bob".to_string()));
    assert!(a.identity.read(|d| !d.user(&bob).unwrap().active));
    assert_eq!(
        portcullis_identity::pending::PendingFile::open(&file)
            .unwrap()
            .entries()
            .len(),
        1
    );
    // Anything else is refused as unavailable; nobody is deprovisioned by the outage.
    let err = a
        .identity
        .change("scim", Instant::now(), Utc::now(), |d, now| {
            d.plan_create_user(user("dave"), now)
                .map_err(IdentityError::from)
        })
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(c
        .identity
        .read(|d| d.user(&bob).unwrap().active && d.user(&carol).unwrap().active));
    assert!(!c.core.lock().unwrap().revoked.contains(&"bob".to_string()));

    // A crashes (dropped without flushing); the database comes back; A starts again
    // from the shared state (bob still active there) and its file.
    drop(a);
    pg.resume().unwrap();
    let a = node_with(&url, "gw-a", Some(&file), false).await;
    assert!(
        a.identity.read(|d| !d.user(&bob).unwrap().active),
        "the kept revocation applies from the start"
    );
    // Its first catch-up commits it; C revokes bob without anyone asking again.
    a.identity.catch_up().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.core.lock().unwrap().revoked.contains(&"bob".to_string()) {
        assert!(Instant::now() < deadline, "C never revoked bob");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(portcullis_identity::pending::PendingFile::open(&file)
        .unwrap()
        .is_empty());
    a.identity.catch_up().await.unwrap();
    converged(&[&a, &c], Duration::from_secs(5)).await;
    assert!(c.identity.read(|d| d.user(&carol).unwrap().active));
}

/// Records of other kinds (access requests): written by one node under the writers' lock
/// with a change of their kind, read back by every node (the writer too) in log order,
/// kept in `records`, and part of a reload when the log was trimmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_records_reach_every_node_through_the_log_and_a_reload() {
    let (_pg, url) = migrated().await;
    let a = node(&url, "gw-a").await;
    let b = node(&url, "gw-b").await;
    let (a_tx, mut a_rx) = mpsc::unbounded_channel();
    let (b_tx, mut b_rx) = mpsc::unbounded_channel();
    a.identity.forward_other(a_tx);
    b.identity.forward_other(b_tx);
    let old = snapshot(&mut connect(&url, None).await.unwrap())
        .await
        .unwrap();
    for revision in 1..=2 {
        let body = serde_json::json!({"id": "ar-1", "revision": revision});
        a.identity
            .save_record("access", "ar-1", &body)
            .await
            .unwrap();
        for rx in [&mut a_rx, &mut b_rx] {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the change arrives")
                .unwrap();
            assert_eq!((got.kind.as_str(), &got.body), ("access", &body));
        }
    }
    assert_eq!(
        b.identity.records("access").await.unwrap(),
        vec![serde_json::json!({"id": "ar-1", "revision": 2})]
    );
    // A node whose last change the log no longer reaches reloads, records included.
    let client = connect(&url, None).await.unwrap();
    client
        .batch_execute(&format!(
            "DELETE FROM changes;
             INSERT INTO meta (key, value) VALUES ('changes.trimmed_through', '{}')
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            a.identity.applied_change().max(b.identity.applied_change())
        ))
        .await
        .unwrap();
    let (tx, _rx) = mpsc::channel::<Command>(64);
    let c = Identity::with_store(
        Directory::from_records(old.users.clone(), old.groups.clone()),
        Box::new(ClusterStore::new(
            Target {
                url: url.clone(),
                password: None,
            },
            "gw-c",
            &old,
        )),
        tx,
    )
    .starting_at(old.number);
    let (c_tx, mut c_rx) = mpsc::unbounded_channel();
    c.forward_other(c_tx);
    c.catch_up().await.unwrap();
    let got = c_rx.try_recv().expect("the reload carries the record");
    assert_eq!(got.kind, "access");
    assert_eq!(got.body["revision"], 2);
}

/// A one-time code's record is replaced only over the body its check read: of two nodes
/// writing over the same body, one wins; the snapshot a node starts from carries the
/// records (read without the data plane's runtime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_record_write_lets_one_of_two_nodes_win() {
    let (_pg, url) = migrated().await;
    let a = node(&url, "gw-a").await;
    let b = node(&url, "gw-b").await;
    let first = serde_json::json!({"user": "alice", "last_step": 1});
    assert!(a
        .identity
        .replace_record("totp", "alice", &first, Expect::Absent)
        .await
        .unwrap());
    assert!(
        !b.identity
            .replace_record("totp", "alice", &first, Expect::Absent)
            .await
            .unwrap(),
        "it exists now"
    );
    let via_a = serde_json::json!({"user": "alice", "last_step": 2, "by": "a"});
    let via_b = serde_json::json!({"user": "alice", "last_step": 2, "by": "b"});
    let (wa, wb) = tokio::join!(
        a.identity
            .replace_record("totp", "alice", &via_a, Expect::Body(&first)),
        b.identity
            .replace_record("totp", "alice", &via_b, Expect::Body(&first)),
    );
    let (wa, wb) = (wa.unwrap(), wb.unwrap());
    assert!(wa ^ wb, "exactly one wins: a {wa}, b {wb}");
    let stored = a.identity.record("totp", "alice").await.unwrap().unwrap();
    assert_eq!(stored, if wa { via_a } else { via_b });
    let s = snapshot(&mut connect(&url, None).await.unwrap())
        .await
        .unwrap();
    assert_eq!(s.records, vec![("totp".to_string(), stored)]);
}
