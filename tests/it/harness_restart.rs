//! Self-test of `Cluster::restart_immediate` (a cluster of its own: a restart disconnects
//! every test sharing the cluster).
/// A cluster of its own: the test here restarts it.
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        own_cluster("harness_restart")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}

#[tokio::test]
async fn restart_immediate_keeps_port_data_and_slots() {
    let db = common::fresh_db().await;
    let c = db.client().await;
    // The cluster runs with synchronous_commit=off: an immediate stop is a crash and can
    // lose asynchronously committed transactions, so commit this one synchronously.
    c.batch_execute(
        "SET synchronous_commit = on;
         CREATE TABLE t (id int);
         INSERT INTO t VALUES (1);",
    )
    .await
    .unwrap();
    // Not in the same (implicit) transaction as writes.
    c.batch_execute("SELECT pg_create_logical_replication_slot('restart_slot', 'wal2json')").await.unwrap();

    let cluster = common::cluster();
    let port = cluster.port;
    tokio::task::spawn_blocking(move || cluster.restart_immediate()).await.unwrap();
    assert_eq!(cluster.port, port);

    assert!(c.simple_query("SELECT 1").await.is_err(), "old connections die with the server");
    let c = db.client().await;
    let n: i64 = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    let slots: i64 = c
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'restart_slot'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1);
    c.batch_execute("SELECT pg_drop_replication_slot('restart_slot')").await.unwrap();
    if !cluster.bindir.as_os_str().is_empty() {
        assert!(cluster.bin("pg_recvlogical").is_file());
    }
}
