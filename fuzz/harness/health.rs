//! Fuzz harness `health`: the public [`lb_core::Health`] machine alone, with arbitrary
//! `fall`, `rise` and passive threshold, against a reference model.
//!
//! The model is declarative: it keeps the signals seen since the last transition and
//! ejects when the last `fall` probes (or the last `passive_threshold` passive signals)
//! all failed, and restores when the last `rise` probes all passed. It checks every return
//! value (the new state exactly when it changed), the state, the epoch and `passes()`.
//!
//! Shared by the cargo-fuzz target and by `core/tests/fuzz_corpus.rs`.

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use lb_core::{Health, HealthConfig, HealthState};

#[derive(Arbitrary, Debug)]
struct Setup {
    fall: u8,
    rise: u8,
    passive_threshold: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Input {
    /// A probe; `true` = it passed.
    Probe(bool),
    /// A signal from real traffic: a failure or not, and whether the pool can spare the
    /// backend (the passive-ejection limit).
    Passive { failed: bool, may_eject: bool },
}

/// Whether the last `n` (at least 1) entries of `h` exist and all equal `v`.
fn last_n_all(h: &[bool], n: u32, v: bool) -> bool {
    let n = n.max(1) as usize;
    h.len() >= n && h[h.len() - n..].iter().all(|&x| x == v)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return;
    };
    // Small values make transitions frequent; 0 is accepted (fall and rise act as 1,
    // a passive threshold of 0 turns passive health off).
    let config = HealthConfig {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        fall: u32::from(setup.fall % 6),
        rise: u32::from(setup.rise % 6),
        passive_threshold: u32::from(setup.passive_threshold % 5),
        max_passive_ejection_percent: 50,
    };
    let mut h = Health::new();
    let mut healthy = true;
    let mut epoch = 0u64;
    let mut probes: Vec<bool> = Vec::new();
    let mut passive: Vec<bool> = Vec::new();
    while !u.is_empty() {
        let Ok(input) = Input::arbitrary(&mut u) else {
            break;
        };
        let (got, want) = match input {
            Input::Probe(passed) => {
                let got = h.on_probe(passed, &config);
                probes.push(passed);
                let want = if healthy && last_n_all(&probes, config.fall, false) {
                    Some(HealthState::Unhealthy)
                } else if !healthy && last_n_all(&probes, config.rise, true) {
                    Some(HealthState::Healthy)
                } else {
                    None
                };
                (got, want)
            }
            Input::Passive { failed, may_eject } => {
                let got = h.on_passive(failed, may_eject, &config);
                let mut want = None;
                if healthy && config.passive_threshold > 0 {
                    passive.push(failed);
                    // At the threshold, it waits until the pool can spare it.
                    if may_eject && last_n_all(&passive, config.passive_threshold, true) {
                        want = Some(HealthState::Unhealthy);
                    }
                }
                (got, want)
            }
        };
        if let Some(state) = want {
            healthy = state == HealthState::Healthy;
            epoch += u64::from(!healthy);
            probes.clear();
            passive.clear();
        }
        assert_eq!(got, want, "after {input:?}");
        assert_eq!(h.is_healthy(), healthy);
        let state = if healthy {
            HealthState::Healthy
        } else {
            HealthState::Unhealthy
        };
        assert_eq!(h.state(), state);
        assert_eq!(h.epoch(), epoch);
        let run_of_passes = if healthy {
            0
        } else {
            probes.iter().rev().take_while(|&&p| p).count()
        };
        assert_eq!(h.passes() as usize, run_of_passes);
        // Keep the model's memory bounded: only the last few signals matter.
        for hist in [&mut probes, &mut passive] {
            if hist.len() > 16 {
                hist.drain(..hist.len() - 8);
            }
        }
    }
}
