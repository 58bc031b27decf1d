//! The data plane: the only program in the gateway that touches the UDP socket, the TUN
//! device and the audit pipeline. It drives the sans-IO [`portcullis_core::Gateway`].
//!
//! What it does: binds the UDP socket (buffers raised with `SO_RCVBUFFORCE` /
//! `SO_SNDBUFFORCE` when allowed, plain `SO_RCVBUF` / `SO_SNDBUF` otherwise), creates and
//! configures the TUN device, runs one event loop ([`run`]: UDP readable → core → TUN; TUN
//! readable → core → UDP; timers; SIGHUP reloads the policy directory; SIGINT/SIGTERM shut
//! down cleanly, closing every flow and session in the audit trail), and hands events to
//! the audit pipeline ([`portcullis_audit::Pipeline`]: spool, events file, ClickHouse),
//! failing closed on new flows while the pipeline cannot write (unless configured
//! otherwise).
//!
//! It meets the control plane (`portcullis-http`, on a thread of its own) only at
//! `portcullis-control`'s two bounded channels: [`portcullis_control::Command`]s in (one
//! named handler each, in [`handlers`]), a [`portcullis_control::Status`] out every
//! 200 ms.
//!
//! What it deliberately does not: no policy or flow logic (the core), no HTTP, SQL, LDAP
//! or TLS; never waits on the audit pipeline (a full queue refuses, counts and blocks new
//! flows) nor on the control plane (answers that wait for durability wait in a task).

mod datapath;
mod handlers;
mod routes;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
pub use datapath::Datapath;
use portcullis_audit::{Pipeline, PipelineConfig, SpoolSettings, StoreConfig, UploadConfig};
use portcullis_config::{FsyncMode, Loaded, OnFull};
use portcullis_control::DataSide;
pub use portcullis_control::DatapathStats;
use portcullis_core::{FlowLimits, Gateway, GatewayConfig, PeerSpec, Timeouts};
use portcullis_model::{Event, Principal};
use portcullis_policy::PolicyBundle;
use portcullis_spool::{FsyncPolicy, SpoolConfig};
use tokio::net::UdpSocket;
use tokio::signal::unix::{signal, SignalKind};

/// What the loop starts with from the identity store (read by the control plane).
#[derive(Debug, Default)]
pub struct Startup {
    /// The active users of the identity store (next to the configuration's `[[user]]`s).
    pub directory_users: Vec<Principal>,
    /// The stored devices, as peers.
    pub peers: Vec<PeerSpec>,
    /// Events to record first (devices that expired while the gateway was down).
    pub reports: Vec<Event>,
    /// The temporary grants in force (approved access requests), before any packet.
    pub grants: Vec<portcullis_model::Grant>,
}

/// Builds the gateway core from a loaded configuration.
/// `directory_users` are the active users of the identity store (next to the
/// configuration file's `[[user]]`s).
pub fn build_gateway(
    loaded: &Loaded,
    bundle: Arc<PolicyBundle>,
    directory_users: Vec<Principal>,
    now: Instant,
) -> anyhow::Result<Gateway> {
    let c = &loaded.config;
    let f = &c.flows;
    let secs = Duration::from_secs;
    let limits = FlowLimits {
        max_flows: f.max_flows,
        max_flows_per_peer: f.max_flows_per_peer,
        timeouts: Timeouts {
            tcp_syn: secs(f.tcp_syn_timeout_secs),
            tcp_established: secs(f.tcp_established_timeout_secs),
            tcp_closing: secs(f.tcp_closing_timeout_secs),
            udp: secs(f.udp_timeout_secs),
            icmp: secs(f.icmp_timeout_secs),
            other: secs(f.other_timeout_secs),
            fragment: secs(f.fragment_timeout_secs),
        },
    };
    let users = c
        .users
        .iter()
        .map(|u| Principal {
            name: u.name.clone(),
            email: u.email.clone(),
            groups: u.groups.clone(),
            tags: u.tags.clone(),
        })
        .chain(directory_users)
        .collect();
    let mut gw = Gateway::new(
        GatewayConfig {
            private_key: loaded.private_key.0,
            limits,
            session_idle_timeout: secs(c.gateway.session_idle_timeout_secs),
        },
        bundle,
        users,
        now,
        chrono::Utc::now(),
    )?;
    gw.set_site(c.cluster.as_ref().and_then(|cl| cl.site()));
    gw.set_resume_sessions(c.cluster.as_ref().is_none_or(|cl| cl.resume_sessions));
    for (p, key) in c.peers.iter().zip(&loaded.peer_keys) {
        let mut addresses = vec![p.address];
        addresses.extend(p.address6);
        gw.handle_peer_add(PeerSpec {
            user: p.user.clone(),
            public_key: *key,
            addresses,
            routes: p.routes.clone(),
            persistent_keepalive: p.persistent_keepalive,
            sign_on: Default::default(),
        })?;
    }
    Ok(gw)
}

/// Binds the WireGuard UDP socket with large buffers.
pub fn bind_udp(listen: SocketAddr, buffer: usize) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .context("creating the udp socket")?;
    if listen.is_ipv6() {
        // Accept IPv4-mapped clients too when bound to [::].
        let _ = socket.set_only_v6(false);
    }
    set_buffers(&socket, buffer);
    // Bound to a site's virtual address, a node that does not hold the address yet must
    // still start (and answer from that address once it moves here): IP_FREEBIND.
    let freebind = if listen.is_ipv6() {
        socket.set_freebind_v6(true)
    } else {
        socket.set_freebind_v4(true)
    };
    if let Err(e) = freebind {
        tracing::debug!("udp socket: IP_FREEBIND not set: {e}");
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&listen.into())
        .with_context(|| format!("binding udp {listen}"))?;
    Ok(UdpSocket::from_std(socket.into())?)
}

fn set_buffers(socket: &socket2::Socket, size: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    // The FORCE variants pass net.core.{r,w}mem_max; they need CAP_NET_ADMIN.
    let forced = setsockopt(&socket.as_fd(), sockopt::RcvBufForce, &size).is_ok()
        && setsockopt(&socket.as_fd(), sockopt::SndBufForce, &size).is_ok();
    if !forced {
        let _ = socket.set_recv_buffer_size(size);
        let _ = socket.set_send_buffer_size(size);
    }
    tracing::info!(
        requested = size,
        recv = socket.recv_buffer_size().unwrap_or(0),
        send = socket.send_buffer_size().unwrap_or(0),
        forced,
        "udp socket buffers"
    );
}

/// Creates the TUN device with the tunnel addresses and MTU, up. Returns whether
/// offloads (virtio-net header, TSO/USO, GRO) are on.
pub fn build_tun(loaded: &Loaded) -> anyhow::Result<(tun_rs::AsyncDevice, bool)> {
    if loaded.config.gateway.offload {
        match tun_builder(loaded)?.offload(true).build_async() {
            Ok(dev) => return Ok((dev, true)),
            Err(e) => tracing::warn!("tun offloads unavailable ({e}); continuing without"),
        }
    }
    let g = &loaded.config.gateway;
    let dev = tun_builder(loaded)?.build_async().with_context(|| {
        format!(
            "creating tun device {:?} (needs CAP_NET_ADMIN and /dev/net/tun)",
            g.tun_name
        )
    })?;
    Ok((dev, false))
}

fn tun_builder(loaded: &Loaded) -> anyhow::Result<tun_rs::DeviceBuilder> {
    let g = &loaded.config.gateway;
    let v4 = match g.tunnel_address.addr() {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(_) => return Err(anyhow!("gateway.tunnel_address must be IPv4")),
    };
    let mut b = tun_rs::DeviceBuilder::new()
        .name(&g.tun_name)
        .mtu(g.mtu)
        .ipv4(v4, g.tunnel_address.prefix_len(), None);
    if let Some(v6) = g.tunnel_address6 {
        if let std::net::IpAddr::V6(a) = v6.addr() {
            b = b.ipv6(a, v6.prefix_len());
        }
    }
    Ok(b)
}

/// The audit pipeline's settings from the configuration.
pub fn pipeline_config(loaded: &Loaded) -> anyhow::Result<PipelineConfig> {
    let c = &loaded.config;
    let a = &c.audit;
    let spool = match (&a.spool_dir, &a.clickhouse) {
        (Some(dir), Some(ch)) => Some(SpoolSettings {
            dir: dir.clone(),
            spool: SpoolConfig {
                segment_bytes: a.segment_bytes,
                max_bytes: a.spool_max_bytes,
                fsync: match a.fsync {
                    FsyncMode::Always => FsyncPolicy::Always,
                    FsyncMode::OnCommit => FsyncPolicy::OnCommit,
                    FsyncMode::Never => FsyncPolicy::Never,
                },
            },
            upload: UploadConfig {
                store: store_config(loaded)?.ok_or_else(|| anyhow!("no [audit.clickhouse]"))?,
                batch_rows: ch.batch_rows,
                batch_interval: Duration::from_millis(ch.batch_interval_ms),
                retention: (ch.retention_days > 0)
                    .then(|| Duration::from_secs(u64::from(ch.retention_days) * 86_400)),
                // Set by the gateway in a cluster: one node applies retention.
                retention_lease: None,
            },
        }),
        _ => None,
    };
    let checkpoints = match (&a.checkpoint_key_file, &a.spool_dir) {
        (Some(key_file), Some(dir)) => Some(portcullis_audit::CheckpointSettings {
            key: std::sync::Arc::new(checkpoint_key(loaded, key_file)?),
            interval: Duration::from_secs(a.checkpoint_interval_secs),
            file: dir.join(CHECKPOINTS_FILE),
            sink: None,
        }),
        _ => None,
    };
    Ok(PipelineConfig {
        gateway: c.gateway.id.clone(),
        events_file: a.events_file.clone(),
        spool,
        queue: 65_536,
        commit_interval: Duration::from_millis(a.commit_interval_ms),
        checkpoints,
    })
}

/// The copy of a node's signed checkpoints outside ClickHouse, in its spool directory.
pub const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";

/// The node's checkpoint signing key (`[audit] checkpoint_key_file`).
pub fn checkpoint_key(
    loaded: &Loaded,
    file: &std::path::Path,
) -> anyhow::Result<portcullis_audit::checkpoint::SigningKey> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        anyhow!(
            "{}: key `audit.checkpoint_key_file`: cannot read {}: {e}",
            loaded.path.display(),
            file.display()
        )
    })?;
    portcullis_audit::checkpoint::SigningKey::from_pem(&text).map_err(|e| {
        anyhow!(
            "{}: key `audit.checkpoint_key_file`: {}: {e}",
            loaded.path.display(),
            file.display()
        )
    })
}

/// ClickHouse connection settings from `[audit.clickhouse]` (password read from its file).
pub fn store_config(loaded: &Loaded) -> anyhow::Result<Option<StoreConfig>> {
    let Some(ch) = &loaded.config.audit.clickhouse else {
        return Ok(None);
    };
    let password = match &ch.password_file {
        Some(f) => Some(
            portcullis_config::read_secret(&loaded.path, "audit.clickhouse.password_file", f)?.0,
        ),
        None => None,
    };
    Ok(Some(StoreConfig {
        urls: ch.all_urls(),
        cluster: ch.cluster.clone(),
        database: ch.database.clone(),
        user: ch.user.clone(),
        password,
    }))
}

/// Runs the data plane until SIGINT or SIGTERM: starts the audit pipeline, binds the
/// UDP socket, creates the TUN device, then runs the loop, one named handler per source.
pub async fn run(
    loaded: Arc<Loaded>,
    bundle: Arc<PolicyBundle>,
    startup: Startup,
    audit_config: PipelineConfig,
    plane: DataSide,
) -> anyhow::Result<()> {
    let c = &loaded.config;
    let mut gw = build_gateway(&loaded, bundle, startup.directory_users, Instant::now())?;
    let routed: Vec<ipnet::IpNet> = c
        .peers
        .iter()
        .flat_map(|p| p.routes.iter().copied())
        .chain(startup.peers.iter().flat_map(|p| p.routes.iter().copied()))
        .collect();
    for peer in startup.peers {
        gw.handle_peer_add(peer).context("adding a stored device")?;
    }
    for event in startup.reports {
        gw.handle_report(event);
    }
    gw.handle_grants(Instant::now(), startup.grants);
    gw.set_decision_clock(Instant::now);
    let (audit, recovery) = Pipeline::start(audit_config)?;
    if let Some(r) = recovery {
        tracing::info!(
            records = r.records,
            torn_tail = r.torn_tail.is_some(),
            corrupt = r.corrupt.len(),
            "audit spool opened"
        );
    }
    let udp = bind_udp(c.gateway.listen, c.gateway.socket_buffer_bytes)?;
    let (tun, offload) = build_tun(&loaded)?;
    routes::install(&c.gateway.tun_name, &routed)?;
    let dp = Datapath::new(udp, tun, offload)?;
    tracing::info!(
        listen = %dp.udp.local_addr()?,
        tun = %c.gateway.tun_name,
        offload,
        public_key = %portcullis_core::b64(&gw.public_key()),
        peers = c.peers.len(),
        "gateway up"
    );
    let DataSide {
        mut commands,
        status,
    } = plane;
    let mut lp = handlers::Loop {
        fail_closed: c.audit.on_full == OnFull::DenyNewFlows,
        loaded: loaded.clone(),
        gw,
        dp,
        audit,
        status,
        revocation_latency: Default::default(),
    };

    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel(2);
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut next_wall = Instant::now();
    let mut next_stats = Instant::now() + Duration::from_secs(60);
    let mut beat = tokio::time::interval(Duration::from_millis(200));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Debug builds only, with PORTCULLIS_TEST_HOOKS set: SIGUSR1 blocks the packet loop
    // for 3 s, so a test can see /readyz fail while HTTP still answers.
    let mut stall = (cfg!(debug_assertions) && std::env::var_os("PORTCULLIS_TEST_HOOKS").is_some())
        .then(|| signal(SignalKind::user_defined1()))
        .transpose()?;

    loop {
        let deadline = tokio::time::Instant::from_std(lp.gw.poll_timeout());
        tokio::select! {
            r = lp.dp.udp.readable() => {
                r?;
                lp.dp.on_udp_readable(&mut lp.gw).await?;
            }
            r = lp.dp.tun.readable() => {
                r?;
                lp.dp.on_tun_readable(&mut lp.gw).await?;
            }
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if now >= next_wall {
                    lp.gw.handle_wall_clock(now, chrono::Utc::now());
                    next_wall = now + Duration::from_secs(1);
                }
                lp.gw.handle_timeout(now);
                if now >= next_stats {
                    next_stats = now + Duration::from_secs(60);
                    handlers::log_stats(&lp.snapshot());
                }
            }
            Some(cmd) = commands.recv() => lp.on_command(cmd).await,
            _ = hup.recv() => {
                if loaded.config.cluster.is_some() {
                    // The directory is this node's copy of the cluster's set: a local
                    // edit would make this node decide differently from the others.
                    tracing::warn!("SIGHUP: in a cluster the policy set is replaced with PUT /policies on any node; [policy] dir is not re-read");
                } else {
                    // Read and validate off the packet loop; the result comes back below.
                    let dir = loaded.config.policy.dir.clone();
                    let tx = reload_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.blocking_send(PolicyBundle::load(&dir));
                    });
                }
            }
            Some(bundle) = reload_rx.recv() => lp.on_reload(bundle),
            _ = beat.tick() => lp.on_tick(),
            Some(()) = async { match stall.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                tracing::warn!("test hook: blocking the packet loop for 3 s");
                std::thread::sleep(Duration::from_secs(3));
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        lp.flush(false).await;
    }
    tracing::info!("shutting down");
    lp.gw.handle_shutdown(Instant::now());
    lp.flush(false).await;
    handlers::log_stats(&lp.snapshot());
    // Write what is queued; give the uploader a moment; the rest stays in the spool.
    lp.audit.shutdown(Duration::from_secs(5));
    Ok(())
}
