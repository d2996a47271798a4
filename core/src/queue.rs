//! Admission: a bounded FIFO of requests waiting for a free slot.
//!
//! `max_conns` is a hard per-backend limit under every policy: when every healthy backend
//! is full, [`Balancer::select`](crate::Balancer::select) returns
//! [`Reject::AllAtCapacity`](crate::Reject::AllAtCapacity) and the proxy answers 429 at
//! once, unless a queue is configured ([`QueueConfig::timeout`]). Then the adapter hands
//! the request to [`Balancer::enqueue`](crate::Balancer::enqueue) and waits:
//!
//! - whenever a slot frees (a release, a backend added or back to health), the core
//!   selects a backend for the oldest waiter and emits [`Admission::Admitted`] with its
//!   [`Lease`] through [`Balancer::poll_admission`](crate::Balancer::poll_admission);
//! - a waiter still queued at its deadline (`enqueued + timeout`) gets
//!   [`Admission::Expired`] from `handle_timeout` (the deadline is part of
//!   `poll_timeout`): the proxy answers 429;
//! - a full queue refuses at once with `Reject::AllAtCapacity` (429 too);
//! - a client that leaves calls [`Balancer::cancel`](crate::Balancer::cancel), which frees
//!   its place (or gives back the lease of an admission not yet polled).
//!
//! While anyone waits, no slot is free (the core admits waiters as soon as one frees), so
//! a new request cannot overtake the queue: its `select` fails and it queues behind.

use std::collections::VecDeque;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::affinity::RequestKey;
use crate::lease::Lease;
use crate::request::RequestMeta;

/// The default bound of the admission queue.
pub const DEFAULT_QUEUE_SIZE: usize = 1024;

/// Admission queue settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// How long a request may wait for a slot; `None` (the default) turns the queue off:
    /// a request that finds every backend full is refused at once. Raised to
    /// [`MIN_TICK`](crate::MIN_TICK).
    pub timeout: Option<Duration>,
    /// Most requests waiting at once (default [`DEFAULT_QUEUE_SIZE`]); 0 turns the queue
    /// off.
    pub size: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            timeout: None,
            size: DEFAULT_QUEUE_SIZE,
        }
    }
}

impl QueueConfig {
    /// Whether requests may queue.
    pub fn enabled(&self) -> bool {
        self.timeout.is_some() && self.size > 0
    }
}

/// Names one queued request, from [`Balancer::enqueue`](crate::Balancer::enqueue) to its
/// [`Admission`]. Tickets are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub(crate) u64);

impl Ticket {
    /// A number unique to this ticket (for the adapter's map of waiters).
    pub fn id(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "q{}", self.0)
    }
}

/// The end of one wait in the queue, from
/// [`Balancer::poll_admission`](crate::Balancer::poll_admission). Exactly one per
/// ticket, unless the ticket was cancelled first.
#[must_use = "an Admitted carries a Lease that must be released"]
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// A slot was reserved for the request: proxy it with this lease (and release it as
    /// usual). If the client has gone meanwhile, release it at once with
    /// [`Outcome::Cancelled`](crate::Outcome::Cancelled).
    Admitted(Ticket, Lease),
    /// The request waited its whole timeout: answer 429.
    Expired(Ticket),
}

impl Admission {
    /// The ticket this admission ends.
    pub fn ticket(&self) -> Ticket {
        match self {
            Admission::Admitted(t, _) | Admission::Expired(t) => *t,
        }
    }
}

/// An owned [`RequestMeta`]: what a queued request is selected by when a slot frees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnedMeta {
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// The hashing key (header value, `user` field, ...), see [`RequestMeta::key`].
    pub key: Option<Vec<u8>>,
    /// The cache-aware key, see [`RequestMeta::affinity`].
    pub affinity: Option<RequestKey>,
    /// The model, see [`RequestMeta::model`].
    pub model: Option<String>,
}

impl OwnedMeta {
    /// The borrowed view `select` takes.
    pub fn as_meta(&self) -> RequestMeta<'_> {
        RequestMeta {
            client_ip: self.client_ip,
            key: self.key.as_deref(),
            affinity: self.affinity.as_ref(),
            model: self.model.as_deref(),
        }
    }
}

impl From<&RequestMeta<'_>> for OwnedMeta {
    fn from(m: &RequestMeta<'_>) -> Self {
        OwnedMeta {
            client_ip: m.client_ip,
            key: m.key.map(<[u8]>::to_vec),
            affinity: m.affinity.cloned(),
            model: m.model.map(str::to_owned),
        }
    }
}

impl From<RequestMeta<'_>> for OwnedMeta {
    fn from(m: RequestMeta<'_>) -> Self {
        OwnedMeta::from(&m)
    }
}

/// Admission queue counters.
///
/// In [`StatusReport::queue`](crate::StatusReport::queue) they count since the previous
/// report; from [`Balancer::queue_stats`](crate::Balancer::queue_stats), since the
/// start. `waiting` is the queue's length at that moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests waiting now.
    pub waiting: usize,
    /// Requests that entered the queue.
    pub enqueued: u64,
    /// Waiters that got a slot.
    pub admitted: u64,
    /// Waiters that reached their deadline (429).
    pub expired: u64,
    /// Requests refused because the queue was full (429).
    pub full: u64,
    /// Waiters whose client left (before their admission was polled).
    /// `enqueued = admitted + expired + cancelled` once nobody waits.
    pub cancelled: u64,
}

impl QueueStats {
    pub(crate) fn since(&self, earlier: &QueueStats) -> QueueStats {
        QueueStats {
            waiting: self.waiting,
            enqueued: self.enqueued - earlier.enqueued,
            admitted: self.admitted - earlier.admitted,
            expired: self.expired - earlier.expired,
            full: self.full - earlier.full,
            cancelled: self.cancelled - earlier.cancelled,
        }
    }
}

impl fmt::Display for QueueStats {
    /// `3 waiting (12 admitted, 1 expired, 0 full, 2 cancelled)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} waiting ({} admitted, {} expired, {} full, {} cancelled)",
            self.waiting, self.admitted, self.expired, self.full, self.cancelled
        )
    }
}

/// One waiting request.
#[derive(Debug)]
pub(crate) struct Waiter {
    pub(crate) ticket: Ticket,
    pub(crate) deadline: Instant,
    pub(crate) meta: OwnedMeta,
}

/// The FIFO itself: tickets ascend from front to back.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    pub(crate) waiting: VecDeque<Waiter>,
    next: u64,
    pub(crate) stats: QueueStats,
    pub(crate) reported: QueueStats,
}

impl Queue {
    pub(crate) fn push(&mut self, deadline: Instant, meta: OwnedMeta) -> Ticket {
        let ticket = Ticket(self.next);
        self.next += 1;
        self.waiting.push_back(Waiter {
            ticket,
            deadline,
            meta,
        });
        self.stats.enqueued += 1;
        ticket
    }

    /// Takes `ticket` out of the queue, if it is waiting.
    pub(crate) fn remove(&mut self, ticket: Ticket) -> Option<Waiter> {
        let i = self
            .waiting
            .binary_search_by_key(&ticket, |w| w.ticket)
            .ok()?;
        self.waiting.remove(i)
    }

    /// The earliest deadline (the front's: deadlines follow enqueue order).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.waiting.front().map(|w| w.deadline)
    }

    /// Removes every waiter whose deadline is at or before `now`, oldest first.
    pub(crate) fn expire(&mut self, now: Instant, mut out: impl FnMut(Ticket)) {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].deadline <= now {
                let w = self.waiting.remove(i).expect("index in range");
                out(w.ticket);
            } else {
                i += 1;
            }
        }
    }

    pub(crate) fn snapshot(&self) -> QueueStats {
        QueueStats {
            waiting: self.waiting.len(),
            ..self.stats
        }
    }
}
