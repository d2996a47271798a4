//! Deadlines for the per-request paths (`--timeout`, `--head-timeout`), one set per shard,
//! behind a single reactor timer.
//!
//! async-io's `Timer` tells its reactor about every new timer (a wake-up through an
//! eventfd, so the reactor recomputes its sleep) and again when the timer is dropped.
//! Under load that is two timers per request, almost none of which ever fire; measured on
//! loopback, removing them outright gained 7% of the smol build's throughput, and this
//! module 4%. Here a new deadline is an
//! entry in an ordered map; one task per shard sleeps on one async-io timer until the
//! earliest entry, and is told to sleep again only when an entry earlier than that
//! arrives, which a later deadline (`now + --timeout`, the common case) never is.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_io::Timer;
use event_listener::Event;
use futures_lite::future;

/// A shard's pending deadlines; [`Timers::run`] fires them.
pub(crate) struct Timers {
    inner: Mutex<Inner>,
    /// When the runner last fired entries: every entry at or before it is gone from the
    /// map, so a `Sleep` polled again tells it has fired without the lock.
    fired_upto: AtomicU64,
    /// Instants are kept as nanoseconds from this one (one word, comparable atomically).
    epoch: Instant,
    /// Notified when an entry earlier than the one the runner sleeps until arrives.
    earlier: Event,
}

struct Inner {
    /// Pending deadlines (nanoseconds from the epoch), earliest first; the id tells apart
    /// equal instants.
    pending: BTreeMap<(u64, u64), Waker>,
    next_id: u64,
    /// What the runner sleeps until (`None`: no entry when it last looked).
    armed: Option<u64>,
}

impl Timers {
    pub(crate) fn new() -> Self {
        Timers {
            inner: Mutex::new(Inner {
                pending: BTreeMap::new(),
                next_id: 0,
                armed: None,
            }),
            fired_upto: AtomicU64::new(0),
            epoch: Instant::now(),
            earlier: Event::new(),
        }
    }

    /// `t` in nanoseconds from the epoch (0 for an earlier instant: it has passed).
    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A future that resolves at `when` (at once if it has passed), as long as
    /// [`Timers::run`] runs.
    pub(crate) fn at(&self, when: Instant) -> Sleep<'_> {
        Sleep {
            timers: self,
            at: self.nanos(when),
            id: None,
            waker: None,
        }
    }

    /// A future that resolves `d` from now.
    pub(crate) fn after(&self, d: Duration) -> Sleep<'_> {
        self.at(lb_proxy::deadline::deadline(Instant::now(), d))
    }

    /// Fires every pending entry at once, whenever it is due (for `memory`, where time
    /// passes only when told).
    #[cfg(feature = "memory")]
    pub(crate) fn fire_all(&self) {
        let due = {
            let mut inner = self.lock();
            let due = std::mem::take(&mut inner.pending);
            inner.armed = None;
            if let Some(&(last, _)) = due.keys().next_back() {
                self.fired_upto.fetch_max(last, Ordering::AcqRel);
            }
            due
        };
        for waker in due.into_values() {
            waker.wake();
        }
    }

    /// Entries not yet fired or dropped.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().pending.len()
    }

    /// Runs forever: wakes each entry once its instant has come.
    pub(crate) async fn run(&self) {
        loop {
            let earlier = self.earlier.listen();
            let now = self.nanos(Instant::now());
            let (due, next) = {
                let mut inner = self.lock();
                let later = inner.pending.split_off(&(now, u64::MAX));
                let due = std::mem::replace(&mut inner.pending, later);
                let next = inner.pending.keys().next().map(|(t, _)| *t);
                inner.armed = next;
                self.fired_upto.store(now, Ordering::Release);
                (due, next)
            };
            // Fired entries are gone from the map: their `Sleep`s see that and resolve.
            for waker in due.into_values() {
                waker.wake();
            }
            match next {
                Some(t) => {
                    future::or(
                        async {
                            Timer::at(self.instant(t)).await;
                        },
                        earlier,
                    )
                    .await
                }
                None => earlier.await,
            }
        }
    }
}

/// See [`Timers::at`]. Dropping it removes its entry.
pub(crate) struct Sleep<'a> {
    timers: &'a Timers,
    /// When it resolves, in nanoseconds from the epoch.
    at: u64,
    /// Set once registered.
    id: Option<u64>,
    /// The waker registered with the entry.
    waker: Option<Waker>,
}

impl Future for Sleep<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Some(id) = this.id {
            if this.at <= this.timers.fired_upto.load(Ordering::Acquire) {
                // Its entry is gone (fired), or it is due anyway (drop removes it).
                return Poll::Ready(());
            }
            if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return Poll::Pending;
            }
            let mut inner = this.timers.lock();
            return match inner.pending.get_mut(&(this.at, id)) {
                None => Poll::Ready(()),
                Some(waker) => {
                    waker.clone_from(cx.waker());
                    this.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            };
        }
        let mut inner = this.timers.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.pending.insert((this.at, id), cx.waker().clone());
        let sooner = inner.armed.is_none_or(|armed| this.at < armed);
        if sooner {
            // Set here so that a burst of earlier entries notifies once.
            inner.armed = Some(this.at);
        }
        drop(inner);
        this.id = Some(id);
        this.waker = Some(cx.waker().clone());
        if sooner {
            this.timers.earlier.notify(1);
        }
        Poll::Pending
    }
}

impl Drop for Sleep<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.timers.lock().pending.remove(&(self.at, id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_executor::LocalExecutor;

    fn on_runner<T>(timers: &Timers, f: impl Future<Output = T>) -> T {
        let ex = LocalExecutor::new();
        ex.spawn(timers.run()).detach();
        async_io::block_on(ex.run(f))
    }

    #[test]
    fn fires_not_before_its_instant_and_leaves_no_entry() {
        let timers = Timers::new();
        on_runner(&timers, async {
            let start = Instant::now();
            timers.after(Duration::from_millis(30)).await;
            assert!(start.elapsed() >= Duration::from_millis(30));
        });
        assert_eq!(timers.len(), 0);
    }

    #[test]
    fn an_earlier_entry_added_later_wakes_the_runner() {
        let timers = Timers::new();
        on_runner(&timers, async {
            let far = timers.after(Duration::from_secs(3600));
            let near = timers.after(Duration::from_millis(20));
            let first = future::or(
                async {
                    far.await;
                    "far"
                },
                async {
                    near.await;
                    "near"
                },
            );
            assert_eq!(first.await, "near");
        });
        // The far one was dropped unfired: its entry is gone.
        assert_eq!(timers.len(), 0);
    }

    #[test]
    fn a_passed_instant_resolves() {
        let timers = Timers::new();
        on_runner(&timers, async {
            let past = Instant::now();
            let never_sooner = timers.after(Duration::from_secs(3600));
            let mut never_sooner = std::pin::pin!(never_sooner);
            // Register the far one first, so the runner sleeps until it.
            assert!(future::poll_once(never_sooner.as_mut()).await.is_none());
            timers.at(past).await;
        });
    }
}
