//! `portcullis gateway`: the two programs of the gateway started side by side. The
//! control plane (`portcullis-http`: HTTP, SCIM, SSO, LDAP, the identity store) runs on a
//! thread of its own; the data plane (`portcullis-io`: the packet loop) runs on this one.
//! They meet at `portcullis-control`'s two bounded channels and nowhere else.

use std::sync::Arc;

use anyhow::anyhow;
use portcullis_config::Loaded;
use portcullis_policy::PolicyBundle;

/// Runs the gateway until SIGINT or SIGTERM.
pub async fn run(loaded: Loaded) -> anyhow::Result<()> {
    let loaded = Arc::new(loaded);
    let c = &loaded.config;
    portcullis_http::adopt_cluster_policy(&loaded)?;
    let bundle = PolicyBundle::load(&c.policy.dir)
        .map_err(|e| anyhow!("policy directory {} rejected:\n{e}", c.policy.dir.display()))?;
    for w in &bundle.warnings {
        tracing::warn!("{w}");
    }
    if let Some(cl) = c.cluster.as_ref().filter(|cl| !cl.sites.is_empty()) {
        for n in bundle.networks().iter() {
            if let Some(site) = n
                .site
                .as_deref()
                .filter(|s| !cl.sites.iter().any(|c| c.name == *s))
            {
                tracing::warn!(network = %n.name, site, "the network names a site that is not one of [[cluster.sites]]: no node serves it");
            }
        }
    }
    for g in bundle.unknown_groups(
        c.users
            .iter()
            .flat_map(|u| u.groups.iter().map(String::as_str)),
    ) {
        tracing::warn!(group = %g, "policies name a group no configured user has (a typo, or provided by an identity source?)");
    }
    let bundle = Arc::new(bundle);
    let (control, data) = portcullis_control::channels();
    let identity = portcullis_http::open_identity(&loaded, control.commands.clone())?;
    let mut startup = portcullis_io::Startup::default();
    if let Some(identity) = &identity {
        startup.directory_users = identity.read(|d| d.principals());
        let stored = portcullis_http::devices::stored(identity).await?;
        startup.peers = stored.peers;
        startup.reports = stored.expired;
    }
    // Read once (the ClickHouse password file among it) for the pipeline and the
    // auditor routes.
    let mut audit_config = portcullis_io::pipeline_config(&loaded)?;
    let store = audit_config.spool.as_ref().map(|s| s.upload.store.clone());
    // In a cluster one node at a time applies audit retention: the control plane holds
    // the lease, the uploader reads this flag.
    let retention_lease = match (&c.cluster, audit_config.spool.as_mut()) {
        (Some(_), Some(s)) if s.upload.retention.is_some() => {
            let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
            s.upload.retention_lease = Some(held.clone());
            Some(held)
        }
        _ => None,
    };
    portcullis_http::start(
        loaded.clone(),
        bundle.clone(),
        identity,
        store,
        control,
        retention_lease,
    )?;
    portcullis_io::run(loaded.clone(), bundle, startup, audit_config, data).await?;
    // A clean exit (sessions ended in the trail): marked stopped, not repaired as dead.
    // A run that failed is left to the repair like a crash.
    if let Err(e) = portcullis_http::leave_cluster(&loaded) {
        tracing::warn!("{e:#}");
    }
    Ok(())
}

/// `portcullis check-config`: loads everything the gateway loads at start, without
/// binding or creating anything, so that "ok" means the gateway will start (as far as
/// files can tell). Errors name the key and the file.
pub fn check(loaded: &Loaded) -> anyhow::Result<()> {
    let c = &loaded.config;
    PolicyBundle::load(&c.policy.dir)
        .map_err(|e| anyhow!("policy directory {}:\n{e}", c.policy.dir.display()))?;
    portcullis_io::pipeline_config(loaded)?;
    if let Some(a) = &c.audit.api {
        portcullis_config::read_secret(&loaded.path, "audit.api.token_file", &a.token_file)?;
    }
    if let Some(f) = c.cluster.as_ref().and_then(|c| c.password_file.as_ref()) {
        portcullis_config::read_secret(&loaded.path, "cluster.password_file", f)?;
    }
    portcullis_http::check(loaded)
}
