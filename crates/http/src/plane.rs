//! Starting the control plane: what it loads (and refuses with a clear error before
//! anything runs), then its thread.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use portcullis_config::Loaded;
use portcullis_control::{Command, ControlSide};
use portcullis_policy::PolicyBundle;
use tokio::sync::mpsc;

use crate::{admin, devices, health, metrics, nonces, serve, sso, tls};

/// Checks what the control plane loads at start, without binding anything: the part of
/// `portcullis check-config` that is the control plane's. Errors name the key and file.
pub fn check(loaded: &Loaded) -> anyhow::Result<()> {
    let c = &loaded.config;
    check_site_key(loaded)?;
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
    if let Some(h) = &c.http {
        if let (Some(cert), Some(key)) = (&h.cert_file, &h.key_file) {
            tls::server_config(cert, key).context("[http] cert_file/key_file")?;
        }
    }
    if let Some(l) = &c.ldap {
        portcullis_ldap_sync::read_password(l)?;
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

/// With sites, this node's private key must be its site's: clients of the site know the
/// site's public key, and any node of the site must answer them.
pub fn check_site_key(loaded: &Loaded) -> anyhow::Result<()> {
    let Some(cl) = &loaded.config.cluster else {
        return Ok(());
    };
    let Some((i, site)) = cl
        .sites
        .iter()
        .enumerate()
        .find(|(_, s)| Some(s.name.as_str()) == cl.site())
    else {
        return Ok(());
    };
    let ours = boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(
        loaded.private_key.0,
    ))
    .to_bytes();
    let theirs = portcullis_config::decode_key(&site.public_key).map_err(|r| {
        anyhow!(
            "{}: key `cluster.sites[{i}].public_key`: {r}",
            loaded.path.display()
        )
    })?;
    if ours != theirs {
        return Err(anyhow!(
            "{}: key `cluster.sites[{i}].public_key`: is not the public key of gateway.private_key_file; every node of site {:?} needs that site's private key",
            loaded.path.display(),
            site.name
        ));
    }
    Ok(())
}

/// Starts the control plane on a thread and runtime of its own and returns once it is
/// serving (or why it could not start). `store` is `[audit.clickhouse]` for the
/// auditor's routes; `retention_lease`, in a cluster, is set while this node holds the
/// audit retention lease.
pub fn start(
    loaded: Arc<Loaded>,
    bundle: Arc<PolicyBundle>,
    identity: Option<Arc<portcullis_identity::Identity>>,
    store: Option<portcullis_audit::StoreConfig>,
    control: ControlSide,
    retention_lease: Option<Arc<AtomicBool>>,
    checkpoints: Option<std::sync::mpsc::Receiver<portcullis_audit::checkpoint::SignedCheckpoint>>,
) -> anyhow::Result<Option<SocketAddr>> {
    let c = &loaded.config;
    // Everything that reads a file or binds is done here, so a mistake stops the start
    // with its file and key named.
    check_site_key(&loaded)?;
    let tokens = load_tokens(&loaded)?;
    let ldap_setup = match (&c.ldap, &identity) {
        (Some(l), Some(_)) => Some((
            portcullis_ldap_sync::read_password(l)?,
            l.url
                .starts_with("ldaps://")
                .then(|| tls::client_config(l.ca_file.as_deref()))
                .transpose()
                .context("[ldap] tls")?,
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
    let listener = match &c.http {
        Some(h) => {
            let l = std::net::TcpListener::bind(h.listen)
                .with_context(|| format!("binding [http] listen {}", h.listen))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let local = listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let profile = c
        .devices
        .as_ref()
        .map(|d| Arc::new(devices::profile_settings(&loaded, d, &bundle)));
    let (started_tx, started_rx) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
    std::thread::Builder::new()
        .name("control-plane".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx.send(Err(anyhow!("control-plane runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let plane = Plane {
                    loaded,
                    identity,
                    tokens,
                    https,
                    profile,
                    store,
                    control,
                    retention_lease,
                    checkpoints,
                };
                plane.run(listener, ldap_setup, started_tx).await;
            });
        })
        .context("starting the control-plane thread")?;
    started_rx
        .recv()
        .map_err(|_| anyhow!("the control plane stopped while starting"))??;
    Ok(local)
}

type LdapSetup = (Option<Arc<str>>, Option<Arc<rustls::ClientConfig>>);

/// The control plane's state on its thread.
struct Plane {
    loaded: Arc<Loaded>,
    identity: Option<Arc<portcullis_identity::Identity>>,
    tokens: Tokens,
    https: Option<Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>>,
    profile: Option<Arc<portcullis_identity::ProfileSettings>>,
    store: Option<portcullis_audit::StoreConfig>,
    control: ControlSide,
    retention_lease: Option<Arc<AtomicBool>>,
    /// In a cluster: the audit writer's signed checkpoints, copied into the database.
    checkpoints: Option<std::sync::mpsc::Receiver<portcullis_audit::checkpoint::SignedCheckpoint>>,
}

impl Plane {
    async fn run(
        self,
        listener: Option<std::net::TcpListener>,
        ldap_setup: Option<LdapSetup>,
        started: std::sync::mpsc::SyncSender<anyhow::Result<()>>,
    ) {
        let Plane {
            loaded,
            identity,
            tokens,
            https,
            profile,
            store,
            control,
            retention_lease,
            checkpoints,
        } = self;
        let ControlSide {
            commands,
            mut status,
        } = control;
        let c = &loaded.config;
        // The heartbeat reports what the status reader last saw.
        let numbers = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        // Dead nodes (this one's previous run among them) to record in the trail.
        let mut repairs = None;
        let cluster = match (&c.cluster, &identity) {
            (Some(cl), Some(identity)) => match cluster_target(&loaded, cl) {
                Ok(target) => {
                    let seen = numbers.clone();
                    let (repairs_tx, repairs_rx) = mpsc::unbounded_channel();
                    repairs = Some((repairs_tx.clone(), repairs_rx));
                    portcullis_cluster::node::spawn(
                        target.clone(),
                        portcullis_cluster::node::NodeInfo {
                            node_id: cl.node_id.clone(),
                            address: c.gateway.listen.to_string(),
                            version: env!("CARGO_PKG_VERSION").to_string(),
                        },
                        identity.clone(),
                        move || {
                            (
                                seen.0.load(Ordering::Relaxed),
                                seen.1.load(Ordering::Relaxed),
                            )
                        },
                        repairs_tx,
                    );
                    let running = portcullis_policy::Sources::read(&c.policy.dir)
                        .map(|s| crate::policy_api::PolicyFiles::from_sources(&s).version())
                        .unwrap_or_default();
                    let policy = Arc::new(crate::policy_cluster::ClusterPolicy::new(
                        target.clone(),
                        &cl.node_id,
                        running,
                    ));
                    let (tx, rx) = mpsc::unbounded_channel();
                    identity.forward_other(tx);
                    tokio::spawn(crate::policy_cluster::follow(
                        policy.clone(),
                        c.policy.dir.clone(),
                        commands.clone(),
                        rx,
                    ));
                    Some((
                        policy,
                        Arc::new(portcullis_cluster::shared::Shared::new(target)),
                    ))
                }
                Err(e) => {
                    let _ = started.send(Err(e));
                    return;
                }
            },
            _ => None,
        };
        // Once-per-cluster work runs where its lease is held.
        let lease = |name: &'static str| {
            cluster
                .as_ref()
                .zip(c.cluster.as_ref())
                .map(|((_, shared), cl)| {
                    portcullis_cluster::lease::spawn(
                        shared.target().clone(),
                        name,
                        cl.node_id.clone(),
                    )
                })
        };
        let ldap = match (&c.ldap, &identity, ldap_setup) {
            (Some(l), Some(identity), Some((password, tls))) => Some(portcullis_ldap_sync::spawn(
                l.clone(),
                password,
                tls,
                identity.clone(),
                commands.clone(),
                lease(portcullis_cluster::lease::LDAP).zip(cluster.as_ref().map(|(_, shared)| {
                    Arc::new(crate::cluster_work::ClusterMirror::new(
                        shared.target().clone(),
                    )) as Arc<dyn portcullis_ldap_sync::MirrorStore>
                })),
            )),
            _ => None,
        };
        if let (Some((_, shared)), Some(repairs)) = (&cluster, repairs) {
            if let Some(held) = lease(portcullis_cluster::lease::NODE_REPAIR) {
                portcullis_cluster::node::spawn_repair(
                    shared.target().clone(),
                    held,
                    repairs.0.clone(),
                );
            }
            tokio::spawn(crate::cluster_work::record_repairs(
                repairs.1,
                shared.clone(),
                commands.clone(),
            ));
        }
        if let (Some((_, shared)), Some(rx)) = (&cluster, checkpoints) {
            crate::cluster_work::copy_checkpoints(rx, shared.clone());
        }
        if let (Some(flag), Some(mut held)) = (
            retention_lease,
            lease(portcullis_cluster::lease::AUDIT_RETENTION),
        ) {
            // The uploader runs on its own thread: it reads the lease as a flag.
            tokio::spawn(async move {
                loop {
                    flag.store(*held.borrow_and_update(), Ordering::Relaxed);
                    if held.changed().await.is_err() {
                        flag.store(false, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
        let access = match &identity {
            Some(identity) => {
                let follow = cluster.as_ref().map(|_| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    identity.forward_other(tx);
                    rx
                });
                match crate::access::AccessService::start(identity.clone(), commands.clone()).await
                {
                    Ok(a) => {
                        if let Some(rx) = follow {
                            tokio::spawn(a.clone().follow(rx));
                        }
                        a.clone()
                            .spawn_expiry(lease(portcullis_cluster::lease::ACCESS_EXPIRY));
                        Some(a)
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                }
            }
            None => None,
        };
        if let Some(identity) = identity.as_ref().filter(|i| i.device_policy().is_some()) {
            devices::spawn_expiry(
                identity.clone(),
                lease(portcullis_cluster::lease::DEVICE_EXPIRY),
            );
        }
        let health = health::Health::new();
        let metrics = metrics::Metrics::new();
        if let (Some(h), Some(listener)) = (&c.http, listener) {
            // Only with a metadata URL is there anything to fetch once for all.
            let metadata_lease = c
                .saml
                .as_ref()
                .filter(|s| s.idp_metadata_is_url())
                .and_then(|_| lease(portcullis_cluster::lease::SAML_METADATA));
            let app = match routes(
                &loaded,
                h,
                &identity,
                &tokens,
                &profile,
                ldap,
                store,
                cluster,
                &commands,
                metadata_lease,
                access,
                metrics.clone(),
            )
            .await
            {
                Ok(app) => app,
                Err(e) => {
                    let _ = started.send(Err(e));
                    return;
                }
            };
            let app = app
                .merge(health::routes(health.clone()))
                .merge(metrics::routes(metrics.clone()));
            let limits = serve::Limits {
                max_connections: h.max_connections,
                max_connections_per_address: h.max_connections_per_address,
                header_timeout: Duration::from_secs(h.header_timeout_secs),
                idle_timeout: Duration::from_secs(h.idle_timeout_secs),
            }
            .fitted();
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    let _ = started.send(Err(anyhow!("[http] listener: {e}")));
                    return;
                }
            };
            tracing::info!(listen = %h.listen, tls = https.is_some(), scim = tokens.scim.is_some(), admin = tokens.admin.is_some(), api = tokens.api.is_some(), "http up");
            let tls_config = https.clone();
            tokio::spawn(async move {
                match tls_config {
                    Some(config) => tls::serve_tls(listener, config, app, limits).await,
                    None => serve::serve_plain(listener, app, limits).await,
                }
            });
        }
        drop(commands);
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                let _ = started.send(Err(anyhow!("control plane: SIGHUP handler: {e}")));
                return;
            }
        };
        let _ = started.send(Ok(()));
        loop {
            tokio::select! {
                s = status.recv() => match s {
                    Some(s) => {
                        numbers.0.store(s.snapshot.sessions, Ordering::Relaxed);
                        numbers.1.store(s.snapshot.flows, Ordering::Relaxed);
                        health.update(s.at, s.ready);
                        metrics.publish(s.snapshot);
                    }
                    // The packet loop is gone: the process is stopping.
                    None => break,
                },
                _ = hup.recv() => {
                    reload_tokens(&loaded, &tokens);
                    reload_certificate(&loaded, https.as_deref());
                }
            }
        }
    }
}

/// Every route of the `[http]` listener except health and metrics.
#[allow(clippy::too_many_arguments)]
async fn routes(
    loaded: &Loaded,
    h: &portcullis_config::HttpConfig,
    identity: &Option<Arc<portcullis_identity::Identity>>,
    tokens: &Tokens,
    profile: &Option<Arc<portcullis_identity::ProfileSettings>>,
    ldap: Option<portcullis_ldap_sync::LdapHandle>,
    store: Option<portcullis_audit::StoreConfig>,
    cluster: Option<(
        Arc<crate::policy_cluster::ClusterPolicy>,
        Arc<portcullis_cluster::shared::Shared>,
    )>,
    commands: &mpsc::Sender<Command>,
    metadata_lease: Option<tokio::sync::watch::Receiver<bool>>,
    access: Option<Arc<crate::access::AccessService>>,
    metrics: Arc<metrics::Metrics>,
) -> anyhow::Result<axum::Router> {
    let c = &loaded.config;
    let mut app = axum::Router::new();
    let mut console_sso = None;
    if let (Some(saml), Some(identity), Some(profile)) = (&c.saml, identity, profile) {
        let sso = sso::Sso::start(
            loaded,
            saml,
            identity.clone(),
            profile.clone(),
            commands.clone(),
            cluster.as_ref().map(|(_, s)| s.clone()),
            metadata_lease,
            access.clone(),
        )
        .await?;
        console_sso = Some(sso.clone());
        app = app.merge(sso::routes(sso));
    }
    // When SCIM last answered a call (Unix seconds; 0: never), for the console.
    let scim_last_call = Arc::new(std::sync::atomic::AtomicI64::new(0));
    if let (Some(identity), Some(t)) = (identity, &tokens.scim) {
        let last = scim_last_call.clone();
        app = app.merge(
            portcullis_scim::router(portcullis_scim::ScimState {
                identity: identity.clone(),
                tokens: t.clone(),
            })
            .layer(axum::middleware::from_fn(
                move |req: axum::extract::Request, next: axum::middleware::Next| {
                    let last = last.clone();
                    async move {
                        let r = next.run(req).await;
                        if r.status().is_success() {
                            last.store(
                                chrono::Utc::now().timestamp(),
                                std::sync::atomic::Ordering::Relaxed,
                            );
                        }
                        r
                    }
                },
            )),
        );
    }
    let console_links = match (&c.console, &c.saml) {
        (Some(_), Some(saml)) => Some(crate::console::Links::new(
            saml.base(),
            cluster.as_ref().map(|(_, s)| s.clone()),
        )),
        _ => None,
    };
    if tokens.admin.is_some() || tokens.api.is_some() || c.console.is_some() {
        let routers = admin::admin_router(admin::AdminApi {
            console_links: console_links.clone(),
            tokens: tokens.admin.clone(),
            api: tokens.api.clone(),
            nonce_log: tokens.nonce_log.clone(),
            identity: identity.clone(),
            commands: commands.clone(),
            ldap,
            profile: profile.clone(),
            max_body_bytes: h.max_body_bytes,
            policy_dir: c.policy.dir.clone(),
            profile_scope: devices::ProfileScope::new(loaded),
            store: store.map(|s| Arc::new(portcullis_auditor::http::StoreHandle::lazy(s))),
            shared: cluster.as_ref().map(|(_, s)| s.clone()),
            cluster_policy: cluster.map(|(p, _)| p),
            access,
        });
        app = app.merge(routers.public);
        match (&c.console, console_sso) {
            (Some(cc), Some(sso)) => {
                let parts = crate::console::Parts {
                    sso,
                    api: routers.console,
                    commands: commands.clone(),
                    policy_dir: c.policy.dir.clone(),
                    metrics,
                    links: console_links
                        .clone()
                        .ok_or_else(|| anyhow::anyhow!("[console] needs [saml]"))?,
                    scim_last_call: tokens.scim.as_ref().map(|_| scim_last_call.clone()),
                    sites: devices::ProfileScope::new(loaded).site_names(),
                };
                app = app.merge(crate::console::routes(crate::console::Console::new(
                    cc, parts,
                )));
            }
            (Some(_), None) => {
                anyhow::bail!(
                    "{}: [console] needs [saml] with an identity store",
                    loaded.path.display()
                )
            }
            _ => {}
        }
    }
    // Bearer failures are limited per address on SCIM and /admin/v1 (the signed API
    // limits its own); the body cap applies to every route.
    Ok(app
        .layer(axum::middleware::from_fn_with_state(
            serve::BearerFailures::default(),
            serve::limit_bearer_failures,
        ))
        .layer(axum::middleware::from_fn(serve::json_errors))
        .layer(axum::extract::DefaultBodyLimit::max(h.max_body_bytes)))
}

/// Opens the identity store when an identity source (SCIM, the admin API) is configured.
pub fn open_identity(
    loaded: &Loaded,
    commands: mpsc::Sender<Command>,
) -> anyhow::Result<Option<Arc<portcullis_identity::Identity>>> {
    let c = &loaded.config;
    if c.scim.is_none()
        && c.admin.is_none()
        && c.api.is_none()
        && c.ldap.is_none()
        && c.devices.is_none()
        && c.cluster.is_none()
    {
        return Ok(None);
    }
    let (store, users, groups, applied): (Box<dyn portcullis_identity::Store>, _, _, _) =
        match &c.cluster {
            Some(cl) => {
                let target = cluster_target(loaded, cl)?;
                let snapshot = read_snapshot(&target).with_context(|| {
                    format!(
                        "cluster.database_url {}: a node reads the shared directory at start",
                        portcullis_config::redact_url(&cl.database_url)
                    )
                })?;
                let store = portcullis_cluster::ClusterStore::new(target, &cl.node_id, &snapshot);
                (
                    Box::new(store),
                    snapshot.users,
                    snapshot.groups,
                    snapshot.number,
                )
            }
            None => {
                let (store, users, groups) =
                    portcullis_identity::SqliteStore::open(&c.identity.database)?;
                (
                    Box::new(portcullis_identity::SqliteBackend::new(store)),
                    users,
                    groups,
                    0,
                )
            }
        };
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
    match &c.cluster {
        Some(cl) => tracing::info!(
            node = %cl.node_id,
            change = applied,
            users = directory.users().count(),
            groups = directory.groups().count(),
            "shared directory read"
        ),
        None => tracing::info!(
            database = %c.identity.database.display(),
            users = directory.users().count(),
            groups = directory.groups().count(),
            "identity store opened"
        ),
    }
    let mut identity =
        portcullis_identity::Identity::with_store(directory, store, commands).starting_at(applied);
    if let Some(d) = &c.devices {
        identity = identity.with_devices(devices::policy(loaded, d))?;
    }
    if let Some(cl) = &c.cluster {
        identity = identity.with_pending(portcullis_identity::pending::PendingFile::open(
            &cl.pending_file,
        )?);
    }
    Ok(Some(Arc::new(identity)))
}

/// With `[cluster]`, before the policy set is loaded: the node's `[policy] dir` becomes
/// the cluster's set (the first node seeds the cluster with its own).
pub fn adopt_cluster_policy(loaded: &Loaded) -> anyhow::Result<()> {
    let Some(cl) = &loaded.config.cluster else {
        return Ok(());
    };
    let target = cluster_target(loaded, cl)?;
    crate::policy_cluster::adopt(&target, &cl.node_id, &loaded.config.policy.dir).with_context(
        || {
            format!(
                "cluster.database_url {}: adopting the cluster's policy set",
                portcullis_config::redact_url(&cl.database_url)
            )
        },
    )?;
    Ok(())
}

/// With `[cluster]`, after the data plane stopped (its sessions ended in the trail):
/// marks this node stopped, so nobody records it as dead. Bounded: a database that does
/// not answer leaves the node "down", and it is repaired as if it had died.
pub fn leave_cluster(loaded: &Loaded) -> anyhow::Result<()> {
    let Some(cl) = &loaded.config.cluster else {
        return Ok(());
    };
    let target = cluster_target(loaded, cl)?;
    let node_id = cl.node_id.clone();
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(portcullis_cluster::node::leave(
                    &target,
                    &node_id,
                    Duration::from_secs(3),
                ));
                Ok(())
            })
            .join()
            .map_err(|_| anyhow!("leaving the cluster: the thread panicked"))?
    })
}

/// `[cluster]`'s database, with the password from `password_file`.
pub fn cluster_target(
    loaded: &Loaded,
    cl: &portcullis_config::ClusterConfig,
) -> anyhow::Result<portcullis_cluster::Target> {
    let password = match &cl.password_file {
        Some(f) => {
            Some(portcullis_config::read_secret(&loaded.path, "cluster.password_file", f)?.0)
        }
        None => None,
    };
    Ok(portcullis_cluster::Target {
        url: cl.database_url.clone(),
        password,
    })
}

/// Reads the shared directory on a runtime of its own (the caller may be on the data
/// plane's): the connection ends with it; the control plane connects its own later.
fn read_snapshot(
    target: &portcullis_cluster::Target,
) -> anyhow::Result<portcullis_cluster::Snapshot> {
    let target = target.clone();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let mut client = target.connect().await?;
                    portcullis_cluster::schema::require_current(&client).await?;
                    Ok(portcullis_cluster::snapshot(&mut client).await?)
                })
            })
            .join()
            .map_err(|_| anyhow!("reading the shared directory: the thread panicked"))?
    })
}

#[derive(Default)]
struct Tokens {
    scim: Option<Arc<std::sync::RwLock<portcullis_config::TokenSet>>>,
    admin: Option<Arc<std::sync::RwLock<portcullis_config::TokenSet>>>,
    api: Option<Arc<std::sync::Mutex<portcullis_apiauth::Verifier>>>,
    nonce_log: Option<Arc<std::sync::Mutex<nonces::NonceLog>>>,
}

/// Reads `[api] tokens_file`; errors name the file and where, never a secret.
pub fn load_api_tokens(
    loaded: &Loaded,
) -> anyhow::Result<Option<Vec<portcullis_apiauth::ApiToken>>> {
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
