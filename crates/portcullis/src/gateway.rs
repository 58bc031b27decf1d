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
    let audit_config = portcullis_io::pipeline_config(&loaded)?;
    let store = audit_config.spool.as_ref().map(|s| s.upload.store.clone());
    portcullis_http::start(loaded.clone(), bundle.clone(), identity, store, control)?;
    portcullis_io::run(loaded, bundle, startup, audit_config, data).await
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
