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
#[allow(dead_code)] // not every test binary asks for the default database
pub async fn store(ch: &ClickHouse, schema: u32) -> Store {
    store_in(ch, "portcullis", schema).await
}

/// A connected store for database `db` of `ch`, migrated up to `schema`.
pub async fn store_in(ch: &ClickHouse, db: &str, schema: u32) -> Store {
    let store = Store::connect(&StoreConfig {
        urls: vec![ch.url()],
        cluster: None,
        database: db.into(),
        user: "default".into(),
        password: None,
    })
    .await
    .unwrap();
    store.migrate_to(schema).await.unwrap();
    store
}
