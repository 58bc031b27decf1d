//! The directory survives a restart: changes committed through [`Identity`] are in the
//! SQLite file when it is opened again, and the core queue sees them in commit order.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Instant;

use chrono::{DateTime, Utc};
use portcullis_control::Command;
use portcullis_identity::{
    DeviceError, DevicePolicy, Directory, DirectoryError, Expect, Group, Identity, IdentityError,
    Mutation, SqliteStore, User,
};
use portcullis_model::{ChangeKind, DeviceChange};
use uuid::Uuid;

fn user(name: &str) -> User {
    User {
        id: Uuid::nil(),
        user_name: name.into(),
        external_id: Some(format!("ext-{name}")),
        display_name: Some(name.to_uppercase()),
        email: format!("{name}@example.com"),
        active: true,
        tags: vec!["oncall".into()],
        source: "scim".into(),
        created: DateTime::<Utc>::UNIX_EPOCH,
        modified: DateTime::<Utc>::UNIX_EPOCH,
        version: 0,
    }
}

fn ok(m: Result<Mutation, DirectoryError>) -> Result<Mutation, IdentityError> {
    Ok(m?)
}

#[tokio::test]
async fn committed_changes_survive_a_reopen_and_reach_the_core_in_order() {
    let dir = std::env::temp_dir().join(format!("pcl-identity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("identity.db");
    let (store, users, groups) = SqliteStore::open(&db).unwrap();
    assert!(users.is_empty() && groups.is_empty());
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let identity = Identity::new(Directory::default(), store, tx);
    // The core: applies and answers.
    let core = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Command::Apply(apply) => {
                    for c in &apply.changes {
                        seen.push((c.user.clone(), c.kind));
                    }
                    let _ = apply.done.send(());
                }
                // A revocation is cut ahead of its commit.
                Command::Revoke(r) => {
                    seen.extend(r.users.into_iter().map(|u| (u, ChangeKind::Deactivated)));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        seen
    });
    let now = Utc::now();
    let alice = identity
        .change("scim", Instant::now(), now, |d, now| {
            ok(d.plan_create_user(user("alice"), now))
        })
        .await
        .unwrap()
        .users[0];
    identity
        .change("scim", Instant::now(), now, |d, now| {
            ok(d.plan_create_user(user("bob"), now))
        })
        .await
        .unwrap();
    identity
        .change("scim", Instant::now(), now, |d, now| {
            ok(d.plan_create_group(
                Group {
                    id: Uuid::nil(),
                    display_name: "sre".into(),
                    external_id: None,
                    members: [alice].into_iter().collect(),
                    source: "scim".into(),
                    created: now,
                    modified: now,
                    version: 0,
                },
                now,
            ))
        })
        .await
        .unwrap();
    let bob = identity.read(|d| d.user_by_name("bob").unwrap().id);
    identity
        .change("scim", Instant::now(), now, |d, now| {
            ok(d.plan_delete_user(&bob, now))
        })
        .await
        .unwrap();
    identity
        .set_meta("ldap.cookie", "rid=001,csn=x")
        .await
        .unwrap();
    drop(identity);
    let seen = core.await.unwrap();
    assert_eq!(
        seen,
        [
            ("alice".to_string(), ChangeKind::Created),
            ("bob".to_string(), ChangeKind::Created),
            ("alice".to_string(), ChangeKind::Updated),
            ("bob".to_string(), ChangeKind::Deactivated),
            ("bob".to_string(), ChangeKind::Deleted),
        ]
    );

    let (store, users, groups) = SqliteStore::open(&db).unwrap();
    let d = Directory::from_records(users, groups);
    let a = d.user_by_name("alice").unwrap();
    assert_eq!(a.id, alice);
    assert_eq!(a.external_id.as_deref(), Some("ext-alice"));
    assert!(d.user_by_name("bob").is_none());
    let p = d.principal(a).unwrap();
    assert_eq!(
        (p.groups, p.tags),
        (vec!["sre".to_string()], vec!["oncall".to_string()])
    );
    assert_eq!(
        store.meta("ldap.cookie").unwrap().as_deref(),
        Some("rid=001,csn=x")
    );
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_conditional_record_write_replaces_only_what_it_read_and_survives_a_reopen() {
    let dir = std::env::temp_dir().join(format!("pcl-identity-cas-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("identity.db");
    let (mut store, _, _) = SqliteStore::open(&db).unwrap();
    let one = serde_json::json!({"last_step": 1});
    let two = serde_json::json!({"last_step": 2});
    assert!(store
        .save_record("totp", "alice", &one, Expect::Absent)
        .unwrap());
    assert!(!store
        .save_record("totp", "alice", &two, Expect::Absent)
        .unwrap());
    assert!(!store
        .save_record("totp", "alice", &two, Expect::Body(&two))
        .unwrap());
    assert!(store
        .save_record("totp", "alice", &two, Expect::Body(&one))
        .unwrap());
    assert!(
        !store
            .save_record("totp", "alice", &two, Expect::Body(&one))
            .unwrap(),
        "the second writer over the same read loses"
    );
    assert!(store.save_record("totp", "bob", &one, Expect::Any).unwrap());
    drop(store);
    let (store, _, _) = SqliteStore::open(&db).unwrap();
    assert_eq!(store.record("totp", "alice").unwrap(), Some(two));
    assert_eq!(store.records("totp").unwrap().len(), 2);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_corrupt_record_is_reported_with_the_file_and_id() {
    let dir = std::env::temp_dir().join(format!("pcl-identity-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("identity.db");
    drop(SqliteStore::open(&db).unwrap());
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "INSERT INTO users (id, user_name, record) VALUES ('x1', 'x', '{not json')",
        [],
    )
    .unwrap();
    drop(conn);
    let err = SqliteStore::open(&db).err().unwrap().to_string();
    assert!(err.contains("identity.db") && err.contains("x1"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn device_policy() -> DevicePolicy {
    DevicePolicy {
        pool: "100.64.0.128/30".parse().unwrap(),
        reserved_addresses: Default::default(),
        reserved_keys: Default::default(),
        reserved_routes: Vec::new(),
        lifetime: chrono::TimeDelta::hours(12),
        grace: chrono::TimeDelta::minutes(5),
        persistent_keepalive: None,
        config_users: vec!["carol".into()],
    }
}

#[tokio::test]
async fn devices_persist_and_leave_with_their_user() {
    let dir = std::env::temp_dir().join(format!("pcl-identity-dev-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("identity.db");
    // A version 1 database (before devices) is upgraded in place.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE users (id TEXT PRIMARY KEY, user_name TEXT NOT NULL, record TEXT NOT NULL);
         CREATE TABLE groups (id TEXT PRIMARY KEY, display_name TEXT NOT NULL, record TEXT NOT NULL);
         CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);
    let (store, _, _) = SqliteStore::open(&db).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let identity = Identity::new(Directory::default(), store, tx)
        .with_devices(device_policy())
        .unwrap();
    let core = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(cmd) = rx.recv().await {
            if let Command::Apply(apply) = cmd {
                seen.extend(apply.devices);
                let _ = apply.done.send(());
            }
        }
        seen
    });
    let now = Utc::now();
    identity
        .change("scim", Instant::now(), now, |d, now| {
            ok(d.plan_create_user(user("erin"), now))
        })
        .await
        .unwrap();
    let erins = identity
        .register_device(
            "Erin",
            [1; 32],
            &portcullis_identity::NewDevice {
                name: "laptop".into(),
                ..Default::default()
            },
            Instant::now(),
            now,
        )
        .await
        .unwrap();
    assert_eq!(erins.user_name, "erin", "the owner's own spelling");
    let carols = identity
        .register_device(
            "carol",
            [2; 32],
            &portcullis_identity::NewDevice {
                name: "".into(),
                ..Default::default()
            },
            Instant::now(),
            now,
        )
        .await
        .unwrap();
    assert_eq!(carols.user_id, None, "a user of the configuration file");
    let err = identity
        .register_device(
            "mallory",
            [3; 32],
            &portcullis_identity::NewDevice {
                name: "".into(),
                ..Default::default()
            },
            Instant::now(),
            now,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::Device(DeviceError::NoSuchUser(_))),
        "{err}"
    );
    let err = identity
        .register_device(
            "carol",
            [1; 32],
            &portcullis_identity::NewDevice {
                name: "".into(),
                ..Default::default()
            },
            Instant::now(),
            now,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::Device(DeviceError::DuplicateKey(_))),
        "{err}"
    );

    // Deleting erin removes her device in the same commit.
    let erin = identity.read(|d| d.user_by_name("erin").unwrap().id);
    identity
        .change("scim", Instant::now(), now, |d, now| {
            ok(d.plan_delete_user(&erin, now))
        })
        .await
        .unwrap();
    drop(identity);
    let seen = core.await.unwrap();
    assert!(matches!(&seen[..], [
        DeviceChange::Added { public_key: a, .. },
        DeviceChange::Added { public_key: b, .. },
        DeviceChange::Removed { public_key: c, reason },
    ] if *a == [1; 32] && *b == [2; 32] && *c == [1; 32] && reason == "user deleted"));

    let (store, _, _) = SqliteStore::open(&db).unwrap();
    let devices = store.devices().unwrap();
    assert_eq!(devices, vec![carols]);
    let version: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 3);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_do_not_wait_for_a_writer_held_up_behind_the_core() {
    let (store, _, _) = SqliteStore::in_memory().unwrap();
    // A queue of one that the "core" does not read yet: the second writer's hand-off
    // waits with the writers' lock held.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let identity = std::sync::Arc::new(Identity::new(Directory::default(), store, tx));
    let now = Utc::now();
    let writers: Vec<_> = ["alice", "bob", "carol"]
        .into_iter()
        .map(|name| {
            let identity = identity.clone();
            tokio::spawn(async move {
                identity
                    .change("scim", Instant::now(), now, |d, now| {
                        ok(d.plan_create_user(user(name), now))
                    })
                    .await
            })
        })
        .collect();
    // Wait until two users are applied: one in the queue, one waiting to enter it.
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while identity.read(|d| d.users().count()) < 2 {
        assert!(Instant::now() < deadline, "writers did not get going");
        tokio::task::yield_now().await;
    }
    // Readers answer at once although a writer holds the store.
    for _ in 0..100 {
        let n = identity.read(|d| d.users().count());
        assert!((2..=3).contains(&n));
    }
    assert!(writers.iter().any(|w| !w.is_finished()));
    // The core catches up: every change arrives, in commit order, and every writer ends.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match rx.recv().await {
            Some(Command::Apply(apply)) => {
                seen.extend(apply.changes.iter().map(|c| c.user.clone()));
                let _ = apply.done.send(());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, ["alice", "bob", "carol"]);
}
