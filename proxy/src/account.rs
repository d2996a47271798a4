//! One request's account: from its head to the end of its response, what `/metrics` and
//! the access log record about it. Adapters open one per request ([`Proxy::account`]),
//! tell it what happens (the backend chosen, the status sent, body bytes each way, the
//! first response byte), and drop it when the response has ended or the client has gone:
//! the drop records it. Nothing here allocates unless the access log is on.
//!
//! [`Proxy::account`]: crate::Proxy::account

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lb_core::Route;

use crate::lease::LeaseGuard;
use crate::metrics::{AffinityPolicy, BackendStats, Direction, Lookup, Metrics};
use crate::reply::{self, ProxyError, Reply};
use crate::reqlog::{json_string, rfc3339_ms};
use crate::request_id::RequestId;
use crate::runtime::Runtime;

/// Where access log lines go (`--access-log`): called once per request, from whichever
/// task ends it; it must not block (the CLI's writer queues the line).
pub type LineSink = Arc<dyn Fn(String) + Send + Sync>;

/// `--access-log`: the sink and the line's form.
#[derive(Clone)]
pub struct AccessLog {
    /// Where lines go.
    pub sink: LineSink,
    /// JSON lines (`--log-format json`), else a combined-log-style line.
    pub json: bool,
    /// Keep the query string in the path (`--access-log-query`).
    pub query: bool,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("json", &self.json)
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

/// What an account needs to know of a request head.
#[derive(Clone, Copy)]
pub struct Arrival<'a> {
    /// When the head was read.
    pub at: Instant,
    /// The client.
    pub client: SocketAddr,
    /// Method.
    pub method: &'a str,
    /// Target as sent (path and query, or absolute form).
    pub target: &'a str,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: &'static str,
    /// The value of the head's first field of a name (given in lower case), if any:
    /// asked for `X-Request-Id`, and for `User-Agent` only when the access log is on.
    pub header: &'a dyn Fn(&str) -> Option<&'a [u8]>,
}

/// One request's account; see the module docs.
pub struct Account {
    metrics: Arc<Metrics>,
    arrived: Instant,
    id: RequestId,
    /// The client sent an `X-Request-Id` (`Some`), taken (`true`) or replaced.
    sent_id: Option<bool>,
    backend: Option<Arc<BackendStats>>,
    selected: Option<Instant>,
    first_byte: Option<Instant>,
    status: u16,
    bytes_in: u64,
    body_in: Option<Arc<AtomicU64>>,
    bytes_out: u64,
    route: Route,
    affinity: Option<AffinityPolicy>,
    access: Option<Box<Access>>,
}

/// What only the access log needs.
struct Access {
    log: AccessLog,
    client: SocketAddr,
    method: String,
    path: String,
    version: &'static str,
    user_agent: String,
    backend: Option<Arc<str>>,
    policy: &'static str,
}

impl Account {
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        head: &Arrival<'_>,
        affinity: Option<AffinityPolicy>,
        access: Option<(&AccessLog, &'static str)>,
    ) -> Account {
        let sent = (head.header)(crate::request_id::HEADER);
        let (id, kept_id) = RequestId::for_request(sent);
        let sent_id = sent.map(|_| kept_id);
        let access = access.map(|(log, policy)| {
            let path = if log.query {
                head.target
            } else {
                head.target.split('?').next().unwrap_or("")
            };
            Box::new(Access {
                log: log.clone(),
                client: head.client,
                method: head.method.to_string(),
                path: path.to_string(),
                version: head.version,
                user_agent: (head.header)("user-agent")
                    .map(|u| String::from_utf8_lossy(u).into_owned())
                    .unwrap_or_default(),
                backend: None,
                policy,
            })
        });
        Account {
            metrics,
            arrived: head.at,
            id,
            sent_id,
            backend: None,
            selected: None,
            first_byte: None,
            status: 0,
            bytes_in: 0,
            body_in: None,
            bytes_out: 0,
            route: Route::Plain,
            affinity,
            access,
        }
    }

    /// The request's id.
    pub fn id(&self) -> &RequestId {
        &self.id
    }

    /// Whether the id is the client's own (its `X-Request-Id` goes on unchanged); else
    /// the request's `X-Request-Id` must be set to [`id`](Self::id).
    pub fn kept_client_id(&self) -> bool {
        self.sent_id == Some(true)
    }

    /// Whether the client sent an `X-Request-Id` that was not taken (it must go: the
    /// request carries [`id`](Self::id) instead).
    pub fn replaced_client_id(&self) -> bool {
        self.sent_id == Some(false)
    }

    /// When the request's head arrived.
    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    /// The backend `guard` leases serves the request (again after a failover).
    pub fn serve<R: Runtime>(&mut self, guard: &mut LeaseGuard<R>) {
        guard.id = Some(self.id.clone());
        self.backend = Some(guard.upstream().stats.clone());
        self.selected = Some(guard.selected());
        self.route = guard.route();
        if let Some(a) = &mut self.access {
            a.backend = Some(guard.upstream().url().clone());
        }
    }

    /// The status of the response head sent to the client.
    pub fn status(&mut self, status: u16) {
        self.status = status;
    }

    /// A reply `lb` makes itself for `e`, with the request's id; its status is the
    /// account's, and a refusal counts as a rejection.
    pub fn reply(&mut self, e: ProxyError) -> Reply {
        let r = reply::error_for(e, Some(&self.id));
        self.replied(&r);
        r
    }

    /// A reply `lb` made (or passes on, with the request's id added), now sent.
    pub fn replied(&mut self, r: &Reply) {
        self.status = r.status;
        if let Some(why) = r.rejection {
            self.metrics.rejected(why);
        }
    }

    /// The first byte of the response body is going to the client now (later calls do
    /// nothing).
    pub fn first_byte(&mut self) {
        if self.first_byte.is_none() {
            self.first_byte = Some(Instant::now());
        }
    }

    /// `n` response body bytes went to the client.
    pub fn bytes_out(&mut self, n: u64) {
        self.bytes_out += n;
    }

    /// `n` request body bytes came from the client.
    pub fn bytes_in(&mut self, n: u64) {
        self.bytes_in += n;
    }

    /// A counter of request body bytes for a body that streams apart from the account
    /// (the tokio build's upload): what it counts is added when the account ends.
    pub fn body_counter(&mut self) -> Arc<AtomicU64> {
        self.body_in.get_or_insert_with(Default::default).clone()
    }

    fn access_line(&self, a: &Access, status: u16, took_us: u64) -> String {
        let now = SystemTime::now();
        let took = std::time::Duration::from_micros(took_us);
        let unix_ms = now
            .checked_sub(took)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        let first_byte = match (self.selected, self.first_byte) {
            (Some(s), Some(f)) => Some(f.saturating_duration_since(s).as_secs_f64()),
            _ => None,
        };
        let (route, depth) = route_words(self.route);
        let bytes_in = self.total_in();
        let mut out = String::with_capacity(256 + a.path.len());
        if a.log.json {
            let _ = write!(
                out,
                r#"{{"ts":"{}","event":"access","client":"{}","method":{},"path":{},"version":"{}","status":{},"backend":{},"bytes_in":{},"bytes_out":{},"duration_s":{:.6},"first_byte_s":{},"request_id":{},"user_agent":{},"policy":"{}","route":{},"depth":{}}}"#,
                rfc3339_ms(unix_ms),
                a.client,
                json_string(&a.method),
                json_string(&a.path),
                a.version,
                status,
                a.backend.as_deref().map_or("null".into(), json_string),
                bytes_in,
                self.bytes_out,
                took.as_secs_f64(),
                first_byte.map_or("null".into(), |f| format!("{f:.6}")),
                json_string(self.id.as_str()),
                json_string(&a.user_agent),
                a.policy,
                route.map_or("null".into(), |r| format!("\"{r}\"")),
                depth.map_or("null".into(), |d| d.to_string()),
            );
        } else {
            // Combined log format's first fields, then ours as key=value.
            let _ = write!(
                out,
                r#"{} - - [{}] "{} {} {}" {} {} "-" {} in={} backend={} duration={:.6} first_byte={} id={} policy={} route={}"#,
                a.client.ip(),
                rfc3339_ms(unix_ms),
                a.method,
                a.path,
                a.version,
                status,
                self.bytes_out,
                json_string(if a.user_agent.is_empty() {
                    "-"
                } else {
                    &a.user_agent
                }),
                bytes_in,
                a.backend.as_deref().unwrap_or("-"),
                took.as_secs_f64(),
                first_byte.map_or("-".into(), |f| format!("{f:.6}")),
                self.id,
                a.policy,
                match (route, depth) {
                    (Some(r), Some(d)) => format!("{r}:{d}"),
                    (Some(r), None) => r.to_string(),
                    _ => "-".into(),
                },
            );
        }
        out.push('\n');
        out
    }

    fn total_in(&self) -> u64 {
        self.bytes_in
            + self
                .body_in
                .as_ref()
                .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// The route as the access log words it, and the matched depth where one applies (not
/// for the hash policies, whose picks match no prefix: their depth is 0).
fn route_words(route: Route) -> (Option<&'static str>, Option<u32>) {
    let depth = |d: u32| (d > 0).then_some(d);
    match route {
        Route::Plain => (None, None),
        Route::Hit { depth: d } => (Some("hit"), depth(d)),
        Route::Miss => (Some("miss"), None),
        Route::Overflow { depth: d } => (Some("overflow"), depth(d)),
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let now = Instant::now();
        let took = now.saturating_duration_since(self.arrived);
        // No response head reached the client: it left first (nginx's 499).
        let status = if self.status == 0 { 499 } else { self.status };
        match &self.backend {
            Some(b) => {
                let first = match (self.selected, self.first_byte) {
                    (Some(s), Some(f)) => Some(f.saturating_duration_since(s)),
                    _ => None,
                };
                b.answered(status, took, first);
            }
            None => self.metrics.answered(status, took),
        }
        let bytes_in = self.total_in();
        if bytes_in > 0 {
            self.metrics.bytes(Direction::In, bytes_in);
        }
        if self.bytes_out > 0 {
            self.metrics.bytes(Direction::Out, self.bytes_out);
        }
        if let Some(policy) = self.affinity {
            let lookup = match self.route {
                Route::Hit { .. } => Some(Lookup::Hit),
                Route::Miss => Some(Lookup::Miss),
                Route::Overflow { .. } => Some(Lookup::Overflow),
                Route::Plain => None,
            };
            if let Some(l) = lookup {
                self.metrics.affinity(policy, l);
            }
        }
        if let Some(a) = &self.access {
            let line = self.access_line(a, status, took.as_micros() as u64);
            (a.log.sink)(line);
        }
    }
}
