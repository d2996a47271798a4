//! Command-line flags and their validation into [`Settings`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Parser;
use lb_core::{
    AffinityConfig, BackendSpec, Config, EngineLoadConfig, HealthConfig, Policy, PrefixHashConfig,
    QueueConfig,
};
use lb_proxy::settings::{DEFAULT_REPLAY_BUFFER, MAX_HEAD_BYTES, POOL_IDLE_TIMEOUT};
use lb_proxy::{HashKey, Settings};

/// The smallest health-check interval accepted.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// The longest duration any flag accepts: 30 days. Longer is no sensible timeout or
/// interval, and a bound checked at start keeps every `now + duration` far from the end
/// of what an `Instant` can hold.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// lb: one address in front of many HTTP backends (vLLM, SGLang, llama.cpp, TGI, or any
/// HTTP service). Streams without buffering, checks health, balances load.
#[derive(Parser, Debug)]
#[command(name = "lb", version = version(), about, long_about = None)]
pub struct Cli {
    /// Backend URLs, space-separated (bash expansion works: http://localhost:800{0..2});
    /// repeatable. `host:port` means http://host:port. Give a weight with `URL#weight=3`.
    #[arg(long = "backends", visible_alias = "backend", value_name = "URL", num_args = 1.., action = clap::ArgAction::Append)]
    pub backends: Vec<String>,

    /// A file of backends, one per line in --backends syntax (# comments), read at start
    /// and polled every second: added lines join (probed first), removed ones drain and
    /// leave, weights change; an invalid file keeps the current set (logged with the line)
    #[arg(long, value_name = "PATH")]
    pub backends_file: Option<PathBuf>,

    /// Backends from DNS: every A/AAAA address of NAME is a backend ADDR:PORT, sent
    /// Host: NAME[:PORT] (dns+https://: TLS, certificate checked for NAME); looked up at
    /// start and every --discover-interval; repeatable
    #[arg(long, value_name = "dns://NAME:PORT", value_parser = discover, action = clap::ArgAction::Append)]
    pub discover: Vec<lb_proxy::settings::Discover>,

    /// How often each --discover name is looked up again (sooner when its records' TTL is
    /// shorter, with --resolver; at least 1s).
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub discover_interval: Duration,

    /// The DNS server --discover asks (UDP, TTLs honoured), instead of the system
    /// resolver (/etc/hosts, /etc/resolv.conf).
    #[arg(long, value_name = "ADDR:PORT", value_parser = resolver)]
    pub resolver: Option<SocketAddr>,

    /// With --check: also resolve each --discover name once, and fail naming it if it
    /// does not resolve.
    #[arg(long, requires = "check")]
    pub resolve: bool,

    /// More backend URLs (same syntax as --backends).
    #[arg(value_name = "URL")]
    pub extra_backends: Vec<String>,

    /// Port to listen on.
    #[arg(long, value_name = "PORT", default_value_t = 8080, value_parser = port, allow_negative_numbers = true)]
    pub port: u16,

    /// Address to listen on.
    #[arg(long, value_name = "IP", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED), value_parser = ip)]
    pub bind: IpAddr,

    /// Whole-request timeout (response head and body); exceeded → 504 or a cut stream.
    #[arg(long, default_value = "4h", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub timeout: Duration,

    /// Timeout for connecting to a backend.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub connect_timeout: Duration,

    /// Time between health-check sweeps (at least 5s).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub health_check_interval: Duration,

    /// Timeout of one health probe (capped by the interval).
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub health_timeout: Duration,

    /// Path probed on every backend; 2xx or 429 means alive.
    #[arg(long, default_value = "/v1/models")]
    pub health_path: String,

    /// Engine load signals: read each backend's vLLM or SGLang load from --load-path
    /// (auto: whichever the metrics show; a backend showing neither is asked again a
    /// minute later), or off.
    #[arg(long, value_name = "auto|vllm|sglang|off", default_value = "auto", value_parser = load_signal)]
    pub load_signal: LoadSignal,

    /// Path of each backend's Prometheus metrics, polled for engine load.
    #[arg(long, value_name = "PATH", default_value = "/metrics")]
    pub load_path: String,

    /// Time between engine load polls of each backend (at least 50ms); a report older
    /// than 3 intervals is ignored.
    #[arg(long, default_value = "500ms", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub load_interval: Duration,

    /// A backend whose engine reports more waiting requests than this is saturated: it
    /// gets no new request while an unsaturated backend can take it.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = whole_u32, allow_negative_numbers = true)]
    pub saturation_waiting: u32,

    /// A backend whose engine reports KV cache usage above this fraction (0 to 1) is
    /// saturated.
    #[arg(long, value_name = "FRACTION", default_value = "0.95", value_parser = fraction, allow_negative_numbers = true)]
    pub saturation_kv: f64,

    /// Consecutive failed probes that mark a backend unhealthy.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = positive_u32, allow_negative_numbers = true)]
    pub fall: u32,

    /// Consecutive passing probes that bring an unhealthy backend back.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = positive_u32, allow_negative_numbers = true)]
    pub rise: u32,

    /// Consecutive proxy errors (transport error or 5xx) that mark a backend unhealthy; 0 = off.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = whole_u32, allow_negative_numbers = true)]
    pub passive_threshold: u32,

    /// Passive errors never eject a backend when that would leave fewer than (100 - this)
    /// percent of the backends (rounded up) healthy: a lone backend is never ejected by
    /// passive errors alone. 100 = no limit; probes may eject any number.
    #[arg(long, value_name = "PERCENT", default_value_t = 50, value_parser = percent, allow_negative_numbers = true)]
    pub max_passive_ejection_percent: u32,

    /// Other backends a request tries when its backend cannot be reached (connect refused
    /// or timed out, or reset before any byte of the request was written); 0 = none.
    #[arg(long, value_name = "N", default_value_t = lb_proxy::settings::DEFAULT_CONNECT_RETRIES, value_parser = whole_u32, allow_negative_numbers = true)]
    pub connect_retries: u32,

    /// Balancing policy (backends at --max-conns are skipped by every one).
    #[arg(long, value_name = "POLICY", default_value = "least-conn", value_parser = policy_parser())]
    pub routing: Policy,

    /// Per-backend cap on requests in flight; 0 = unlimited. When every healthy backend is
    /// full, requests get 429 with Retry-After: 1.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = whole_u32, allow_negative_numbers = true)]
    pub max_conns: u32,

    /// Time between [STATUS] lines (default: the health-check interval).
    #[arg(long, value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub status_interval: Option<Duration>,

    /// How long in-flight requests may finish after SIGTERM/SIGINT.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub shutdown_timeout: Duration,

    /// Extra CA bundle (PEM) to trust for https:// backends, besides the system roots.
    #[arg(long, value_name = "FILE")]
    pub backend_ca: Option<PathBuf>,

    /// A client must send its request head within this long.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub head_timeout: Duration,

    /// A request body that sends nothing for this long is given up (408 if no response
    /// has begun), so a client trickling its body cannot hold a slot for --timeout.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub client_body_timeout: Duration,

    /// A client that reads nothing of its response for this long is cut off (a
    /// streaming client reads continuously).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub client_write_timeout: Duration,

    /// Most client connections open at once; at the limit lb stops accepting and new
    /// clients wait in the kernel's backlog. Default: half of the open-files limit left
    /// after a small reserve (each client may hold a backend connection too).
    #[arg(long, value_name = "N", value_parser = positive_usize, allow_negative_numbers = true)]
    pub max_client_conns: Option<usize>,

    /// What consistent-hash routing hashes: header:NAME, user (the OpenAI `user` field) or
    /// client-ip. Requests without the header or field hash the client IP.
    #[arg(long, default_value = "user", value_parser = hash_key)]
    pub hash_key: HashKey,

    /// prefix-hash routing keys a request by at most this many units of its prompt (a
    /// message, or a 1 KiB block of a long message or prompt), and a chat by no more than
    /// its opening (the messages up to the first user message); 1 to 256.
    #[arg(long, value_name = "N", default_value_t = lb_core::DEFAULT_PREFIX_UNITS, value_parser = prefix_units, allow_negative_numbers = true)]
    pub prefix_units: usize,

    /// prefix-hash routing walks past a backend whose load is above this many times the
    /// average (a number greater than 1).
    #[arg(long, value_name = "X", default_value = "1.25", value_parser = balance_factor, allow_negative_numbers = true)]
    pub balance_factor: u32,

    /// A request whose model no backend lists goes only to backends without a model list,
    /// and gets 404 (model_not_found) when every backend has one, rather than going to
    /// any backend.
    #[arg(long)]
    pub strict_models: bool,

    /// Cache-aware routing forgets a prefix after this long unused (sliding).
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub affinity_ttl: Duration,

    /// When every healthy backend is at --max-conns, wait up to this long for a free slot
    /// (FIFO) before answering 429. Default: answer 429 at once.
    #[arg(long, value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    pub queue_timeout: Option<Duration>,

    /// Most requests waiting for a slot at once (with --queue-timeout).
    #[arg(long, value_name = "N", default_value_t = lb_core::queue::DEFAULT_QUEUE_SIZE, value_parser = whole_usize, allow_negative_numbers = true)]
    pub queue_size: usize,

    /// Append one JSON line per request (bodies included) to this file, created with mode 0640.
    #[arg(long, value_name = "PATH")]
    pub log_to: Option<PathBuf>,

    /// Cap on each body captured in the --log-to file, in bytes (cut bodies are flagged
    /// request_truncated / response_truncated). Each request in flight holds up to this
    /// much a body for the log.
    #[arg(long, value_name = "BYTES", default_value_t = lb_proxy::reqlog::DEFAULT_BODY_LIMIT, value_parser = whole_u64, allow_negative_numbers = true)]
    pub log_body_limit: u64,

    /// Most request body bytes kept per request to send it again on a fresh connection
    /// when its reused keep-alive connection turns out closed before any response byte.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_REPLAY_BUFFER, value_parser = whole_usize, allow_negative_numbers = true)]
    pub replay_buffer: usize,

    /// Log one line per backend (URL, state, in-flight) with each status line.
    #[arg(long, short = 'v')]
    pub verbose: bool,

    /// A file holding the bearer token that /admin/* needs on an admin listener not on
    /// loopback (without it, /admin/* there answers 403).
    #[arg(long, value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,

    /// Validate every flag, backend and file, print "lb: configuration ok" and exit 0 (or
    /// the usual one-line error and 2), without listening: like nginx -t.
    #[arg(long)]
    pub check: bool,

    /// The admin listener (/metrics, /health, /live): ADDR:PORT, or off. Port 0 picks a
    /// free port (printed at start). Default 127.0.0.1:9901; when that default is taken,
    /// lb warns and runs without it.
    #[arg(long, value_name = "ADDR:PORT|off", value_parser = admin_bind)]
    pub admin_bind: Option<AdminBind>,

    /// How every line lb writes to stderr looks: text, or json (one object per line).
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = log_format)]
    pub log_format: LogFormat,

    /// One line per request to this file (appended, mode 0640; reopened on SIGHUP), or -
    /// for stdout: JSON with --log-format json, else a combined-log-style line.
    #[arg(long, value_name = "PATH|-")]
    pub access_log: Option<PathBuf>,

    /// Keep query strings in the access log's paths (left out by default: they may carry
    /// secrets).
    #[arg(long)]
    pub access_log_query: bool,
}

/// `--load-signal`: `off`, or the series to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSignal(pub Option<lb_proxy::load::Signal>);

fn load_signal(s: &str) -> Result<LoadSignal, String> {
    match s {
        "off" => Ok(LoadSignal(None)),
        _ => s
            .parse()
            .map(|g| LoadSignal(Some(g)))
            .map_err(|e: lb_proxy::load::UnknownSignal| e.to_string()),
    }
}

/// A fraction from 0 to 1 (`--saturation-kv`).
fn fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("'{s}' is not a fraction from 0 to 1 (e.g. 0.95)")),
    }
}

/// `--admin-bind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminBind {
    /// `off`.
    Off,
    /// An address.
    At(SocketAddr),
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Text lines, as always.
    Text,
    /// One JSON object per line.
    Json,
}

/// The admin listener's default address: loopback only, and not 9090 (Prometheus's own).
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);

fn admin_bind(s: &str) -> Result<AdminBind, String> {
    if s == "off" {
        return Ok(AdminBind::Off);
    }
    s.parse::<SocketAddr>()
        .map(AdminBind::At)
        .map_err(|_| format!("'{s}' is not ADDR:PORT (e.g. 127.0.0.1:9901, [::1]:9901) or off"))
}

fn discover(s: &str) -> Result<lb_proxy::settings::Discover, String> {
    lb_proxy::settings::Discover::parse(s)
}

fn resolver(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("'{s}' is not ADDR:PORT (e.g. 10.96.0.10:53, [::1]:53)"))
}

fn log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("'{s}' is not a log format (text or json)")),
    }
}

fn version() -> &'static str {
    if cfg!(feature = "tokio") {
        concat!(env!("CARGO_PKG_VERSION"), " (tokio)")
    } else {
        concat!(env!("CARGO_PKG_VERSION"), " (smol)")
    }
}

/// Parses Go-style durations: `500ms`, `30s`, `5m`, `4h`, `1h30m`, at most
/// [`MAX_DURATION`].
pub fn duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("missing value".into());
    }
    if let Some(rest) = t.strip_prefix('-') {
        // Flags may take values that start with '-' so that "-5s" gets this message, not
        // "unknown flag"; a flag there means the value was left out.
        return Err(if rest.starts_with(|c: char| c.is_ascii_digit()) {
            format!("'{s}' is negative; durations are like 500ms, 30s, 5m, 4h, 1h30m")
        } else {
            format!("missing value (found the flag '{t}')")
        });
    }
    let d = humantime::parse_duration(t).map_err(|e| {
        format!("'{s}' is not a duration ({e}); write e.g. 500ms, 30s, 5m, 4h, 1h30m")
    })?;
    if d > MAX_DURATION {
        return Err(format!(
            "'{s}' is longer than 30 days, the longest duration accepted"
        ));
    }
    Ok(d)
}

/// A whole number from `min` up to what `T` holds, for the numeric flags.
fn whole<T: TryFrom<u64>>(s: &str, min: u64, max: u64) -> Result<T, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("missing value".into());
    }
    let too_large = || format!("'{s}' is too large (at most {max})");
    match t.parse::<u64>() {
        Ok(n) if n < min => Err(format!("'{s}' is not a whole number ≥ {min}")),
        Ok(n) => T::try_from(n).map_err(|_| too_large()),
        // All digits but no u64: beyond any limit.
        Err(_) if t.bytes().all(|b| b.is_ascii_digit()) => Err(too_large()),
        Err(_) => Err(format!("'{s}' is not a whole number ≥ {min}")),
    }
}

fn port(s: &str) -> Result<u16, String> {
    whole(s, 1, u16::MAX.into())
}

fn positive_u32(s: &str) -> Result<u32, String> {
    whole(s, 1, u32::MAX.into())
}

fn percent(s: &str) -> Result<u32, String> {
    match whole(s, 0, 100)? {
        n if n <= 100 => Ok(n),
        _ => Err(format!("'{s}' is not a percentage (0 to 100)")),
    }
}

fn positive_usize(s: &str) -> Result<usize, String> {
    whole(s, 1, usize::MAX as u64)
}

fn whole_u32(s: &str) -> Result<u32, String> {
    whole(s, 0, u32::MAX.into())
}

fn whole_u64(s: &str) -> Result<u64, String> {
    whole(s, 0, u64::MAX)
}

fn whole_usize(s: &str) -> Result<usize, String> {
    whole(s, 0, u64::try_from(usize::MAX).unwrap_or(u64::MAX))
}

fn ip(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("'{s}' is not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1)"))
}

fn prefix_units(s: &str) -> Result<usize, String> {
    let cap = lb_core::affinity::CHAIN_CAP;
    match whole(s, 1, cap as u64) {
        Ok(n) if (1..=cap).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a whole number from 1 to {cap}")),
    }
}

/// `--balance-factor`: a number above 1 (at most 100), kept in thousandths.
fn balance_factor(s: &str) -> Result<u32, String> {
    let refuse = || format!("'{s}' is not a number greater than 1 and at most 100 (e.g. 1.25)");
    let x: f64 = s.trim().parse().map_err(|_| refuse())?;
    if !x.is_finite() || x > 100.0 {
        return Err(refuse());
    }
    let milli = (x * 1000.0).round();
    if milli <= 1000.0 {
        return Err(refuse());
    }
    Ok(milli as u32)
}

fn hash_key(s: &str) -> Result<HashKey, String> {
    s.parse()
}

/// `--routing`: the policies with a few words each (`--help` lists them), their aliases
/// accepted too.
fn policy_parser() -> impl TypedValueParser<Value = Policy> {
    let values = Policy::ALL.map(|p| {
        let (help, aliases): (&str, &[&str]) = match p {
            Policy::LeastConn => (
                "fewest requests in flight relative to weight (default)",
                &["least-connections"],
            ),
            Policy::RoundRobin => ("strict rotation over the healthy backends", &["rr"]),
            Policy::WeightedRoundRobin => (
                "rotation in proportion to URL#weight=N (nginx's smooth weighted round robin)",
                &["wrr"],
            ),
            Policy::Random => ("uniformly at random, in proportion to weight", &[]),
            Policy::IpHash => (
                "the client's address picks the backend: each client sticks to one",
                &[],
            ),
            Policy::P2c => (
                "the less loaded of two random backends (alias random-two-least)",
                &["random-two-least"],
            ),
            Policy::CacheAware => (
                "LLM prompt-prefix (KV cache) affinity, unless load says otherwise; needs --max-conns",
                &[],
            ),
            Policy::ConsistentHash => (
                "the --hash-key value picks the backend: session affinity",
                &[],
            ),
            Policy::PrefixHash => (
                "the prompt's first --prefix-units units pick the backend, within --balance-factor of the average load: the same answer on every lb replica",
                &[],
            ),
        };
        PossibleValue::new(p.name()).help(help).aliases(aliases)
    });
    PossibleValuesParser::new(values).try_map(|s| s.parse::<Policy>())
}

/// Reads `--admin-token-file`: its first line, trimmed; at least 16 characters.
fn admin_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--admin-token-file: {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "--admin-token-file: {}: the token must be at least 16 visible ASCII characters on the first line",
            path.display()
        ));
    }
    Ok(token)
}

/// Parses one backend argument: `URL` or `URL#weight=N`.
pub fn backend(arg: &str, max_conns: u32) -> Result<BackendSpec, String> {
    lb_proxy::settings::parse_backend(arg, max_conns).map_err(|e| format!("--backends: {e}"))
}

impl Cli {
    /// Checks what clap cannot and builds the settings.
    pub fn into_settings(self) -> Result<Settings, String> {
        let args: Vec<&String> = self.backends.iter().chain(&self.extra_backends).collect();
        if args.is_empty() && self.backends_file.is_none() && self.discover.is_empty() {
            return Err("no backends given: pass --backends URL [URL...] (e.g. --backends http://localhost:8000), --backends-file PATH or --discover dns://NAME:PORT".into());
        }
        for (i, d) in self.discover.iter().enumerate() {
            if self.discover[..i].contains(d) {
                return Err(format!("--discover: {d} is listed twice"));
            }
        }
        if self.discover_interval < lb_proxy::settings::MIN_DISCOVER_INTERVAL {
            return Err(format!(
                "--discover-interval must be at least 1s (got {})",
                humantime::format_duration(self.discover_interval)
            ));
        }
        let mut backends: Vec<BackendSpec> = Vec::with_capacity(args.len());
        for arg in args {
            let spec = backend(arg, self.max_conns)?;
            if backends.iter().any(|b| b.url == spec.url) {
                return Err(format!("--backends: {} is listed twice", spec.url));
            }
            backends.push(spec);
        }
        if self.health_check_interval < MIN_HEALTH_INTERVAL {
            return Err(format!(
                "--health-check-interval must be at least 5s (got {})",
                humantime::format_duration(self.health_check_interval)
            ));
        }
        for (flag, d) in [
            ("--timeout", self.timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--health-timeout", self.health_timeout),
            ("--head-timeout", self.head_timeout),
            ("--client-body-timeout", self.client_body_timeout),
            ("--client-write-timeout", self.client_write_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{flag} must be greater than 0"));
            }
        }
        if self
            .status_interval
            .is_some_and(|d| d < Duration::from_secs(1))
        {
            return Err("--status-interval must be at least 1s".into());
        }
        if !self.health_path.starts_with('/') || self.health_path.contains(char::is_whitespace) {
            return Err(format!(
                "--health-path must start with '/' and contain no spaces (got '{}')",
                self.health_path
            ));
        }
        if !self.load_path.starts_with('/') || self.load_path.contains(char::is_whitespace) {
            return Err(format!(
                "--load-path must start with '/' and contain no spaces (got '{}')",
                self.load_path
            ));
        }
        if self.load_interval < lb_proxy::load::MIN_LOAD_INTERVAL {
            return Err(format!(
                "--load-interval must be at least 50ms (got {})",
                humantime::format_duration(self.load_interval)
            ));
        }
        if self.routing == Policy::CacheAware && self.max_conns == 0 {
            return Err("--routing cache-aware needs --max-conns > 0 (its load guard and table size scale with it)".into());
        }
        if self.affinity_ttl.is_zero() {
            return Err("--affinity-ttl must be greater than 0".into());
        }
        if self.queue_timeout.is_some() && self.queue_size == 0 {
            return Err("--queue-size must be greater than 0 with --queue-timeout".into());
        }
        if self.queue_timeout.is_some() && self.max_conns == 0 {
            return Err("--queue-timeout needs --max-conns > 0 (requests queue when every backend is at its limit)".into());
        }
        let listen = SocketAddr::new(self.bind, self.port);
        let admin_token = match &self.admin_token_file {
            None => None,
            Some(path) => Some(admin_token(path)?),
        };
        let (admin, admin_required) = match self.admin_bind {
            None => (Some(DEFAULT_ADMIN), false),
            Some(AdminBind::Off) => (None, false),
            Some(AdminBind::At(a)) => (Some(a), true),
        };
        if let Some(a) = admin.filter(|_| admin_required) {
            let overlap =
                a.ip() == listen.ip() || a.ip().is_unspecified() || listen.ip().is_unspecified();
            if a.port() != 0 && a.port() == listen.port() && overlap {
                return Err(format!(
                    "--admin-bind: {a} is the proxy's own address ({listen}, --port/--bind); the admin listener needs an address of its own"
                ));
            }
        }
        let settings = Settings {
            listen,
            backends,
            core: Config {
                policy: self.routing,
                health: HealthConfig {
                    interval: self.health_check_interval,
                    timeout: self.health_timeout,
                    fall: self.fall,
                    rise: self.rise,
                    passive_threshold: self.passive_threshold,
                    max_passive_ejection_percent: self.max_passive_ejection_percent,
                },
                status_interval: Some(self.status_interval.unwrap_or(self.health_check_interval)),
                affinity: AffinityConfig {
                    ttl: self.affinity_ttl,
                    ..AffinityConfig::default()
                },
                queue: QueueConfig {
                    timeout: self.queue_timeout,
                    size: self.queue_size,
                },
                engine: EngineLoadConfig {
                    interval: self.load_interval,
                    saturation_waiting: self.saturation_waiting,
                    saturation_kv_ppm: (self.saturation_kv * f64::from(lb_core::engine::PPM))
                        .round() as u32,
                },
                prefix_hash: PrefixHashConfig {
                    units: self.prefix_units,
                    balance_factor: self.balance_factor,
                },
                strict_models: self.strict_models,
            },
            request_timeout: self.timeout,
            connect_timeout: self.connect_timeout,
            health_path: self.health_path,
            load: lb_proxy::LoadSettings {
                signal: self.load_signal.0,
                path: self.load_path,
            },
            shutdown_timeout: self.shutdown_timeout,
            backend_ca: self.backend_ca,
            pool_idle_timeout: POOL_IDLE_TIMEOUT,
            max_head_bytes: MAX_HEAD_BYTES,
            head_timeout: self.head_timeout,
            client_body_timeout: self.client_body_timeout,
            client_write_timeout: self.client_write_timeout,
            // Set by `main` once the open-files limit is raised, unless given.
            max_client_conns: self
                .max_client_conns
                .unwrap_or(lb_proxy::settings::DEFAULT_MAX_CLIENT_CONNS),
            replay_buffer: self.replay_buffer,
            connect_retries: self.connect_retries,
            hash_key: self.hash_key,
            // Opened by `main` once the flags are known to be good (see `crate::reqlog`).
            request_log: None,
            access_log: None,
            admin,
            admin_required,
            max_conns: self.max_conns,
            admin_token,
            backends_file: self.backends_file,
            discover: self.discover,
            discover_interval: self.discover_interval,
            resolver: self.resolver,
        };
        settings
            .core
            .validate(&settings.backends)
            .map_err(|e| e.to_string())?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_proxy::deadline::{deadline, FAR};
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;
    use std::time::Instant;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let cli = Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.into_settings()
    }

    #[test]
    fn durations() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert!(duration("-5s").unwrap_err().contains("negative"));
        assert!(duration("soon").is_err());
        assert_eq!(duration("30d"), Ok(MAX_DURATION));
        assert_eq!(duration("720h"), Ok(MAX_DURATION));
        assert!(duration("720h1ns").unwrap_err().contains("30 days"));
        assert!(duration("500000000000y").unwrap_err().contains("30 days"));
        // Too large for humantime itself.
        assert!(duration("99999999999999999999999y").is_err());
    }

    proptest! {
        /// Whatever the string, the parser answers (no panic) with a duration of at most
        /// 30 days, and the deadline of that duration is exact.
        #[test]
        fn any_string_gives_a_bounded_duration_or_an_error(s in any::<String>()) {
            check_duration(&s)?;
        }

        /// The same for strings that look like durations, with numbers of any size.
        #[test]
        fn duration_like_strings_are_bounded(
            s in "-?[0-9]{1,25}(ns|us|ms|s|m|h|d|w|M|y)( ?[0-9]{1,25}(ns|us|ms|s|m|h|d|w|M|y)){0,2}"
        ) {
            check_duration(&s)?;
        }

        /// Any duration at all gives a deadline (no panic), between now and now + FAR,
        /// exact up to FAR.
        #[test]
        fn any_duration_gives_a_deadline(secs in any::<u64>(), nanos in 0u32..1_000_000_000) {
            let after = Duration::new(secs, nanos);
            let now = Instant::now();
            let at = deadline(now, after);
            prop_assert!(at >= now);
            prop_assert!(at - now <= FAR);
            if after <= FAR {
                prop_assert_eq!(at - now, after);
            } else {
                prop_assert_eq!(at - now, FAR);
            }
        }
    }

    fn check_duration(s: &str) -> Result<(), TestCaseError> {
        if let Ok(d) = duration(s) {
            prop_assert!(d <= MAX_DURATION, "{s:?} gave {d:?}");
            let now = Instant::now();
            prop_assert_eq!(deadline(now, d), now + d);
        }
        Ok(())
    }

    #[test]
    fn backends_from_flags_and_positionals() {
        let s = parse(&[
            "--backends",
            "http://a:1",
            "b:2",
            "--backends",
            "http://c:3#weight=4",
            "http://d:4",
        ])
        .unwrap();
        let urls: Vec<&str> = s.backends.iter().map(|b| b.url.as_str()).collect();
        assert_eq!(
            urls,
            ["http://a:1", "http://b:2", "http://c:3", "http://d:4"]
        );
        assert_eq!(s.backends[2].weight, 4);
        assert_eq!(s.core.policy, Policy::LeastConn);
        assert_eq!(s.request_timeout, Duration::from_secs(4 * 3600));
        assert_eq!(s.core.status_interval, Some(Duration::from_secs(30)));
    }

    #[test]
    fn engine_load_flags() {
        let s = parse(&["--backends", "a:1"]).unwrap();
        assert_eq!(s.load, lb_proxy::LoadSettings::default());
        assert_eq!(s.core.engine, EngineLoadConfig::default());
        let s = parse(&[
            "--backends",
            "a:1",
            "--load-signal",
            "off",
            "--load-interval",
            "50ms",
            "--saturation-kv",
            "0.8",
            "--saturation-waiting",
            "0",
            "--load-path",
            "/engine/metrics",
        ])
        .unwrap();
        assert_eq!(s.load.signal, None);
        assert_eq!(s.load.path, "/engine/metrics");
        assert_eq!(s.core.engine.interval, Duration::from_millis(50));
        assert_eq!(s.core.engine.saturation_kv_ppm, 800_000);
        assert_eq!(s.core.engine.saturation_waiting, 0);
        let s = parse(&["--backends", "a:1", "--load-signal", "sglang"]).unwrap();
        assert_eq!(
            s.load.signal,
            Some(lb_proxy::load::Signal::Only(lb_proxy::load::Engine::Sglang))
        );
    }

    #[test]
    fn prefix_hash_and_model_flags() {
        let s = parse(&["--backends", "a:1", "--routing", "prefix-hash"]).unwrap();
        assert_eq!(s.core.policy, Policy::PrefixHash);
        assert_eq!(s.core.prefix_hash, PrefixHashConfig::default());
        assert_eq!(s.core.prefix_hash.units, 32, "the documented default");
        assert!(!s.core.strict_models);
        let s = parse(&[
            "--backends",
            "a:1",
            "--routing",
            "prefix-hash",
            "--prefix-units",
            "16",
            "--balance-factor",
            "1.5",
            "--strict-models",
        ])
        .unwrap();
        assert_eq!(s.core.prefix_hash.units, 16);
        assert_eq!(s.core.prefix_hash.balance_factor, 1500);
        assert!(s.core.strict_models);
    }

    #[test]
    fn every_policy_name_and_alias_is_accepted() {
        let names = Policy::names();
        let mut all: Vec<&str> = names.split(", ").collect();
        all.extend(["rr", "wrr", "least-connections"]);
        for name in all {
            let s = parse(&["--backends", "a:1", "--max-conns", "1", "--routing", name]);
            assert_eq!(
                s.map(|s| s.core.policy),
                Ok(name.parse::<Policy>().unwrap()),
                "{name}"
            );
        }
    }

    #[test]
    fn refusals_name_the_flag() {
        for (args, needle) in [
            (&[][..], "backends"),
            (&["--backends", "ftp://x:1"][..], "--backends"),
            (&["--backends", "a:1", "--port", "0"][..], "--port"),
            (&["--backends", "a:1", "--port", "70000"][..], "--port"),
            (&["--backends", "a:1", "--timeout", "-5s"][..], "--timeout"),
            (&["--backends", "a:1", "--timeout", "abc"][..], "--timeout"),
            (
                &["--backends", "a:1", "--timeout", "500000000000y"][..],
                "--timeout",
            ),
            (
                &["--backends", "a:1", "--queue-timeout", "31d"][..],
                "--queue-timeout",
            ),
            (
                &["--backends", "a:1", "--health-check-interval", "1s"][..],
                "health-check-interval",
            ),
            (
                &["--backends", "a:1", "--routing", "fastest"][..],
                "least-conn",
            ),
            (&["--backends", "a:1#weight=0"][..], "weight"),
            (&["--backends", "a:1", "a:1"][..], "twice"),
            (
                &["--backends", "a:1", "--routing", "cache-aware"][..],
                "max-conns",
            ),
            (
                &["--backends", "a:1", "--queue-timeout", "5s"][..],
                "max-conns",
            ),
            (
                &["--backends", "a:1", "--hash-key", "cookie"][..],
                "hash-key",
            ),
            (
                &["--backends", "a:1", "--affinity-ttl", "0s"][..],
                "affinity-ttl",
            ),
            (
                &["--backends", "a:1", "--load-interval", "49ms"][..],
                "--load-interval",
            ),
            (
                &["--backends", "a:1", "--load-signal", "triton"][..],
                "--load-signal",
            ),
            (
                &["--backends", "a:1", "--saturation-kv", "1.5"][..],
                "--saturation-kv",
            ),
            (
                &["--backends", "a:1", "--saturation-waiting", "-1"][..],
                "--saturation-waiting",
            ),
            (
                &["--backends", "a:1", "--load-path", "metrics"][..],
                "--load-path",
            ),
            (
                &["--backends", "a:1", "--balance-factor", "1"][..],
                "--balance-factor",
            ),
            (
                &["--backends", "a:1", "--balance-factor", "0.9"][..],
                "--balance-factor",
            ),
            (
                &["--backends", "a:1", "--balance-factor", "nan"][..],
                "--balance-factor",
            ),
            (
                &["--backends", "a:1", "--balance-factor", "1.0001"][..],
                "--balance-factor",
            ),
            (
                &["--backends", "a:1", "--prefix-units", "0"][..],
                "--prefix-units",
            ),
            (
                &["--backends", "a:1", "--prefix-units", "257"][..],
                "--prefix-units",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
