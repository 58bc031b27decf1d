//! The io layer: the only place that touches sockets, the TUN device, clocks, signals and
//! the events file. It drives the sans-IO [`portcullis_core::Gateway`].
//!
//! What it does: binds the UDP socket (buffers raised with `SO_RCVBUFFORCE` /
//! `SO_SNDBUFFORCE` when allowed, plain `SO_RCVBUF` / `SO_SNDBUF` otherwise), creates and
//! configures the TUN device, runs one event loop (UDP readable → core → TUN; TUN readable
//! → core → UDP; timers; SIGHUP reloads the policy directory; SIGINT/SIGTERM shut down
//! cleanly, closing every flow and session in the audit trail), and hands events to the
//! audit pipeline ([`portcullis_audit::Pipeline`]: spool, events file, ClickHouse), failing
//! closed on new flows while the pipeline cannot write (unless configured otherwise).
//! The `[http]` listener (SCIM, admin API, SSO, `/healthz`, `/readyz`) runs on a thread
//! and runtime of its own ([`serve`], [`health`]); it reaches the packet loop only through
//! the command and identity channels.
//!
//! What it deliberately does not: no policy or flow logic; never waits on the audit
//! pipeline (a full queue refuses, counts and blocks new flows).

mod datapath;
pub mod devices;
pub mod health;
pub mod http;
pub mod ldap;
mod metrics;
pub mod nonces;
mod policy_api;
pub mod serve;
pub mod sso;
pub mod tls;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
pub use datapath::{Datapath, DatapathStats};
use portcullis_audit::{Pipeline, PipelineConfig, SpoolSettings, StoreConfig, UploadConfig};
use portcullis_config::{FsyncMode, Loaded, OnFull};
use portcullis_core::{FlowLimits, Gateway, GatewayConfig, PeerSpec, Timeouts};
use portcullis_model::Principal;
use portcullis_policy::PolicyBundle;
use portcullis_spool::{FsyncPolicy, SpoolConfig};
use tokio::net::UdpSocket;
use tokio::signal::unix::{signal, SignalKind};

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
    for (p, key) in c.peers.iter().zip(&loaded.peer_keys) {
        let mut addresses = vec![p.address];
        addresses.extend(p.address6);
        gw.handle_peer_add(PeerSpec {
            user: p.user.clone(),
            public_key: *key,
            addresses,
            persistent_keepalive: p.persistent_keepalive,
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

/// Loads everything the gateway loads at start, without binding or creating anything:
/// what `portcullis check-config` runs, so that "ok" means the gateway will start (as far
/// as files can tell). Errors name the key and the file.
pub fn check(loaded: &Loaded) -> anyhow::Result<()> {
    let c = &loaded.config;
    PolicyBundle::load(&c.policy.dir)
        .map_err(|e| anyhow!("policy directory {}:\n{e}", c.policy.dir.display()))?;
    for (key, file) in [
        ("scim.token_file", c.scim.as_ref().map(|s| &s.token_file)),
        ("admin.token_file", c.admin.as_ref().map(|a| &a.token_file)),
    ] {
        if let Some(file) = file {
            portcullis_config::TokenSet::load(&loaded.path, key, file)?;
        }
    }
    load_api_tokens(loaded)?;
    if let Some(a) = &c.api {
        if a.nonce_file.exists() {
            std::fs::read(&a.nonce_file)
                .map_err(|e| anyhow!("key `api.nonce_file`: {}: {e}", a.nonce_file.display()))?;
        }
    }
    pipeline_config(loaded)?;
    if let Some(a) = &c.audit.api {
        portcullis_config::read_secret(&loaded.path, "audit.api.token_file", &a.token_file)?;
    }
    if let Some(h) = &c.http {
        if let (Some(cert), Some(key)) = (&h.cert_file, &h.key_file) {
            tls::server_config(cert, key).context("[http] cert_file/key_file")?;
        }
    }
    if let Some(l) = &c.ldap {
        ldap::read_password(l)?;
        if l.url.starts_with("ldaps://") {
            tls::client_config(l.ca_file.as_deref()).context("[ldap] tls")?;
        }
    }
    if let Some(s) = c.saml.as_ref().filter(|s| !s.idp_metadata_is_url()) {
        std::fs::read_to_string(&s.idp_metadata)
            .map_err(|e| anyhow!("key `saml.idp_metadata`: {}: {e}", s.idp_metadata))?;
    }
    Ok(())
}

/// Commands the control plane may have queued for the packet loop at once.
const ADMIN_QUEUE: usize = 1024;

/// Runs the gateway until SIGINT or SIGTERM.
pub async fn run(loaded: Loaded) -> anyhow::Result<()> {
    let c = &loaded.config;
    let bundle = PolicyBundle::load(&c.policy.dir)
        .map_err(|e| anyhow!("policy directory {} rejected:\n{e}", c.policy.dir.display()))?;
    for w in &bundle.warnings {
        tracing::warn!("{w}");
    }
    let health = health::Health::new();
    let metrics = metrics::Metrics::new();
    health
        .policy_loaded
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for g in bundle.unknown_groups(
        c.users
            .iter()
            .flat_map(|u| u.groups.iter().map(String::as_str)),
    ) {
        tracing::warn!(group = %g, "policies name a group no configured user has (a typo, or provided by an identity source?)");
    }
    let (identity, mut apply_rx) = open_identity(&loaded)?;
    let directory_users = identity
        .as_ref()
        .map(|i| i.read(|d| d.principals()))
        .unwrap_or_default();
    let profile = c
        .devices
        .as_ref()
        .map(|d| devices::profile_settings(&loaded, d, &bundle));
    let mut gw = build_gateway(&loaded, Arc::new(bundle), directory_users, Instant::now())?;
    if let Some(identity) = &identity {
        devices::add_stored(&mut gw, identity)?;
    }
    // The control plane's one channel into the packet loop: bounded, so a flood of
    // requests waits in the handlers (on the control thread), not in memory here.
    let (admin_tx, mut admin_rx) = tokio::sync::mpsc::channel(ADMIN_QUEUE);
    let tokens = load_tokens(&loaded)?;
    let ldap = match (&c.ldap, &identity) {
        (Some(l), Some(identity)) => Some(ldap::spawn(
            l.clone(),
            ldap::read_password(l)?,
            l.url
                .starts_with("ldaps://")
                .then(|| tls::client_config(l.ca_file.as_deref()))
                .transpose()
                .context("[ldap] tls")?,
            identity.clone(),
            admin_tx.clone(),
        )),
        _ => None,
    };
    let https = match c
        .http
        .as_ref()
        .and_then(|h| h.cert_file.as_ref().zip(h.key_file.as_ref()))
    {
        Some((cert, key)) => Some(Arc::new(std::sync::RwLock::new(
            tls::server_config(cert, key).context("[http] cert_file/key_file")?,
        ))),
        None => None,
    };
    let profile = profile.map(Arc::new);
    // Read once (the ClickHouse password file among it) for the pipeline and the
    // auditor routes.
    let audit_config = pipeline_config(&loaded)?;
    if let Some(h) = &c.http {
        let mut app = axum::Router::new();
        if let (Some(saml), Some(identity), Some(profile)) = (&c.saml, &identity, &profile) {
            let sso = sso::Sso::start(
                &loaded,
                saml,
                identity.clone(),
                profile.clone(),
                admin_tx.clone(),
            )
            .await?;
            app = app.merge(sso::routes(sso));
        }
        if let (Some(identity), Some(t)) = (&identity, &tokens.scim) {
            app = app.merge(portcullis_scim::router(portcullis_scim::ScimState {
                identity: identity.clone(),
                tokens: t.clone(),
            }));
        }
        if tokens.admin.is_some() || tokens.api.is_some() {
            app = app.merge(http::admin_router(http::AdminApi {
                tokens: tokens.admin.clone(),
                api: tokens.api.clone(),
                nonce_log: tokens.nonce_log.clone(),
                identity: identity.clone(),
                commands: admin_tx.clone(),
                ldap: ldap.clone(),
                profile: profile.clone(),
                max_body_bytes: h.max_body_bytes,
                policy_dir: c.policy.dir.clone(),
                profile_scope: devices::ProfileScope::new(&loaded),
                store: audit_config.spool.as_ref().map(|s| {
                    Arc::new(portcullis_auditor::http::StoreHandle::lazy(
                        s.upload.store.clone(),
                    ))
                }),
            }));
        }
        // Bearer failures are limited per address on SCIM and /admin/v1 (the signed API
        // limits its own); the body cap applies to every route.
        let app = app
            .layer(axum::middleware::from_fn_with_state(
                serve::BearerFailures::default(),
                serve::limit_bearer_failures,
            ))
            .layer(axum::middleware::from_fn(serve::json_errors))
            .layer(axum::extract::DefaultBodyLimit::max(h.max_body_bytes));
        let app = app
            .merge(health::routes(health.clone()))
            .merge(metrics::routes(metrics.clone()));
        // The control plane's listener runs on a thread and runtime of its own: TLS
        // handshakes, handlers and their commits never run on the packet loop, and
        // /readyz answers (unready) while the loop is stuck.
        let listener = std::net::TcpListener::bind(h.listen)
            .with_context(|| format!("binding [http] listen {}", h.listen))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let limits = serve::Limits {
            max_connections: h.max_connections,
            max_connections_per_address: h.max_connections_per_address,
            header_timeout: Duration::from_secs(h.header_timeout_secs),
            idle_timeout: Duration::from_secs(h.idle_timeout_secs),
        }
        .fitted();
        let tls_config = https.clone();
        std::thread::Builder::new()
            .name("control-http".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return tracing::error!("http runtime: {e}"),
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return tracing::error!("http listener: {e}"),
                    };
                    match tls_config {
                        Some(config) => tls::serve_tls(listener, config, app, limits).await,
                        None => serve::serve_plain(listener, app, limits).await,
                    }
                });
            })
            .context("starting the http thread")?;
        tracing::info!(listen = %local, tls = https.is_some(), scim = tokens.scim.is_some(), admin = tokens.admin.is_some(), api = tokens.api.is_some(), "http up");
    }
    drop(admin_tx);
    if let Some(identity) = identity.as_ref().filter(|i| i.device_policy().is_some()) {
        devices::spawn_expiry(identity.clone());
    }
    let (audit, recovery) = Pipeline::start(audit_config)?;
    if let Some(r) = recovery {
        tracing::info!(
            records = r.records,
            torn_tail = r.torn_tail.is_some(),
            corrupt = r.corrupt.len(),
            "audit spool opened"
        );
    }
    let fail_closed = c.audit.on_full == OnFull::DenyNewFlows;
    let udp = bind_udp(c.gateway.listen, c.gateway.socket_buffer_bytes)?;
    let (tun, offload) = build_tun(&loaded)?;
    let mut dp = Datapath::new(udp, tun, offload)?;
    health
        .udp_bound
        .store(true, std::sync::atomic::Ordering::Relaxed);
    health
        .tun_up
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        listen = %dp.udp.local_addr()?,
        tun = %c.gateway.tun_name,
        offload,
        public_key = %portcullis_core::b64(&gw.public_key()),
        peers = c.peers.len(),
        "gateway up"
    );

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
        let deadline = tokio::time::Instant::from_std(gw.poll_timeout());
        tokio::select! {
            r = dp.udp.readable() => {
                r?;
                dp.on_udp_readable(&mut gw).await?;
            }
            r = dp.tun.readable() => {
                r?;
                dp.on_tun_readable(&mut gw).await?;
            }
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if now >= next_wall {
                    gw.handle_wall_clock(now, chrono::Utc::now());
                    next_wall = now + Duration::from_secs(1);
                }
                gw.handle_timeout(now);
                if now >= next_stats {
                    next_stats = now + Duration::from_secs(60);
                    log_stats(&snapshot(&gw, &dp.stats, &audit));
                }
            }
            Some(apply) = apply_rx.recv() => {
                let now = Instant::now();
                for change in apply.changes {
                    let user = change.user.clone();
                    // A change the policy entities refuse revokes the user in the core.
                    match gw.handle_identity_change(now, change, apply.requested, apply.requested_at) {
                        Ok(o) if o.refused.is_some() => tracing::error!(%user, "identity change refused, user revoked"),
                        Ok(o) if o.sessions_cut + o.flows_cut > 0 || o.latency.as_nanos() > 0 => tracing::info!(
                            %user, sessions_cut = o.sessions_cut, flows_cut = o.flows_cut,
                            latency_us = o.latency.as_micros() as u64, "identity change applied"),
                        Ok(_) => tracing::info!(%user, "identity change applied"),
                        Err(e) => tracing::error!(%user, "identity change: {e}"),
                    }
                }
                for change in apply.devices {
                    if let Err(e) = gw.handle_device_change(now, change) {
                        tracing::error!("device change not applied: {e}");
                    }
                }
                // Resets out, and the events durable, before the source hears "done".
                let ack = flush(&mut gw, &mut dp, &audit, fail_closed, &metrics, true).await;
                let done = apply.done;
                reply_when_durable(ack, move |_| {
                    let _ = done.send(());
                });
            }
            Some(cmd) = admin_rx.recv() => {
                if let Some(reply) = admin(&mut gw, &loaded, identity.as_deref(), cmd) {
                    let ack = flush(&mut gw, &mut dp, &audit, fail_closed, &metrics, true).await;
                    reply_when_durable(ack, reply);
                }
            }
            _ = hup.recv() => {
                // Read and validate off the packet loop; the result comes back below.
                let dir = loaded.config.policy.dir.clone();
                let tx = reload_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = tx.blocking_send(PolicyBundle::load(&dir));
                });
                reload_tokens(&loaded, &tokens);
                reload_certificate(&loaded, https.as_deref());
            }
            Some(loaded_bundle) = reload_rx.recv() => reload(&mut gw, loaded_bundle),
            _ = beat.tick() => {
                health.beat(Instant::now());
                health.audit_writable.store(!audit.blocked(), std::sync::atomic::Ordering::Relaxed);
                metrics.publish(snapshot(&gw, &dp.stats, &audit));
            }
            Some(()) = async { match stall.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                tracing::warn!("test hook: blocking the packet loop for 3 s");
                std::thread::sleep(Duration::from_secs(3));
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        flush(&mut gw, &mut dp, &audit, fail_closed, &metrics, false).await;
    }
    tracing::info!("shutting down");
    gw.handle_shutdown(Instant::now());
    flush(&mut gw, &mut dp, &audit, fail_closed, &metrics, false).await;
    log_stats(&snapshot(&gw, &dp.stats, &audit));
    // Write what is queued; give the uploader a moment; the rest stays in the spool.
    audit.shutdown(Duration::from_secs(5));
    Ok(())
}

/// Opens the identity store when an identity source (SCIM, the admin API) is configured.
fn open_identity(
    loaded: &Loaded,
) -> anyhow::Result<(
    Option<Arc<portcullis_identity::Identity>>,
    tokio::sync::mpsc::UnboundedReceiver<portcullis_identity::Apply>,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let c = &loaded.config;
    if c.scim.is_none()
        && c.admin.is_none()
        && c.api.is_none()
        && c.ldap.is_none()
        && c.devices.is_none()
    {
        return Ok((None, rx));
    }
    let (store, users, groups) = portcullis_identity::SqliteStore::open(&c.identity.database)?;
    let mut directory = portcullis_identity::Directory::from_records(users, groups);
    directory.set_reserved(c.users.iter().map(|u| u.name.clone()));
    for u in directory.users() {
        if c.users
            .iter()
            .any(|cu| cu.name.eq_ignore_ascii_case(&u.user_name))
        {
            tracing::warn!(user = %u.user_name, "a [[user]] in the configuration file shadows the identity store's user of the same name");
        }
    }
    tracing::info!(
        database = %c.identity.database.display(),
        users = directory.users().count(),
        groups = directory.groups().count(),
        "identity store opened"
    );
    let mut identity = portcullis_identity::Identity::new(directory, store, tx);
    if let Some(d) = &c.devices {
        identity = identity.with_devices(devices::policy(loaded, d))?;
    }
    Ok((Some(Arc::new(identity)), rx))
}

#[derive(Default)]
struct Tokens {
    scim: Option<Arc<std::sync::RwLock<portcullis_config::TokenSet>>>,
    admin: Option<Arc<std::sync::RwLock<portcullis_config::TokenSet>>>,
    api: Option<Arc<std::sync::Mutex<portcullis_apiauth::Verifier>>>,
    nonce_log: Option<Arc<std::sync::Mutex<nonces::NonceLog>>>,
}

/// Reads `[api] tokens_file`; errors name the file and where, never a secret.
fn load_api_tokens(loaded: &Loaded) -> anyhow::Result<Option<Vec<portcullis_apiauth::ApiToken>>> {
    let Some(api) = &loaded.config.api else {
        return Ok(None);
    };
    let file = api.tokens_file.display().to_string();
    let src = std::fs::read_to_string(&api.tokens_file).map_err(|e| {
        anyhow!(
            "{}: key `api.tokens_file`: cannot read {file}: {e}",
            loaded.path.display()
        )
    })?;
    Ok(Some(portcullis_apiauth::parse_tokens(&file, &src)?))
}

fn load_tokens(loaded: &Loaded) -> anyhow::Result<Tokens> {
    let c = &loaded.config;
    let (api, nonce_log) = match (load_api_tokens(loaded)?, &c.api) {
        (Some(t), Some(a)) => {
            // window_secs is range-checked (10..=3600).
            let window = chrono::TimeDelta::try_seconds(a.window_secs as i64)
                .unwrap_or(portcullis_apiauth::DEFAULT_WINDOW);
            let mut verifier = portcullis_apiauth::Verifier::new(t, window);
            let (log, records) = nonces::NonceLog::open(&a.nonce_file)?;
            verifier.restore(&records, chrono::Utc::now());
            tracing::info!(file = %a.nonce_file.display(), restored = verifier.nonces(), "api nonces restored");
            (
                Some(Arc::new(std::sync::Mutex::new(verifier))),
                Some(Arc::new(std::sync::Mutex::new(log))),
            )
        }
        _ => (None, None),
    };
    let load = |key: &str, file: &std::path::Path| -> anyhow::Result<_> {
        Ok(Arc::new(std::sync::RwLock::new(
            portcullis_config::TokenSet::load(&loaded.path, key, file)?,
        )))
    };
    Ok(Tokens {
        scim: c
            .scim
            .as_ref()
            .map(|s| load("scim.token_file", &s.token_file))
            .transpose()?,
        admin: c
            .admin
            .as_ref()
            .map(|a| load("admin.token_file", &a.token_file))
            .transpose()?,
        api,
        nonce_log,
    })
}

/// Re-reads the HTTPS certificate and key (renewal); a pair that fails to load keeps
/// the old one.
fn reload_certificate(
    loaded: &Loaded,
    slot: Option<&std::sync::RwLock<Arc<rustls::ServerConfig>>>,
) {
    let (Some(slot), Some(h)) = (slot, loaded.config.http.as_ref()) else {
        return;
    };
    let (Some(cert), Some(key)) = (&h.cert_file, &h.key_file) else {
        return;
    };
    match tls::server_config(cert, key) {
        Ok(config) => {
            if let Ok(mut w) = slot.write() {
                *w = config;
            }
            tracing::info!(cert = %cert.display(), "https certificate reloaded");
        }
        Err(e) => tracing::error!("https certificate not reloaded, the previous one stays: {e:#}"),
    }
}

/// Re-reads the token files (rotation); a file that fails to load keeps the old tokens.
fn reload_tokens(loaded: &Loaded, tokens: &Tokens) {
    let c = &loaded.config;
    let pairs = [
        (
            tokens.scim.as_ref(),
            c.scim.as_ref().map(|s| &s.token_file),
            "scim.token_file",
        ),
        (
            tokens.admin.as_ref(),
            c.admin.as_ref().map(|a| &a.token_file),
            "admin.token_file",
        ),
    ];
    if let Some(v) = &tokens.api {
        match load_api_tokens(loaded) {
            Ok(Some(t)) => {
                if let Ok(mut v) = v.lock() {
                    v.set_tokens(t);
                }
                tracing::info!(key = "api.tokens_file", "tokens reloaded");
            }
            Ok(None) => {}
            Err(e) => tracing::error!("api tokens not reloaded, the previous ones stay valid: {e}"),
        }
    }
    for (slot, file, key) in pairs {
        let (Some(slot), Some(file)) = (slot, file) else {
            continue;
        };
        match portcullis_config::TokenSet::load(&loaded.path, key, file) {
            Ok(set) => {
                if let Ok(mut w) = slot.write() {
                    *w = set;
                }
                tracing::info!(key, "tokens reloaded");
            }
            Err(e) => tracing::error!("tokens not reloaded, the previous ones stay valid: {e}"),
        }
    }
}

/// An answer held until the events the command caused are durable (audit before
/// answer); it is told whether they are.
type Reply = Box<dyn FnOnce(bool) + Send>;

/// Runs one admin command on the loop; commands that changed something return their
/// answer, to be sent once their events are durable.
fn admin(
    gw: &mut Gateway,
    loaded: &Loaded,
    identity: Option<&portcullis_identity::Identity>,
    cmd: http::AdminCommand,
) -> Option<Reply> {
    use http::AdminCommand;
    match cmd {
        AdminCommand::Sessions(tx) => {
            let _ = tx.send(gw.sessions());
            None
        }
        AdminCommand::KillSession(id, tx) => {
            let killed = gw.handle_session_kill(Instant::now(), id, "killed by admin");
            if killed {
                tracing::info!(session = id, "admin: session killed");
            }
            Some(Box::new(move |_| {
                let _ = tx.send(killed);
            }))
        }
        AdminCommand::Users(tx) => {
            let sessions = gw.sessions();
            let rows = gw
                .enforcer()
                .engine()
                .users()
                .map(|p| {
                    let in_config = loaded.config.users.iter().any(|u| u.name == p.name);
                    let source = if in_config {
                        "config".to_string()
                    } else {
                        identity
                            .and_then(|i| {
                                i.read(|d| d.user_by_name(&p.name).map(|u| u.source.clone()))
                            })
                            .unwrap_or_default()
                    };
                    http::UserRow {
                        name: p.name.clone(),
                        source,
                        active: true,
                        groups: p.groups.clone(),
                        tags: p.tags.clone(),
                        devices: gw
                            .peers()
                            .filter(|(u, _, _)| *u == p.name)
                            .map(|(_, d, _)| d.to_string())
                            .collect(),
                        sessions: sessions.iter().filter(|s| s.user == p.name).count(),
                    }
                })
                .collect();
            let _ = tx.send(rows);
            None
        }
        AdminCommand::DisableConfigUser {
            name,
            actor,
            requested,
            requested_at,
            done,
        } => {
            let known = gw.enforcer().engine().user(&name).is_some();
            if known {
                let r = gw.handle_identity_change(
                    Instant::now(),
                    portcullis_model::IdentityChange::revoked(actor, name.clone()),
                    requested,
                    requested_at,
                );
                if let Err(e) = r {
                    tracing::error!(user = %name, "admin disable: {e}");
                }
                tracing::info!(user = %name, "admin: user disabled");
            }
            Some(Box::new(move |_| {
                let _ = done.send(known);
            }))
        }
        AdminCommand::Report(event, durable) => {
            gw.handle_report(event);
            durable.map(|tx| -> Reply {
                Box::new(move |ok| {
                    let _ = tx.send(ok);
                })
            })
        }
        AdminCommand::Policy(tx) => {
            let _ = tx.send(gw.enforcer().engine().bundle().clone());
            None
        }
        AdminCommand::Access(user, tx) => {
            let engine = gw.enforcer().engine();
            let groups = engine
                .user(&user)
                .map(|p| p.groups.clone())
                .unwrap_or_default();
            let _ = tx.send((engine.bundle().clone(), groups));
            None
        }
        AdminCommand::ApplyPolicy(bundle, done) => {
            let applied = apply_bundle(gw, bundle, "replaced through the api");
            Some(Box::new(move |_| {
                let _ = done.send(applied);
            }))
        }
    }
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
            },
        }),
        _ => None,
    };
    Ok(PipelineConfig {
        gateway: c.gateway.id.clone(),
        events_file: a.events_file.clone(),
        spool,
        queue: 65_536,
        commit_interval: Duration::from_millis(a.commit_interval_ms),
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
        url: ch.url.clone(),
        database: ch.database.clone(),
        user: ch.user.clone(),
        password,
    }))
}

/// Applies a validated bundle (`how` it came, for the log); a set the core refuses is
/// recorded and the running one stays. Flows cut, or why it was refused.
fn apply_bundle(gw: &mut Gateway, bundle: Arc<PolicyBundle>, how: &str) -> Result<usize, String> {
    let dir = bundle.dir.clone();
    match gw.handle_policy_bundle(Instant::now(), bundle) {
        Ok(cut) => {
            tracing::info!(dir = %dir.display(), flows_cut = cut, "policy {how}");
            Ok(cut)
        }
        Err(e) => {
            tracing::error!("policy not {how}, the running one stays: {e}");
            gw.handle_policy_rejected(vec![e.to_string()]);
            Err(e.to_string())
        }
    }
}

/// Applies a reloaded policy directory; a rejected set leaves the running one in force.
fn reload(gw: &mut Gateway, loaded: Result<PolicyBundle, portcullis_policy::LoadError>) {
    match loaded {
        Ok(bundle) => {
            let _ = apply_bundle(gw, Arc::new(bundle), "reloaded");
        }
        Err(e) => {
            tracing::error!("policy reload rejected, previous policy stays in force:\n{e}");
            gw.handle_policy_rejected(e.errors.iter().map(|e| e.to_string()).collect());
        }
    }
}

/// Sends what the core queued (datagrams, TUN packets, events). With `durable`, the
/// last event goes in with a durability receiver: the writer commits in order, so once it
/// answers every event of this flush is durable (None: there was no event).
async fn flush(
    gw: &mut Gateway,
    dp: &mut Datapath,
    audit: &Pipeline,
    fail_closed: bool,
    metrics: &metrics::Metrics,
    durable: bool,
) -> Option<tokio::sync::oneshot::Receiver<bool>> {
    let mut ack = None;
    while let Some(t) = gw.poll_transmit() {
        dp.send_datagram(t.dst, &t.payload).await;
    }
    while let Some(p) = gw.poll_tun_packet() {
        dp.write_tun_packet(&p).await;
    }
    // Read the clock only in iterations that have events (most carry only packets).
    let mut now = None;
    let mut pending = gw.poll_event();
    while let Some(e) = pending.take() {
        if let portcullis_model::Event::UserRevoked { latency_us, .. } = &e {
            metrics
                .revocation_latency
                .observe(*latency_us as f64 / 1_000_000.0);
        }
        let time = *now.get_or_insert_with(chrono::Utc::now);
        pending = gw.poll_event();
        if durable && pending.is_none() {
            ack = Some(audit.submit_durable(e, time));
        } else {
            audit.submit(e, time);
        }
    }
    let blocked = fail_closed && audit.blocked();
    if blocked != gw.enforcer().audit_blocked() {
        if blocked {
            tracing::error!("audit trail cannot take events: denying new flows until it can");
        } else {
            tracing::warn!("audit trail writable again: new flows are decided by policy");
        }
        gw.handle_audit_blocked(blocked);
    }
    ack
}

/// Runs `reply` once `ack` says the events before it are durable (true), refused
/// (false), or at once when nothing was recorded. The packet loop does not wait: the
/// reply waits in a task of its own.
fn reply_when_durable(
    ack: Option<tokio::sync::oneshot::Receiver<bool>>,
    reply: impl FnOnce(bool) + Send + 'static,
) {
    match ack {
        None => reply(true),
        Some(rx) => {
            tokio::spawn(async move {
                let durable = rx.await.unwrap_or(false);
                if !durable {
                    tracing::error!(
                        "a control-plane event could not be recorded before its answer"
                    );
                }
                reply(durable);
            });
        }
    }
}

/// The packet loop's numbers for `/metrics`.
fn snapshot(gw: &Gateway, dp: &DatapathStats, audit: &Pipeline) -> metrics::Snapshot {
    let a = audit.stats();
    let r = std::sync::atomic::Ordering::Relaxed;
    metrics::Snapshot {
        enforce: gw.enforcer().stats,
        wireguard: gw.stats,
        datapath: *dp,
        audit_written: a.written.load(r),
        audit_refused: a.refused.load(r),
        audit_uploaded: a.uploaded.load(r),
        audit_upload_batches: a.batches.load(r),
        audit_upload_errors: a.upload_errors.load(r),
        audit_backlog: a.backlog.load(r),
        audit_lag_ms: a.lag_ms.load(r),
        audit_spool_bytes: a.spool_bytes.load(r),
        sessions: gw.session_count() as u64,
        flows: gw.enforcer().flows().len() as u64,
        peers: gw.peers().count() as u64,
    }
}

/// The counters in the log (every minute and at shutdown): the numbers `/metrics` gets.
fn log_stats(s: &metrics::Snapshot) {
    let (e, w, dp) = (&s.enforce, &s.wireguard, &s.datapath);
    tracing::info!(
        flows = s.flows,
        forwarded_out = e.forwarded_out,
        forwarded_in = e.forwarded_in,
        denied = e.denied,
        policy_errors = e.policy_errors,
        spoofed = e.spoofed,
        malformed = e.malformed,
        fragments_dropped = e.fragments_dropped,
        inbound_no_flow = e.inbound_no_flow,
        inbound_multicast = e.inbound_multicast,
        flows_opened = e.flows_opened,
        flows_evicted = e.flows_evicted,
        flows_revoked = e.flows_revoked,
        datagrams = w.datagrams,
        malformed_datagrams = w.malformed_datagrams,
        unknown_peer = w.unknown_peer,
        wg_errors = w.wg_errors,
        handshakes = w.handshakes,
        cookie_replies = w.cookie_replies,
        udp_batches = dp.udp_batches,
        udp_datagrams = dp.udp_datagrams,
        udp_sends = dp.udp_sends,
        tun_reads = dp.tun_reads,
        tun_writes = dp.tun_writes,
        send_errors = dp.send_errors,
        audit_written = s.audit_written,
        audit_refused = s.audit_refused,
        audit_uploaded = s.audit_uploaded,
        audit_batches = s.audit_upload_batches,
        audit_upload_errors = s.audit_upload_errors,
        audit_backlog = s.audit_backlog,
        audit_lag_ms = s.audit_lag_ms,
        audit_spool_bytes = s.audit_spool_bytes,
        "counters"
    );
}
