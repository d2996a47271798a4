//! The control path: one timer set to the core's `poll_timeout`, probes when it asks.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Empty;
use lb_core::{Action, Notice, ProbeId, ProbeOutcome};

use crate::proxy::describe;
use crate::shared::Shared;

/// Runs forever: handles due deadlines, starts the probes the core asks for, reports
/// events, and sleeps until the next deadline.
pub(crate) async fn drive(shared: Arc<Shared>) {
    loop {
        let mut probes = Vec::new();
        let mut events = Vec::new();
        let next = {
            let mut core = shared.core();
            let now = Instant::now();
            if core.poll_timeout().is_some_and(|t| t <= now) {
                core.handle_timeout(now);
            }
            while let Some(action) = core.poll_action() {
                probes.push(action);
            }
            while let Some(event) = core.poll_event() {
                events.push(event);
            }
            core.poll_timeout()
        };
        for e in events {
            (shared.log)(Notice::Core(e));
        }
        for Action::StartProbe {
            probe, deadline, ..
        } in probes
        {
            tokio::spawn(run_probe(shared.clone(), probe, deadline));
        }
        match next {
            Some(t) => tokio::time::sleep_until(t.into()).await,
            // Nothing scheduled (no backends): nothing will ever be.
            None => std::future::pending::<()>().await,
        }
    }
}

/// One probe: `GET <backend><health-path>`, bounded by the core's deadline. The body is
/// not read; the status decides.
async fn run_probe(shared: Arc<Shared>, probe: ProbeId, deadline: Instant) {
    let uri = shared.upstream(probe.backend()).probe_uri.clone();
    let req = http::Request::get(uri)
        .header(
            http::header::HOST,
            shared.upstream(probe.backend()).authority.as_str(),
        )
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
    let mut events = Vec::new();
    {
        let mut core = shared.core();
        core.probe_result(Instant::now(), probe, outcome);
        while let Some(e) = core.poll_event() {
            events.push(e);
        }
    }
    for e in events {
        (shared.log)(Notice::Core(e));
    }
}
