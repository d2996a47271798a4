//! How notices look on stderr. The core decides what is worth saying; this decides how.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::SystemTime;

use lb_core::{Event, HealthState, StatusReport};
use lb_proxy::{Notice, Settings};

/// Formats one notice as log lines (without timestamps). `/health` is never logged.
pub fn lines(notice: &Notice, verbose: bool) -> Vec<String> {
    match notice {
        Notice::Core(Event::Health {
            url, state, cause, ..
        }) => {
            let word = match state {
                HealthState::Healthy => "healthy",
                HealthState::Unhealthy => "unhealthy",
            };
            vec![format!("[HEALTH] {url} marked as {word} ({cause})")]
        }
        Notice::Core(Event::Status(report)) => status(report, verbose),
        Notice::Core(Event::Removed { url, .. }) => vec![format!("[POOL] {url} removed")],
        Notice::Listening(addr) => vec![format!("[INFO] listening on http://{addr}")],
        Notice::AdminListening(addr) => vec![format!(
            "[INFO] admin listening on http://{addr} (/metrics, /health, /live, /admin/backends)"
        )],
        Notice::AdminUnavailable { addr, error } => vec![format!(
            "[WARN] admin listener not started: cannot listen on {addr} ({error}); running without /metrics (set --admin-bind to choose another address, or off)"
        )],
        Notice::Hangup => vec!["[INFO] SIGHUP: log files reopened".to_string()],
        Notice::DiscoveryError { source, error } => vec![format!(
            "[WARN] {}: {error} (keeping the current backends)",
            match source {
                lb_proxy::fleet::Source::File => "--backends-file",
                lb_proxy::fleet::Source::Dns => "--discover",
                _ => "discovery",
            }
        )],
        Notice::BackendChange {
            backend,
            change,
            source,
            client,
        } => vec![format!(
            "[INFO] backend {backend} {} ({}{})",
            match change {
                lb_proxy::fleet::Change::Weight => "reweighted",
                c => c.name(),
            },
            source.name(),
            client.map_or(String::new(), |c| format!(" from {c}"))
        )],
        Notice::ProxyError {
            backend,
            request,
            id,
            status,
            error,
        } => {
            let answered = if *status == 0 {
                "response cut".to_string()
            } else {
                format!("answered {status}")
            };
            vec![format!(
                "[ERROR] {request} -> {backend}: {error} ({answered}){}",
                id_suffix(id.as_ref())
            )]
        }
        Notice::Failover {
            from,
            to,
            request,
            id,
            error,
        } => vec![format!(
            "[RETRY] {request} -> {from}: {error}; sent to {to} instead{}",
            id_suffix(id.as_ref())
        )],
        Notice::ShuttingDown { in_flight } => vec![format!(
            "[INFO] shutting down: no new connections, waiting for {in_flight} in-flight request(s)"
        )],
        Notice::Stopped { abandoned: 0 } => vec!["[INFO] stopped".to_string()],
        Notice::Stopped { abandoned } => vec![format!(
            "[INFO] stopped at --shutdown-timeout with {abandoned} request(s) still in flight"
        )],
    }
}

/// ` [request id X]` for a line about a request, if it has one.
fn id_suffix(id: Option<&lb_proxy::request_id::RequestId>) -> String {
    id.map_or_else(String::new, |id| format!(" [request id {id}]"))
}

/// `[STATUS] Active: 12 | Healthy: 3/3 | Conns/node: [5, 4, 3]`, plus one line per backend
/// when verbose.
fn status(r: &StatusReport, verbose: bool) -> Vec<String> {
    let mut loads = String::new();
    for (i, l) in r.loads.iter().enumerate() {
        if i > 0 {
            loads.push_str(", ");
        }
        if r.elided > 0 && i == lb_core::LOADS_KEPT_EACH_END {
            let _ = write!(loads, "... {} more ..., ", r.elided);
        }
        let _ = write!(loads, "{l}");
    }
    let mut line = format!(
        "[STATUS] Active: {} | Healthy: {}/{} | Conns/node: [{loads}]",
        r.in_flight, r.healthy, r.total
    );
    if let Some(a) = &r.routing {
        let _ = write!(
            line,
            " | Affinity: warm {}% cold {}% ovfl {}% ({} reqs, {} keys)",
            a.percent(a.warm),
            a.percent(a.cold),
            a.percent(a.overflow),
            a.requests,
            a.keys
        );
    }
    let mut out = vec![line];
    if verbose {
        for b in &r.backends {
            let state = match (b.draining, b.healthy) {
                (true, _) => "draining",
                (false, true) => "healthy",
                (false, false) => "unhealthy",
            };
            let mut line = format!("[STATUS]   {} {state} in-flight {}", b.url, b.in_flight);
            if let Some(e) = &b.engine {
                let _ = write!(line, "{}", engine(e, std::time::Instant::now()));
            }
            out.push(line);
        }
    }
    out
}

/// ` | engine running 4 waiting 0 kv 25% (0.3s ago)`: an engine's last load report.
fn engine(e: &lb_core::EngineReport, now: std::time::Instant) -> String {
    let r = &e.report;
    let mut s = format!(" | engine running {} waiting {}", r.running, r.waiting);
    if let Some(kv) = r.kv_usage() {
        let _ = write!(s, " kv {:.0}%", kv * 100.0);
    }
    let age = now.saturating_duration_since(e.at).as_secs_f64();
    let _ = write!(s, " ({age:.1}s ago)");
    s
}

/// The startup summary: version, every setting, every backend.
pub fn summary(s: &Settings, runtime: &str) -> Vec<String> {
    let h = &s.core.health;
    let d = |d| humantime::format_duration(d).to_string();
    let mut out = vec![
        format!("[INFO] lb {} ({runtime}) starting", env!("CARGO_PKG_VERSION")),
        format!(
            "[INFO] listen {} | routing {} | timeout {} | connect-timeout {} | shutdown-timeout {}",
            s.listen,
            s.core.policy,
            d(s.request_timeout),
            d(s.connect_timeout),
            d(s.shutdown_timeout)
        ),
        format!(
            "[INFO] health GET {} every {} (timeout {}, fall {}, rise {}, passive-threshold {}) | status every {}",
            s.health_path,
            d(h.interval),
            d(h.timeout.min(h.interval)),
            h.fall,
            h.rise,
            h.passive_threshold,
            s.core.status_interval.map_or("never".into(), d)
        ),
        format!(
            "[INFO] max-conns {} | pool idle timeout {} | head timeout {}",
            match s.max_conns {
                0 => "unlimited".to_string(),
                n => format!("{n} per backend"),
            },
            d(s.pool_idle_timeout),
            d(s.head_timeout)
        ),
    ];
    let e = &s.core.engine;
    out.push(match s.load.signal {
        None => "[INFO] engine load signals off".to_string(),
        Some(signal) => format!(
            "[INFO] engine load: GET {} every {} ({signal}) | saturated at waiting > {} or kv > {}%",
            s.load.path,
            d(e.interval),
            e.saturation_waiting,
            f64::from(e.saturation_kv_ppm) / 1e4
        ),
    });
    for b in &s.backends {
        out.push(format!("[INFO] backend {} (weight {})", b.url, b.weight));
    }
    if let Some(path) = &s.backends_file {
        out.push(format!(
            "[INFO] backends file {} (read every {})",
            path.display(),
            d(lb_proxy::discovery::POLL)
        ));
    }
    for name in &s.discover {
        out.push(format!(
            "[INFO] discover {name} (every {}, or the TTL if shorter; resolver {})",
            d(s.discover_interval),
            s.resolver.map_or("system".to_string(), |r| r.to_string())
        ));
    }
    out
}

/// Writes lines to stderr with a UTC timestamp, in one write so lines from several
/// threads do not interleave.
pub fn emit(lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    let ts = humantime::format_rfc3339_seconds(SystemTime::now());
    let mut buf = String::new();
    for l in lines {
        let _ = writeln!(buf, "{ts} {l}");
    }
    let _ = std::io::stderr().lock().write_all(buf.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_core::{BackendSpec, Balancer, Cause, Config, ProbeOutcome};
    use rand::{rngs::SmallRng, SeedableRng};

    #[test]
    fn health_line() {
        let now = std::time::Instant::now();
        let mut lb = Balancer::new(Config::default(), SmallRng::seed_from_u64(0), now);
        let backend = lb
            .add_backend(now, BackendSpec::new("http://localhost:8001"))
            .unwrap();
        let n = Notice::Core(Event::Health {
            backend,
            url: "http://localhost:8001".into(),
            state: HealthState::Unhealthy,
            cause: Cause::Probe(ProbeOutcome::Error("connection refused".into())),
            epoch: 1,
        });
        assert_eq!(
            lines(&n, false),
            ["[HEALTH] http://localhost:8001 marked as unhealthy (error: connection refused)"]
        );
    }

    #[test]
    fn status_line_and_elision() {
        let mut r = StatusReport {
            in_flight: 12,
            healthy: 3,
            total: 3,
            loads: vec![5, 4, 3],
            elided: 0,
            backends: vec![],
            ..StatusReport::default()
        };
        assert_eq!(
            lines(&Notice::Core(Event::Status(r.clone())), false),
            ["[STATUS] Active: 12 | Healthy: 3/3 | Conns/node: [5, 4, 3]"]
        );
        r.loads = (0..30).rev().collect();
        r.elided = 10;
        let line = lines(&Notice::Core(Event::Status(r)), false).remove(0);
        assert!(line.contains("15, ... 10 more ..., 14,"), "{line}");
        let now = std::time::Instant::now();
        let e = lb_core::EngineReport {
            at: now,
            report: lb_core::LoadReport::new(4, 0).with_kv_usage(0.25),
        };
        assert_eq!(
            engine(&e, now + std::time::Duration::from_millis(300)),
            " | engine running 4 waiting 0 kv 25% (0.3s ago)"
        );
    }
}
