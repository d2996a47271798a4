//! What an adapter needs to run a proxy: validated settings and parsed backend targets.
//!
//! Plain data, no IO: the CLI builds a [`Settings`], both adapters consume it, so the two
//! builds behave the same.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lb_core::affinity::BodyFields;
use lb_core::{BackendSpec, Config, Event, Policy, RequestKey, RequestMeta};

/// Idle pooled connections to a backend are closed after this long. vLLM's server
/// (uvicorn) closes idle keep-alive connections after 5 s; reusing one it is closing
/// fails the request, so ours must be shorter.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// TCP keep-alive on every backend socket: the first probe after this long without a
/// segment either way, then one every [`BACKEND_KEEPALIVE_INTERVAL`], and the connection
/// is declared dead after [`BACKEND_KEEPALIVE_PROBES`] unanswered probes. So a backend
/// that vanishes from the network (a partition, a host that loses power) in the middle of
/// a silent stream is detected within 15 s + 3 × 5 s = 30 s: the stream is cut and its
/// lease released then, not at `--timeout` (4 h by default). Data in flight is bounded by
/// the kernel's retransmission timeout instead.
pub const BACKEND_KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
/// See [`BACKEND_KEEPALIVE_IDLE`].
pub const BACKEND_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// See [`BACKEND_KEEPALIVE_IDLE`].
pub const BACKEND_KEEPALIVE_PROBES: u32 = 3;

/// Default cap on a request or response head.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Default of `--client-body-timeout` and `--client-write-timeout`.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// `--max-client-conns` when the open-files limit cannot be read.
pub const DEFAULT_MAX_CLIENT_CONNS: usize = 10_000;

/// The default `--max-client-conns` for a process allowed `nofile` open files: what is
/// left after a reserve for listeners, logs and probes, halved, since each client
/// connection may hold a backend connection too.
pub fn max_client_conns_for(nofile: u64) -> usize {
    let usable = nofile.saturating_sub(64) / 2;
    usize::try_from(usable).unwrap_or(usize::MAX).max(16)
}

/// Default of `--connect-retries`: a request whose backend cannot be reached tries up to
/// this many others.
pub const DEFAULT_CONNECT_RETRIES: u32 = 2;

/// Default of `--replay-buffer`: the most request body bytes kept to send a request
/// again when its reused connection turns out closed (enough for almost every
/// completion request).
pub const DEFAULT_REPLAY_BUFFER: usize = 64 * 1024;

/// The pool idle limit for a backend that announced `Keep-Alive: timeout=N` (`secs`):
/// one second below it, half of it for `N` under 2 s, never above `default`. A backend
/// closes idle connections at `N`; reusing one that close is on its way fails.
pub fn learned_idle(default: Duration, secs: u64) -> Duration {
    let announced = Duration::from_secs(secs);
    let below = if secs >= 2 {
        announced - Duration::from_secs(1)
    } else {
        announced / 2
    };
    below.min(default)
}

/// How long a connection to one backend may sit idle in the pool: the default (`POOL_IDLE_TIMEOUT`)
/// until the backend announces a shorter limit in a `Keep-Alive: timeout=N` response
/// field ([`learned_idle`]). Shared by every shard.
#[derive(Debug)]
pub struct IdleLimit {
    default: Duration,
    ms: AtomicU64,
}

impl IdleLimit {
    /// The limit `default`, until a backend says otherwise.
    pub fn new(default: Duration) -> Self {
        IdleLimit {
            default,
            ms: AtomicU64::new(default.as_millis() as u64),
        }
    }

    /// The limit now.
    pub fn get(&self) -> Duration {
        Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }

    /// Learns from a response's `Keep-Alive` field value.
    pub fn learn(&self, keep_alive: &[u8]) {
        if let Some(secs) = lb_http1::keep_alive_timeout(keep_alive) {
            let ms = learned_idle(self.default, secs).as_millis() as u64;
            if ms != self.ms.load(Ordering::Relaxed) {
                self.ms.store(ms, Ordering::Relaxed);
            }
        }
    }
}

/// Everything one run of the proxy needs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The backends, in the order given.
    pub backends: Vec<BackendSpec>,
    /// The core's configuration.
    pub core: Config,
    /// Whole-request deadline (head and body, both ways); exceeded → 504 or a cut stream.
    pub request_timeout: Duration,
    /// Deadline for establishing a backend connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Path probed on each backend (appended to its URL's path).
    pub health_path: String,
    /// Engine load polls (`--load-signal`, `--load-path`); their interval and the
    /// saturation thresholds are in `core.engine`.
    pub load: crate::load::LoadSettings,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// Extra PEM CA bundle trusted for `https://` backends (besides the system roots).
    pub backend_ca: Option<PathBuf>,
    /// Idle pooled connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Largest request or response head accepted (bigger requests get 431).
    pub max_head_bytes: usize,
    /// A client must send a complete request head within this long (else 408).
    pub head_timeout: Duration,
    /// A request body that sends nothing for this long is given up (408 if no response
    /// has begun): a client trickling its body cannot hold a slot for `--timeout`.
    pub client_body_timeout: Duration,
    /// A client that reads nothing of its response for this long is cut off (a streaming
    /// client reads continuously).
    pub client_write_timeout: Duration,
    /// Most client connections open at once; at the limit `lb` stops accepting and new
    /// clients wait in the kernel's backlog (HAProxy's `maxconn`).
    pub max_client_conns: usize,
    /// Most request body bytes kept to send a request again on a fresh connection when
    /// its reused one failed before any response byte (`--replay-buffer`).
    pub replay_buffer: usize,
    /// How many other backends a request may go to when its backend cannot be reached
    /// (connect refused or timed out, or reset before any byte of the request was
    /// written), `--connect-retries`.
    pub connect_retries: u32,
    /// What `consistent-hash` routing hashes.
    pub hash_key: HashKey,
    /// The request log (`--log-to`): where each request's entry goes, and the cap on each
    /// captured body. The CLI owns the file and its writer thread.
    pub request_log: Option<crate::reqlog::RequestLog>,
    /// `--admin-bind`: the admin listener's address (`None`: off).
    pub admin: Option<SocketAddr>,
    /// Whether `--admin-bind` was given: then an address that cannot be bound stops the
    /// start; the default's failure only costs the admin listener (with a warning).
    pub admin_required: bool,
    /// `--access-log`: one line per request (off: `None`).
    pub access_log: Option<crate::account::AccessLog>,
    /// `--max-conns`, for backends added while running.
    pub max_conns: u32,
    /// `--backends-file`: backends read from this file at start and whenever it changes.
    pub backends_file: Option<std::path::PathBuf>,
    /// `--admin-token-file`'s token: needed (as `Authorization: Bearer`) for `/admin/*`
    /// on an admin listener that is not on loopback.
    pub admin_token: Option<String>,
    /// `--discover`: names whose addresses are backends (see [`crate::discovery`]).
    pub discover: Vec<Discover>,
    /// `--discover-interval`: how often each name is resolved again (sooner when its
    /// records' TTL is shorter; never more than once a second).
    pub discover_interval: Duration,
    /// `--resolver`: the DNS server asked (UDP, TTLs honoured); `None`: the system
    /// resolver.
    pub resolver: Option<SocketAddr>,
}

/// The default `--discover-interval`.
pub const DEFAULT_DISCOVER_INTERVAL: Duration = Duration::from_secs(5);

/// The shortest time between two lookups of one name, whatever its TTL says.
pub const MIN_DISCOVER_INTERVAL: Duration = Duration::from_secs(1);

/// One `--discover` name: `dns://NAME[:PORT]` (http backends) or `dns+https://NAME[:PORT]`
/// (TLS backends, certificate checked for NAME). Each address NAME resolves to is a
/// backend at `ADDR:PORT`, sent `Host: NAME[:PORT]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discover {
    /// The name (a host name, lowercase; no IP literal).
    pub name: String,
    /// The backends' port (the scheme's default when none is given: 80, or 443).
    pub port: u16,
    /// Whether the backends speak TLS (`dns+https://`).
    pub tls: bool,
}

impl Discover {
    /// Parses `dns://NAME[:PORT]` or `dns+https://NAME[:PORT]`. The error says what is
    /// wrong, without naming a flag.
    pub fn parse(arg: &str) -> Result<Discover, String> {
        let (tls, rest) = match arg.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "dns" => (false, rest),
                "dns+https" => (true, rest),
                "dns+http" => (false, rest),
                other => {
                    return Err(format!(
                        "'{arg}': unsupported scheme '{other}' (use dns://NAME:PORT or dns+https://NAME:PORT)"
                    ))
                }
            },
            None => {
                return Err(format!(
                    "'{arg}': expected dns://NAME:PORT or dns+https://NAME:PORT"
                ))
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@', '[', ']']) {
            return Err(format!(
                "'{arg}': only a name and a port (no path, query, user or IP literal)"
            ));
        }
        let (name, port) = split_host_port(rest).map_err(|e| format!("'{arg}': {e}"))?;
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let label_ok =
            |l: &str| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-');
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!("'{arg}': '{name}' is not a valid DNS name"));
        }
        if name.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "'{arg}': an IP address is no name to discover (use --backends)"
            ));
        }
        let port = port.unwrap_or(if tls { 443 } else { 80 });
        if port == 0 {
            return Err(format!("'{arg}': port 0 is not a valid backend port"));
        }
        Ok(Discover { name, port, tls })
    }

    /// The backend at `ip` that this name resolved to.
    pub fn target(&self, ip: IpAddr) -> Target {
        Target::discovered(self.tls, ip, self.port, &self.name)
    }
}

impl fmt::Display for Discover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "dns+https" } else { "dns" };
        write!(f, "{scheme}://{}:{}", self.name, self.port)
    }
}

/// Parses one backend in `--backends` syntax: `URL` or `URL#weight=N` (`host:port` means
/// `http://host:port`), with the cap `max_conns`. The error says what is wrong, without
/// naming a flag.
pub fn parse_backend(arg: &str, max_conns: u32) -> Result<BackendSpec, String> {
    let (url, weight) = match arg.split_once('#') {
        None => (arg, 1),
        Some((url, opt)) => {
            let w = opt
                .strip_prefix("weight=")
                .ok_or_else(|| format!("'{arg}': expected URL#weight=N after '#'"))?;
            let w: u32 = w
                .parse()
                .ok()
                .filter(|w| (1..=lb_core::MAX_WEIGHT).contains(w))
                .ok_or_else(|| {
                    format!(
                        "'{arg}': weight must be a whole number from 1 to {}",
                        lb_core::MAX_WEIGHT
                    )
                })?;
            (url, w)
        }
    };
    let target = Target::parse(url).map_err(|e| e.to_string())?;
    Ok(BackendSpec {
        url: target.url.to_string(),
        weight,
        max_conns,
    })
}

/// Parses a `--backends-file`: one backend per line in `--backends` syntax, blank lines
/// and `#` comments (whole-line or trailing) ignored. The error names the line. A file
/// with no backend is an error too: a file caught half-written must not empty the pool.
pub fn parse_backends_file(text: &str, max_conns: u32) -> Result<Vec<BackendSpec>, String> {
    let mut specs: Vec<BackendSpec> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // A `#` starts a comment unless it is the `#weight=` of a backend.
        let line = strip_comment(line).trim();
        if line.is_empty() {
            continue;
        }
        let spec = parse_backend(line, max_conns).map_err(|e| format!("line {}: {e}", i + 1))?;
        if specs.iter().any(|s| s.url == spec.url) {
            return Err(format!("line {}: {} is listed twice", i + 1, spec.url));
        }
        specs.push(spec);
    }
    if specs.is_empty() {
        return Err("no backend in the file".into());
    }
    Ok(specs)
}

/// `line` without its comment: from a `#` that does not begin `#weight=`.
fn strip_comment(line: &str) -> &str {
    let mut from = 0;
    while let Some(i) = line[from..].find('#') {
        let at = from + i;
        if !line[at..].starts_with("#weight=") {
            return &line[..at];
        }
        from = at + 1;
    }
    line
}

impl Settings {
    /// Settings for `backends` on `listen`, everything else at the CLI's defaults (the
    /// README's flags table): a base for tests and embedders, `Settings { .., ..new }`.
    pub fn new(listen: SocketAddr, backends: Vec<BackendSpec>) -> Settings {
        Settings {
            listen,
            backends,
            core: Config::default(),
            request_timeout: Duration::from_secs(4 * 3600),
            connect_timeout: Duration::from_secs(5),
            health_path: "/v1/models".into(),
            load: crate::load::LoadSettings::default(),
            shutdown_timeout: Duration::from_secs(30),
            backend_ca: None,
            pool_idle_timeout: POOL_IDLE_TIMEOUT,
            max_head_bytes: MAX_HEAD_BYTES,
            head_timeout: Duration::from_secs(30),
            client_body_timeout: DEFAULT_CLIENT_TIMEOUT,
            client_write_timeout: DEFAULT_CLIENT_TIMEOUT,
            max_client_conns: DEFAULT_MAX_CLIENT_CONNS,
            replay_buffer: DEFAULT_REPLAY_BUFFER,
            connect_retries: DEFAULT_CONNECT_RETRIES,
            hash_key: HashKey::User,
            request_log: None,
            access_log: None,
            admin: None,
            admin_required: false,
            max_conns: 0,
            admin_token: None,
            backends_file: None,
            discover: Vec::new(),
            discover_interval: DEFAULT_DISCOVER_INTERVAL,
            resolver: None,
        }
    }

    /// Whether the policy needs the request body (its first
    /// [`MAX_BODY_PREFIX`](lb_core::affinity::MAX_BODY_PREFIX) bytes) before selecting.
    /// Model pools need it too: see [`Proxy::routes_by_body`](crate::Proxy::routes_by_body).
    pub fn routes_by_body(&self) -> bool {
        match self.core.policy {
            Policy::CacheAware | Policy::PrefixHash => true,
            Policy::ConsistentHash => self.hash_key == HashKey::User,
            _ => false,
        }
    }

    /// What a request routes by, from what the adapter read of it: `prefix` is the body's
    /// first bytes and whether the body ended within them (read when
    /// [`routes_by_body`](Self::routes_by_body), or with model pools), `header` looks a
    /// request header up by its lowercase name, and `models` says whether model pools are
    /// on (then the body's `model` is taken). A body that did not fit in the prefix gives
    /// no body key and no model. The body is parsed once.
    pub fn route_keys<'h>(
        &self,
        prefix: Option<(&[u8], bool)>,
        header: impl FnOnce(&str) -> Option<&'h [u8]>,
        models: bool,
    ) -> RouteKeys {
        let mut keys = RouteKeys::default();
        let policy = self.core.policy;
        if let Some((data, ended)) = prefix {
            let chain = matches!(policy, Policy::CacheAware | Policy::PrefixHash);
            // An empty body names nothing (and parsing it would build a JSON error).
            let fields = if ended && !data.is_empty() {
                BodyFields::parse(data, chain)
            } else {
                BodyFields::default()
            };
            if models {
                keys.model.clone_from(&fields.model);
            }
            match policy {
                Policy::CacheAware => keys.affinity = Some(fields.into_cache_key()),
                // The prompt first; without one, the user (then the client address).
                Policy::PrefixHash => {
                    if fields.chain.is_none() {
                        keys.key = fields.user.map(String::into_bytes);
                    }
                    keys.affinity = Some(fields.chain);
                }
                Policy::ConsistentHash if self.hash_key == HashKey::User => {
                    keys.key = fields.user.map(String::into_bytes);
                }
                _ => {}
            }
        }
        if let (Policy::ConsistentHash, HashKey::Header(name)) = (policy, &self.hash_key) {
            keys.key = header(name).map(<[u8]>::to_vec);
        }
        keys
    }
}

/// The keys one request routes by ([`Settings::route_keys`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteKeys {
    /// The hashing key (`--hash-key`'s header or `user` field).
    pub key: Option<Vec<u8>>,
    /// The cache-aware key (the prompt chain for prefix-hash).
    pub affinity: Option<RequestKey>,
    /// The model the body names (with model pools on).
    pub model: Option<String>,
}

impl RouteKeys {
    /// The request's meta for [`Balancer::select`](lb_core::Balancer::select).
    pub fn meta(&self, client_ip: IpAddr) -> RequestMeta<'_> {
        RequestMeta {
            client_ip: Some(client_ip),
            key: self.key.as_deref(),
            affinity: self.affinity.as_ref(),
            model: self.model.as_deref(),
        }
    }
}

/// What `--routing consistent-hash` hashes (`--hash-key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// A request header's value (name lowercase); requests without it hash the client IP.
    Header(String),
    /// The OpenAI `user` field of a JSON body; requests without it hash the client IP.
    User,
    /// The client's IP address.
    ClientIp,
}

impl std::str::FromStr for HashKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "user" => Ok(HashKey::User),
            "client-ip" => Ok(HashKey::ClientIp),
            _ => match s.strip_prefix("header:") {
                Some(name)
                    if !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) =>
                {
                    Ok(HashKey::Header(name.to_ascii_lowercase()))
                }
                _ => Err(format!(
                    "'{s}' is not a hash key (use header:NAME, user or client-ip)"
                )),
            },
        }
    }
}

/// A backend URL taken apart for the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The URL as given (normalised: a scheme is always present, no trailing slash).
    pub url: Arc<str>,
    /// Whether to speak TLS.
    pub tls: bool,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Port (the scheme's default when none is given).
    pub port: u16,
    /// `host[:port]` as the backend sees it in `Host`: brackets kept for IPv6, the port left
    /// out when it is the scheme's default.
    pub authority: String,
    /// Path prefix every proxied path is appended to: empty, or `/base` (no trailing slash).
    pub path_prefix: String,
    /// The name TLS checks the certificate for (and sends as SNI): `host`, but for a
    /// backend found by `--discover` the name it was found under, not its address.
    pub tls_name: String,
}

/// Why a backend URL was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlError {
    /// The offending URL.
    pub url: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid backend URL '{}': {}", self.url, self.reason)
    }
}

impl std::error::Error for UrlError {}

impl Target {
    /// Parses `http://host[:port][/prefix]`, `https://...`, or `host:port` (meaning http).
    /// Query strings, fragments and user info are refused.
    pub fn parse(input: &str) -> Result<Target, UrlError> {
        let err = |reason: &str| UrlError {
            url: input.to_string(),
            reason: reason.to_string(),
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("empty"));
        }
        let (tls, rest) = match s.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "http" => (false, rest),
                "https" => (true, rest),
                other => {
                    return Err(err(&format!(
                        "unsupported scheme '{other}' (use http or https)"
                    )))
                }
            },
            None => (false, s),
        };
        if rest.contains(['?', '#']) {
            return Err(err("query strings and fragments are not allowed"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(err("user info is not supported"));
        }
        if authority.is_empty() {
            return Err(err("missing host"));
        }
        let (host, port) = split_host_port(authority).map_err(|r| err(&r))?;
        let default_port = if tls { 443 } else { 80 };
        let port = port.unwrap_or(default_port);
        if port == 0 {
            return Err(err("port 0 is not a valid backend port"));
        }
        if path
            .chars()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(err("the path contains spaces or control characters"));
        }
        let path_prefix = path.trim_end_matches('/').to_string();
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let authority = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        let url = format!(
            "{}://{authority}{path_prefix}",
            if tls { "https" } else { "http" }
        );
        Ok(Target {
            url: url.into(),
            tls,
            tls_name: host.clone(),
            host,
            port,
            authority,
            path_prefix,
        })
    }

    /// A backend found by `--discover` under `name`: connected to at `ip:port` (its URL
    /// says so), but sent `Host: name[:port]` (the port left out when it is the scheme's
    /// default) and, over TLS, checked as `name`: what the backend would see were it
    /// reached by name.
    pub fn discovered(tls: bool, ip: IpAddr, port: u16, name: &str) -> Target {
        let scheme = if tls { "https" } else { "http" };
        let addr = SocketAddr::new(ip, port.max(1));
        // An address and a port always parse; the URL is normalised as `--backends` is.
        let mut t = Target::parse(&format!("{scheme}://{addr}")).unwrap_or_else(|_| Target {
            url: format!("{scheme}://{addr}").into(),
            tls,
            host: ip.to_string(),
            port,
            authority: String::new(),
            path_prefix: String::new(),
            tls_name: String::new(),
        });
        let default_port = if tls { 443 } else { 80 };
        t.authority = if port == default_port {
            name.to_string()
        } else {
            format!("{name}:{port}")
        };
        t.tls_name = name.to_string();
        t
    }

    /// `host:port` (brackets around an IPv6 address): where connections go.
    pub fn connect_authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn split_host_port(authority: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed '[' in IPv6 address")?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("'{h}' is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after ']'")?),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    if !host.starts_with('[')
        && !host.contains(':')
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return Err(format!("'{host}' is not a valid host name"));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| format!("'{p}' is not a valid port (1-65535)"))?,
        ),
    };
    Ok((host, port))
}

/// Something for the operator's log: the core's events plus what only adapters see.
#[derive(Clone, Debug)]
pub enum Notice {
    /// A core event (health transition, status report, removal).
    Core(Event),
    /// The proxy is listening.
    Listening(SocketAddr),
    /// The admin listener is listening (`--admin-bind`).
    AdminListening(SocketAddr),
    /// The default admin address could not be bound: `lb` runs without the admin
    /// listener (an explicit `--admin-bind` that fails stops the start instead).
    AdminUnavailable {
        /// The address tried.
        addr: SocketAddr,
        /// Why it failed.
        error: String,
    },
    /// A proxied request failed at or because of its backend.
    ProxyError {
        /// The backend's URL.
        backend: Arc<str>,
        /// Method and path of the request.
        request: String,
        /// The request's id.
        id: Option<crate::request_id::RequestId>,
        /// The status the client got (502, 504, ...), or 0 if the response had started.
        status: u16,
        /// What went wrong.
        error: String,
    },
    /// A request could not reach its backend (nothing of it was written) and went to
    /// another one (`--connect-retries`).
    Failover {
        /// The backend it could not reach.
        from: Arc<str>,
        /// The backend it goes to now.
        to: Arc<str>,
        /// Method and path of the request.
        request: String,
        /// The request's id.
        id: Option<crate::request_id::RequestId>,
        /// Why the first backend failed.
        error: String,
    },
    /// The pool changed at runtime (the admin API, discovery).
    BackendChange {
        /// The backend.
        backend: Arc<str>,
        /// What changed.
        change: crate::fleet::Change,
        /// Who changed it.
        source: crate::fleet::Source,
        /// The admin API client, for a change through the API.
        client: Option<SocketAddr>,
    },
    /// A discovery source could not be read or holds an error: the pool keeps its
    /// current backends from it (said once per distinct error).
    DiscoveryError {
        /// The source.
        source: crate::fleet::Source,
        /// What is wrong (for a file: its path and the line).
        error: String,
    },
    /// SIGHUP arrived: log files are reopened (for rotation).
    Hangup,
    /// A signal arrived: no new connections; waiting for this many requests.
    ShuttingDown {
        /// Requests in flight at that moment.
        in_flight: u64,
    },
    /// Shutdown finished; `abandoned` requests were still in flight at the deadline.
    Stopped {
        /// Requests cut at the shutdown deadline.
        abandoned: u64,
    },
}

/// Where adapters send notices (the CLI prints them).
pub type NoticeSink = Arc<dyn Fn(Notice) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(policy: Policy, hash_key: HashKey) -> Settings {
        Settings {
            core: Config {
                policy,
                ..Config::default()
            },
            hash_key,
            ..Settings::new("127.0.0.1:0".parse().unwrap(), Vec::new())
        }
    }

    #[test]
    fn route_keys_follow_policy_and_hash_key() {
        let body = br#"{"user":"alice","messages":[{"role":"user","content":"hi"}]}"#;
        let header = |name: &str| (name == "x-session").then_some(&b"s-1"[..]);
        let ip: IpAddr = "10.0.0.7".parse().unwrap();

        // Cache-aware: the key comes from the whole body; a cut body gives RequestKey::None.
        let s = routing(Policy::CacheAware, HashKey::ClientIp);
        assert!(s.routes_by_body());
        let k = s.route_keys(Some((body, true)), header, false);
        assert_eq!(k.affinity, Some(RequestKey::from_body(body)));
        assert_eq!(k.key, None);
        let m = k.meta(ip);
        assert_eq!((m.client_ip, m.key), (Some(ip), None));
        assert_eq!(m.affinity, k.affinity.as_ref());
        let k = s.route_keys(Some((body, false)), header, false);
        assert_eq!(k.affinity, Some(RequestKey::None));

        // consistent-hash on `user`: the field of a whole body, nothing from a cut one.
        let s = routing(Policy::ConsistentHash, HashKey::User);
        assert!(s.routes_by_body());
        let k = s.route_keys(Some((body, true)), header, false);
        assert_eq!((k.key.as_deref(), k.affinity), (Some(&b"alice"[..]), None));
        assert_eq!(s.route_keys(Some((body, false)), header, false).key, None);

        // consistent-hash on a header: its value, or none when absent.
        let s = routing(Policy::ConsistentHash, HashKey::Header("x-session".into()));
        assert!(!s.routes_by_body());
        assert_eq!(
            s.route_keys(None, header, false).key.as_deref(),
            Some(&b"s-1"[..])
        );
        let s = routing(Policy::ConsistentHash, HashKey::Header("x-other".into()));
        assert_eq!(s.route_keys(None, header, false).key, None);

        // prefix-hash: the prompt chain even with a user; the user without a prompt.
        let s = routing(Policy::PrefixHash, HashKey::User);
        assert!(s.routes_by_body());
        let k = s.route_keys(Some((body, true)), header, false);
        assert_eq!(k.key, None);
        assert!(matches!(k.affinity, Some(RequestKey::Chat { .. })));
        let k = s.route_keys(Some((br#"{"user":"bob"}"#, true)), header, false);
        assert_eq!(
            (k.key.as_deref(), k.affinity),
            (Some(&b"bob"[..]), Some(RequestKey::None))
        );

        // Model pools: the model of a whole body, under any policy; nothing else changes.
        let body = br#"{"model":"llama","user":"alice","prompt":"hi"}"#;
        let s = routing(Policy::IpHash, HashKey::User);
        assert!(!s.routes_by_body());
        let k = s.route_keys(Some((body, true)), header, true);
        assert_eq!(
            (k.model.as_deref(), k.key.as_deref()),
            (Some("llama"), None)
        );
        assert_eq!(k.meta(ip).model, Some("llama"));
        assert_eq!(s.route_keys(Some((body, true)), header, false).model, None);
        assert_eq!(s.route_keys(Some((body, false)), header, true).model, None);

        // Policies that do not route by content carry no keys.
        let s = routing(Policy::LeastConn, HashKey::Header("x-session".into()));
        assert_eq!(s.route_keys(None, header, false), RouteKeys::default());
    }

    #[test]
    fn learned_idle_stays_below_the_announced_limit() {
        let d = POOL_IDLE_TIMEOUT;
        assert_eq!(learned_idle(d, 5), Duration::from_secs(4));
        assert_eq!(learned_idle(d, 3), Duration::from_secs(2));
        assert_eq!(learned_idle(d, 1), Duration::from_millis(500));
        assert_eq!(learned_idle(d, 0), Duration::ZERO);
        assert_eq!(learned_idle(d, 60), d);
    }

    #[test]
    fn idle_limits_follow_the_backend() {
        let l = IdleLimit::new(POOL_IDLE_TIMEOUT);
        assert_eq!(l.get(), POOL_IDLE_TIMEOUT);
        l.learn(b"timeout=2, max=1000");
        assert_eq!(l.get(), Duration::from_secs(1));
        l.learn(b"max=5");
        assert_eq!(l.get(), Duration::from_secs(1));
        l.learn(b"timeout=600");
        assert_eq!(l.get(), POOL_IDLE_TIMEOUT);
    }

    #[test]
    fn parses_common_forms() {
        let t = Target::parse("http://localhost:8000").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path_prefix.as_str()),
            (false, "localhost", 8000, "")
        );
        assert_eq!(&*t.url, "http://localhost:8000");
        let t = Target::parse("localhost:8001").unwrap();
        assert_eq!(&*t.url, "http://localhost:8001");
        let t = Target::parse("https://api.example.com/base/").unwrap();
        assert_eq!(
            (t.tls, t.port, t.path_prefix.as_str()),
            (true, 443, "/base")
        );
        assert_eq!(t.authority, "api.example.com");
        assert_eq!(&*t.url, "https://api.example.com/base");
        let t = Target::parse("http://[::1]:9000/v").unwrap();
        assert_eq!(
            (t.host.as_str(), t.authority.as_str()),
            ("::1", "[::1]:9000")
        );
    }

    #[test]
    fn refuses_bad_urls() {
        for bad in [
            "",
            "ftp://x:1",
            "http://",
            "http://host:0",
            "http://host:65536",
            "http://host:abc",
            "http://us@host:1",
            "http://host:1/?q",
            "http://ho st:1",
            "http://[::1:80",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} should be refused");
        }
        let e = Target::parse("ftp://x:1").unwrap_err().to_string();
        assert!(e.contains("unsupported scheme 'ftp'"), "{e}");
    }
}
