//! Runs the sans-IO [`Engine`] on tokio's clock for `mock-backend --engine`.
//!
//! One task drives the engine: it calls `handle_timeout` at each deadline and
//! publishes each request's progress on a `watch` channel, which the
//! request's [`Ticket`] reads. A `watch` keeps only the latest progress, so a
//! slow reader costs no memory; it catches up by the token count. Dropping a
//! ticket before its request finished (the client left) cancels the request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{watch, Notify};

use crate::engine::{Engine, EngineConfig, Event, Prompt, Rejection, RequestId, Snapshot};

/// Where a request stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Prompt tokens found in the prefix cache, once admitted.
    pub cached_tokens: Option<u64>,
    /// Tokens generated so far.
    pub generated: u64,
    /// Whether the last token was generated.
    pub done: bool,
}

/// The engine shared by every connection, with its driver task.
pub struct EngineHost {
    state: Mutex<Hosted>,
    /// Wakes the driver when a submission or cancellation moved the deadline.
    wake: Notify,
    next_id: AtomicU64,
}

struct Hosted {
    engine: Engine,
    /// The progress channel of each request in the engine.
    watchers: HashMap<RequestId, watch::Sender<Progress>>,
}

impl Hosted {
    /// Brings the engine to `now` and hands its events to the watchers.
    fn advance(&mut self, now: Instant) {
        self.engine.handle_timeout(now);
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Admitted { id, cached_tokens } => {
                    if let Some(tx) = self.watchers.get(&id) {
                        tx.send_modify(|p| p.cached_tokens = Some(cached_tokens));
                    }
                }
                Event::Token {
                    id,
                    generated,
                    done,
                } => {
                    if let Some(tx) = self.watchers.get(&id) {
                        tx.send_modify(|p| {
                            p.generated = generated;
                            p.done = done;
                        });
                    }
                    if done {
                        // The receiver still reads the last value.
                        self.watchers.remove(&id);
                    }
                }
            }
        }
    }
}

impl EngineHost {
    /// Creates the engine and spawns its driver on the current tokio runtime.
    pub fn start(cfg: EngineConfig) -> Arc<Self> {
        let host = Arc::new(EngineHost {
            state: Mutex::new(Hosted {
                engine: Engine::new(cfg),
                watchers: HashMap::new(),
            }),
            wake: Notify::new(),
            next_id: AtomicU64::new(0),
        });
        tokio::spawn(drive(host.clone()));
        host
    }

    fn lock(&self) -> MutexGuard<'_, Hosted> {
        // The engine's state stays consistent between calls, also after a
        // panic in one of them: keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submits a request arriving now.
    pub fn submit(self: &Arc<Self>, prompt: Prompt, max_tokens: u64) -> Result<Ticket, Rejection> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(Progress::default());
        {
            let mut h = self.lock();
            let now = Instant::now();
            h.engine.handle_timeout(now);
            h.engine.submit(now, id, prompt, max_tokens)?;
            h.watchers.insert(id, tx);
            h.advance(now);
        }
        self.wake.notify_one();
        Ok(Ticket {
            host: self.clone(),
            id,
            rx,
            finished: false,
        })
    }

    /// The engine's gauges and counters now.
    pub fn snapshot(&self) -> Snapshot {
        let mut h = self.lock();
        h.advance(Instant::now());
        h.engine.snapshot()
    }

    fn cancel(&self, id: RequestId) {
        {
            let mut h = self.lock();
            h.engine.cancel(id);
            h.watchers.remove(&id);
        }
        self.wake.notify_one();
    }
}

/// Runs every iteration at its end, for ever.
async fn drive(host: Arc<EngineHost>) {
    loop {
        let deadline = {
            let mut h = host.lock();
            h.advance(Instant::now());
            h.engine.poll_timeout()
        };
        match deadline {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = host.wake.notified() => {}
                }
            }
            None => host.wake.notified().await,
        }
    }
}

/// A request in the engine; dropping it before the request finished cancels
/// the request.
pub struct Ticket {
    host: Arc<EngineHost>,
    id: RequestId,
    rx: watch::Receiver<Progress>,
    finished: bool,
}

impl Ticket {
    /// The progress, once it changed since the last call (at once if it has);
    /// `None` once there will be no more.
    pub async fn next(&mut self) -> Option<Progress> {
        // A `watch` reports an unseen value before it reports a closed channel.
        self.rx.changed().await.ok()?;
        let p = *self.rx.borrow_and_update();
        self.finished |= p.done;
        Some(p)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.finished {
            self.host.cancel(self.id);
        }
    }
}
