//! Cache-aware routing: send a request where its prompt prefix is already cached.
//!
//! LLM servers (vLLM, SGLang, TGI, llama.cpp) keep the KV cache of recent prompts and
//! reuse it for any later prompt that starts the same way. A multi-turn chat resends the
//! whole conversation each turn, and many sessions share a system prompt, so the backend
//! that served the previous turn answers the next one with little prefill. With
//! [`Policy::CacheAware`](crate::Policy::CacheAware) the balancer remembers which backend
//! last served which prefix and routes accordingly, while load always wins in the end.
//!
//! # Keys
//!
//! The adapter buffers at most [`MAX_BODY_PREFIX`] bytes of the body. If the whole body
//! fits, it calls [`RequestKey::from_body`] once and lends the key to
//! [`Balancer::select`](crate::Balancer::select) with
//! [`RequestMeta::with_affinity`](crate::RequestMeta::with_affinity); otherwise (and for
//! bodies that are not JSON) the key is [`RequestKey::None`] and the request goes by least
//! connections. The buffered part is then forwarded and the rest streamed as usual.
//!
//! A key is a *chain*: one cumulative hash per unit (a message, or a
//! [`BLOCK_BYTES`]-block of a long message or prompt), at most [`CHAIN_CAP`] units, so that
//! `chain[i]` stands for the request's first `i + 1` units and two requests share a
//! chain value exactly when they share that prefix. An OpenAI `user` field replaces the
//! chain with a one-unit key: all of that user's requests are one prefix.
//!
//! # The routing rule
//!
//! 1. **Longest prefix.** The request goes to the backend recorded for the deepest unit of
//!    its chain that the table knows (a live entry: used within the TTL, on a backend
//!    still healthy, not draining, and not ejected since: see *Invalidation*). Such a
//!    request is *warm*. A request with no live unit is *cold* and goes by least
//!    connections.
//! 2. **Load wins.** A warm request *overflows* to least connections if its backend is
//!    at its `max_conns`, or is ahead of the least-loaded ready backend by more than
//!    [`AffinityConfig::overflow_percent`] of its `max_conns` (raw in-flight counts:
//!    `(in_flight − min_in_flight) × 100 > overflow_percent × max_conns`). A hot prefix
//!    thus spills onto a second backend, which then caches it too.
//! 3. **Re-point.** Every selected request points all its units at the backend the lease
//!    names (the one that serves it): sessions follow their backend, and after an
//!    overflow the prefix follows the load.
//!
//! # Bounds and expiry
//!
//! - **TTL.** An entry not used for [`AffinityConfig::ttl`] (sliding: every use renews it)
//!   is ignored at once and reclaimed at the next sweep (each `handle_timeout`).
//! - **Memory.** Each backend's entries form an LRU list holding at most
//!   `max_conns × entries_per_conn` entries ([`AffinityConfig::entries_per_conn`]; a
//!   backend without a cap counts as [`UNCAPPED_CONNS`]); inserting into a full list
//!   evicts its least recently used entry. So the table never holds more than
//!   `Σ_backends max_conns × entries_per_conn` entries, whatever the traffic, at about
//!   80 bytes each (slab entry and hash-map slot). The default, 1024 entries per
//!   connection, is 4 full-length chains per connection: 64 connections per backend cost
//!   about 5 MiB per backend.
//! - **Invalidation.** Each list belongs to one backend and one health epoch: when the
//!   backend turns unhealthy (its epoch goes up), is drained, or is removed, all its
//!   entries die at once (O(1): lookups compare the owner), and their memory is reclaimed
//!   at the next sweep or insertion for that slot.
//!
//! # Cost
//!
//! `select` probes the table from the deepest unit up (one probe when the whole chain is
//! known, at most [`CHAIN_CAP`]) and re-points at most [`CHAIN_CAP`] entries; both are
//! hash-map operations on pre-hashed keys, with no scan of the table.

use std::fmt;
use std::time::Duration;

mod key;
pub(crate) mod table;

pub use key::{user_of, RequestKey, BLOCK_BYTES, CHAIN_CAP, MAX_BODY_PREFIX};

/// The `max_conns` assumed for a backend without a cap (`max_conns == 0`) by the
/// cache-aware guard and the table bound. [`Config::validate`](crate::Config::validate)
/// refuses such backends under cache-aware routing; this keeps the balancer sane if a
/// caller skips it.
pub const UNCAPPED_CONNS: u32 = 64;

/// Settings of cache-aware routing (ignored by the other policies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityConfig {
    /// Entries idle this long are forgotten (sliding). Default 1 h. Raised to
    /// [`MIN_TICK`](crate::MIN_TICK).
    pub ttl: Duration,
    /// A warm request overflows to least connections when its backend is ahead of the
    /// least-loaded one by more than this percentage of its `max_conns`. Default 20.
    pub overflow_percent: u32,
    /// Table entries per backend per unit of `max_conns` (at least 1). Default 1024.
    pub entries_per_conn: u32,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            ttl: Duration::from_secs(3600),
            overflow_percent: 20,
            entries_per_conn: 1024,
        }
    }
}

/// Cache-aware routing counters.
///
/// In [`StatusReport::routing`](crate::StatusReport::routing) they count the requests
/// selected since the previous report; from
/// [`Balancer::routing_stats`](crate::Balancer::routing_stats), since the start. `keys`
/// is the table's size at that moment. `warm + cold + overflow == requests`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutingStats {
    /// Requests selected (rejections not counted).
    pub requests: u64,
    /// Routed to the backend holding their longest known prefix.
    pub warm: u64,
    /// No known prefix: least connections (includes `unkeyed`).
    pub cold: u64,
    /// A known prefix, but its backend was full or too far ahead: least connections.
    pub overflow: u64,
    /// Cold requests that had no key at all ([`RequestKey::None`]).
    pub unkeyed: u64,
    /// Entries in the table.
    pub keys: usize,
}

impl RoutingStats {
    /// `part` as a whole percentage of `requests` (0 when there were none), rounded to
    /// nearest.
    pub fn percent(&self, part: u64) -> u64 {
        (part * 100 + self.requests / 2)
            .checked_div(self.requests)
            .unwrap_or(0)
    }

    pub(crate) fn since(&self, earlier: &RoutingStats) -> RoutingStats {
        RoutingStats {
            requests: self.requests - earlier.requests,
            warm: self.warm - earlier.warm,
            cold: self.cold - earlier.cold,
            overflow: self.overflow - earlier.overflow,
            unkeyed: self.unkeyed - earlier.unkeyed,
            keys: self.keys,
        }
    }
}

impl fmt::Display for RoutingStats {
    /// `warm 82% cold 15% ovfl 3% (120 reqs, 5731 keys)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "warm {}% cold {}% ovfl {}% ({} reqs, {} keys)",
            self.percent(self.warm),
            self.percent(self.cold),
            self.percent(self.overflow),
            self.requests,
            self.keys
        )
    }
}

/// How one cache-aware pick went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Warm,
    Cold,
    Overflow,
}
