//! How long the core's lock is held: what `cargo bench -p lb-proxy` (benches/contend.rs)
//! reads to measure the hold time per request.
//!
//! Only with the `lock-timing` feature (the bench turns it on for itself; `lb` is built
//! without it): then [`Proxy::lock`](crate::Proxy) hands out a guard that, while
//! [`start`] has turned timing on, reads the clock after taking the lock and again just
//! before letting it go, and adds the difference up. Without the feature the guard is
//! the mutex's own and this module holds nothing.

#[cfg(not(feature = "lock-timing"))]
pub(crate) type Held<'a, T> = std::sync::MutexGuard<'a, T>;

#[cfg(not(feature = "lock-timing"))]
pub(crate) fn held<T>(guard: std::sync::MutexGuard<'_, T>) -> Held<'_, T> {
    guard
}

#[cfg(feature = "lock-timing")]
pub use timing::{start, stop, Holds};

#[cfg(feature = "lock-timing")]
pub(crate) use timing::{held, Held};

#[cfg(feature = "lock-timing")]
mod timing {
    use std::ops::{Deref, DerefMut};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::MutexGuard;
    use std::time::{Duration, Instant};

    static ON: AtomicBool = AtomicBool::new(false);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    static NANOS: AtomicU64 = AtomicU64::new(0);

    /// The core's lock, held; timed while timing is on.
    pub(crate) struct Held<'a, T> {
        guard: MutexGuard<'a, T>,
        since: Option<Instant>,
    }

    pub(crate) fn held<T>(guard: MutexGuard<'_, T>) -> Held<'_, T> {
        let since = ON.load(Ordering::Relaxed).then(Instant::now);
        Held { guard, since }
    }

    impl<T> Deref for Held<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.guard
        }
    }

    impl<T> DerefMut for Held<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            &mut self.guard
        }
    }

    impl<T> Drop for Held<'_, T> {
        // Runs before the fields drop: the clock is read while the lock is still held.
        fn drop(&mut self) {
            if let Some(since) = self.since {
                let ns = since.elapsed().as_nanos() as u64;
                NANOS.fetch_add(ns, Ordering::Relaxed);
                COUNT.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// What the lock's holds added up to between [`start`] and [`stop`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Holds {
        /// How many times it was taken.
        pub count: u64,
        /// For how long, all together.
        pub total: Duration,
    }

    /// Clears the sums and turns timing on (for every `Proxy` in the process).
    pub fn start() {
        COUNT.store(0, Ordering::Relaxed);
        NANOS.store(0, Ordering::Relaxed);
        ON.store(true, Ordering::Release);
    }

    /// Turns timing off; what the holds since [`start`] added up to. Holds still in
    /// progress are counted when they end.
    pub fn stop() -> Holds {
        ON.store(false, Ordering::Release);
        Holds {
            count: COUNT.load(Ordering::Acquire),
            total: Duration::from_nanos(NANOS.load(Ordering::Acquire)),
        }
    }
}
