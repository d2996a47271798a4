//! The core's outputs: [`Action`]s the adapter must carry out and [`Event`]s it reports.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::BackendId;
use crate::health::{HealthState, ProbeOutcome};
use crate::lease::Outcome;
use crate::status::StatusReport;

/// Identifies one probe, to match its result to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProbeId {
    pub(crate) backend: BackendId,
    /// The backend's probe sequence number: a result for an older probe is stale.
    pub(crate) seq: u64,
}

impl ProbeId {
    /// The probed backend.
    pub fn backend(self) -> BackendId {
        self.backend
    }
}

/// Work the adapter must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Probe a backend's health path and report with
    /// [`Balancer::probe_result`](crate::Balancer::probe_result). The core counts the probe
    /// as timed out at `deadline` whatever the adapter does.
    StartProbe {
        /// The probe, to hand back with its result.
        probe: ProbeId,
        /// The backend's URL.
        url: Arc<str>,
        /// When the probe must have finished.
        deadline: Instant,
    },
}

/// Why a backend's health changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// An active probe.
    Probe(ProbeOutcome),
    /// Real traffic.
    Passive(Outcome),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Probe(p) => write!(f, "{p}"),
            Cause::Passive(o) => write!(f, "{o} from a proxied request"),
        }
    }
}

/// Something worth telling the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A backend changed health; emitted exactly once per transition.
    Health {
        /// The backend.
        backend: BackendId,
        /// Its URL.
        url: Arc<str>,
        /// The new state.
        state: HealthState,
        /// Why.
        cause: Cause,
        /// The backend's epoch after the transition (bumped when it turns unhealthy).
        epoch: u64,
    },
    /// The periodic status report.
    Status(StatusReport),
    /// A backend left the pool (removed, or drained and idle).
    Removed {
        /// The backend.
        backend: BackendId,
        /// Its URL.
        url: Arc<str>,
    },
}
