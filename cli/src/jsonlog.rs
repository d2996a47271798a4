//! `--log-format json`: every line `lb` writes to stderr as one JSON object with `ts`
//! (RFC 3339, UTC, milliseconds), `level` (`info`, `warn`, `error`), `event` and the
//! event's fields. The names are stable: the README lists them.

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use lb_core::{Event, HealthState, StatusReport};
use lb_proxy::{Notice, Settings};
use serde_json::{json, Map, Value};

/// One notice as `(level, event, fields)` objects (several for a verbose status).
pub fn records(notice: &Notice, verbose: bool) -> Vec<Value> {
    let (level, event, fields) = match notice {
        Notice::Core(Event::Health {
            url, state, cause, ..
        }) => {
            let (level, to) = match state {
                HealthState::Healthy => ("info", "healthy"),
                HealthState::Unhealthy => ("warn", "unhealthy"),
            };
            let passive = matches!(cause, lb_core::Cause::Passive(_));
            (
                level,
                "health",
                json!({"backend": &**url, "to": to, "cause": cause.to_string(), "passive": passive}),
            )
        }
        Notice::Core(Event::Status(r)) => return vec![status(r, verbose)],
        Notice::Core(Event::Removed { url, .. }) => {
            ("info", "backend_removed", json!({"backend": &**url}))
        }
        Notice::Listening(addr) => ("info", "listening", json!({"addr": addr.to_string()})),
        Notice::AdminListening(addr) => {
            ("info", "admin_listening", json!({"addr": addr.to_string()}))
        }
        Notice::AdminUnavailable { addr, error } => (
            "warn",
            "admin_unavailable",
            json!({"addr": addr.to_string(), "error": error}),
        ),
        Notice::Hangup => ("info", "reopened", json!({})),
        Notice::DiscoveryError { source, error } => (
            "warn",
            "discovery_error",
            json!({"source": source.name(), "error": error}),
        ),
        Notice::BackendChange {
            backend,
            change,
            source,
            client,
        } => (
            "info",
            "backend_change",
            json!({
                "backend": &**backend,
                "change": change.name(),
                "source": source.name(),
                "client": client.map(|c| c.to_string()),
            }),
        ),
        Notice::ProxyError {
            backend,
            request,
            id,
            status,
            error,
        } => (
            "error",
            "proxy_error",
            json!({
                "backend": &**backend,
                "request": request,
                "request_id": id.as_ref().map(|i| i.as_str()),
                "status": if *status == 0 { Value::Null } else { json!(status) },
                "cut": *status == 0,
                "error": error,
            }),
        ),
        Notice::Failover {
            from,
            to,
            request,
            id,
            error,
        } => (
            "warn",
            "failover",
            json!({
                "from": &**from,
                "to": &**to,
                "request": request,
                "request_id": id.as_ref().map(|i| i.as_str()),
                "error": error,
            }),
        ),
        Notice::ShuttingDown { in_flight } => {
            ("info", "shutting_down", json!({"in_flight": in_flight}))
        }
        Notice::Stopped { abandoned } => ("info", "stopped", json!({"abandoned": abandoned})),
    };
    vec![record(level, event, fields)]
}

fn record(level: &str, event: &str, fields: Value) -> Value {
    let mut m = Map::new();
    m.insert("ts".into(), json!(now()));
    m.insert("level".into(), json!(level));
    m.insert("event".into(), json!(event));
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    Value::Object(m)
}

fn status(r: &StatusReport, verbose: bool) -> Value {
    let mut fields = json!({
        "in_flight": r.in_flight,
        "healthy": r.healthy,
        "total": r.total,
        "loads": r.loads,
        "loads_elided": r.elided,
    });
    if let Some(a) = &r.routing {
        fields["affinity"] = json!({
            "requests": a.requests,
            "warm": a.warm,
            "cold": a.cold,
            "overflow": a.overflow,
            "keys": a.keys,
        });
    }
    if verbose {
        fields["backends"] = r
            .backends
            .iter()
            .map(|b| {
                json!({
                    "backend": &*b.url,
                    "state": match (b.draining, b.healthy) {
                        (true, _) => "draining",
                        (false, true) => "healthy",
                        (false, false) => "unhealthy",
                    },
                    "in_flight": b.in_flight,
                    "engine": b.engine.map(|e| json!({
                        "running": e.report.running,
                        "waiting": e.report.waiting,
                        "kv_usage": e.report.kv_usage(),
                        "age_seconds": std::time::Instant::now()
                            .saturating_duration_since(e.at)
                            .as_secs_f64(),
                    })),
                })
            })
            .collect();
    }
    record("info", "status", fields)
}

/// The start-up summary as one record.
pub fn summary(s: &Settings, runtime: &str) -> Value {
    let h = &s.core.health;
    let secs = |d: std::time::Duration| d.as_secs_f64();
    record(
        "info",
        "starting",
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "runtime": runtime,
            "listen": s.listen.to_string(),
            "admin": s.admin.map(|a| a.to_string()),
            "routing": s.core.policy.name(),
            "timeout_s": secs(s.request_timeout),
            "connect_timeout_s": secs(s.connect_timeout),
            "shutdown_timeout_s": secs(s.shutdown_timeout),
            "health_path": s.health_path,
            "health_interval_s": secs(h.interval),
            "health_timeout_s": secs(h.timeout.min(h.interval)),
            "fall": h.fall,
            "rise": h.rise,
            "passive_threshold": h.passive_threshold,
            "load_signal": s.load.signal.map_or("off".to_string(), |g| g.to_string()),
            "load_path": s.load.path,
            "load_interval_s": secs(s.core.engine.interval),
            "saturation_waiting": s.core.engine.saturation_waiting,
            "saturation_kv": f64::from(s.core.engine.saturation_kv_ppm) / 1e6,
            "max_client_conns": s.max_client_conns,
            "backends_file": s.backends_file.as_ref().map(|p| p.display().to_string()),
            "discover": s.discover.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            "discover_interval_s": secs(s.discover_interval),
            "resolver": s.resolver.map(|r| r.to_string()),
            "backends": s.backends.iter().map(|b| json!({
                "url": &*b.url,
                "weight": b.weight,
                "max_conns": b.max_conns,
            })).collect::<Vec<_>>(),
        }),
    )
}

/// A start-up failure as one record.
pub fn failure(message: &str) -> Value {
    record("error", "start_failed", json!({"error": message}))
}

/// Writes records to stderr, one per line, in one write.
pub fn emit(records: &[Value]) {
    if records.is_empty() {
        return;
    }
    let mut buf = String::new();
    for r in records {
        buf.push_str(&r.to_string());
        buf.push('\n');
    }
    let _ = std::io::stderr().lock().write_all(buf.as_bytes());
}

fn now() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    lb_proxy::reqlog::rfc3339_ms(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_error_is_one_object_with_stable_names() {
        let (id, _) = lb_proxy::request_id::RequestId::for_request(Some(b"abc"));
        let n = Notice::ProxyError {
            backend: "http://b:1".into(),
            request: "GET /x".into(),
            id: Some(id),
            status: 502,
            error: "connection refused".into(),
        };
        let r = records(&n, false).remove(0);
        assert_eq!(r["level"], "error");
        assert_eq!(r["event"], "proxy_error");
        assert_eq!(r["request_id"], "abc");
        assert_eq!(r["status"], 502);
        assert!(r["ts"].as_str().unwrap().ends_with('Z'));
    }
}
