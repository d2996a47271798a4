//! Idle keep-alive connections to backends, per backend, newest first. A connection idle
//! for its backend's idle limit (4 s, below uvicorn's 5 s, or less when the backend
//! announces `Keep-Alive: timeout=N`) is closed by the reaper task; one the backend closed
//! meanwhile is noticed (and dropped) when it is taken: the reactor says whether anything
//! arrived on it since it went idle, and only then is it looked at (a `recv` peek).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_io::Timer;
use event_listener::Event;
use futures_lite::future;
use lb_core::BackendId;

use crate::stream::Stream;

struct Idle {
    conn: Stream,
    since: Instant,
}

struct Lists {
    /// By backend slot, oldest first; each list tagged with the backend it holds
    /// connections to (a slot freed by a removal may go to another backend).
    by_slot: Vec<(Option<BackendId>, Vec<Idle>)>,
    /// Connections over all slots.
    total: usize,
}

pub(crate) struct Pool {
    lists: Mutex<Lists>,
    /// Notified when a connection arrives in an empty pool (the reaper then has work).
    filled: Event,
}

impl Pool {
    pub(crate) fn new(slots: usize) -> Self {
        Pool {
            lists: Mutex::new(Lists {
                by_slot: (0..slots).map(|_| (None, Vec::new())).collect(),
                total: 0,
            }),
            filled: Event::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection to `backend` that still looks usable (idle
    /// for less than `limit`, not closed by the backend); stale ones are dropped on the
    /// way.
    pub(crate) fn take(&self, backend: BackendId, limit: Duration) -> Option<Stream> {
        let now = Instant::now();
        let mut stale = Vec::new();
        let found = {
            let mut lists = self.lock();
            let mut found = None;
            let list = match lists.by_slot.get_mut(backend.slot()) {
                Some((owner, list)) if *owner == Some(backend) => list,
                _ => return None,
            };
            let mut taken = 0;
            while let Some(idle) = list.pop() {
                taken += 1;
                let young = now.duration_since(idle.since) < limit;
                // Quiet: nothing arrived since it went idle, so no syscall is needed (under
                // load, the usual case). Else look whether the backend closed it.
                if young && (idle.conn.is_quiet() || !idle.conn.is_stale()) {
                    found = Some(idle.conn);
                    break;
                }
                stale.push(idle);
            }
            lists.total -= taken;
            found
        };
        drop(stale); // closed outside the lock
        found
    }

    /// Keeps `conn` for the next request to `backend`, unless its idle `limit` is 0.
    pub(crate) fn put(&self, backend: BackendId, conn: Stream, limit: Duration) {
        if limit.is_zero() {
            return;
        }
        let was_empty = {
            let mut lists = self.lock();
            let slot = backend.slot();
            if lists.by_slot.len() <= slot {
                lists.by_slot.resize_with(slot + 1, || (None, Vec::new()));
            }
            let (owner, list) = &mut lists.by_slot[slot];
            let mut gone = 0;
            if *owner != Some(backend) {
                // The slot's previous backend left the pool: its connections go.
                *owner = Some(backend);
                gone = list.len();
                list.clear();
            }
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
            lists.total = lists.total + 1 - gone;
            lists.total == 1
        };
        if was_empty {
            self.filled.notify(1);
        }
    }

    /// Runs forever: closes connections as their idle time runs out (`limit` gives each
    /// backend slot's idle limit).
    pub(crate) async fn reap(&self, limit: impl Fn(usize) -> Duration) {
        loop {
            let filled = self.filled.listen();
            let now = Instant::now();
            let mut expired = Vec::new();
            let next = {
                let mut lists = self.lock();
                let mut next: Option<Instant> = None;
                let mut removed = 0;
                for (slot, (_, list)) in lists.by_slot.iter_mut().enumerate() {
                    let timeout = limit(slot);
                    let n = list
                        .iter()
                        .take_while(|i| now.duration_since(i.since) >= timeout)
                        .count();
                    removed += n;
                    expired.extend(list.drain(..n));
                    if let Some(first) = list.first() {
                        let due = first.since + timeout;
                        next = Some(next.map_or(due, |t| t.min(due)));
                    }
                }
                lists.total -= removed;
                next
            };
            drop(expired);
            match next {
                // Connections added meanwhile expire later than the oldest one.
                Some(due) => {
                    Timer::at(due).await;
                }
                None => {
                    future::or(filled, async {
                        // Bounds the wait should a notification be missed.
                        Timer::after(Duration::from_secs(3600)).await;
                    })
                    .await
                }
            }
        }
    }
}
