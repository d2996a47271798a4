//! Cache-aware routing: send a request where its prompt prefix is already cached.
//!
//! LLM servers (vLLM, SGLang, TGI, llama.cpp) keep the KV cache of recent prompts and
//! reuse it for any later prompt that starts the same way. A multi-turn chat resends the
//! whole conversation each turn, and many sessions share a system prompt, so the backend
//! that served the previous turn answers the next one with little prefill. With
//! [`Policy::CacheAware`](crate::Policy::CacheAware) the balancer remembers which backend
//! served which prefix and routes accordingly, while load always wins in the end.
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
//! The table remembers, for each unit, the backend that last served a prompt containing
//! it (its *holder*), or with [`AffinityConfig::all_holders`] every such backend. A
//! holder is *live* if it used the unit within the TTL and is still healthy, not
//! draining, and not ejected since (see *Invalidation*). The *guard* allows a backend
//! that is below its `max_conns` and at most [`AffinityConfig::overflow_percent`] of its
//! `max_conns` ahead of the least-loaded ready backend, in effective loads (in flight, or
//! the engine's reported queue when larger, see [`crate::engine`]):
//! `(load − min_load) × 100 ≤ overflow_percent × max_conns`. A saturated engine's
//! backend counts as full (the saturation skip).
//!
//! 1. **Longest prefix.** Find the deepest unit of the request's chain with a live
//!    holder. If the guard allows it, that holder takes the request (*warm*). No live
//!    unit at all: *cold*, least connections.
//! 2. **Load wins.** If the guard does not allow it, the request *overflows* to least
//!    connections. The pinned backend is spared, so a hot prefix spills onto a second
//!    backend, which then caches it too.
//! 3. **Re-point.** Every selected request points all its units at the backend its
//!    lease names (the one that serves it): sessions follow their backend, and after an
//!    overflow the prefix follows the load.
//!
//! With `all_holders`, rule 3 *adds* the serving backend to each unit's holders (as its
//! most recent use there) instead of replacing them, so a prefix served by several
//! backends (a system prompt, a hot conversation after an overflow) is known on all of
//! them; rule 1 picks the least loaded of the deepest unit's live holders that the
//! guard allows (ties at random), and rule 2 first tries the least-loaded allowed holder
//! of the next-longest prefix that has one (typically a backend with the shared system
//! prompt but not this session) before least connections. In the prefix simulation
//! (`examples/simulate_prefix.rs`) this spreads new sessions better, overflows less and
//! reuses more, most of all under cache pressure.
//!
//! Counters ([`RoutingStats`]): *warm* is rule 1 with a holder, *cold* rule 1 without,
//! *overflow* rule 2.
//!
//! # Bounds and expiry
//!
//! - **TTL.** A holder that has not used a unit for [`AffinityConfig::ttl`] (sliding:
//!   every use renews it) is ignored at once and reclaimed at the next sweep (each
//!   `handle_timeout`).
//! - **Memory.** The table stores one entry per unit and holder. Each backend's entries
//!   form an LRU list of at most `max_conns × entries_per_conn` entries
//!   ([`AffinityConfig::entries_per_conn`]; a backend without a cap counts as
//!   [`UNCAPPED_CONNS`]); recording into a full list evicts its least recently used
//!   entry. So the table never holds more than `Σ_backends max_conns × entries_per_conn`
//!   entries, whatever the traffic, at about 80 bytes each (slab node and hash-map slot).
//!   The default, 256 entries per connection, holds one full-length chain per
//!   connection: about 20 KiB per connection, 1.3 MiB for a backend with 64.
//! - **Cache size.** A backend's list evicts in LRU order, as the backend's own prefix
//!   cache does, so when the list is about as large as that cache (in units: cache
//!   tokens ÷ about 200 tokens a unit ÷ `max_conns`) the table forgets what the backend
//!   has evicted and routing follows what is really cached. The default is sized for
//!   memory and long chains, so it remembers more than a small cache holds; under heavy
//!   cache pressure a smaller `entries_per_conn` routes better (`examples/simulate_prefix.rs`
//!   measures both).
//! - **Invalidation.** Each list belongs to one backend and one health epoch: when the
//!   backend turns unhealthy (its epoch goes up), is drained, or is removed, all its
//!   entries die at once (O(1): lookups compare the list's owner), and their memory is
//!   reclaimed at the next sweep or at the next recording for that slot.
//!
//! # Cost
//!
//! `select` looks the chain up from the deepest unit (one hash probe and a walk of that
//! unit's holders when the whole chain is known; at most [`CHAIN_CAP`] probes, each
//! walking at most one holder per backend) and records at most [`CHAIN_CAP`] entries.
//! Nothing scans the table; allocation is amortised growth up to the bound.

use std::fmt;
use std::time::Duration;

mod key;
pub(crate) mod select;
mod table;

pub use key::{user_of, BodyFields, RequestKey, BLOCK_BYTES, CHAIN_CAP, MAX_BODY_PREFIX};

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
    /// A backend holding a request's prefix is passed over when it is ahead of the
    /// least-loaded one by more than this percentage of its `max_conns` (or at its cap).
    /// Default 20.
    pub overflow_percent: u32,
    /// Table entries per backend per unit of `max_conns` (at least 1). Default 256.
    pub entries_per_conn: u32,
    /// Remember every backend that served a unit, not only the last one (see *The
    /// routing rule*). Default false: every request re-points its chain to the backend
    /// that served it.
    pub all_holders: bool,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            ttl: Duration::from_secs(3600),
            overflow_percent: 20,
            entries_per_conn: 256,
            all_holders: false,
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
    /// Routed to a backend holding their longest known prefix.
    pub warm: u64,
    /// No known prefix: least connections (includes `unkeyed`).
    pub cold: u64,
    /// A known prefix, but its backend (every one holding it) was full or too far ahead:
    /// least connections (or, with `all_holders`, a holder of a shorter prefix).
    pub overflow: u64,
    /// Cold requests that had no key at all ([`RequestKey::None`]).
    pub unkeyed: u64,
    /// Entries in the table (one per unit and backend holding it).
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
