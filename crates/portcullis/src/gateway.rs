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
    // Not fatal at start: the set is the cluster's (PUT /policies refuses such a site);
    // a node must still start and serve the rest. No node serves such a network.
    for e in unknown_sites(c, &bundle) {
        tracing::warn!("{e}");
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
        startup.grants = portcullis_http::access::stored_grants(identity).await?;
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
    // In a cluster the signed checkpoints are also kept in the database.
    let checkpoints = match (&c.cluster, audit_config.checkpoints.as_mut()) {
        (Some(_), Some(cp)) => {
            let (tx, rx) = std::sync::mpsc::sync_channel(64);
            cp.sink = Some(tx);
            Some(rx)
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
        checkpoints,
    )?;
    portcullis_io::run(loaded.clone(), bundle, startup, audit_config, data).await?;
    // A clean exit (sessions ended in the trail): marked stopped, not repaired as dead.
    // A run that failed is left to the repair like a crash.
    if let Err(e) = portcullis_http::leave_cluster(&loaded) {
        tracing::warn!("{e:#}");
    }
    Ok(())
}

/// The networks naming a site that is not in `[[cluster.sites]]` (when there are sites).
pub(crate) fn unknown_sites(
    c: &portcullis_config::Config,
    bundle: &PolicyBundle,
) -> Vec<portcullis_policy::SourceError> {
    match c.cluster.as_ref().filter(|cl| !cl.sites.is_empty()) {
        Some(cl) => {
            let known: Vec<&str> = cl.sites.iter().map(|s| s.name.as_str()).collect();
            bundle.networks().unknown_sites(&known)
        }
        None => Vec::new(),
    }
}

/// `portcullis check-config`: loads everything the gateway loads at start, without
/// binding or creating anything, so that "ok" means the gateway will start (as far as
/// files can tell). Errors name the key and the file.
pub fn check(loaded: &Loaded) -> anyhow::Result<()> {
    let c = &loaded.config;
    let bundle = PolicyBundle::load(&c.policy.dir)
        .map_err(|e| anyhow!("policy directory {}:\n{e}", c.policy.dir.display()))?;
    let unknown = unknown_sites(c, &bundle);
    if !unknown.is_empty() {
        let list: Vec<String> = unknown.iter().map(ToString::to_string).collect();
        return Err(anyhow!(
            "policy directory {}:\n{}",
            c.policy.dir.display(),
            list.join("\n")
        ));
    }
    portcullis_io::pipeline_config(loaded)?;
    if let Some(a) = &c.audit.api {
        portcullis_config::read_secret(&loaded.path, "audit.api.token_file", &a.token_file)?;
    }
    if let Some(f) = c.cluster.as_ref().and_then(|c| c.password_file.as_ref()) {
        portcullis_config::read_secret(&loaded.path, "cluster.password_file", f)?;
    }
    if let Some(f) = c.mfa.as_ref().and_then(|m| m.secret_key_file.as_ref()) {
        let text = portcullis_config::read_secret(&loaded.path, "mfa.secret_key_file", f)?;
        portcullis_mfa::SealingKey::parse(&text.0).map_err(|e| {
            anyhow!(
                "{}: mfa.secret_key_file: {}: {e}",
                loaded.path.display(),
                f.display()
            )
        })?;
    }
    portcullis_http::check(loaded)
}
