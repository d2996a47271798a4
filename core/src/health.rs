//! The per-backend health state machine, and what counts as a pass or a failure.

use std::fmt;
use std::time::Duration;

/// Health-check settings shared by every backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time between probe sweeps. The first sweep happens when a backend is added.
    pub interval: Duration,
    /// How long one probe may take. Each probe's deadline is also capped so that it ends
    /// no later than the next sweep.
    pub timeout: Duration,
    /// Consecutive failed probes that eject a healthy backend (at least 1).
    pub fall: u32,
    /// Consecutive passing probes that bring back an ejected backend (at least 1).
    pub rise: u32,
    /// Consecutive passive failures (transport errors and 5xx from real traffic) that eject
    /// a healthy backend; 0 turns passive health off.
    pub passive_threshold: u32,
    /// Passive failures never eject a backend when that would leave fewer than
    /// `100 - max_passive_ejection_percent` percent of the backends (rounded up) healthy,
    /// like Envoy's `max_ejection_percent`: passive health alone cannot empty the pool (a
    /// lone backend is never ejected by it). Probes may still eject any number. 100 turns
    /// the limit off; 0 turns passive ejection off.
    pub max_passive_ejection_percent: u32,
}

/// The first re-probe of a passively ejected backend comes this soon; the wait then
/// doubles up to the probe interval.
pub const PASSIVE_REPROBE: Duration = Duration::from_secs(1);

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            fall: 1,
            rise: 2,
            passive_threshold: 1,
            max_passive_ejection_percent: 50,
        }
    }
}

/// What one active probe observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The backend answered with this status. 2xx and 429 pass (a saturated backend is
    /// alive); anything else fails.
    Status(u16),
    /// The probe failed before a status arrived (connect refused, reset, TLS, ...).
    Error(String),
    /// No answer before the probe's deadline.
    TimedOut,
}

impl ProbeOutcome {
    /// Whether this outcome counts as a pass.
    pub fn passed(&self) -> bool {
        match self {
            ProbeOutcome::Status(s) => (200..300).contains(s) || *s == 429,
            ProbeOutcome::Error(_) | ProbeOutcome::TimedOut => false,
        }
    }
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeOutcome::Status(s) => write!(f, "status {s}"),
            ProbeOutcome::Error(e) => write!(f, "error: {e}"),
            ProbeOutcome::TimedOut => f.write_str("error: probe timed out"),
        }
    }
}

/// Whether a backend receives traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Eligible for selection.
    Healthy,
    /// Ejected: no new requests until it passes `rise` probes in a row.
    Unhealthy,
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        })
    }
}

/// One backend's health.
///
/// ```text
///                 `fall` probe failures in a row,
///                 or `passive_threshold` passive failures in a row
///   ┌─────────┐ ──────────────────────────────────────────────▶ ┌───────────┐
///   │ Healthy │              (epoch += 1)                        │ Unhealthy │
///   └─────────┘ ◀────────────────────────────────────────────── └───────────┘
///        ▲                 `rise` probe passes in a row              │  │
///        │ start                                                     │  │ any failure:
///                                                                    └──┘ passes = 0
/// ```
///
/// A backend starts healthy, so requests flow at once; the first probe corrects that.
/// Passive successes never bring a backend back: only probes do. 4xx (429 included) is
/// never a failure. Each method returns the new state when, and only when, it changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    state: HealthState,
    probe_failures: u32,
    passive_failures: u32,
    passes: u32,
    epoch: u64,
    /// A probe has passed (or the backend was trusted without one): until then a healthy
    /// backend takes traffic only while no proven one exists.
    proven: bool,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// A healthy backend with clean counters, epoch 0.
    pub fn new() -> Self {
        Health {
            state: HealthState::Healthy,
            probe_failures: 0,
            passive_failures: 0,
            passes: 0,
            epoch: 0,
            proven: false,
        }
    }

    /// A backend that takes traffic at once, as if a probe had passed.
    pub fn trusted() -> Self {
        Health {
            proven: true,
            ..Health::new()
        }
    }

    /// Whether a probe has ever passed (or the backend was trusted).
    pub fn is_proven(&self) -> bool {
        self.proven
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Whether the state is [`HealthState::Healthy`].
    pub fn is_healthy(&self) -> bool {
        self.state == HealthState::Healthy
    }

    /// Number of healthy → unhealthy transitions so far.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Passing probes in a row while unhealthy.
    pub fn passes(&self) -> u32 {
        self.passes
    }

    /// Feeds one probe result; returns the new state if it changed.
    pub fn on_probe(&mut self, passed: bool, config: &HealthConfig) -> Option<HealthState> {
        self.proven |= passed;
        match (self.state, passed) {
            (HealthState::Healthy, true) => {
                self.probe_failures = 0;
                None
            }
            (HealthState::Healthy, false) => {
                self.probe_failures += 1;
                (self.probe_failures >= config.fall.max(1)).then(|| self.eject())
            }
            (HealthState::Unhealthy, true) => {
                self.passes += 1;
                (self.passes >= config.rise.max(1)).then(|| self.restore())
            }
            (HealthState::Unhealthy, false) => {
                self.passes = 0;
                None
            }
        }
    }

    /// Feeds one signal from real traffic (`failed`: transport error or 5xx; otherwise a
    /// response below 500); returns the new state if it changed. `may_eject` says whether
    /// the pool can spare this backend (the passive-ejection limit): when it cannot, the
    /// failures still count, and the next failure once it can ejects it.
    pub fn on_passive(
        &mut self,
        failed: bool,
        may_eject: bool,
        config: &HealthConfig,
    ) -> Option<HealthState> {
        if self.state == HealthState::Unhealthy || config.passive_threshold == 0 {
            return None;
        }
        if !failed {
            self.passive_failures = 0;
            return None;
        }
        self.passive_failures = self.passive_failures.saturating_add(1);
        (self.passive_failures >= config.passive_threshold && may_eject).then(|| self.eject())
    }

    fn eject(&mut self) -> HealthState {
        self.state = HealthState::Unhealthy;
        self.epoch += 1;
        self.probe_failures = 0;
        self.passive_failures = 0;
        self.passes = 0;
        self.state
    }

    fn restore(&mut self) -> HealthState {
        self.state = HealthState::Healthy;
        self.probe_failures = 0;
        self.passive_failures = 0;
        self.passes = 0;
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(fall: u32, rise: u32) -> HealthConfig {
        HealthConfig {
            fall,
            rise,
            ..HealthConfig::default()
        }
    }

    #[test]
    fn probe_pass_statuses() {
        assert!(ProbeOutcome::Status(200).passed());
        assert!(ProbeOutcome::Status(204).passed());
        assert!(ProbeOutcome::Status(429).passed());
        assert!(!ProbeOutcome::Status(404).passed());
        assert!(!ProbeOutcome::Status(503).passed());
        assert!(!ProbeOutcome::TimedOut.passed());
        assert!(!ProbeOutcome::Error("refused".into()).passed());
    }

    #[test]
    fn fall_then_rise() {
        let c = cfg(2, 2);
        let mut h = Health::new();
        assert_eq!(h.on_probe(false, &c), None);
        assert_eq!(h.on_probe(false, &c), Some(HealthState::Unhealthy));
        assert_eq!(h.epoch(), 1);
        assert_eq!(h.on_probe(true, &c), None);
        assert_eq!(h.on_probe(false, &c), None, "a failure resets the passes");
        assert_eq!(h.on_probe(true, &c), None);
        assert_eq!(h.on_probe(true, &c), Some(HealthState::Healthy));
        assert_eq!(h.epoch(), 1);
    }

    #[test]
    fn passive_ejects_but_never_restores() {
        let c = cfg(1, 1);
        let mut h = Health::new();
        assert_eq!(h.on_passive(true, true, &c), Some(HealthState::Unhealthy));
        assert_eq!(h.on_passive(false, true, &c), None);
        assert!(!h.is_healthy());
        assert_eq!(h.on_probe(true, &c), Some(HealthState::Healthy));
    }

    #[test]
    fn passive_threshold_zero_is_off() {
        let c = HealthConfig {
            passive_threshold: 0,
            ..HealthConfig::default()
        };
        let mut h = Health::new();
        for _ in 0..10 {
            assert_eq!(h.on_passive(true, true, &c), None);
        }
    }

    #[test]
    fn passive_failures_wait_until_the_pool_can_spare_the_backend() {
        let c = cfg(1, 1);
        let mut h = Health::new();
        assert_eq!(h.on_passive(true, false, &c), None);
        assert_eq!(h.on_passive(true, false, &c), None);
        assert!(h.is_healthy());
        assert_eq!(h.on_passive(true, true, &c), Some(HealthState::Unhealthy));
    }

    #[test]
    fn a_passing_probe_proves_a_backend() {
        let c = cfg(1, 1);
        let mut h = Health::new();
        assert!(h.is_healthy() && !h.is_proven());
        h.on_probe(false, &c);
        assert!(!h.is_proven());
        h.on_probe(true, &c);
        assert!(h.is_proven());
        assert!(Health::trusted().is_proven());
    }
}
