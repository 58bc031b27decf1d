//! The control plane on its own: started with a real listener, identity store and
//! tokens, facing a scripted data plane on the other end of `portcullis-control`'s
//! channels. What crosses the seam, and when the HTTP client hears back, is checked
//! here without a packet loop, a TUN device or root.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_control::{Command, DataSide, Readiness, Snapshot, Status, UserRow};
use portcullis_model::{ChangeKind, Event};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const ADMIN: &str = "admin-token-0123456789abcdef";
const SCIM: &str = "scim-token-0123456789abcdef";

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nContent-Type: application/scim+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// What the scripted loop saw, and how it answers.
#[derive(Default)]
struct Script {
    applied: Vec<(String, ChangeKind)>,
    reports: Vec<Event>,
    killed: Vec<u64>,
    /// Reports are answered "not durable" while set (an audit trail that is down).
    audit_down: bool,
    /// How long an identity change takes to apply.
    apply_delay: Duration,
}

/// Answers the commands as the packet loop would, per `script`; returns the status end.
fn scripted_loop(data: DataSide, script: Arc<Mutex<Script>>) -> tokio::sync::mpsc::Sender<Status> {
    let DataSide {
        mut commands,
        status,
    } = data;
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            match cmd {
                Command::Apply(apply) => {
                    let delay = script.lock().unwrap().apply_delay;
                    tokio::time::sleep(delay).await;
                    let mut s = script.lock().unwrap();
                    s.applied
                        .extend(apply.changes.iter().map(|c| (c.user.clone(), c.kind)));
                    let _ = apply.done.send(());
                }
                Command::Users(tx) => {
                    // The loop knows alice (configuration) and every user it was given,
                    // with no source: the control plane names it.
                    let s = script.lock().unwrap();
                    let mut rows = vec![row("alice", "config")];
                    for (u, kind) in &s.applied {
                        if *kind != ChangeKind::Deleted {
                            rows.push(row(u, ""));
                        }
                    }
                    let _ = tx.send(rows);
                }
                Command::KillSession(id, tx) => {
                    script.lock().unwrap().killed.push(id);
                    let _ = tx.send(id == 7);
                }
                Command::Report(event, durable) => {
                    let mut s = script.lock().unwrap();
                    let ok = !s.audit_down;
                    s.reports.push(event);
                    if let Some(tx) = durable {
                        let _ = tx.send(ok);
                    }
                }
                Command::Sessions(tx) => {
                    let _ = tx.send(Vec::new());
                }
                other => panic!("unexpected command {other:?}"),
            }
        }
    });
    status
}

fn row(name: &str, source: &str) -> UserRow {
    UserRow {
        name: name.into(),
        source: source.into(),
        active: true,
        groups: Vec::new(),
        tags: Vec::new(),
        devices: Vec::new(),
        sessions: 0,
    }
}

fn status(flows: u64) -> Status {
    let mut snapshot = Snapshot {
        flows,
        ..Snapshot::default()
    };
    snapshot.enforce.decisions = 42;
    snapshot
        .audit_commit_latency
        .observe(Duration::from_micros(300));
    Status {
        at: Instant::now(),
        ready: Readiness {
            tun_up: true,
            udp_bound: true,
            policy_loaded: true,
            audit_writable: true,
        },
        snapshot,
    }
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_answers_through_the_channels_and_only_after_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies");
    std::fs::write(dir.path().join("admin.token"), format!("{ADMIN}\n")).unwrap();
    std::fs::write(dir.path().join("scim.token"), format!("{SCIM}\n")).unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:51820\"\nprivate_key_file = \"gw.key\"\ntun_name = \"pc-test\"\ntunnel_address = \"100.64.0.1/24\"\n\
             [policy]\ndir = \"{policies}\"\n[audit]\nevents_file = \"events.jsonl\"\n\
             [[user]]\nname = \"alice\"\ngroups = [\"sre\"]\n\
             [http]\nlisten = \"127.0.0.1:0\"\n[admin]\ntoken_file = \"admin.token\"\n[scim]\ntoken_file = \"scim.token\"\n\
             [identity]\ndatabase = \"identity.db\"\n"
        ),
    )
    .unwrap();
    let loaded = Arc::new(portcullis_config::load_unkeyed(&config).unwrap());
    let bundle =
        Arc::new(portcullis_policy::PolicyBundle::load(&loaded.config.policy.dir).unwrap());
    let (control, data) = portcullis_control::channels();
    let identity = portcullis_http::open_identity(&loaded, control.commands.clone()).unwrap();
    assert!(identity.is_some());
    let script = Arc::new(Mutex::new(Script::default()));
    let status_tx = scripted_loop(data, script.clone());
    let addr = portcullis_http::start(loaded, bundle, identity, None, control, None, None)
        .unwrap()
        .unwrap();

    // Alive but not ready: the loop has not reported yet.
    assert_eq!(http(addr, "GET", "/healthz", "", "").await.0, 200);
    let (code, body) = http(addr, "GET", "/readyz", "", "").await;
    assert_eq!(code, 503);
    assert!(body.contains("packet loop has not started"), "{body}");

    // A status makes it ready and is what /metrics shows.
    status_tx.try_send(status(5)).unwrap();
    wait_for("ready", async || {
        http(addr, "GET", "/readyz", "", "").await.0 == 200
    })
    .await;
    let (_, metrics) = http(addr, "GET", "/metrics", "", "").await;
    assert!(metrics.contains("portcullis_flows 5"), "{metrics}");
    assert!(
        metrics.contains("portcullis_decisions_total 42"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_audit_commit_latency_seconds_count 1"),
        "{metrics}"
    );
    // No status for over a second: a stuck loop is unready though HTTP answers.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (code, body) = http(addr, "GET", "/readyz", "", "").await;
    assert_eq!(code, 503);
    assert!(body.contains("no progress"), "{body}");

    // A SCIM change commits here, crosses as one Apply, and is answered only once the
    // loop applied it.
    script.lock().unwrap().apply_delay = Duration::from_millis(400);
    let started = Instant::now();
    let (code, body) = http(
        addr,
        "POST",
        "/scim/v2/Users",
        SCIM,
        r#"{"userName": "dave", "active": true}"#,
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(
        script.lock().unwrap().applied,
        vec![("dave".to_string(), ChangeKind::Created)]
    );
    script.lock().unwrap().apply_delay = Duration::ZERO;

    // The loop lists who it knows; the control plane names where each came from.
    let (code, body) = http(addr, "GET", "/admin/v1/users", ADMIN, "").await;
    assert_eq!(code, 200, "{body}");
    let users: serde_json::Value = serde_json::from_str(&body).unwrap();
    let source = |name: &str| {
        users
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .map(|u| u["source"].as_str().unwrap().to_string())
    };
    assert_eq!(source("alice").as_deref(), Some("config"));
    assert_eq!(source("dave").as_deref(), Some("scim"));

    // An admin action is answered once its admin_action is durable...
    let (code, _) = http(addr, "POST", "/admin/v1/sessions/7/kill", ADMIN, "").await;
    assert_eq!(code, 200);
    {
        let s = script.lock().unwrap();
        assert_eq!(s.killed, vec![7]);
        assert!(
            matches!(
                s.reports.last(),
                Some(Event::AdminAction { action, outcome, .. })
                    if action == "POST /sessions/{id}/kill" && outcome == "ok"
            ),
            "{:?}",
            s.reports
        );
    }
    // ...and not answered as done while the audit trail cannot record it.
    script.lock().unwrap().audit_down = true;
    let (code, body) = http(addr, "POST", "/admin/v1/sessions/7/kill", ADMIN, "").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("could not be recorded"), "{body}");
}
