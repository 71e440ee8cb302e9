//! Self-test of the shared test harness (testkit::pg): a real Postgres with wal2json.
use testkit::pg as common;

#[tokio::test]
async fn fresh_databases_are_distinct_and_logical_decoding_works() {
    let a = common::fresh_db().await;
    let b = common::fresh_db().await;
    assert_ne!(a.dbname, b.dbname);
    assert_eq!((a.host.as_str(), a.port), (b.host.as_str(), b.port));

    let ca = a.client().await;
    let cb = b.client().await;
    let name_a: String = ca.query_one("SELECT current_database()::text", &[]).await.unwrap().get(0);
    let name_b: String = cb.query_one("SELECT current_database()::text", &[]).await.unwrap().get(0);
    assert_eq!(name_a, a.dbname);
    assert_eq!(name_b, b.dbname);

    // Brand-new and empty: no user tables; a table made in one is not visible in the other.
    let tables: i64 = ca
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
    ca.batch_execute("CREATE TABLE only_in_a (id int)").await.unwrap();
    let in_b: i64 =
        cb.query_one("SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'", &[]).await.unwrap().get(0);
    assert_eq!(in_b, 0);

    let wal_level: String = ca.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    assert_eq!(wal_level, "logical");

    // Slot names are cluster-wide: make this one unique to the database.
    let slot = format!("harness_slot_{}", a.dbname);
    let row = ca
        .query_one("SELECT 'init' FROM pg_create_logical_replication_slot($1, 'wal2json')", &[&slot])
        .await
        .unwrap_or_else(|e| panic!("create wal2json slot (is wal2json installed?): {e:?}"));
    let init: String = row.get(0);
    assert_eq!(init, "init");

    // The cluster runs with synchronous_commit=off, and logical decoding only reads WAL
    // that is flushed: commit this one synchronously so it is decodable at once.
    ca.batch_execute("SET synchronous_commit = on; INSERT INTO only_in_a VALUES (1)").await.unwrap();
    let changes: Vec<String> = ca
        .query("SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)", &[&slot])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(changes.iter().any(|c| c.contains("only_in_a")), "wal2json output should mention the table: {changes:?}");

    ca.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
}

#[tokio::test]
async fn conn_string_connects() {
    let db = common::fresh_db().await;
    let (client, conn) = tokio_postgres::connect(&db.conn_string(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[test]
fn cluster_is_shared_and_has_binaries() {
    let c = common::cluster();
    assert!(std::ptr::eq(c, common::cluster()));
    if !c.bindir.as_os_str().is_empty() {
        assert!(c.bin("pg_recvlogical").is_file());
    }
}
