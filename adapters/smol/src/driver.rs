//! The control path: one timer set to the core's `poll_timeout`, probes when it asks.

use std::sync::{Arc, Weak};
use std::time::Instant;

use async_executor::Executor;
use async_io::Timer;
use futures_lite::future;
use lb_core::{Action, ProbeId, ProbeOutcome};
use lb_http1::{Header, RequestHead, Status, Version};

use crate::connect::describe;
use crate::io::{head_read_size, read_more, send};
use crate::shared::Shared;

/// Runs forever: handles due deadlines (queue expiries among them), starts the probes the
/// core asks for (as tasks on `spawner`, held weakly so that the executor can go away),
/// reports events, delivers admissions, and sleeps until the next deadline, or until an
/// input may have added an earlier one (`Shared::rearm`).
pub(crate) async fn drive(shared: Arc<Shared>, spawner: Weak<Executor<'static>>) {
    let mut timer = Timer::never();
    loop {
        // Listening before reading the deadline: a later enqueue wakes this turn's sleep.
        let rearmed = shared.rearm.listen();
        let mut probes = Vec::new();
        let (drained, next) = {
            let mut core = shared.core();
            let now = Instant::now();
            if core.poll_timeout().is_some_and(|t| t <= now) {
                core.handle_timeout(now);
            }
            while let Some(action) = core.poll_action() {
                probes.push(action);
            }
            (shared.drain(&mut core), core.poll_timeout())
        };
        shared.dispatch(drained);
        for Action::StartProbe {
            probe, deadline, ..
        } in probes
        {
            let Some(ex) = spawner.upgrade() else { return };
            ex.spawn(run_probe(shared.clone(), probe, deadline))
                .detach();
        }
        match next {
            Some(t) => timer.set_at(t),
            // Nothing scheduled (no backends, an empty queue) until an input says so.
            None => timer = Timer::never(),
        }
        future::or(
            async {
                (&mut timer).await;
            },
            rearmed,
        )
        .await;
    }
}

/// One probe: `GET <backend prefix><health path>` on a fresh connection, bounded by the
/// core's deadline. The response body is not read; the status decides.
async fn run_probe(shared: Arc<Shared>, probe: ProbeId, deadline: Instant) {
    let outcome = future::or(check(&shared, probe), async {
        Timer::at(deadline).await;
        ProbeOutcome::TimedOut
    })
    .await;
    let drained = {
        let mut core = shared.core();
        core.probe_result(Instant::now(), probe, outcome);
        shared.drain(&mut core)
    };
    shared.dispatch(drained);
}

async fn check(shared: &Shared, probe: ProbeId) -> ProbeOutcome {
    let up = shared.upstream(probe.backend());
    let conn = match shared.connector.connect(up, &shared.local(0).reactor).await {
        Ok(c) => c,
        Err(e) => return ProbeOutcome::Error(e),
    };
    let head = RequestHead {
        method: "GET".into(),
        target: up.probe_target.clone(),
        version: Version::Http11,
        headers: vec![
            Header::new("Host", up.target.authority.as_bytes()),
            Header::new(
                "User-Agent",
                concat!("lb/", env!("CARGO_PKG_VERSION"), " health-check"),
            ),
            Header::new("Connection", "close"),
        ],
    };
    let mut out = Vec::new();
    head.write(&mut out);
    if let Err(e) = send(&conn, &out).await {
        return ProbeOutcome::Error(describe(&e));
    }
    let mut buf = Vec::new();
    loop {
        match lb_http1::parse_response(&buf, &shared.limits) {
            Ok(Status::Complete(resp, n)) if resp.is_interim() => {
                // A 1xx before the real answer: skip it.
                buf.drain(..n);
                continue;
            }
            Ok(Status::Complete(resp, _)) => return ProbeOutcome::Status(resp.status),
            Ok(Status::Partial) => {}
            Err(e) => return ProbeOutcome::Error(format!("invalid response: {e}")),
        }
        let want = head_read_size(buf.len(), shared.limits.max_head_bytes);
        match read_more(&conn, &mut buf, want).await {
            Ok(0) => {
                return ProbeOutcome::Error("backend closed the connection".into());
            }
            Ok(_) => {}
            Err(e) => return ProbeOutcome::Error(describe(&e)),
        }
    }
}
