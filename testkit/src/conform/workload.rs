//! The workload: a model of the tables the generator made (so that updates and deletes
//! find rows, and DDL knows the columns) and the steps it emits.
//!
//! The model may be stale (a cascade deletes child rows, a truncate empties a table): an
//! UPDATE or DELETE of a row that is gone changes nothing, on both plugins alike. What the
//! model must never allow is a statement that fails unexpectedly.

use super::values::{self, COMMON, Ty};
use super::{Rng, ident, lit};

/// The prefix of the transactional message that ends every workload.
pub const END_PREFIX: &str = "conformance-end";

/// The name of every stored generated column (no other column has it, and no DDL
/// touches it): the harness knows them by it, whatever became of their table.
pub const GENERATED_COLUMN: &str = "gen";

/// One step, run as one simple-query batch.
#[derive(Clone, Debug)]
pub enum Step {
    Sql(String),
    /// A statement that must fail with an error containing the text.
    Fails(String, &'static str),
    /// Two transactions at once: each statement on connection 0 or 1, in this order.
    Interleaved(Vec<(usize, String)>),
}

impl Step {
    pub fn sql(&self) -> String {
        match self {
            Step::Sql(s) | Step::Fails(s, _) => s.clone(),
            Step::Interleaved(parts) => parts.iter().map(|(c, sql)| format!("/* connection {c} */ {sql};\n")).collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Identity {
    /// REPLICA IDENTITY DEFAULT with a primary key on `id`.
    Pk,
    /// DEFAULT with a two-column key `(sub, id)`.
    PkPair,
    /// FULL (the table also has a primary key, or none).
    Full { pk: bool },
    /// USING INDEX: a unique index on `code`.
    Index,
    /// NOTHING, despite a primary key.
    Nothing,
    /// DEFAULT, without any key.
    NoKey,
}

impl Identity {
    /// Whether updates and deletes are allowed with a publication for updates and deletes.
    fn identifies(self) -> bool {
        !matches!(self, Identity::Nothing | Identity::NoKey)
    }

    fn has_pk(self) -> bool {
        matches!(self, Identity::Pk | Identity::PkPair | Identity::Nothing | Identity::Full { pk: true })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    /// Range-partitioned on `id` into `<name>_lo` (ids below [`HIGH`]) and `<name>_hi`.
    Partitioned,
    /// Referenced by `FkChild` tables (ON DELETE/UPDATE CASCADE); has a bigserial `n`.
    FkParent,
    FkChild {
        parent: usize,
    },
    /// Large, incompressible values stored out of line.
    Toast,
}

/// Ids from here on go to a partitioned table's `_hi` partition.
const HIGH: i64 = 1_000_000;

#[derive(Clone, Debug)]
struct Column {
    name: String,
    ty: Ty,
}

#[derive(Clone, Debug)]
struct Table {
    schema: String,
    name: String,
    identity: Identity,
    kind: Kind,
    /// The generated columns (not the fixed `id`, `sub`, `code`, `p`, `n`).
    cols: Vec<Column>,
    ids: Vec<i64>,
    dropped: bool,
    /// Has `gen int8 GENERATED ALWAYS AS (id * 2) STORED`.
    generated: bool,
}

impl Table {
    fn qname(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }

    /// The fixed columns and their values for a new row `id`.
    fn fixed(&self, id: i64) -> Vec<(&'static str, String)> {
        let mut v = vec![("id", id.to_string())];
        match self.identity {
            Identity::PkPair => v.push(("sub", (id % 7).to_string())),
            Identity::Index => v.push(("code", lit(&format!("c{id}")))),
            _ => {}
        }
        if let Kind::FkChild { .. } = self.kind {
            v.push(("p", format!("(SELECT id FROM {{parent}} ORDER BY id DESC LIMIT 1 OFFSET {})", id % 3)));
        }
        v
    }
}

#[derive(Clone)]
struct Model {
    tables: Vec<Table>,
    next_id: i64,
    next_name: usize,
}

struct Generator {
    rng: Rng,
    model: Model,
    steps: Vec<Step>,
    seed: u64,
    /// Leave out [`Generator::type_lifecycle`]'s SQL (its random draws still happen, so
    /// that the rest of a seed's workload stays the same).
    without_type_changes: bool,
}

/// Where tables go: the default schema, one with quotes, a dot and spaces, one in unicode.
const SCHEMAS: &[&str] = &["public", "we\"ird.sch ema", "schéma_ü"];

const TABLE_NAMES: &[&str] = &["t", "Mixed Case", "quo\"te", "dot.ted", "ünï", "sp ace"];

/// The workload of `seed`: about `transactions` transactions after the setup, then the end
/// marker. `without_type_changes` leaves out renamed, moved and dropped types.
pub fn generate(seed: u64, transactions: usize, without_type_changes: bool) -> Vec<Step> {
    let mut g = Generator {
        rng: Rng::new(seed),
        model: Model { tables: Vec::new(), next_id: 1, next_name: 0 },
        steps: Vec::new(),
        seed,
        without_type_changes,
    };
    g.setup();
    for _ in 0..transactions {
        g.one_step();
    }
    g.steps.push(Step::Sql(format!(
        "SELECT pg_logical_emit_message(true, {}, {})",
        lit(END_PREFIX),
        lit(&seed.to_string())
    )));
    g.steps
}

impl Generator {
    fn setup(&mut self) {
        let mut sql = String::new();
        for s in SCHEMAS.iter().chain([&values::TYPES_SCHEMA]) {
            if *s != "public" {
                sql.push_str(&format!("CREATE SCHEMA {};\n", ident(s)));
            }
        }
        sql.push_str(&values::create_types_sql());
        if self.rng.chance(30) {
            // The walsenders (and the renderer's connections) start after the workload:
            // with the types' schema on their search_path, types are named unqualified.
            sql.push_str(&format!(
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET search_path = public, {}', current_database()); END $$;\n",
                ident(values::TYPES_SCHEMA)
            ));
        }
        self.steps.push(Step::Sql(sql));
        // One of each kind and identity, then a few random ones.
        let kinds = [
            (Kind::Plain, Identity::Pk),
            (Kind::Plain, Identity::PkPair),
            (Kind::Plain, Identity::Full { pk: false }),
            (Kind::Plain, Identity::Index),
            (Kind::Plain, Identity::Nothing),
            (Kind::Plain, Identity::NoKey),
            (Kind::Partitioned, Identity::Pk),
            (Kind::FkParent, Identity::Pk),
            (Kind::Toast, Identity::Pk),
            (Kind::Toast, Identity::Full { pk: true }),
        ];
        for (kind, identity) in kinds {
            self.create_table(kind, identity);
        }
        let parent = self.model.tables.iter().position(|t| t.kind == Kind::FkParent).unwrap_or(0);
        self.create_table(Kind::FkChild { parent }, Identity::Full { pk: true });
    }

    fn fresh_name(&mut self) -> String {
        let base = self.rng.pick(TABLE_NAMES);
        self.model.next_name += 1;
        format!("{base}{}", self.model.next_name)
    }

    fn random_cols(&mut self, n: usize) -> Vec<Column> {
        (0..n).map(|i| Column { name: self.col_name(i), ty: *self.rng.pick(COMMON) }).collect()
    }

    fn col_name(&mut self, i: usize) -> String {
        let base = self.rng.pick(&["c", "Col", "c\"q", "c.d", "c e", "ç"]);
        self.model.next_name += 1;
        format!("{base}{i}_{}", self.model.next_name)
    }

    fn create_table(&mut self, kind: Kind, identity: Identity) {
        let schema = self.rng.pick(SCHEMAS).to_string();
        let name = self.fresh_name();
        let mut cols = match kind {
            Kind::Toast => vec![
                Column { name: "big".into(), ty: Ty::BigText },
                Column { name: "blob".into(), ty: Ty::BigBytea },
                Column { name: "note".into(), ty: Ty::Text },
            ],
            _ => Vec::new(),
        };
        let n = self.rng.range(2, 8) as usize;
        cols.extend(self.random_cols(n));
        let generated = kind == Kind::Plain && self.rng.chance(30);
        let table = Table { schema, name, identity, kind, cols, ids: Vec::new(), dropped: false, generated };
        let sql = self.create_sql(&table);
        self.model.tables.push(table);
        self.steps.push(Step::Sql(sql));
    }

    fn create_sql(&self, t: &Table) -> String {
        let q = t.qname();
        let mut defs = vec!["id int8 NOT NULL".to_string()];
        match t.identity {
            Identity::PkPair => defs.push("sub int2 NOT NULL".into()),
            Identity::Index => defs.push("code text NOT NULL".into()),
            _ => {}
        }
        if let Kind::FkChild { parent } = t.kind {
            defs.push(format!(
                "p int8 REFERENCES {} ON DELETE CASCADE ON UPDATE CASCADE",
                self.model.tables[parent].qname()
            ));
        }
        if t.kind == Kind::FkParent {
            defs.push("n bigserial".into());
        }
        if t.generated {
            defs.push(format!("{GENERATED_COLUMN} int8 GENERATED ALWAYS AS (id * 2) STORED"));
        }
        for c in &t.cols {
            defs.push(format!("{} {}", ident(&c.name), c.ty.sql()));
        }
        match t.identity {
            // Not in the columns' order: which order do the old keys come in?
            Identity::PkPair => defs.push("PRIMARY KEY (sub, id)".into()),
            i if i.has_pk() => defs.push("PRIMARY KEY (id)".into()),
            _ => {}
        }
        let mut sql = format!("CREATE TABLE {q} ({})", defs.join(", "));
        if t.kind == Kind::Partitioned {
            sql.push_str(" PARTITION BY RANGE (id);\n");
            for (suffix, bounds) in [("_lo", format!("MINVALUE) TO ({HIGH}")), ("_hi", format!("{HIGH}) TO (MAXVALUE"))]
            {
                let part = format!("{}.{}", ident(&t.schema), ident(&format!("{}{suffix}", t.name)));
                sql.push_str(&format!("CREATE TABLE {part} PARTITION OF {q} FOR VALUES FROM ({bounds});\n"));
            }
        } else {
            sql.push_str(";\n");
        }
        match t.identity {
            Identity::Full { .. } => sql.push_str(&format!("ALTER TABLE {q} REPLICA IDENTITY FULL;\n")),
            Identity::Nothing => sql.push_str(&format!("ALTER TABLE {q} REPLICA IDENTITY NOTHING;\n")),
            Identity::Index => {
                let index = ident(&format!("{}_code", t.name));
                sql.push_str(&format!(
                    "CREATE UNIQUE INDEX {index} ON {q} (code);\nALTER TABLE {q} REPLICA IDENTITY USING INDEX {index};\n"
                ));
            }
            _ => {}
        }
        if t.kind == Kind::Toast {
            sql.push_str(&format!(
                "ALTER TABLE {q} ALTER COLUMN big SET STORAGE EXTERNAL, ALTER COLUMN blob SET STORAGE EXTERNAL;\n"
            ));
        }
        sql
    }

    fn live(&self) -> Vec<usize> {
        (0..self.model.tables.len()).filter(|&i| !self.model.tables[i].dropped).collect()
    }

    fn random_table(&mut self) -> usize {
        let live = self.live();
        *self.rng.pick(&live)
    }

    /// One step: mostly a transaction; sometimes DDL, a message outside any
    /// transaction, or a statement that must fail.
    fn one_step(&mut self) {
        match self.rng.below(100) {
            0..=10 => self.ddl(),
            11 => self.rare(),
            12..=17 => {
                let m = self.message(false);
                self.steps.push(Step::Sql(m));
            }
            18..=20 => self.forbidden_change(),
            21..=26 => self.interleaved(),
            _ => self.transaction(),
        }
    }

    /// Two transactions open at once, their changes interleaved (inserts only: they
    /// never wait for each other's locks), committed in either order or one rolled back.
    fn interleaved(&mut self) {
        let mut parts = vec![(0, "BEGIN".to_string()), (1, "BEGIN".to_string())];
        for _ in 0..self.rng.range(2, 8) {
            let connection = self.rng.below(2);
            let op = if self.rng.chance(20) {
                let transactional = self.rng.chance(70);
                self.message(transactional)
            } else {
                self.insert()
            };
            parts.push((connection, op));
        }
        let first = self.rng.below(2);
        parts.push((first, "COMMIT".into()));
        parts.push((1 - first, if self.rng.chance(15) { "ROLLBACK" } else { "COMMIT" }.into()));
        self.steps.push(Step::Interleaved(parts));
    }

    /// What is rare in applications: a transaction with a replication origin, a
    /// materialized view refreshed, an unlogged table written, a large transaction.
    fn rare(&mut self) {
        let sql = match self.rng.below(6) {
            5 => {
                // The server's own schema: its changes are never streamed, the
                // transaction itself is (as wal2json's filter-tables leaves it).
                let n = self.model.next_name;
                self.model.next_name += 1;
                let insert = self.insert();
                format!(
                    "CREATE SCHEMA IF NOT EXISTS pgdeltastream;\nCREATE TABLE pgdeltastream.own{n} (a int PRIMARY KEY);\n\
                     INSERT INTO pgdeltastream.own{n} VALUES (1);\nBEGIN;\nINSERT INTO pgdeltastream.own{n} VALUES (2);\n{insert};\nCOMMIT;\n"
                )
            }
            4 => self.type_lifecycle(),
            0 => {
                // Changes replayed from elsewhere carry an origin (pgoutput sends an
                // Origin message; neither format prints it without include-origin).
                // Origins belong to the cluster, not to the database: named by the seed.
                let origin = lit(&format!("conform {} {}", self.seed, self.model.next_name));
                self.model.next_name += 1;
                let insert = self.insert();
                format!(
                    "SELECT pg_replication_origin_create({origin});\n\
                     SELECT pg_replication_origin_session_setup({origin});\n\
                     BEGIN;\nSELECT pg_replication_origin_xact_setup('0/AB', now());\n{insert};\nCOMMIT;\n\
                     SELECT pg_replication_origin_session_reset();\nSELECT pg_replication_origin_drop({origin});\n"
                )
            }
            1 => {
                let mv = ident(&format!("mv{}", self.model.next_name));
                self.model.next_name += 1;
                let rows = self.rng.range(0, 30);
                // Kept, so that the harness can tell its changes (wal2json prints them);
                // on no table of the workload, so that DROP TABLE needs no CASCADE.
                format!(
                    "CREATE MATERIALIZED VIEW {mv} AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, {rows}) g;\n\
                     REFRESH MATERIALIZED VIEW {mv};\n"
                )
            }
            2 => {
                let u = ident(&format!("unlogged{}", self.model.next_name));
                self.model.next_name += 1;
                format!(
                    "CREATE UNLOGGED TABLE {u} (a int PRIMARY KEY, b text);\nINSERT INTO {u} VALUES (1, 'x');\nUPDATE {u} SET b = 'y';\n"
                )
            }
            _ => {
                // Several MiB in one transaction: the renderer holds a transaction until
                // its commit, and spills it to a file past a bound.
                let Some(ti) = self.live().into_iter().find(|&i| {
                    let t = &self.model.tables[i];
                    t.kind == Kind::Toast && ["big", "note"].iter().all(|n| t.cols.iter().any(|c| c.name == *n))
                }) else {
                    return self.transaction();
                };
                let t = &self.model.tables[ti];
                let first = self.model.next_id + 1;
                let rows = self.rng.range(200, 400);
                self.model.next_id += rows;
                let ids: Vec<i64> = (first..first + rows).collect();
                let sql = format!(
                    "INSERT INTO {} (id, big, note) SELECT g, repeat(md5(g::text), 400), 'bulk' FROM generate_series({first}, {}) g",
                    t.qname(),
                    first + rows - 1
                );
                self.model.tables[ti].ids.extend(ids);
                sql
            }
        };
        self.steps.push(Step::Sql(sql));
    }

    /// A type renamed, moved to another schema and maybe dropped, with rows written
    /// between: wal2json names it as the catalog was when the row was written.
    fn type_lifecycle(&mut self) -> String {
        let n = self.model.next_name;
        self.model.next_name += 1;
        let (ty, table) = (format!("lc{n}"), ident(&format!("typed{n}")));
        let s = ident(values::TYPES_SCHEMA);
        let insert = |id: usize, v: &str| format!("INSERT INTO {table} VALUES ({id}, 'x', '{{{v},NULL}}');\n");
        let mut sql = format!(
            "BEGIN;\nCREATE TYPE {s}.{ty} AS ENUM ('x', 'y');\n\
             CREATE TABLE {table} (id int8 PRIMARY KEY, v {s}.{ty}, a {s}.{ty}[]);\n{}COMMIT;\n",
            insert(1, "x")
        );
        sql.push_str(&format!("BEGIN;\nALTER TYPE {s}.{ty} RENAME TO {ty}_renamed;\n{}COMMIT;\n", insert(2, "y")));
        sql.push_str(&format!("BEGIN;\nALTER TYPE {s}.{ty}_renamed SET SCHEMA public;\n{}COMMIT;\n", insert(3, "x")));
        sql.push_str(&format!("BEGIN;\nALTER TYPE public.{ty}_renamed ADD VALUE 'z';\nCOMMIT;\n{}", insert(4, "z")));
        if self.rng.chance(50) {
            sql.push_str(&format!("DROP TABLE {table};\nDROP TYPE public.{ty}_renamed;\n"));
        }
        if self.without_type_changes { "SELECT 1".into() } else { sql }
    }

    /// An UPDATE or DELETE of a table that cannot identify rows: with a publication of
    /// updates and deletes, Postgres refuses it (and nothing is decoded).
    fn forbidden_change(&mut self) {
        let candidates: Vec<usize> =
            self.live().into_iter().filter(|&i| !self.model.tables[i].identity.identifies()).collect();
        if candidates.is_empty() {
            return self.transaction();
        }
        let t = &self.model.tables[*self.rng.pick(&candidates)];
        let sql = if self.rng.chance(50) {
            format!("UPDATE {} SET id = id WHERE id > 0", t.qname())
        } else {
            format!("DELETE FROM {}", t.qname())
        };
        self.steps.push(Step::Fails(sql, "does not have a replica identity"));
    }

    fn transaction(&mut self) {
        let mut sql = String::from("BEGIN;\n");
        let saved = self.model.clone();
        let n = self.rng.range(1, 6);
        for _ in 0..n {
            self.op_or_savepoint(&mut sql, 0);
        }
        if self.rng.chance(8) {
            sql.push_str("ROLLBACK;\n");
            self.model = saved;
        } else {
            sql.push_str("COMMIT;\n");
        }
        self.steps.push(Step::Sql(sql));
    }

    fn op_or_savepoint(&mut self, sql: &mut String, depth: usize) {
        if depth < 2 && self.rng.chance(12) {
            let name = ident(&format!("sp {depth}"));
            sql.push_str(&format!("SAVEPOINT {name};\n"));
            let saved = self.model.clone();
            for _ in 0..self.rng.range(1, 3) {
                self.op_or_savepoint(sql, depth + 1);
            }
            if self.rng.chance(50) {
                sql.push_str(&format!("ROLLBACK TO SAVEPOINT {name};\n"));
                self.model = saved;
            } else {
                sql.push_str(&format!("RELEASE SAVEPOINT {name};\n"));
            }
            return;
        }
        let op = match self.rng.below(100) {
            0..=34 => self.insert(),
            35..=54 => self.update(),
            55..=64 => self.delete(),
            65..=69 => self.update_key(),
            70..=74 => self.update_many(),
            75..=80 => self.truncate(),
            81..=86 => self.message(true),
            // DDL inside the transaction: the relation changes between two changes of
            // the same transaction (and may be rolled back with a savepoint).
            87..=89 => self.alter().unwrap_or_else(|| self.insert()),
            _ => self.message(false),
        };
        sql.push_str(&op);
        sql.push_str(";\n");
    }

    fn new_id(&mut self, kind: Kind) -> i64 {
        self.model.next_id += 1;
        let id = self.model.next_id;
        if kind == Kind::Partitioned && self.rng.chance(50) { id + HIGH } else { id }
    }

    fn insert(&mut self) -> String {
        let ti = self.random_table();
        let rows = if self.rng.chance(10) { self.rng.range(5, 40) } else { self.rng.range(1, 3) };
        let kind = self.model.tables[ti].kind;
        let mut names: Vec<String> = Vec::new();
        let mut tuples = Vec::new();
        for _ in 0..rows {
            let id = self.new_id(kind);
            let t = &self.model.tables[ti];
            let parent = match t.kind {
                Kind::FkChild { parent } => self.model.tables[parent].qname(),
                _ => String::new(),
            };
            let fixed = t.fixed(id);
            let cols = t.cols.clone();
            names = fixed.iter().map(|(n, _)| ident(n)).chain(cols.iter().map(|c| ident(&c.name))).collect();
            let mut vals: Vec<String> = fixed.into_iter().map(|(_, v)| v.replace("{parent}", &parent)).collect();
            for c in &cols {
                vals.push(c.ty.value_or_null(&mut self.rng, 15));
            }
            tuples.push(format!("({})", vals.join(", ")));
            self.model.tables[ti].ids.push(id);
        }
        format!("INSERT INTO {} ({}) VALUES {}", self.model.tables[ti].qname(), names.join(", "), tuples.join(",\n  "))
    }

    /// A table that identifies rows and has some, with one of its ids.
    fn target(&mut self) -> Option<(usize, i64)> {
        let candidates: Vec<usize> = self
            .live()
            .into_iter()
            .filter(|&i| self.model.tables[i].identity.identifies() && !self.model.tables[i].ids.is_empty())
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let ti = *self.rng.pick(&candidates);
        let id = *self.rng.pick(&self.model.tables[ti].ids);
        Some((ti, id))
    }

    fn set_list(&mut self, ti: usize) -> String {
        let cols = self.model.tables[ti].cols.clone();
        let mut sets: Vec<String> = Vec::new();
        for c in &cols {
            // Big values are mostly left alone: that is the unchanged-TOAST case.
            let pct = if matches!(c.ty, Ty::BigText | Ty::BigBytea) { 10 } else { 40 };
            if self.rng.chance(pct) {
                sets.push(format!("{} = {}", ident(&c.name), c.ty.value_or_null(&mut self.rng, 15)));
            }
        }
        if sets.is_empty() {
            // An UPDATE that changes nothing is still an update.
            sets.push("id = id".into());
        }
        sets.join(", ")
    }

    fn update(&mut self) -> String {
        let Some((ti, id)) = self.target() else { return self.insert() };
        let sets = self.set_list(ti);
        format!("UPDATE {} SET {sets} WHERE id = {id}", self.model.tables[ti].qname())
    }

    fn update_many(&mut self) -> String {
        let Some((ti, _)) = self.target() else { return self.insert() };
        let sets = self.set_list(ti);
        let m = self.rng.range(2, 4);
        format!("UPDATE {} SET {sets} WHERE id % {m} = 0", self.model.tables[ti].qname())
    }

    /// Changes the key: the old key goes in `oldkeys`. In a partitioned table the row may
    /// move to the other partition (a delete and an insert).
    fn update_key(&mut self) -> String {
        let Some((ti, id)) = self.target() else { return self.insert() };
        let kind = self.model.tables[ti].kind;
        let new = self.new_id(kind);
        let t = &mut self.model.tables[ti];
        t.ids.retain(|&i| i != id);
        t.ids.push(new);
        let sets = match t.identity {
            Identity::PkPair => format!("id = {new}, sub = {}", new % 7),
            Identity::Index => format!("id = {new}, code = {}", lit(&format!("c{new}"))),
            _ => format!("id = {new}"),
        };
        format!("UPDATE {} SET {sets} WHERE id = {id}", t.qname())
    }

    fn delete(&mut self) -> String {
        let Some((ti, id)) = self.target() else { return self.insert() };
        let t = &mut self.model.tables[ti];
        t.ids.retain(|&i| i != id);
        format!("DELETE FROM {} WHERE id = {id}", t.qname())
    }

    fn truncate(&mut self) -> String {
        let live = self.live();
        let n = self.rng.range(1, 3) as usize;
        let mut picked: Vec<usize> = (0..n).map(|_| *self.rng.pick(&live)).collect();
        picked.sort_unstable();
        picked.dedup();
        // A referenced table needs CASCADE, or its referencing tables in the same list.
        let cascade = picked.iter().any(|&i| self.model.tables[i].kind == Kind::FkParent);
        let names: Vec<String> = picked.iter().map(|&i| self.model.tables[i].qname()).collect();
        let restart = if self.rng.chance(40) { " RESTART IDENTITY" } else { "" };
        for &i in &picked {
            self.model.tables[i].ids.clear();
        }
        format!("TRUNCATE {}{restart}{}", names.join(", "), if cascade { " CASCADE" } else { "" })
    }

    fn message(&mut self, transactional: bool) -> String {
        let prefix = *self.rng.pick(&["app", "", "we'ird \\pre\"fix", "préfixe 😀", "a.b,c*", "{\"json\":1}"]);
        let content = match self.rng.below(6) {
            0 => "''".to_string(),
            5 if self.rng.chance(30) => "repeat('é\u{1F600}', 30000)".to_string(),
            1 => format!("'\\x{:016x}00ff'::bytea", self.rng.next_u64()),
            2 => "'\\xc328e282'::bytea".to_string(),
            _ => lit(&values::text(&mut self.rng, 4)),
        };
        format!("SELECT pg_logical_emit_message({transactional}, {}, {content})", lit(prefix))
    }

    fn ddl(&mut self) {
        match self.alter() {
            Some(sql) => self.steps.push(Step::Sql(sql)),
            None => {
                let kinds =
                    [Identity::Pk, Identity::PkPair, Identity::Full { pk: false }, Identity::Index, Identity::NoKey];
                let identity = *self.rng.pick(&kinds);
                self.create_table(Kind::Plain, identity);
            }
        }
    }

    /// An ALTER or DROP of a random table; None for a new table instead.
    fn alter(&mut self) -> Option<String> {
        let ti = self.random_table();
        let t = self.model.tables[ti].clone();
        let q = t.qname();
        // Partitioned and referenced tables keep their shape (their DDL has rules of
        // its own); they still get new columns.
        let simple = matches!(t.kind, Kind::Plain | Kind::Toast);
        let sql = match self.rng.below(9) {
            0 | 1 => {
                let ty = *self.rng.pick(COMMON);
                let name = self.col_name(t.cols.len());
                let default =
                    if self.rng.chance(40) { format!(" DEFAULT {}", ty.value(&mut self.rng)) } else { String::new() };
                self.model.tables[ti].cols.push(Column { name: name.clone(), ty });
                format!("ALTER TABLE {q} ADD COLUMN {} {}{default}", ident(&name), ty.sql())
            }
            2 if simple && t.cols.len() > 1 => {
                let ci = self.rng.below(t.cols.len());
                let c = self.model.tables[ti].cols.remove(ci);
                format!("ALTER TABLE {q} DROP COLUMN {}", ident(&c.name))
            }
            3 if simple => {
                let ci = t.cols.iter().position(|c| values::widened(c.ty).is_some())?;
                let to = values::widened(t.cols[ci].ty).unwrap_or(Ty::Text);
                self.model.tables[ti].cols[ci].ty = to;
                format!("ALTER TABLE {q} ALTER COLUMN {} TYPE {}", ident(&t.cols[ci].name), to.sql())
            }
            4 if !t.cols.is_empty() => {
                let ci = self.rng.below(t.cols.len());
                let name = self.col_name(ci);
                let old = std::mem::replace(&mut self.model.tables[ti].cols[ci].name, name.clone());
                format!("ALTER TABLE {q} RENAME COLUMN {} TO {}", ident(&old), ident(&name))
            }
            5 if simple => {
                let name = self.fresh_name();
                self.model.tables[ti].name = name.clone();
                format!("ALTER TABLE {q} RENAME TO {}", ident(&name))
            }
            6 if t.kind == Kind::Plain && matches!(t.identity, Identity::Pk | Identity::Full { pk: true }) => {
                // DEFAULT <-> FULL: the old row in updates and deletes changes shape.
                let (to, word) = match t.identity {
                    Identity::Full { pk: true } => (Identity::Pk, "DEFAULT"),
                    _ => (Identity::Full { pk: true }, "FULL"),
                };
                self.model.tables[ti].identity = to;
                format!("ALTER TABLE {q} REPLICA IDENTITY {word}")
            }
            7 if simple && self.live().len() > 8 => {
                self.model.tables[ti].dropped = true;
                format!("DROP TABLE {q}")
            }
            _ => return None,
        };
        Some(sql)
    }
}
