//! The scrape: what the proxy's state says now (gauges read under the core's lock once),
//! and the counters summed over cells, encoded by `prometheus-client`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::hist::Sums;
use super::process::Process;
use super::{AffinityPolicy, BackendStats, Metrics, Rejection};

/// What the proxy's state says at a scrape.
#[derive(Debug)]
pub struct Scrape {
    /// Every backend in the pool.
    pub backends: Vec<BackendRow>,
    /// Requests waiting in the admission queue now.
    pub queue_depth: usize,
    /// The routing policy, and the entries its affinity table holds (`None` for
    /// policies without one).
    pub affinity: Option<(&'static str, usize)>,
    /// Client connections open now.
    pub client_connections: usize,
}

/// One backend at a scrape.
#[derive(Debug)]
pub struct BackendRow {
    /// Its URL: the `backend` label.
    pub url: Arc<str>,
    /// Healthy (and not draining).
    pub up: bool,
    /// Requests in flight through this `lb`.
    pub in_flight: u32,
    /// `--max-conns` (0: unlimited).
    pub max_conns: u32,
    /// Its weight.
    pub weight: u32,
    /// Its counters.
    pub stats: Arc<BackendStats>,
    /// Its engine's last load report, if it ever sent one.
    pub engine: Option<EngineRow>,
}

/// A backend engine's last load report at a scrape (see `lb_core::engine`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineRow {
    /// Requests it said it was running.
    pub running: u32,
    /// Requests it said were waiting.
    pub waiting: u32,
    /// Its KV cache usage (0..1), if it said.
    pub kv_usage: Option<f64>,
    /// Seconds since the report came.
    pub age: f64,
}

/// The exposition format a scrape asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4 (the default).
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text`, else Prometheus text.
    pub fn from_accept(accept: Option<&[u8]>) -> Format {
        let wants = accept.is_some_and(|a| {
            a.windows(b"application/openmetrics-text".len())
                .any(|w| w.eq_ignore_ascii_case(b"application/openmetrics-text"))
        });
        if wants {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// Its `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl Metrics {
    /// The exposition of every series, in `format`.
    pub fn encode(&self, scrape: Scrape, format: Format) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Collect {
            scrape,
            totals: self.totals(),
            runtime: self.runtime,
            process: Process::read(),
        }));
        let mut out = String::with_capacity(16 * 1024);
        let encoded = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        };
        if encoded.is_err() {
            // Writing to a String cannot fail; a collector error would be a bug here.
            let _ = writeln!(out, "# encoding failed");
        }
        out
    }

    fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for c in self.cells.iter() {
            c.codes.add_to(&mut t.codes);
            c.duration.add_to(&mut t.duration);
            for (s, r) in t.rejections.iter_mut().zip(&c.rejections) {
                *s += r.load(Ordering::Relaxed);
            }
            c.queue_wait.add_to(&mut t.queue_wait);
            t.client_conns += c.client_conns.load(Ordering::Relaxed);
            for (s, b) in t.bytes.iter_mut().zip(&c.bytes) {
                *s += b.load(Ordering::Relaxed);
            }
            for (sp, cp) in t.affinity.iter_mut().zip(&c.affinity) {
                for (s, v) in sp.iter_mut().zip(cp) {
                    *s += v.load(Ordering::Relaxed);
                }
            }
        }
        for (ts, ms) in t.changes.iter_mut().zip(&self.changes) {
            for (s, v) in ts.iter_mut().zip(ms) {
                *s = v.load(Ordering::Relaxed);
            }
        }
        t
    }
}

#[derive(Debug, Default)]
struct Totals {
    codes: Vec<(Option<u16>, u64)>,
    duration: Sums,
    rejections: [u64; Rejection::ALL.len()],
    queue_wait: Sums,
    client_conns: u64,
    bytes: [u64; 2],
    affinity: [[u64; 3]; 3],
    changes: [[u64; 4]; 4],
}

#[derive(Debug, Default)]
struct BackendTotals {
    codes: Vec<(Option<u16>, u64)>,
    duration: Sums,
    first_byte: Sums,
    conns: [u64; 3],
    retries: [u64; 2],
    probes: Sums,
}

impl BackendStats {
    fn totals(&self) -> BackendTotals {
        let mut t = BackendTotals::default();
        for c in self.cells.iter() {
            c.codes.add_to(&mut t.codes);
            c.duration.add_to(&mut t.duration);
            c.first_byte.add_to(&mut t.first_byte);
            for (s, v) in t.conns.iter_mut().zip(&c.conns) {
                *s += v.load(Ordering::Relaxed);
            }
            for (s, v) in t.retries.iter_mut().zip(&c.retries) {
                *s += v.load(Ordering::Relaxed);
            }
        }
        self.probes.add_to(&mut t.probes);
        t
    }
}

#[derive(Debug)]
struct Collect {
    scrape: Scrape,
    totals: Totals,
    runtime: &'static str,
    process: Option<Process>,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Writes one family: its descriptor, then a sample per label set.
struct Family<'e, 'w> {
    encoder: &'e mut DescriptorEncoder<'w>,
}

impl Family<'_, '_> {
    fn counter(&mut self, name: &str, help: &str, rows: &[(Labels<'_>, u64)]) -> Fmt {
        let mut m = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in rows {
            m.encode_family(labels)?
                .encode_counter::<NoLabelSet, _, u64>(v, None)?;
        }
        Ok(())
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        rows: &[(Labels<'_>, f64)],
    ) -> Fmt {
        let mut m = self
            .encoder
            .encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for (labels, v) in rows {
            if labels.is_empty() {
                m.encode_gauge(v)?;
            } else {
                m.encode_family(labels)?.encode_gauge(v)?;
            }
        }
        Ok(())
    }

    /// A histogram in seconds: `name` gets the `_seconds` suffix from its unit.
    fn histogram(&mut self, name: &str, help: &str, rows: &[(Labels<'_>, &Sums)]) -> Fmt {
        let mut m = self.encoder.encode_descriptor(
            name,
            help,
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        let none: Option<&HashMap<usize, Exemplar<NoLabelSet, f64>>> = None;
        for (labels, sums) in rows {
            let buckets = sums.per_bucket();
            if labels.is_empty() {
                m.encode_histogram(sums.sum_seconds(), sums.count(), &buckets, none)?;
            } else {
                m.encode_family(labels)?.encode_histogram(
                    sums.sum_seconds(),
                    sums.count(),
                    &buckets,
                    none,
                )?;
            }
        }
        Ok(())
    }
}

type Fmt = Result<(), std::fmt::Error>;

fn code_label(code: Option<u16>) -> String {
    code.map_or_else(|| "other".to_string(), |c| c.to_string())
}

impl Collector for Collect {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Fmt {
        let s = &self.scrape;
        let t = &self.totals;
        let backends: Vec<(&BackendRow, BackendTotals)> =
            s.backends.iter().map(|b| (b, b.stats.totals())).collect();
        let mut f = Family {
            encoder: &mut encoder,
        };

        // Requests, by the backend that answered ("none": lb itself) and the status.
        let mut codes: Vec<(String, String, u64)> = Vec::new();
        for (b, bt) in &backends {
            for (code, n) in &bt.codes {
                codes.push((b.url.to_string(), code_label(*code), *n));
            }
        }
        for (code, n) in &t.codes {
            codes.push(("none".into(), code_label(*code), *n));
        }
        let rows: Vec<_> = codes
            .iter()
            .map(|(b, c, n)| (vec![("backend", b.as_str()), ("code", c.as_str())], *n))
            .collect();
        f.counter(
            "lb_requests",
            "Requests answered, by the backend that answered (none: lb itself) and the status sent to the client (499: the client left before a response head).",
            &rows,
        )?;
        let mut rows: Vec<(Labels<'_>, &Sums)> = backends
            .iter()
            .map(|(b, bt)| (vec![("backend", &*b.url)], &bt.duration))
            .collect();
        rows.push((vec![("backend", "none")], &t.duration));
        f.histogram(
            "lb_request_duration",
            "From the request head to the end of the response.",
            &rows,
        )?;
        let rows: Vec<(Labels<'_>, &Sums)> = backends
            .iter()
            .map(|(b, bt)| (vec![("backend", &*b.url)], &bt.first_byte))
            .collect();
        f.histogram(
            "lb_response_first_byte",
            "From the backend's selection (connecting and sending the request included) to the first response body byte: time to first token for a streamed completion.",
            &rows,
        )?;

        // Backends.
        let gauge_rows = |get: &dyn Fn(&BackendRow) -> f64| -> Vec<(Labels<'_>, f64)> {
            s.backends
                .iter()
                .map(|b| (vec![("backend", &*b.url)], get(b)))
                .collect()
        };
        f.gauge(
            "lb_backend_up",
            "1 while the backend is healthy (and not draining), else 0.",
            None,
            &gauge_rows(&|b| f64::from(u8::from(b.up))),
        )?;
        f.gauge(
            "lb_backend_in_flight",
            "Requests in flight to the backend through this lb.",
            None,
            &gauge_rows(&|b| f64::from(b.in_flight)),
        )?;
        f.gauge(
            "lb_backend_max_conns",
            "The backend's cap on requests in flight (--max-conns; 0: none).",
            None,
            &gauge_rows(&|b| f64::from(b.max_conns)),
        )?;
        f.gauge(
            "lb_backend_weight",
            "The backend's weight.",
            None,
            &gauge_rows(&|b| f64::from(b.weight)),
        )?;
        // Engine load signals: only the backends whose engine has reported.
        let engine_rows = |get: &dyn Fn(&EngineRow) -> Option<f64>| -> Vec<(Labels<'_>, f64)> {
            s.backends
                .iter()
                .filter_map(|b| Some((vec![("backend", &*b.url)], get(b.engine.as_ref()?)?)))
                .collect()
        };
        f.gauge(
            "lb_backend_engine_running",
            "Requests the backend's engine reported running (vllm:num_requests_running, sglang:num_running_reqs), from its last load report.",
            None,
            &engine_rows(&|e| Some(f64::from(e.running))),
        )?;
        f.gauge(
            "lb_backend_engine_waiting",
            "Requests the backend's engine reported waiting (vllm:num_requests_waiting, sglang:num_queue_reqs), from its last load report.",
            None,
            &engine_rows(&|e| Some(f64::from(e.waiting))),
        )?;
        f.gauge(
            "lb_backend_engine_kv_usage",
            "KV cache usage (0 to 1) the backend's engine reported (vllm:kv_cache_usage_perc, sglang:token_usage), from its last load report.",
            None,
            &engine_rows(&|e| e.kv_usage),
        )?;
        f.gauge(
            "lb_backend_engine_report_age",
            "Seconds since the backend's engine last reported its load (older than 3 --load-interval: ignored for routing).",
            Some(&Unit::Seconds),
            &engine_rows(&|e| Some(e.age)),
        )?;
        let mut rows = Vec::new();
        for (b, _) in &backends {
            rows.push((
                vec![("backend", &*b.url), ("to", "healthy")],
                b.stats.to_healthy.load(Ordering::Relaxed),
            ));
            rows.push((
                vec![("backend", &*b.url), ("to", "unhealthy")],
                b.stats.to_unhealthy.load(Ordering::Relaxed),
            ));
        }
        f.counter(
            "lb_health_transitions",
            "Health state changes, by the state entered.",
            &rows,
        )?;
        let rows: Vec<(Labels<'_>, &Sums)> = backends
            .iter()
            .map(|(b, bt)| (vec![("backend", &*b.url)], &bt.probes))
            .collect();
        f.histogram(
            "lb_probe_duration",
            "How long each health probe took (failed ones included).",
            &rows,
        )?;
        let rows: Vec<_> = backends
            .iter()
            .map(|(b, _)| {
                (
                    vec![("backend", &*b.url)],
                    b.stats.passive_ejections.load(Ordering::Relaxed),
                )
            })
            .collect();
        f.counter(
            "lb_passive_ejections",
            "Ejections caused by proxied traffic (transport errors, 5xx, invalid responses).",
            &rows,
        )?;

        // Admission.
        let rows: Vec<_> = Rejection::ALL
            .iter()
            .map(|r| (vec![("reason", r.label())], t.rejections[*r as usize]))
            .collect();
        f.counter(
            "lb_rejections",
            "Requests lb answered itself instead of proxying, by reason.",
            &rows,
        )?;
        f.gauge(
            "lb_queue_depth",
            "Requests waiting in the admission queue.",
            None,
            &[(vec![], s.queue_depth as f64)],
        )?;
        f.histogram(
            "lb_queue_wait",
            "How long admitted or expired requests waited in the admission queue.",
            &[(vec![], &t.queue_wait)],
        )?;
        if let Some((policy, entries)) = s.affinity {
            let i = match policy {
                "consistent-hash" => AffinityPolicy::ConsistentHash,
                "prefix-hash" => AffinityPolicy::PrefixHash,
                _ => AffinityPolicy::CacheAware,
            } as usize;
            let rows: Vec<_> = ["hit", "miss", "overflow"]
                .iter()
                .enumerate()
                .map(|(r, result)| {
                    (
                        vec![("policy", policy), ("result", *result)],
                        t.affinity[i][r],
                    )
                })
                .collect();
            f.counter(
                "lb_affinity_lookups",
                "Affinity routing decisions: hit (the backend holding the prefix or hash), miss (nothing known: load decided), overflow (the holder was too loaded).",
                &rows,
            )?;
            f.gauge(
                "lb_affinity_entries",
                "Entries in the affinity table.",
                None,
                &[(vec![("policy", policy)], entries as f64)],
            )?;
        }

        // Connections and bytes.
        f.gauge(
            "lb_client_connections",
            "Client connections open.",
            None,
            &[(vec![], s.client_connections as f64)],
        )?;
        f.counter(
            "lb_client_connections",
            "Client connections accepted.",
            &[(vec![], t.client_conns)],
        )?;
        let mut rows = Vec::new();
        for (b, bt) in &backends {
            for (i, result) in ["new", "reused", "failed"].iter().enumerate() {
                rows.push((vec![("backend", &*b.url), ("result", *result)], bt.conns[i]));
            }
        }
        f.counter(
            "lb_upstream_connections",
            "Backend connections proxied requests used: new, reused (pooled keep-alive) or failed (could not connect).",
            &rows,
        )?;
        let mut rows = Vec::new();
        for (b, bt) in &backends {
            for (i, reason) in ["connect", "keepalive_race"].iter().enumerate() {
                rows.push((
                    vec![("backend", &*b.url), ("reason", *reason)],
                    bt.retries[i],
                ));
            }
        }
        f.counter(
            "lb_retries",
            "Requests sent again, by the backend that failed them: connect (to another backend, --connect-retries) or keepalive_race (on a new connection).",
            &rows,
        )?;
        {
            use crate::fleet::{Change, Source};
            let sources = [Source::Flag, Source::File, Source::Dns, Source::Api];
            let changes = [
                Change::Added,
                Change::Drained,
                Change::Removed,
                Change::Weight,
            ];
            let mut rows = Vec::new();
            for s in sources {
                for c in changes {
                    let n = t.changes[s as usize][c as usize];
                    if n > 0 {
                        rows.push((vec![("source", s.name()), ("change", c.name())], n));
                    }
                }
            }
            f.counter(
                "lb_backend_changes",
                "Pool changes at runtime, by source (api, file, dns) and change (added, drained, removed, weight).",
                &rows,
            )?;
        }
        f.counter(
            "lb_bytes",
            "Body bytes: in from clients, out to clients.",
            &[
                (vec![("direction", "in")], t.bytes[0]),
                (vec![("direction", "out")], t.bytes[1]),
            ],
        )?;
        let m = f.encoder.encode_descriptor(
            "lb_build",
            "The lb version and runtime.",
            None,
            MetricType::Info,
        );
        m?.encode_info(&vec![
            ("version", env!("CARGO_PKG_VERSION")),
            ("runtime", self.runtime),
        ])?;

        if let Some(p) = &self.process {
            let mut m = f.encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent.",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            m.encode_counter::<NoLabelSet, _, u64>(&p.cpu_seconds, None)?;
            f.gauge(
                "process_resident_memory",
                "Resident memory size.",
                Some(&Unit::Bytes),
                &[(vec![], p.resident_bytes as f64)],
            )?;
            f.gauge(
                "process_virtual_memory",
                "Virtual memory size.",
                Some(&Unit::Bytes),
                &[(vec![], p.virtual_bytes as f64)],
            )?;
            f.gauge(
                "process_open_fds",
                "Open file descriptors.",
                None,
                &[(vec![], p.open_fds as f64)],
            )?;
            if let Some(max) = p.max_fds {
                f.gauge(
                    "process_max_fds",
                    "The limit on open file descriptors.",
                    None,
                    &[(vec![], max as f64)],
                )?;
            }
            f.gauge(
                "process_start_time",
                "Start time of the process since the Unix epoch.",
                Some(&Unit::Seconds),
                &[(vec![], p.start_time_seconds)],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_once_and_counters_end_in_total() {
        let m = Metrics::new("tokio");
        let stats = Arc::new(BackendStats::default());
        stats.answered(200, std::time::Duration::from_millis(2), None);
        stats.answered(200, std::time::Duration::from_secs(2), None);
        let scrape = Scrape {
            backends: vec![BackendRow {
                url: "http://b:1".into(),
                up: true,
                in_flight: 0,
                max_conns: 0,
                weight: 1,
                stats,
                engine: Some(EngineRow {
                    running: 3,
                    waiting: 1,
                    kv_usage: None,
                    age: 0.25,
                }),
            }],
            queue_depth: 0,
            affinity: None,
            client_connections: 0,
        };
        let text = m.encode(scrape, Format::Prometheus);
        assert!(
            text.contains(
                r#"lb_request_duration_seconds_bucket{backend="http://b:1",le="+Inf"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"lb_request_duration_seconds_bucket{backend="http://b:1",le="0.0025"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"lb_requests_total{backend="http://b:1",code="200"} 2"#));
        assert!(text.contains(r#"lb_build_info{version="#));
        assert!(text.contains(r#"lb_backend_engine_running{backend="http://b:1"} 3"#));
        assert!(text.contains(r#"lb_backend_engine_report_age_seconds{backend="http://b:1"} 0.25"#));
        assert!(!text.contains(r#"lb_backend_engine_kv_usage{"#), "{text}");
        let om = Metrics::new("smol").encode(
            Scrape {
                backends: vec![],
                queue_depth: 0,
                affinity: None,
                client_connections: 0,
            },
            Format::OpenMetrics,
        );
        assert!(om.trim_end().ends_with("# EOF"), "{om}");
    }
}
