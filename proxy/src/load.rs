//! Engine load polls: every `--load-interval`, `GET <backend><--load-path>` (default
//! `/metrics`) on each healthy backend, concurrently, each bounded in time (4/5 of the
//! interval) and size ([`MAX_LOAD_BODY`]); the vLLM or SGLang figures it shows
//! ([`lb_promtext`]) go to the core as [`Balancer::load_report`](lb_core::Balancer::load_report).
//! One implementation for both builds: the GET is the runtime's [`Runtime::get`], the one
//! health probes use.
//!
//! Load polls are not requests: they are counted nowhere in `lb_requests_total` or the
//! backends' connection figures, and their failure says nothing about health (the core
//! simply stops counting a report older than three intervals).
//!
//! With `--load-signal auto`, a backend whose answer shows none of the known series (a
//! plain HTTP service, a `404`) is left alone for [`QUIET_AFTER_NOTHING`] before it is
//! asked again, so `lb` in front of ordinary services sends one `GET /metrics` per
//! backend a minute. A transport error or a timeout is retried at the next interval (the
//! engine may be starting; it is probed for health anyway).

use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_core::LoadReport;
pub use lb_promtext::{Engine, Signal, UnknownSignal};

use lb_promtext::engine_load;

use crate::driver::either_value;
use crate::proxy::Proxy;
use crate::runtime::Runtime;
use crate::upstream::Upstream;

/// The most of a metrics body read; the rest is not read (the figures come first in
/// vLLM's and SGLang's expositions, and a body cut here is read up to its last line).
pub const MAX_LOAD_BODY: usize = 1 << 20;

/// How long a backend whose metrics show none of the known series is left alone under
/// `--load-signal auto`.
pub const QUIET_AFTER_NOTHING: Duration = Duration::from_secs(60);

/// The shortest `--load-interval` accepted.
pub const MIN_LOAD_INTERVAL: Duration = Duration::from_millis(50);

/// `--load-signal` and `--load-path`. The interval and the saturation thresholds are the
/// core's ([`lb_core::EngineLoadConfig`], in `Settings::core.engine`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSettings {
    /// Which engine's series to read; `None`: `off`, no polls at all.
    pub signal: Option<Signal>,
    /// The path polled on each backend (appended to its URL's path).
    pub path: String,
}

impl Default for LoadSettings {
    fn default() -> Self {
        LoadSettings {
            signal: Some(Signal::Auto),
            path: "/metrics".into(),
        }
    }
}

/// How long one poll may take: 4/5 of the interval, so it ends before the next is due.
pub fn poll_timeout(interval: Duration) -> Duration {
    interval * 4 / 5
}

/// One backend's polling state and what the last poll found (for the admin API).
#[derive(Clone, Debug, Default)]
pub struct LoadPoll {
    /// A poll is under way.
    busy: bool,
    /// No poll before this (`auto`, after an answer without the known series).
    quiet_until: Option<Instant>,
    /// The engine its last report came from.
    pub engine: Option<Engine>,
    /// When the last poll ended (ms since the epoch) and what it found.
    pub last: Option<(u64, String)>,
}

/// What one poll found.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Found {
    /// The figures.
    Load(lb_promtext::EngineLoad),
    /// An answer without the known series (the reason: a status, or "no known series").
    Nothing(String),
    /// No answer: a transport error or the timeout.
    Failed(String),
}

impl LoadPoll {
    /// Whether a poll may start at `now`; if so it is marked under way.
    pub(crate) fn start(&mut self, now: Instant) -> bool {
        if self.busy || self.quiet_until.is_some_and(|t| now < t) {
            return false;
        }
        self.busy = true;
        true
    }

    /// Records what a poll found at `now` (`at_ms`: the same instant, for the API).
    pub(crate) fn finish(&mut self, signal: Signal, found: &Found, now: Instant, at_ms: u64) {
        self.busy = false;
        self.quiet_until = None;
        let said = match found {
            Found::Load(l) => {
                self.engine = Some(l.engine);
                format!("{} figures", l.engine)
            }
            Found::Nothing(why) => {
                if signal == Signal::Auto {
                    self.engine = None;
                    self.quiet_until = Some(now + QUIET_AFTER_NOTHING);
                    format!(
                        "{why}; not polled again for {}s",
                        QUIET_AFTER_NOTHING.as_secs()
                    )
                } else {
                    why.clone()
                }
            }
            Found::Failed(e) => format!("no answer: {e}"),
        };
        self.last = Some((at_ms, said));
    }
}

/// What a scrape's answer says, under `signal`.
pub(crate) fn read_scrape(status: u16, body: &[u8], truncated: bool, signal: Signal) -> Found {
    if !(200..300).contains(&status) {
        return Found::Nothing(format!("HTTP {status}"));
    }
    // A cut body is read up to its last complete line.
    let body = if truncated {
        let end = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        &body[..end]
    } else {
        body
    };
    match engine_load(body, signal) {
        Some(l) => Found::Load(l),
        None => Found::Nothing(match signal {
            Signal::Auto => "no vllm: or sglang: load series".into(),
            Signal::Only(e) => format!("no {e} load series"),
        }),
    }
}

/// Polls every healthy backend each interval until shutdown. Spawned once by
/// [`drive`](crate::drive) unless `--load-signal off`.
pub(crate) async fn poll_engines<R: Runtime>(proxy: Arc<Proxy<R>>) {
    let Some(signal) = proxy.settings().load.signal else {
        return;
    };
    let interval = proxy.settings().core.engine.interval.max(MIN_LOAD_INTERVAL);
    let mut next = Instant::now();
    loop {
        proxy.runtime().sleep_until(next).await;
        if proxy.is_shutting_down() {
            return;
        }
        let now = Instant::now();
        let due: Vec<Arc<Upstream<R>>> = {
            let core = proxy.lock();
            core.balancer
                .backends()
                .filter(|v| v.healthy && !v.draining)
                .filter_map(|v| core.upstream(v.id))
                .collect()
        };
        let deadline = now + poll_timeout(interval);
        for up in due {
            if up.load_poll(|p| p.start(now)) {
                proxy
                    .runtime()
                    .spawn(poll_one(proxy.clone(), up, signal, deadline));
            }
        }
        // The next tick on the interval's grid, skipping those missed while stalled.
        next += interval;
        if next <= now {
            next = now + interval;
        }
    }
}

/// One poll of one backend, bounded by `deadline`.
async fn poll_one<R: Runtime>(
    proxy: Arc<Proxy<R>>,
    up: Arc<Upstream<R>>,
    signal: Signal,
    deadline: Instant,
) {
    let get = proxy
        .runtime()
        .get(&up, &proxy.settings().load.path, MAX_LOAD_BODY);
    let timeout = proxy.runtime().sleep_until(deadline);
    let found = match either_value(get, timeout).await {
        Some(Ok(f)) => read_scrape(f.status, &f.body, f.truncated, signal),
        Some(Err(e)) => Found::Failed(e),
        None => Found::Failed("timed out".into()),
    };
    let now = Instant::now();
    if let Found::Load(l) = &found {
        let mut report = LoadReport::new(l.running, l.waiting);
        if let Some(kv) = l.kv_usage {
            report = report.with_kv_usage(kv);
        }
        proxy.lock().balancer.load_report(now, up.id(), report);
    }
    let at = crate::fleet::unix_ms();
    up.load_poll(|p| p.finish(signal, &found, now, at));
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &[u8] = b"vllm:num_requests_running 2\nvllm:num_requests_waiting 7\n";

    #[test]
    fn answers_read_as_load_nothing_or_failure() {
        let Found::Load(l) = read_scrape(200, VLLM, false, Signal::Auto) else {
            panic!("vLLM figures expected");
        };
        assert_eq!((l.engine, l.running, l.waiting), (Engine::Vllm, 2, 7));
        assert_eq!(
            read_scrape(404, VLLM, false, Signal::Auto),
            Found::Nothing("HTTP 404".into())
        );
        assert!(matches!(
            read_scrape(200, b"{\"ok\":true}", false, Signal::Auto),
            Found::Nothing(_)
        ));
        assert!(matches!(
            read_scrape(200, VLLM, false, Signal::Only(Engine::Sglang)),
            Found::Nothing(_)
        ));
        // A cut body: its last, partial line is left out.
        let cut = b"vllm:num_requests_running 2\nvllm:num_requests_waiting 7";
        let Found::Load(l) = read_scrape(200, cut, true, Signal::Auto) else {
            panic!("the first line is whole");
        };
        assert_eq!(l.waiting, 0);
    }

    #[test]
    fn auto_leaves_a_backend_without_series_alone_for_a_minute() {
        let t = Instant::now();
        let mut p = LoadPoll::default();
        assert!(p.start(t));
        assert!(!p.start(t), "one poll at a time");
        p.finish(Signal::Auto, &Found::Nothing("HTTP 404".into()), t, 0);
        assert!(!p.start(t + Duration::from_secs(59)));
        assert!(p.start(t + QUIET_AFTER_NOTHING));
        // A failure is retried at the next interval.
        p.finish(Signal::Auto, &Found::Failed("refused".into()), t, 0);
        assert!(p.start(t));
        // With an engine named, nothing found is retried too.
        p.finish(
            Signal::Only(Engine::Vllm),
            &Found::Nothing("HTTP 404".into()),
            t,
            0,
        );
        assert!(p.start(t));
        assert!(p.last.as_ref().unwrap().1.contains("404"));
    }

    #[test]
    fn the_timeout_ends_before_the_next_poll() {
        assert_eq!(
            poll_timeout(Duration::from_millis(500)),
            Duration::from_millis(400)
        );
        assert!(poll_timeout(MIN_LOAD_INTERVAL) < MIN_LOAD_INTERVAL);
    }
}
