//! The control path: one timer set to the core's `poll_timeout`, and the probes it asks
//! for, run through the adapter's [`Runtime`].

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use lb_core::{Action, ProbeId, ProbeOutcome};

use crate::models::{MAX_MODELS_BODY, MODELS_PATH};
use crate::proxy::Proxy;
use crate::runtime::Runtime;

/// Runs until the proxy stops: handles due deadlines (queue expiries among them), starts
/// the probes the core asks for, reports events, delivers admissions, and sleeps until the
/// next deadline, or until an input may have added an earlier one. Spawn it once.
pub async fn drive<R: Runtime>(proxy: Arc<Proxy<R>>) {
    if proxy.settings().backends_file.is_some() {
        proxy
            .runtime()
            .spawn(crate::discovery::watch_file(proxy.clone()));
    }
    if proxy.settings().load.signal.is_some() {
        proxy
            .runtime()
            .spawn(crate::load::poll_engines(proxy.clone()));
    }
    crate::discovery::start_dns(&proxy);
    loop {
        // Listening before reading the deadline: a later input wakes this turn's sleep.
        let rearmed = proxy.rearm.listen();
        let mut actions = Vec::new();
        let (drained, next) = {
            let mut core = proxy.lock();
            let now = Instant::now();
            if core.balancer.poll_timeout().is_some_and(|t| t <= now) {
                core.balancer.handle_timeout(now);
            }
            while let Some(a) = core.balancer.poll_action() {
                actions.push(a);
            }
            let drained = proxy.drain(&mut core, now);
            (drained, core.balancer.poll_timeout())
        };
        proxy.dispatch(drained);
        // Once shutdown begins, no probe starts: what one finds then says nothing (a
        // backend's connections are being closed by lb itself).
        if !proxy.is_shutting_down() {
            for action in actions {
                match action {
                    Action::StartProbe {
                        probe, deadline, ..
                    } => proxy
                        .runtime()
                        .spawn(run_probe(proxy.clone(), probe, deadline)),
                }
            }
        }
        let sleep = next.map(|t| proxy.runtime().sleep_until(t));
        either(
            async move {
                match sleep {
                    Some(s) => s.await,
                    // Nothing scheduled (no backends, an empty queue) until an input says so.
                    None => std::future::pending().await,
                }
            },
            rearmed,
        )
        .await;
    }
}

/// One probe: `GET <backend prefix><health path>`, bounded by the core's deadline. The
/// status decides health. When the health path is `/v1/models` its body (at most
/// [`MAX_MODELS_BODY`] bytes) is the backend's model list; else a probe that passes is
/// followed by a `GET /v1/models` of its own, bounded by the probe timeout (see
/// [`crate::models`]).
async fn run_probe<R: Runtime>(proxy: Arc<Proxy<R>>, probe: ProbeId, deadline: Instant) {
    let Some(upstream) = proxy.upstream(probe.backend()) else {
        return;
    };
    let started = Instant::now();
    let health_path = &proxy.settings().health_path;
    let lists = health_path == MODELS_PATH;
    let get = proxy.runtime().get(
        &upstream,
        health_path,
        if lists { MAX_MODELS_BODY } else { 0 },
    );
    let timeout = proxy.runtime().sleep_until(deadline);
    let mut models = None;
    let outcome = match either_value(get, timeout).await {
        Some(Ok(fetched)) => {
            if lists {
                models = Some(crate::models::parse(&fetched));
            }
            ProbeOutcome::Status(fetched.status)
        }
        Some(Err(e)) => ProbeOutcome::Error(e),
        None => ProbeOutcome::TimedOut,
    };
    let passed = outcome.passed();
    upstream.stats.probe(started.elapsed());
    let found = outcome.to_string();
    let at = crate::fleet::unix_ms();
    upstream.note(|n| n.probe = Some((at, found)));
    if proxy.is_shutting_down() {
        return;
    }
    // The models first: a backend that turns healthy now takes only its models' requests.
    if let Some(models) = models {
        proxy.learn_models(&upstream, models);
    }
    let drained = {
        let mut core = proxy.lock();
        let now = Instant::now();
        core.balancer.probe_result(now, probe, outcome);
        proxy.drain(&mut core, now)
    };
    proxy.dispatch(drained);
    if !lists && passed {
        let get = proxy.runtime().get(&upstream, MODELS_PATH, MAX_MODELS_BODY);
        let timeout = proxy
            .runtime()
            .sleep_until(Instant::now() + proxy.settings().core.health.timeout);
        if let Some(Ok(fetched)) = either_value(get, timeout).await {
            if !proxy.is_shutting_down() {
                proxy.learn_models(&upstream, crate::models::parse(&fetched));
            }
        }
    }
}

/// Waits for whichever of `a` and `b` ends first.
pub(crate) async fn either(a: impl Future<Output = ()>, b: impl Future<Output = ()>) {
    let (mut a, mut b) = (pin!(a), pin!(b));
    poll_fn(|cx| {
        if a.as_mut().poll(cx).is_ready() || b.as_mut().poll(cx).is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// `work`'s value, or `None` if `stop` ends first.
pub(crate) async fn either_value<T>(
    work: impl Future<Output = T>,
    stop: impl Future<Output = ()>,
) -> Option<T> {
    let (mut work, mut stop) = (pin!(work), pin!(stop));
    poll_fn(|cx| {
        if let Poll::Ready(v) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        stop.as_mut().poll(cx).map(|()| None)
    })
    .await
}
