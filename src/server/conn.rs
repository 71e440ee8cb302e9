//! One client connection: hyper's HTTP/1.1 over it, with the header timeout, the idle
//! watchdog and graceful shutdown.
//!
//! hyper's header-read timeout (`poll_read_head` in its `proto/h1/conn.rs`) runs from
//! the moment hyper starts reading a request head until the head is complete, and it
//! also starts while a kept-alive connection waits for its next request: so it ends
//! slow heads and idle kept-alive connections alike. The idle watchdog covers the
//! rest: a request whose body does not come, a response nobody reads.

use std::convert::Infallible;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::HttpSettings;
use super::io::{Activity, Io};
use super::tls::{self, Stream};

/// Request heads over this are refused with 431 (hyper's default is the ~400 KiB of
/// its read buffer); it leaves room for a URI up to hyper's own limit (414 beyond).
const MAX_HEAD: usize = 96 * 1024;

pub(super) fn builder(settings: &HttpSettings) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new()).header_read_timeout(settings.header_timeout).max_header_size(MAX_HEAD);
    b
}

/// Serves one connection until it ends, goes silent, or the server stops.
pub(super) async fn serve(
    tcp: TcpStream,
    place: OwnedSemaphorePermit,
    app: Router,
    builder: Arc<http1::Builder>,
    settings: Arc<HttpSettings>,
    stop: CancellationToken,
) {
    let stream = match &settings.tls {
        None => Stream::Plain(tcp),
        Some(tls) => tokio::select! {
            stream = tls::accept(tcp, tls, settings.header_timeout) => match stream {
                Some(stream) => stream,
                None => return,
            },
            _ = stop.cancelled() => return,
        },
    };
    let idle_timeout = settings.idle_timeout;
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(Io::new(stream, activity.clone(), place));
    let app = TowerToHyperService::new(app);
    let service = {
        let activity = activity.clone();
        service_fn(move |req| handle(app.clone(), activity.clone(), req))
    };
    let mut conn = pin!(builder.serve_connection(io, service).with_upgrades());
    let mut watchdog = Watchdog::new(activity, idle_timeout);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.cancelled(), if !stopping => {
                // Ends the connection at once if it is idle; else after the response.
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            silence = watchdog.silence() => match silence {
                Silence::Quiet => conn.as_mut().graceful_shutdown(),
                Silence::Dead => {
                    tracing::debug!("closing a connection on which nothing moved");
                    return;
                }
            },
        }
    }
}

/// One request, through the router, telling the watchdog when the server is at work.
async fn handle(
    app: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    req: hyper::Request<Incoming>,
) -> Result<axum::response::Response, Infallible> {
    let working = Working(activity.clone());
    activity.set_working(true);
    let req = req.map(|body| Body::new(Watched { body, activity: activity.clone(), client_side: true }));
    let response = hyper::service::Service::call(&app, req).await?;
    drop(working);
    Ok(response.map(|body| Body::new(Watched { body, activity, client_side: false })))
}

/// The handler is at work until its future ends (or is dropped).
struct Working(Arc<Activity>);

impl Drop for Working {
    fn drop(&mut self) {
        self.0.set_working(false);
    }
}

/// A body that tells whose turn it is. Reading the request body, a pending poll waits
/// for the client; producing the response body, a pending poll is the server at work.
struct Watched<B> {
    body: B,
    activity: Arc<Activity>,
    client_side: bool,
}

impl<B: HttpBody + Unpin> HttpBody for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        self.activity.set_working(polled.is_pending() != self.client_side);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

enum Silence {
    /// Nothing moved for the idle timeout: time for a graceful shutdown.
    Quiet,
    /// And still nothing, as long again: time to close.
    Dead,
}

struct Watchdog {
    activity: Arc<Activity>,
    tick: Interval,
    period: Duration,
    idle_timeout: Duration,
    last: u64,
    quiet_for: Duration,
    warned: bool,
}

impl Watchdog {
    fn new(activity: Arc<Activity>, idle_timeout: Duration) -> Watchdog {
        // Checked four times per timeout: a connection goes after 1 to 1.25 timeouts.
        let period = (idle_timeout / 4).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let last = activity.moved();
        Watchdog { activity, tick, period, idle_timeout, last, quiet_for: Duration::ZERO, warned: false }
    }

    /// Resolves when the connection has been silent for the idle timeout (cancel-safe).
    async fn silence(&mut self) -> Silence {
        loop {
            self.tick.tick().await;
            let moved = self.activity.moved();
            if moved != self.last || self.activity.working() {
                self.last = moved;
                self.quiet_for = Duration::ZERO;
                continue;
            }
            self.quiet_for += self.period;
            if self.quiet_for >= self.idle_timeout {
                self.quiet_for = Duration::ZERO;
                if std::mem::replace(&mut self.warned, true) {
                    return Silence::Dead;
                }
                return Silence::Quiet;
            }
        }
    }
}
