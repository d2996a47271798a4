//! Engine load signals ([`Balancer::load_report`]): property tests of the effective load
//! (`max(in_flight, running + waiting)`), of staleness, and of the saturation skip.
//!
//! - **ordering:** least-conn picks a backend whose rank (the replica-aware one of
//!   `lb_core::engine`, modelled here) relative to weight is the least among the
//!   unsaturated backends below their cap (among all below their cap when every one of
//!   those is saturated); p2c never picks the strictly more loaded of two (effective
//!   load);
//! - **staleness:** reports older than three intervals change nothing: a balancer fed
//!   them picks exactly as its twin (same seed) that never heard of engines;
//! - **saturation skip:** a request is placed whenever its twin without reports would
//!   place it (never a `429` the reports caused), and on a saturated backend only when
//!   every unsaturated one is full;
//! - `max_conns` counts only this balancer's own leases, whatever the engine says.

use std::time::{Duration, Instant};

use lb_core::{
    Action, BackendId, BackendSpec, Balancer, Config, Lease, LoadReport, Outcome, Policy,
    ProbeOutcome, Reject, RequestMeta,
};
use proptest::prelude::*;
use rand::{rngs::SmallRng, SeedableRng};

/// One backend of a generated pool: weight, cap, own leases to hold, and its report
/// (running, waiting, KV percent), if any.
#[derive(Clone, Debug)]
struct Spec {
    weight: u32,
    max_conns: u32,
    leases: u32,
    report: Option<(u32, u32, Option<u32>)>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        1u32..4,
        0u32..4,
        0u32..4,
        proptest::option::of((0u32..8, 0u32..9, proptest::option::of(80u32..=100))),
    )
        .prop_map(|(weight, max_conns, leases, report)| Spec {
            weight,
            max_conns,
            leases,
            report,
        })
}

struct Pool {
    lb: Balancer,
    ids: Vec<BackendId>,
    held: Vec<Lease>,
    now: Instant,
}

/// A pool of `specs` under `policy`, every backend proven, each holding its own leases
/// (up to its cap); reports fed at `now` when `reports`.
fn pool(policy: Policy, specs: &[Spec], seed: u64, reports: bool) -> Pool {
    let now = Instant::now();
    let config = Config {
        policy,
        status_interval: None,
        ..Config::default()
    };
    let mut lb = Balancer::new(config, SmallRng::seed_from_u64(seed), now);
    let ids: Vec<BackendId> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let spec = BackendSpec {
                weight: s.weight,
                max_conns: s.max_conns,
                ..BackendSpec::new(format!("http://b{i}"))
            };
            lb.add_backend(now, spec).unwrap()
        })
        .collect();
    lb.handle_timeout(now);
    while let Some(Action::StartProbe { probe, .. }) = lb.poll_action() {
        lb.probe_result(now, probe, ProbeOutcome::Status(200));
    }
    let mut held = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let others: Vec<BackendId> = ids.iter().copied().filter(|&o| o != ids[i]).collect();
        let n = if s.max_conns == 0 {
            s.leases
        } else {
            s.leases.min(s.max_conns)
        };
        for _ in 0..n {
            let l = lb
                .select_excluding(now, &RequestMeta::default(), &others)
                .unwrap();
            assert_eq!(l.backend(), ids[i]);
            held.push(l);
        }
    }
    if reports {
        for (i, s) in specs.iter().enumerate() {
            if let Some((running, waiting, kv)) = s.report {
                let mut r = LoadReport::new(running, waiting);
                if let Some(kv) = kv {
                    r = r.with_kv_usage(f64::from(kv) / 100.0);
                }
                assert!(lb.load_report(now, ids[i], r));
            }
        }
    }
    Pool { lb, ids, held, now }
}

impl Pool {
    fn finish(mut self) {
        for l in self.held.drain(..) {
            self.lb.release(self.now, l, Outcome::Response(200));
        }
        assert_eq!(self.lb.outstanding(), 0);
    }
}

/// Two pools alike but for the reports: one got them, its twin none. Cache-aware needs
/// every backend capped, so uncapped specs get a cap of 1 first.
fn twins(policy: Policy, mut specs: Vec<Spec>, seed: u64) -> (Vec<Spec>, Pool, Pool) {
    if policy == Policy::CacheAware {
        for s in &mut specs {
            s.max_conns = s.max_conns.max(1);
        }
    }
    let with = pool(policy, &specs, seed, true);
    let twin = pool(policy, &specs, seed, false);
    (specs, with, twin)
}

/// What the core must see: effective load, cap room, saturation.
fn effective(s: &Spec, with_reports: bool) -> (u32, bool, bool) {
    let own = if s.max_conns == 0 {
        s.leases
    } else {
        s.leases.min(s.max_conns)
    };
    let room = s.max_conns == 0 || own < s.max_conns;
    match s.report.filter(|_| with_reports) {
        None => (own, room, false),
        Some((r, w, kv)) => (own.max(r + w), room, w > 5 || kv.is_some_and(|k| k > 95)),
    }
}

/// The documented least-conn rank with fresh reports (`lb_core::engine`, "Ranking with
/// several replicas"), in requests, for the pool of `specs` (reports fed after the own
/// leases, nothing sent since): `own + shrink(foreign - mean) / R`.
fn ranks(specs: &[Spec]) -> Vec<f64> {
    let own = |s: &Spec| {
        f64::from(if s.max_conns == 0 {
            s.leases
        } else {
            s.leases.min(s.max_conns)
        })
    };
    let fresh: Vec<(f64, f64)> = specs
        .iter()
        .filter_map(|s| s.report.map(|(r, w, _)| (f64::from(r + w), own(s))))
        .collect();
    let (engine, mine): (f64, f64) = fresh.iter().fold((0.0, 0.0), |a, f| (a.0 + f.0, a.1 + f.1));
    let r = if mine == 0.0 {
        1.0
    } else {
        (engine / mine).clamp(1.0, 16.0)
    };
    let n = fresh.len().max(1) as f64;
    let mean = fresh.iter().map(|&(e, o)| (e - o).max(0.0)).sum::<f64>() / n;
    specs
        .iter()
        .map(|s| match s.report {
            None => own(s),
            Some((run, wait, _)) => {
                let d = (f64::from(run + wait) - own(s)).max(0.0) - mean;
                own(s) + d.signum() * (d.abs() - mean.sqrt()).max(0.0) / r
            }
        })
        .collect()
}

proptest! {
    #[test]
    fn least_conn_ranks_by_signal_rank_and_skips_saturation(
        specs in proptest::collection::vec(spec(), 1..6),
        seed in any::<u64>(),
    ) {
        let mut p = pool(Policy::LeastConn, &specs, seed, true);
        let views: Vec<_> = specs.iter().map(|s| effective(s, true)).collect();
        let ranks = ranks(&specs);
        let picked = p.lb.select(p.now, &RequestMeta::default());
        let any_room = views.iter().any(|v| v.1);
        let free_unsaturated = views.iter().any(|v| v.1 && !v.2);
        match picked {
            Err(r) => {
                prop_assert!(!any_room, "rejected ({r:?}) with room: {specs:?}");
                prop_assert_eq!(r, Reject::AllAtCapacity);
            }
            Ok(l) => {
                let i = p.ids.iter().position(|&id| id == l.backend()).unwrap();
                let (_, room, saturated) = views[i];
                prop_assert!(room, "picked a full backend");
                prop_assert!(!saturated || !free_unsaturated, "picked saturated b{i} with an unsaturated one free: {specs:?}");
                // Least rank / weight among the candidates of its class (the core
                // rounds to thousandths of a request).
                for (j, v) in views.iter().enumerate() {
                    if v.1 && (v.2 == saturated || !free_unsaturated) {
                        prop_assert!(
                            ranks[i] / f64::from(specs[i].weight)
                                <= ranks[j] / f64::from(specs[j].weight) + 0.01,
                            "b{i} (rank {}) picked over b{j} (rank {}): {specs:?}", ranks[i], ranks[j]
                        );
                    }
                }
                p.held.push(l);
            }
        }
        p.finish();
    }

    /// Every policy: the skip never turns a request away that the twin without reports
    /// places, and lands on a saturated backend only when no unsaturated one has room.
    #[test]
    fn the_saturation_skip_never_rejects(
        specs in proptest::collection::vec(spec(), 1..6),
        policy in 0usize..Policy::ALL.len(),
        seed in any::<u64>(),
        picks in 1usize..6,
    ) {
        let policy = Policy::ALL[policy];
        let (specs, mut with, mut twin) = twins(policy, specs, seed);
        for k in 0..picks {
            let key = [k as u8];
            let meta = RequestMeta::default().with_key(&key);
            let a = with.lb.select(with.now, &meta);
            let b = twin.lb.select(twin.now, &meta);
            prop_assert_eq!(a.is_ok(), b.is_ok(), "pick {}: {:?} vs {:?}", k, a, b);
            if let Ok(l) = &a {
                let free_unsaturated = with.ids.iter().zip(&specs).any(|(&id, s)| {
                    let v = with.lb.backend(id).unwrap();
                    let room = v.max_conns == 0 || v.in_flight < v.max_conns;
                    room && !effective(s, true).2
                });
                let i = with.ids.iter().position(|&id| id == l.backend()).unwrap();
                prop_assert!(!effective(&specs[i], true).2 || !free_unsaturated,
                    "{policy}: saturated b{i} picked with an unsaturated one free");
            }
            if let Ok(l) = a { with.held.push(l); }
            if let Ok(l) = b { twin.held.push(l); }
        }
        with.finish();
        twin.finish();
    }

    /// Reports older than three intervals are ignored: the same picks as a twin that
    /// never got any, under every policy.
    #[test]
    fn stale_reports_change_nothing(
        specs in proptest::collection::vec(spec(), 1..6),
        policy in 0usize..Policy::ALL.len(),
        seed in any::<u64>(),
        late_ms in 1u64..5000,
    ) {
        let policy = Policy::ALL[policy];
        let (_, mut with, mut twin) = twins(policy, specs, seed);
        let stale = with.lb.config().engine.stale_after() + Duration::from_millis(late_ms);
        let later = with.now + stale;
        for k in 0..4u8 {
            let key = [k];
            let meta = RequestMeta::default().with_key(&key);
            let a = with.lb.select(later, &meta);
            let b = twin.lb.select(twin.now + stale, &meta);
            let (pa, pb) = (a.as_ref().map(|l| l.backend().slot()), b.as_ref().map(|l| l.backend().slot()));
            prop_assert_eq!(pa.ok(), pb.ok());
            if let Ok(l) = a { with.held.push(l); }
            if let Ok(l) = b { twin.held.push(l); }
        }
        with.now = later;
        twin.now += stale;
        with.finish();
        twin.finish();
    }

    /// p2c over two backends: never the one with the strictly larger effective load
    /// (both unsaturated, uncapped, weight 1).
    #[test]
    fn p2c_prefers_the_less_loaded_engine(
        a in (0u32..4, 0u32..20, 0u32..=5),
        b in (0u32..4, 0u32..20, 0u32..=5),
        seed in any::<u64>(),
    ) {
        let specs: Vec<Spec> = [a, b].iter().map(|&(leases, running, waiting)| Spec {
            weight: 1, max_conns: 0, leases, report: Some((running, waiting, None)),
        }).collect();
        let mut p = pool(Policy::P2c, &specs, seed, true);
        let loads: Vec<u32> = specs.iter().map(|s| effective(s, true).0).collect();
        let l = p.lb.select(p.now, &RequestMeta::default()).unwrap();
        let i = p.ids.iter().position(|&id| id == l.backend()).unwrap();
        prop_assert!(loads[i] <= loads[1 - i], "{loads:?}: picked {i}");
        p.held.push(l);
        p.finish();
    }
}

/// The cap stays exact: an engine reporting an empty queue does not lift `max_conns`,
/// and one reporting a long queue does not lower it.
#[test]
fn max_conns_counts_only_own_leases() {
    let specs = vec![
        Spec {
            weight: 1,
            max_conns: 2,
            leases: 0,
            report: Some((50, 0, None)),
        };
        1
    ];
    let mut p = pool(Policy::LeastConn, &specs, 1, true);
    for _ in 0..2 {
        let l = p.lb.select(p.now, &RequestMeta::default()).unwrap();
        p.held.push(l);
    }
    assert_eq!(
        p.lb.select(p.now, &RequestMeta::default()).unwrap_err(),
        Reject::AllAtCapacity
    );
    p.lb.load_report(p.now, p.ids[0], LoadReport::new(0, 0));
    assert_eq!(
        p.lb.select(p.now, &RequestMeta::default()).unwrap_err(),
        Reject::AllAtCapacity
    );
    p.finish();
}

/// A report moves traffic away at once, a newer one brings it back, and the view shows
/// the last report even once stale.
#[test]
fn reports_steer_least_conn_and_are_shown() {
    let specs = vec![
        Spec {
            weight: 1,
            max_conns: 0,
            leases: 0,
            report: None,
        };
        2
    ];
    let mut p = pool(Policy::LeastConn, &specs, 7, false);
    let (a, b) = (p.ids[0], p.ids[1]);
    // a's engine is busy with other clients' work (4 foreign, b's 0: a deviation of ±2
    // around the mean, √2 of it within the band): b takes the next two.
    assert!(p.lb.load_report(p.now, a, LoadReport::new(4, 0)));
    assert!(p.lb.load_report(p.now, b, LoadReport::new(0, 0)));
    for _ in 0..2 {
        let l = p.lb.select(p.now, &RequestMeta::default()).unwrap();
        assert_eq!(l.backend(), b);
        p.held.push(l);
    }
    // a's engine is saturated (waiting 6): b takes it even though it is more loaded.
    assert!(p.lb.load_report(p.now, a, LoadReport::new(0, 6)));
    for _ in 0..3 {
        let l = p.lb.select(p.now, &RequestMeta::default()).unwrap();
        assert_eq!(l.backend(), b);
        p.held.push(l);
    }
    let view = p.lb.backend(a).unwrap();
    assert_eq!(view.engine.unwrap().report, LoadReport::new(0, 6));
    // Three intervals later a's report is stale: a has 0 own, it takes the next.
    let later = p.now + p.lb.config().engine.stale_after() + Duration::from_millis(1);
    let l = p.lb.select(later, &RequestMeta::default()).unwrap();
    assert_eq!(l.backend(), a);
    p.held.push(l);
    assert!(p.lb.backend(a).unwrap().engine.is_some(), "still shown");
    p.now = later;
    p.finish();
    // Unknown backends are refused.
    let mut q = pool(Policy::LeastConn, &specs[..1], 1, false);
    let gone = q.ids[0];
    q.lb.remove_backend(q.now, gone);
    assert!(!q.lb.load_report(q.now, gone, LoadReport::new(1, 1)));
    q.finish();
}

/// A report counts what this balancer sends after it: two engines reported equally busy
/// share the next requests evenly, rather than the first one taking them all until its
/// own count passes the report (the herding replicas of the simulator).
#[test]
fn requests_sent_after_a_report_count_on_top_of_it() {
    let specs = vec![
        Spec {
            weight: 1,
            max_conns: 0,
            leases: 0,
            report: None,
        };
        2
    ];
    let mut p = pool(Policy::LeastConn, &specs, 11, false);
    let (a, b) = (p.ids[0], p.ids[1]);
    assert!(p.lb.load_report(p.now, a, LoadReport::new(5, 0)));
    assert!(p.lb.load_report(p.now, b, LoadReport::new(5, 0)));
    let mut to_a = 0;
    for i in 0..10_usize {
        let l = p.lb.select(p.now, &RequestMeta::default()).unwrap();
        to_a += usize::from(l.backend() == a);
        p.held.push(l);
        // After every second request the two are level again.
        if i % 2 == 1 {
            assert_eq!(to_a, i.div_ceil(2), "after {} requests", i + 1);
        }
    }
    // A newer report includes what was sent (5 own each, 5 others' each): it is not
    // counted twice, and the next requests alternate again.
    assert!(p.lb.load_report(p.now, a, LoadReport::new(10, 0)));
    assert!(p.lb.load_report(p.now, b, LoadReport::new(10, 0)));
    let mut to_a = 0;
    for i in 0..6_usize {
        let l = p.lb.select(p.now, &RequestMeta::default()).unwrap();
        to_a += usize::from(l.backend() == a);
        p.held.push(l);
        if i % 2 == 1 {
            assert_eq!(to_a, i.div_ceil(2), "after {} requests", i + 1);
        }
    }
    p.finish();
}

/// Several replicas reading the same report: engine 0 reported least (6 against 8, 2 of
/// each this replica's), a difference within the others' churn. With R = 30 / 8 other
/// replicas likely sending what this one sends, each send counts 3.75: a replica's next
/// four requests go to four different engines, not all to engine 0 until the next report
/// (the herd of the simulator).
#[test]
fn replicas_do_not_herd_onto_the_engine_that_reported_least() {
    let spec = Spec {
        weight: 1,
        max_conns: 0,
        leases: 2,
        report: None,
    };
    for seed in 0..8 {
        let mut p = pool(Policy::LeastConn, &vec![spec.clone(); 4], seed, false);
        for (i, &id) in p.ids.iter().enumerate() {
            let queued = if i == 0 { 6 } else { 8 };
            assert!(p.lb.load_report(p.now, id, LoadReport::new(queued, 0)));
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let l = p.lb.select(p.now, &RequestMeta::default()).unwrap();
            seen.insert(l.backend());
            p.held.push(l);
        }
        assert_eq!(seen.len(), 4, "seed {seed}");
        p.finish();
    }
}

/// A large, lasting deviation steers least-conn (by 1/R of what exceeds the band): an
/// engine holding 20 requests of other clients gets none of the next two.
#[test]
fn a_large_foreign_load_is_avoided() {
    let spec = Spec {
        weight: 1,
        max_conns: 0,
        leases: 4,
        report: None,
    };
    let mut p = pool(Policy::LeastConn, &vec![spec; 2], 3, false);
    let (a, b) = (p.ids[0], p.ids[1]);
    assert!(p.lb.load_report(p.now, a, LoadReport::new(24, 0)));
    assert!(p.lb.load_report(p.now, b, LoadReport::new(4, 0)));
    // R = 28 / 8 = 3.5, mean foreign 10, band √10: a ranks 4 + 1.95, b 4 - 1.95; each
    // send to b counts 1 + 2.5.
    for _ in 0..2 {
        let l = p.lb.select(p.now, &RequestMeta::default()).unwrap();
        assert_eq!(l.backend(), b);
        p.held.push(l);
    }
    let l = p.lb.select(p.now, &RequestMeta::default()).unwrap();
    assert_eq!(l.backend(), a);
    p.held.push(l);
    p.finish();
}
