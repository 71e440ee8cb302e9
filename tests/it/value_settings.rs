//! The settings that decide how Postgres prints values (bytea_output,
//! extra_float_digits, DateStyle, IntervalStyle, TimeZone) are pinned on every
//! connection of ours, so a database or role that sets them otherwise changes nothing:
//! the stream and the snapshot print the same values, the same way. `bytea_output =
//! escape` used to make the stream send escape text as if it were hex.

use testkit::pg as common;
use testkit::support;

use serde_json::{Value, json};
use support::*;

/// One row, as the stream and the snapshot must print it, whatever the database sets.
fn expected(id: i32) -> Value {
    json!({
        "id": id,
        "b": "00ff41",
        "f": 1.2345678901234568,
        "r": 1.2345678,
        "d": "2024-02-29",
        "ts": "2024-02-29 12:34:56.5+00",
        "i": "1 day 02:03:04",
    })
}

#[tokio::test]
async fn settings_of_the_database_do_not_change_how_values_are_printed() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(&format!(
        "ALTER DATABASE \"{0}\" SET bytea_output = 'escape';
         ALTER DATABASE \"{0}\" SET extra_float_digits = -3;
         ALTER DATABASE \"{0}\" SET DateStyle = 'SQL, DMY';
         ALTER DATABASE \"{0}\" SET IntervalStyle = 'sql_standard';
         ALTER DATABASE \"{0}\" SET TimeZone = 'Asia/Kolkata';",
        db.dbname
    ))
    .await
    .unwrap();
    // A new connection sees the database's settings: they would change the output.
    let other = db.client().await;
    let printed: String = other
        .query_one("SELECT '\\x00ff41'::bytea::text || ' ' || '2024-02-29'::date::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(printed, "\\000\\377A 29/02/2024");

    let insert = "INSERT INTO v VALUES ($1, '\\x00ff41', 1.2345678901234568, 1.2345678, '2024-02-29',
                  '2024-02-29 12:34:56.5+00', '1 day 02:03:04')";
    other
        .batch_execute(
            "CREATE TABLE v (id int PRIMARY KEY, b bytea, f float8, r real, d date, ts timestamptz, i interval)",
        )
        .await
        .unwrap();
    other.execute(insert, &[&1i32]).await.unwrap();
    let server = TestServer::start(&db).await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    other.execute(insert, &[&2i32]).await.unwrap();

    let (status, rows) = server.snapshot(json!({"table": "v"})).await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows, json!([expected(1)]), "snapshot");

    let tx = next_changes(&mut ws).await;
    let change = &tx["change"][0];
    let names = change["columnnames"].as_array().unwrap();
    let values = change["columnvalues"].as_array().unwrap();
    let streamed: serde_json::Map<String, Value> =
        names.iter().zip(values).map(|(n, v)| (n.as_str().unwrap().to_owned(), v.clone())).collect();
    assert_eq!(Value::Object(streamed), expected(2), "stream");
    server.stop().await;
}
