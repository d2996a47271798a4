//! The control path: one timer set to the core's `poll_timeout`, probes when it asks.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Empty;
use lb_core::{Action, ProbeId, ProbeOutcome};

use crate::proxy::describe;
use crate::shared::Shared;

/// Runs forever: handles due deadlines, starts the probes the core asks for, reports
/// events and queue expiries, and sleeps until the next deadline (or until an input adds
/// an earlier one).
pub(crate) async fn drive(shared: Arc<Shared>) {
    loop {
        let (drained, next) = {
            let mut core = shared.core();
            let now = Instant::now();
            if core.poll_timeout().is_some_and(|t| t <= now) {
                core.handle_timeout(now);
            }
            (shared.drain(&mut core), core.poll_timeout())
        };
        for action in &drained.actions {
            let Action::StartProbe {
                probe, deadline, ..
            } = action;
            tokio::spawn(run_probe(shared.clone(), *probe, *deadline));
        }
        shared.dispatch(drained);
        match next {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.into()) => {}
                    _ = shared.rearm.notified() => {}
                }
            }
            None => shared.rearm.notified().await,
        }
    }
}

/// One probe: `GET <backend><health-path>`, bounded by the core's deadline. The body is
/// not read; the status decides.
async fn run_probe(shared: Arc<Shared>, probe: ProbeId, deadline: Instant) {
    let upstream = shared.upstream(probe.backend());
    let req = http::Request::get(upstream.probe_uri.clone())
        .header(http::header::HOST, upstream.host.clone())
        .header(
            http::header::USER_AGENT,
            concat!("lb/", env!("CARGO_PKG_VERSION"), " health-check"),
        )
        .body(Empty::<Bytes>::new())
        .expect("a GET with a valid URI and static headers is a valid request");
    let outcome = match tokio::time::timeout_at(deadline.into(), shared.probes.request(req)).await {
        Ok(Ok(resp)) => ProbeOutcome::Status(resp.status().as_u16()),
        Ok(Err(e)) => ProbeOutcome::Error(describe(&e)),
        Err(_) => ProbeOutcome::TimedOut,
    };
    let drained = {
        let mut core = shared.core();
        core.probe_result(Instant::now(), probe, outcome);
        shared.drain(&mut core)
    };
    shared.dispatch(drained);
}
