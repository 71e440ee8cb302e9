//! The viewer in a real browser: Debian's chromium, driven through chromedriver
//! (`make browser` installs both). Loads the page, creates a session through the form,
//! inserts rows with psql and sees them in the live feed, sees the session's consumer
//! and its lag in the list, pages through the snapshot, drops the session. Screenshots
//! go to target/viewer-screenshots/.

use testkit::pg as common;
use testkit::support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use support::*;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver on a free port, in a process group of its own: dropping it kills the
/// group (the driver and the browsers it started), by its id.
struct Driver {
    child: Child,
    port: u16,
    _profile: TempDir,
}

impl Driver {
    fn start() -> Driver {
        assert!(
            Path::new(CHROMEDRIVER).is_file() && Path::new(CHROMIUM).is_file(),
            "{CHROMEDRIVER} or {CHROMIUM} is missing: run `make browser` (apt-get install chromium chromium-driver)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let profile = TempDir::new("profile");
        let child = std::os::unix::process::CommandExt::process_group(
            Command::new(CHROMEDRIVER).arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()),
            0,
        )
        .spawn()
        .expect("start chromedriver");
        let driver = Driver { child, port, _profile: profile };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    async fn browser(&self) -> Client {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1500,1000",
            &format!("--user-data-dir={}", self._profile.0.display()),
        ];
        let caps = json!({"goog:chromeOptions": {"binary": CHROMIUM, "args": args}});
        let Value::Object(caps) = caps else { unreachable!() };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) on the process group this test started.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pgdeltastream-browser-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/viewer-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
}

/// Evaluates `script` (a function body returning a value) until it returns true.
async fn until(c: &Client, what: &str, within: Duration, script: &str) -> Duration {
    let started = Instant::now();
    loop {
        let v = c.execute(script, vec![]).await.unwrap_or_else(|e| panic!("{what}: script failed: {e}"));
        if v == Value::Bool(true) {
            return started.elapsed();
        }
        if started.elapsed() > within {
            screenshot(c, &format!("failed-{}", what.replace(' ', "-"))).await;
            let body = c.execute("return document.body.innerText", vec![]).await.unwrap_or_default();
            panic!("{what}: not within {within:?}; the page says:\n{}", body.as_str().unwrap_or(""));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn psql(db: &common::TestDb, sql: &str) {
    let out = Command::new(common::cluster().bin("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.conn_string(), "-c", sql])
        .output()
        .expect("run psql");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
}

async fn fill(c: &Client, css: &str, text: &str) {
    let input = c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
    input.clear().await.unwrap();
    input.send_keys(text).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    let el = c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
    if let Err(e) = el.click().await {
        screenshot(c, "failed-click").await;
        panic!("click {css}: {e}");
    }
}

/// The JS test of "the feed shows a row of `kind` whose text contains `text`".
/// Once the page is connected, creates the session `orders` of `tables` through the
/// form (clicking `clicks` on the way) and waits until it is watched.
async fn create_in_form(c: &Client, tables: &str, clicks: &[&str]) {
    until(
        c,
        "the list loads",
        Duration::from_secs(20),
        "return document.querySelector('#conn').textContent === 'connected'",
    )
    .await;
    click(c, "#create > summary").await;
    fill(c, "#create-form input[name=name]", "orders").await;
    fill(c, "#create-form input[name=tables]", tables).await;
    for selector in clicks {
        click(c, selector).await;
    }
    click(c, "#create-form button[type=submit]").await;
    let watched = "return document.querySelector('#feed-status').textContent === 'watching orders'";
    until(c, "the session is watched", Duration::from_secs(20), watched).await;
}

fn feed_has(kind: &str, text: &str) -> String {
    format!(
        "return [...document.querySelectorAll('#feed tbody tr[data-kind={kind}]')].some(r => !r.hidden && r.innerText.includes({}))",
        json!(text)
    )
}

#[tokio::test]
async fn the_viewer_creates_a_session_and_shows_its_changes_live() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, item text, qty int, note text);
         ALTER TABLE orders REPLICA IDENTITY FULL;
         CREATE TABLE audit (id serial PRIMARY KEY, what text);
         INSERT INTO orders VALUES (100, 'seed', 1, 'in the snapshot'), (101, 'seed too', 2, NULL);",
    )
    .await
    .unwrap();
    let mut settings = fast_settings(&db);
    // Low enough that the session's slot is past it: the list marks its retained WAL.
    settings.retention.warn_bytes = 1024;
    let server = TestServer::start_with(settings).await;
    let driver = Driver::start();
    let c = driver.browser().await;
    let base = format!("http://{}", server.addr);

    c.goto(&format!("{base}/")).await.unwrap();
    // Create a session through the form: it is watched at once.
    create_in_form(&c, "public.orders, public.audit", &["#create-form input[value=truncate]"]).await;
    until(
        &c,
        "the session is listed",
        Duration::from_secs(10),
        "return !!document.querySelector('#sessions tbody tr[data-name=orders]')",
    )
    .await;

    // A row inserted with psql shows in the feed within 2 s.
    psql(&db, "INSERT INTO orders VALUES (1, 'apple', 3, 'first')");
    let took = until(&c, "the insert in the feed", Duration::from_secs(10), &feed_has("I", "apple")).await;
    assert!(took <= Duration::from_secs(2), "the insert took {took:?} to show");

    // A few seconds of traffic for the sparkline.
    for burst in 1..=8 {
        let sql = format!(
            "INSERT INTO audit (what) SELECT 'burst {burst}.' || g FROM generate_series(1, {}) g",
            burst % 4 + 1
        );
        pg.batch_execute(&sql).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    until(&c, "the bursts", Duration::from_secs(10), &feed_has("I", "burst 8.1")).await;

    // An update (REPLICA IDENTITY FULL: the old row is known) highlights what changed.
    psql(&db, "UPDATE orders SET qty = 5, note = 'more' WHERE id = 1");
    psql(&db, "INSERT INTO audit (what) VALUES ('qty of 1 changed'); INSERT INTO orders VALUES (2, 'pear', 1, NULL)");
    psql(&db, "DELETE FROM orders WHERE id = 2");
    until(&c, "the update in the feed", Duration::from_secs(10), &feed_has("U", "apple")).await;
    let changed = c
        .execute("return [...document.querySelectorAll('#feed tbody tr[data-kind=U] .col.changed b')].map(b => b.textContent)", vec![])
        .await
        .unwrap();
    assert_eq!(changed, json!(["qty", "note"]));
    let key = c
        .execute("return document.querySelector('#feed tbody tr[data-kind=U] td.key').innerText", vec![])
        .await
        .unwrap();
    assert_eq!(key, json!("id=1"), "the key is the primary key's, even with REPLICA IDENTITY FULL");
    until(&c, "the delete in the feed", Duration::from_secs(10), &feed_has("D", "id=2")).await;

    // The session's consumer streams while the viewer watches; the list shows it and its lag.
    let (mut consumer, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v2/sessions/orders/stream", server.addr)).await.unwrap();
    let mut last = String::new();
    for _ in 0..2 {
        let tx = next_changes(&mut consumer).await;
        last = tx["nextlsn"].as_str().unwrap().to_owned();
    }
    ack(&mut consumer, &last).await;
    let row = "document.querySelector('#sessions tbody tr[data-name=orders]')";
    until(
        &c,
        "the consumer in the list",
        Duration::from_secs(10),
        &format!("return {row}.innerText.includes('streaming')"),
    )
    .await;
    until(
        &c,
        "the last ack in the list",
        Duration::from_secs(10),
        &format!("return {row}.innerText.includes(' s ago')"),
    )
    .await;
    until(
        &c,
        "the retained WAL in the list",
        Duration::from_secs(10),
        &format!("return /\\d+(\\.\\d)? (B|KiB|MiB)/.test({row}.querySelectorAll('td')[7].innerText)"),
    )
    .await;
    until(
        &c,
        "the lag in the list",
        Duration::from_secs(10),
        &format!("return /^\\d+(\\.\\d)? (B|KiB|MiB)$/.test({row}.querySelector('td.lag').innerText)"),
    )
    .await;

    // Filters and pause.
    click(&c, "#filter-kinds input[value=I]").await;
    until(
        &c,
        "inserts filtered out",
        Duration::from_secs(5),
        "return [...document.querySelectorAll('#feed tbody tr[data-kind=I]')].every(r => r.hidden)",
    )
    .await;
    click(&c, "#filter-kinds input[value=I]").await;
    click(&c, "#pause").await;
    psql(&db, "INSERT INTO orders VALUES (3, 'plum', 7, 'while paused')");
    until(
        &c,
        "the change waits while paused",
        Duration::from_secs(10),
        "return document.querySelector('#pause').textContent.startsWith('Resume (1 waiting')",
    )
    .await;
    assert_eq!(c.execute(&feed_has("I", "plum"), vec![]).await.unwrap(), json!(false), "a paused feed adds no row");
    click(&c, "#pause").await;
    until(&c, "the paused change after resuming", Duration::from_secs(5), &feed_has("I", "plum")).await;
    assert_eq!(
        c.execute(&format!("return {row}.querySelectorAll('td')[7].className"), vec![]).await.unwrap(),
        json!("num warn"),
        "the retained WAL is past the threshold"
    );
    c.execute("document.activeElement.blur()", vec![]).await.unwrap();
    screenshot(&c, "feed").await;

    // The snapshot, a page at a time.
    c.execute(
        "document.querySelector('#sessions tbody tr[data-name=orders] td.actions button:nth-child(2)').click()",
        vec![],
    )
    .await
    .unwrap();
    fill(&c, "#snap-table", "public.orders").await;
    fill(&c, "#snap-limit", "1").await;
    click(&c, "#snapshot-form button[type=submit]").await;
    until(
        &c,
        "the first snapshot page",
        Duration::from_secs(10),
        "return document.querySelector('#snapshot tbody').innerText.includes('in the snapshot')",
    )
    .await;
    click(&c, "#snap-next").await;
    until(
        &c,
        "the second snapshot page",
        Duration::from_secs(10),
        "return document.querySelector('#snapshot tbody').innerText.includes('seed too')",
    )
    .await;
    screenshot(&c, "snapshot").await;

    // Releasing the snapshot: the browser says so clearly.
    let (status, _) = request(server.addr, "DELETE", "/v2/sessions/orders/snapshot", None).await;
    assert_eq!(status, 200);
    click(&c, "#snapshot-form button[type=submit]").await;
    until(
        &c,
        "the released snapshot's message",
        Duration::from_secs(10),
        "return document.querySelector('#snap-error').innerText.includes('no longer available')",
    )
    .await;

    // A bad create shows the API's error.
    click(&c, "#create > summary").await;
    fill(&c, "#create-form input[name=name]", "orders").await;
    click(&c, "#create-form button[type=submit]").await;
    until(
        &c,
        "the conflict's message",
        Duration::from_secs(10),
        "return document.querySelector('#action-error').innerText.includes('Cannot create session orders')",
    )
    .await;
    // It stays through the list's next polls (every 1.5 s), until dismissed.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let shown = c.execute("return document.querySelector('#action-error').innerText", vec![]).await.unwrap();
    assert!(shown.as_str().unwrap().contains("already"), "{shown}");
    click(&c, "#create > summary").await;
    click(&c, "#action-error").await;
    until(&c, "the message dismissed", Duration::from_secs(5), "return document.querySelector('#action-error').hidden")
        .await;

    // Drop, after confirming.
    drop(consumer);
    c.execute("document.querySelector('#sessions tbody tr[data-name=orders] button.danger').click()", vec![])
        .await
        .unwrap();
    until(&c, "the confirm dialog", Duration::from_secs(5), "return document.querySelector('#confirm-dialog').open")
        .await;
    screenshot(&c, "confirm-drop").await;
    click(&c, "#confirm-drop").await;
    until(
        &c,
        "the session gone",
        Duration::from_secs(20),
        "return !document.querySelector('#sessions tbody tr[data-name=orders]')",
    )
    .await;
    let (_, list) = server.get("/v2/sessions").await;
    assert_eq!(list, json!([]));

    c.close().await.unwrap();
    server.stop().await;
}

/// The list says which sessions are past their WAL budget and which lost their slot.
#[tokio::test]
async fn the_viewer_shows_budgets_and_invalidated_sessions() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE filler (a int)").await.unwrap();
    let mut settings = fast_settings(&db);
    settings.retention.check_interval = Duration::from_millis(200);
    let server = TestServer::start_with(settings).await;
    for (name, policy) in [("kept", "keep"), ("dropped", "drop")] {
        let body = json!({"name": name, "tables": ["orders"], "maxRetainedBytes": 1 << 20, "onMaxRetained": policy});
        let (status, created) = server.post("/v2/sessions", &body.to_string()).await;
        assert_eq!(status, 201, "{created}");
    }
    pg.batch_execute("INSERT INTO filler SELECT g FROM generate_series(1, 100000) g").await.unwrap();
    let driver = Driver::start();
    let c = driver.browser().await;
    c.goto(&format!("http://{}/", server.addr)).await.unwrap();
    let row = |name: &str, text: &str| {
        format!(
            "const r = document.querySelector('#sessions tbody tr[data-name={name}]'); return !!r && r.innerText.includes({})",
            json!(text)
        )
    };
    until(
        &c,
        "the dropped session marked",
        Duration::from_secs(20),
        &row("dropped", "invalidated · max_retained_bytes"),
    )
    .await;
    until(&c, "the kept session past its budget", Duration::from_secs(20), &row("kept", "of 1.0 MiB (keep) ⚠")).await;
    screenshot(&c, "budgets").await;
    c.close().await.unwrap();
    server.stop().await;
}

/// A session made through the form with DDL shows its table's schema changes in the
/// feed, between the rows written before and after them.
#[tokio::test]
async fn the_viewer_shows_schema_changes() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, item text)").await.unwrap();
    let server = TestServer::start(&db).await;
    let driver = Driver::start();
    let c = driver.browser().await;
    c.goto(&format!("http://{}/", server.addr)).await.unwrap();
    create_in_form(&c, "public.orders", &["#create-form input[name=ddl]"]).await;
    let (_, view) = server.get("/v2/sessions/orders").await;
    assert_eq!(view["ddl"], true, "{view}");
    pg.batch_execute("INSERT INTO orders VALUES (1, 'pen')").await.unwrap();
    pg.batch_execute("ALTER TABLE orders ADD COLUMN qty int").await.unwrap();
    pg.batch_execute("INSERT INTO orders VALUES (2, 'ink', 3)").await.unwrap();
    until(&c, "the schema change in the feed", Duration::from_secs(10), &feed_has("DDL", "ALTER TABLE")).await;
    until(&c, "the insert after it", Duration::from_secs(10), &feed_has("I", "ink")).await;
    let kinds = c
        .execute("return [...document.querySelectorAll('#feed tbody tr')].map(r => r.dataset.kind).reverse()", vec![])
        .await
        .unwrap();
    assert_eq!(kinds, json!(["I", "DDL", "I"]), "in order, newest on top");
    let ddl =
        c.execute("return document.querySelector('#feed tbody tr[data-kind=DDL]').innerText", vec![]).await.unwrap();
    assert!(ddl.as_str().unwrap().contains("qty integer"), "the columns after the change: {ddl}");
    screenshot(&c, "ddl").await;
    c.close().await.unwrap();
    server.stop().await;
}

/// A session's live backfill shows in its row: one done, with its rows, and one waiting
/// for a client, with what is left by Postgres's estimate.
#[tokio::test]
async fn the_viewer_shows_backfills() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders SELECT generate_series(1, 300); ANALYZE orders",
    )
    .await
    .unwrap();
    let server = TestServer::start(&db).await;
    for name in ["filled", "waiting"] {
        let (status, created) =
            server.post("/v2/sessions", &json!({"name": name, "tables": ["orders"]}).to_string()).await;
        assert_eq!(status, 201, "{created}");
    }
    let url = format!("ws://{}/v2/sessions/filled/stream", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    for name in ["filled", "waiting"] {
        let (status, body) = server.post(&format!("/v2/sessions/{name}/backfill"), r#"{"tables":["orders"]}"#).await;
        assert_eq!(status, 202, "{body}");
    }
    loop {
        let m = next_json(&mut ws).await;
        if m["backfill"]["last"] == true && m["backfill"]["more"] == false {
            ack(&mut ws, m["nextlsn"].as_str().unwrap()).await;
            break;
        }
    }
    let driver = Driver::start();
    let c = driver.browser().await;
    c.goto(&format!("http://{}/", server.addr)).await.unwrap();
    let row = |name: &str, text: &str| {
        format!(
            "const r = document.querySelector('#sessions tbody tr[data-name={name}]'); return !!r && r.innerText.includes({})",
            json!(text)
        )
    };
    until(&c, "the finished backfill", Duration::from_secs(20), &row("filled", "backfill done · 300 rows · 1 chunk"))
        .await;
    until(
        &c,
        "the waiting backfill",
        Duration::from_secs(20),
        &row("waiting", "backfill running · 0 rows · 0 chunks · ~300 to go"),
    )
    .await;
    screenshot(&c, "backfills").await;
    c.close().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn the_page_and_its_assets_carry_a_strict_policy_and_revalidate() {
    let db = common::fresh_db().await;
    let server = TestServer::start(&db).await;
    let reply = exchange(server.addr, b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(header(&reply, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(header(&reply, "x-content-type-options"), Some("nosniff"));
    let csp = header(&reply, "content-security-policy").unwrap();
    assert!(csp.contains("default-src 'self'") && csp.contains("connect-src 'self';"), "{csp}");
    // 'self' covers this origin's websockets; a bare ws: or wss: would allow any host's.
    assert!(!csp.contains("ws:") && !csp.contains("wss:"), "{csp}");
    assert!(reply.contains("<script type=\"module\" src=\"/assets/app.js\">"), "{reply}");
    let etag = header(&reply, "etag").unwrap().to_owned();

    let again = format!("GET / HTTP/1.1\r\nhost: localhost\r\nif-none-match: {etag}\r\nconnection: close\r\n\r\n");
    let reply = exchange(server.addr, again.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 304"), "{reply}");

    let reply =
        exchange(server.addr, b"GET /assets/feed.js HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(header(&reply, "content-type"), Some("text/javascript; charset=utf-8"));
    assert_ne!(header(&reply, "etag"), Some(etag.as_str()));

    let (status, body) = server.get("/assets/..%2Fviewer.rs").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].is_string(), "{body}");
    let (status, body) = server.post("/", "{}").await;
    assert_eq!(status, 405, "{body}");
    // The API's JSON answers, errors included, are never sniffed either.
    for path in ["/v2/sessions", "/no/such/path"] {
        let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
        let reply = exchange(server.addr, request.as_bytes()).await;
        assert_eq!(header(&reply, "x-content-type-options"), Some("nosniff"), "{reply}");
    }
    server.stop().await;
}

/// A page of another origin, from a server of its own: what it makes the browser send.
/// `{TARGET}` and `{SLOT}` are filled in.
const HOSTILE_PAGE: &str = r#"<!doctype html><title>elsewhere</title><script>
const target = "{TARGET}";
function socket(path) {
  return new Promise(resolve => {
    const s = new WebSocket(`ws://${target}${path}`);
    const seen = { opened: false, messages: 0 };
    s.onopen = () => { seen.opened = true; };
    s.onmessage = e => {
      seen.messages++;
      try { const m = JSON.parse(e.data); if (m.nextlsn) s.send(JSON.stringify({ lsn: m.nextlsn })); } catch (_) {}
    };
    s.onclose = e => resolve({ ...seen, code: e.code });
    setTimeout(() => { s.close(); resolve({ ...seen, code: 'open after 5 s' }); }, 5000);
  });
}
async function run() {
  const v2 = socket('/v2/sessions/orders/stream');
  const v1 = socket('/v1/lr/stream?slotName={SLOT}');
  let post;
  try {
    await fetch(`http://${target}/v2/sessions`, { method: 'POST', mode: 'no-cors',
      headers: { 'content-type': 'text/plain' }, body: JSON.stringify({ name: 'evil', tables: ['public.orders'] }) });
    post = 'sent';
  } catch (e) { post = 'failed: ' + e; }
  const img = await new Promise(r => { const i = new Image(); i.onload = () => r('load'); i.onerror = () => r('error'); i.src = `http://${target}/v1/init`; });
  window.results = { v2: await v2, v1: await v1, post, img, done: true };
}
run();
</script>"#;

/// Serves `page` to every request on a port of its own, until the test ends.
fn serve_page(page: String) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            use std::io::{Read, Write};
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                page.len()
            );
            let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(page.as_bytes()));
        }
    });
    port
}

/// A page on another origin (localhost, another port) tries what any web page could
/// against an unauthenticated server: read and ack a session's stream through a
/// websocket, open the v1 stream, create a session with a text/plain POST, reset the
/// default with an <img> of /v1/init. All refused; nothing changed; the session's real
/// consumer then gets the change the page would have taken.
#[tokio::test]
async fn a_page_of_another_origin_cannot_drive_the_server() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, item text)").await.unwrap();
    let server = TestServer::start(&db).await;
    let slot = server.init().await;
    let body = json!({"name": "orders", "tables": ["public.orders"]}).to_string();
    let (status, created) = server.post("/v2/sessions", &body).await;
    assert_eq!(status, 201, "{created}");
    pg.batch_execute("INSERT INTO orders VALUES (1, 'for the real consumer')").await.unwrap();
    let slots = || support::database_slots(&pg);
    let before = slots().await;
    assert!(before.contains(&slot), "{before:?}");

    let page = HOSTILE_PAGE.replace("{TARGET}", &server.addr.to_string()).replace("{SLOT}", &slot);
    let page_port = serve_page(page);
    let driver = Driver::start();
    let c = driver.browser().await;
    c.goto(&format!("http://localhost:{page_port}/")).await.unwrap();
    until(&c, "the page's attempts", Duration::from_secs(30), "return !!(window.results && window.results.done)").await;
    let results = c.execute("return window.results", vec![]).await.unwrap();
    assert_eq!(results["v2"]["opened"], json!(false), "{results}");
    assert_eq!(results["v1"]["opened"], json!(false), "{results}");
    assert_eq!(results["img"], json!("error"), "{results}");
    c.close().await.unwrap();

    let (_, sessions) = server.get("/v2/sessions").await;
    let names: Vec<&str> = sessions.as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["default", "orders"], "no session was created");
    assert_eq!(slots().await, before, "the default session was not reset");
    let (mut consumer, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v2/sessions/orders/stream", server.addr)).await.unwrap();
    let tx = next_changes(&mut consumer).await;
    assert_eq!(tx["change"][0]["columnvalues"][1], "for the real consumer", "{tx}");
    server.stop().await;
}

const SECRET: &[u8] = b"a browser test secret that is long enough";

fn hs256(claims: Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
}

#[tokio::test]
async fn with_jwt_the_page_asks_for_a_token_and_keeps_it_for_the_tab() {
    use pgdeltastream::server::{KeySource, Verifier};
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, item text)").await.unwrap();
    let mut settings = fast_settings(&db);
    settings.http.auth = Some(std::sync::Arc::new(Verifier::new(KeySource::Secret(SECRET), None, None).unwrap()));
    let server = TestServer::start_with(settings).await;
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let token = hs256(json!({"role": "admin", "exp": exp}));
    let bearer = format!("Bearer {token}");
    let body = json!({"name": "orders", "tables": ["orders"]}).to_string().into_bytes();
    let headers = [("content-type", "application/json"), ("authorization", bearer.as_str())];
    let (status, _) = raw_request(server.addr, "POST", "/v2/sessions", &headers, body).await;
    assert_eq!(status, 201);

    let driver = Driver::start();
    let c = driver.browser().await;
    // The page loads without a token, then asks for one.
    c.goto(&format!("http://{}/", server.addr)).await.unwrap();
    until(&c, "the token dialog", Duration::from_secs(20), "return document.querySelector('#token-dialog').open").await;
    screenshot(&c, "token").await;

    // A wrong token is refused and asked for again, with the server's reason.
    fill(&c, "#token", "not-a-token").await;
    click(&c, "#token-form button[type=submit]").await;
    until(
        &c,
        "the refusal",
        Duration::from_secs(10),
        "return document.querySelector('#token-dialog').open && !document.querySelector('#token-error').hidden",
    )
    .await;

    fill(&c, "#token", &token).await;
    click(&c, "#token-form button[type=submit]").await;
    until(
        &c,
        "the sessions",
        Duration::from_secs(20),
        "return !!document.querySelector('#sessions tbody tr[data-name=orders]')",
    )
    .await;
    let kept = c.execute("return sessionStorage.getItem('pgdeltastream.token')", vec![]).await.unwrap();
    assert_eq!(kept, json!(token), "the token is kept for the tab");
    let in_local = c.execute("return localStorage.length", vec![]).await.unwrap();
    assert_eq!(in_local, json!(0), "and nowhere that outlives it");

    // The feed's websocket carries the token as ?access_token=.
    c.execute("document.querySelector('#sessions tbody tr[data-name=orders] td.actions button').click()", vec![])
        .await
        .unwrap();
    until(
        &c,
        "the session is watched",
        Duration::from_secs(20),
        "return document.querySelector('#feed-status').textContent === 'watching orders'",
    )
    .await;
    pg.batch_execute("INSERT INTO orders VALUES (1, 'with a token')").await.unwrap();
    until(&c, "the insert in the feed", Duration::from_secs(10), &feed_has("I", "with a token")).await;

    // Forgetting the token asks again.
    click(&c, "#forget-token").await;
    until(&c, "the token dialog again", Duration::from_secs(20), "return document.querySelector('#token-dialog').open")
        .await;
    let kept = c.execute("return sessionStorage.getItem('pgdeltastream.token')", vec![]).await.unwrap();
    assert_eq!(kept, Value::Null);

    c.close().await.unwrap();
    server.stop().await;
}
