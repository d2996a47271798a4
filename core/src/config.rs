//! The balancer's settings, and the checks that tell a user which ones cannot work.

use std::fmt;
use std::time::Duration;

use crate::affinity::AffinityConfig;
use crate::backend::BackendSpec;
use crate::engine::EngineLoadConfig;
use crate::health::HealthConfig;
use crate::policy::Policy;
use crate::queue::QueueConfig;

/// The smallest interval or timeout the core works with: shorter ones are raised to it, so
/// that a deadline is always strictly in the future (no busy loop).
pub const MIN_TICK: Duration = Duration::from_millis(1);

/// Everything the balancer needs to know up front.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The balancing policy.
    pub policy: Policy,
    /// Active and passive health settings.
    pub health: HealthConfig,
    /// Time between [`Event::Status`](crate::Event::Status) reports; `None` for no reports.
    pub status_interval: Option<Duration>,
    /// Cache-aware routing settings (used by [`Policy::CacheAware`] only).
    pub affinity: AffinityConfig,
    /// The admission queue (off by default).
    pub queue: QueueConfig,
    /// How engine load reports count (see [`crate::engine`]).
    pub engine: EngineLoadConfig,
    /// Prefix-hash routing settings (used by [`Policy::PrefixHash`] only).
    pub prefix_hash: PrefixHashConfig,
    /// A request naming a model that no backend in the pool lists goes only to backends
    /// without a list, and is refused ([`Reject::UnknownModel`](crate::Reject::UnknownModel),
    /// a `404`) when every backend has one, rather than routed among all backends
    /// (`--strict-models`). See [`Balancer::set_models`](crate::Balancer::set_models).
    pub strict_models: bool,
}

/// The default [`PrefixHashConfig::units`]: 32 units are 32 KiB of a prompt or of a long
/// message (1 KiB blocks, [`BLOCK_BYTES`](crate::affinity::BLOCK_BYTES)), about 8k
/// tokens. A chat's key never goes past its opening (the messages up to the first `user`
/// message, [`RequestKey::Chat`](crate::RequestKey::Chat)), so for chats this is only a
/// cap on very long openings; a plain `prompt` is keyed by its first 32 KiB. A key that
/// ends inside a shared system prompt would send every conversation of a popular prompt
/// to one backend, which the bounded-load walk then spreads turn by turn (losing each
/// conversation's history); the opening whole keeps each conversation on its backend and
/// spreads conversations (the README's simulator table, four replicas: 95% of the oracle's
/// reuse with 16 or 32, the load's max/mean 1.11 with 16, whose cap cuts the openings of
/// the longest system prompts short, and 1.05 with 32; 85% and 1.31 with 4).
pub const DEFAULT_PREFIX_UNITS: usize = 32;

/// The default [`PrefixHashConfig::balance_factor`], in thousandths: 1.25, SGLang's
/// `prefix_hash` and the bounded-loads paper's usual choice.
pub const DEFAULT_BALANCE_FACTOR: u32 = 1250;

/// Settings of [`Policy::PrefixHash`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixHashConfig {
    /// How many units of the request's prompt chain make its key (at least 1, at most
    /// [`CHAIN_CAP`](crate::affinity::CHAIN_CAP)): `chain[min(units, len) - 1]`.
    pub units: usize,
    /// The bound, in thousandths (above 1000): a backend whose load relative to its
    /// weight is above `balance_factor / 1000` times the average is walked past.
    pub balance_factor: u32,
}

impl Default for PrefixHashConfig {
    fn default() -> Self {
        PrefixHashConfig {
            units: DEFAULT_PREFIX_UNITS,
            balance_factor: DEFAULT_BALANCE_FACTOR,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let health = HealthConfig::default();
        Config {
            policy: Policy::LeastConn,
            status_interval: Some(health.interval),
            health,
            affinity: AffinityConfig::default(),
            queue: QueueConfig::default(),
            engine: EngineLoadConfig::default(),
            prefix_hash: PrefixHashConfig::default(),
            strict_models: false,
        }
    }
}

impl Config {
    /// Checks the settings against the backends they will run with: what the balancer
    /// would otherwise quietly clamp or work around. The CLI calls it before starting.
    ///
    /// - [`Policy::CacheAware`] needs every backend to have `max_conns > 0`: its load
    ///   guard and its table bound scale with it.
    /// - The affinity TTL must be positive and `entries_per_conn` at least 1.
    /// - [`Policy::PrefixHash`] needs 1 to `CHAIN_CAP` key units and a balance factor
    ///   above 1.
    /// - A queue timeout needs a queue size above 0.
    pub fn validate(&self, backends: &[BackendSpec]) -> Result<(), ConfigError> {
        if self.policy == Policy::CacheAware {
            if let Some(b) = backends.iter().find(|b| b.max_conns == 0) {
                return Err(ConfigError(format!(
                    "routing {} needs a connection limit (--max-conns > 0): backend {} has none",
                    self.policy, b.url
                )));
            }
            if self.affinity.ttl.is_zero() {
                return Err(ConfigError(
                    "the affinity TTL must be greater than 0".into(),
                ));
            }
            if self.affinity.entries_per_conn == 0 {
                return Err(ConfigError(
                    "the affinity table needs at least 1 entry per connection".into(),
                ));
            }
        }
        if self.policy == Policy::PrefixHash {
            let p = &self.prefix_hash;
            if !(1..=crate::affinity::CHAIN_CAP).contains(&p.units) {
                return Err(ConfigError(format!(
                    "the prefix-hash key needs 1 to {} units (got {})",
                    crate::affinity::CHAIN_CAP,
                    p.units
                )));
            }
            if p.balance_factor <= 1000 {
                return Err(ConfigError(
                    "the prefix-hash balance factor must be greater than 1".into(),
                ));
            }
        }
        if self.queue.timeout.is_some() && self.queue.size == 0 {
            return Err(ConfigError(
                "a queue timeout needs a queue size greater than 0".into(),
            ));
        }
        Ok(())
    }

    /// The same settings with what the balancer cannot run with raised to the least it
    /// can: intervals and timeouts to [`MIN_TICK`] (so a deadline is never now), counts
    /// to 1. [`Balancer::new`](crate::Balancer::new) runs with these.
    pub(crate) fn clamped(mut self) -> Config {
        let h = &mut self.health;
        h.interval = h.interval.max(MIN_TICK);
        h.timeout = h.timeout.max(MIN_TICK);
        h.fall = h.fall.max(1);
        h.rise = h.rise.max(1);
        self.status_interval = self.status_interval.map(|d| d.max(MIN_TICK));
        self.affinity.ttl = self.affinity.ttl.max(MIN_TICK);
        self.affinity.entries_per_conn = self.affinity.entries_per_conn.max(1);
        self.queue.timeout = self.queue.timeout.map(|d| d.max(MIN_TICK));
        self.engine.interval = self.engine.interval.max(MIN_TICK);
        let p = &mut self.prefix_hash;
        p.units = p.units.clamp(1, crate::affinity::CHAIN_CAP);
        p.balance_factor = p.balance_factor.max(1001);
        self
    }
}

/// Settings that cannot work together, from [`Config::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}
