//! Shared by the auditor's integration tests: a runtime and a store on a test server.

use portcullis_audit::{Store, StoreConfig};
use portcullis_testkit::ClickHouse;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A connected store for the `portcullis` database of `ch`, migrated up to `schema`.
pub async fn store(ch: &ClickHouse, schema: u32) -> Store {
    let store = Store::connect(&StoreConfig {
        url: ch.url(),
        database: "portcullis".into(),
        user: "default".into(),
        password: None,
    })
    .await
    .unwrap();
    store.migrate_to(schema).await.unwrap();
    store
}
