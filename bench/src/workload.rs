//! The throughput workloads: the tables and the SQL that writes them.

use tokio_postgres::Client;

use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The narrow `items` table (5 columns, ~260 bytes of JSON per change).
    Narrow,
    /// The `wide` table: 40 columns, ~2 KB of data per row.
    Wide,
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub name: &'static str,
    pub shape: Shape,
    pub transactions: u64,
    pub rows_per_transaction: u64,
}

impl Workload {
    pub fn rows(&self) -> u64 {
        self.transactions * self.rows_per_transaction
    }

    pub fn describe(&self) -> String {
        let what = match (self.shape, self.rows_per_transaction) {
            (Shape::Narrow, 1) => "row",
            (Shape::Narrow, _) => "rows",
            (Shape::Wide, _) => "wide rows (40 cols, ~2 KB)",
        };
        if self.transactions == 1 {
            format!("1 tx of {} {what}", thousands(self.rows_per_transaction))
        } else {
            format!("{} tx of {} {what}", thousands(self.transactions), thousands(self.rows_per_transaction))
        }
    }
}

/// The four workloads of the issue, divided by `scale` (100 for --quick).
pub fn all(scale: u64) -> Vec<Workload> {
    let s = |n: u64| (n / scale).max(1);
    vec![
        Workload { name: "one_big_tx", shape: Shape::Narrow, transactions: 1, rows_per_transaction: s(1_000_000) },
        Workload { name: "tx_of_100", shape: Shape::Narrow, transactions: s(10_000), rows_per_transaction: 100 },
        Workload { name: "tx_of_1", shape: Shape::Narrow, transactions: s(100_000), rows_per_transaction: 1 },
        Workload { name: "wide_rows", shape: Shape::Wide, transactions: s(1_000), rows_per_transaction: 100 },
    ]
}

/// The wide table's rows are just over TOAST's threshold (~2 KB); toast_tuple_target
/// keeps them inline and uncompressed, so decoding reads plain rows.
pub async fn create_tables(client: &Client) -> Result<()> {
    let wide_text: Vec<String> = (1..=30).map(|i| format!("t{i:02} text NOT NULL")).collect();
    client
        .batch_execute(&format!(
            "CREATE TABLE items (
                id bigint PRIMARY KEY,
                account integer NOT NULL,
                amount numeric(12,2) NOT NULL,
                label text NOT NULL,
                created timestamptz NOT NULL
            );
            CREATE TABLE wide (
                id bigint PRIMARY KEY,
                n1 integer NOT NULL, n2 integer NOT NULL, n3 bigint NOT NULL,
                amount1 numeric(14,4) NOT NULL, amount2 numeric(14,4) NOT NULL,
                flag boolean NOT NULL, created timestamptz NOT NULL, day date NOT NULL,
                ratio double precision NOT NULL,
                {}
            ) WITH (toast_tuple_target = 8160);",
            wide_text.join(",\n")
        ))
        .await?;
    Ok(())
}

/// SQL inserting rows `first..=last` (1-based ids) of the workload's table.
fn insert_rows(shape: Shape, first: &str, last: &str) -> String {
    match shape {
        Shape::Narrow => format!(
            "INSERT INTO items SELECT g, g % 1000, (g % 100000) / 100.0, md5(g::text), now() \
             FROM generate_series({first}, {last}) g"
        ),
        Shape::Wide => {
            // 30 texts of 64 hex digits: ~1.9 KB of text + ~60 bytes of other columns.
            let texts: Vec<String> =
                (1..=30).map(|i| format!("md5((g + {i})::text) || md5((g * {i})::text)")).collect();
            format!(
                "INSERT INTO wide SELECT g, g % 1000, g % 77, g * 31, g / 7.0, g / 13.0, g % 2 = 0, now(), \
                 current_date, g / 3.0, {} FROM generate_series({first}, {last}) g",
                texts.join(", ")
            )
        }
    }
}

/// Writes the workload: each transaction commits on its own (a DO block with COMMIT
/// in its loop, so no client round trip per transaction).
pub async fn write(client: &Client, w: &Workload) -> Result<()> {
    let per = w.rows_per_transaction;
    if w.transactions == 1 {
        client.batch_execute(&insert_rows(w.shape, "1", &per.to_string())).await?;
        return Ok(());
    }
    let body = insert_rows(w.shape, &format!("i * {per} + 1"), &format!("i * {per} + {per}"));
    client
        .batch_execute(&format!(
            "DO $bench$ BEGIN FOR i IN 0..{} LOOP {body}; COMMIT; END LOOP; END $bench$",
            w.transactions - 1
        ))
        .await?;
    Ok(())
}

/// A fresh database `db` whose `items` table holds `rows` rows written in one
/// transaction, at rest (`VACUUM ANALYZE`: visibility hints set, so that the first
/// reader does not pay for them): a connection to it, and the seconds the write took.
pub async fn items_at_rest(
    cluster: &crate::cluster::Cluster,
    db: &str,
    name: &'static str,
    rows: u64,
) -> Result<(Client, f64)> {
    let client = crate::fresh_db(cluster, db).await?;
    create_tables(&client).await?;
    let w = Workload { name, shape: Shape::Narrow, transactions: 1, rows_per_transaction: rows };
    let t = std::time::Instant::now();
    write(&client, &w).await?;
    let secs = t.elapsed().as_secs_f64();
    client.batch_execute("VACUUM ANALYZE items").await?;
    Ok((client, secs))
}

pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
