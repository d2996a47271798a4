//! `--routing prefix-hash`: replica consistency and the bounded-load walk.
//!
//! - Independent balancers (different RNG seeds, backends added in different orders, so
//!   different slots) fed the same pool, health and requests pick the same backend for
//!   every request: nothing in the choice depends on randomness or on local state other
//!   than the loads.
//! - The bounded walk never picks a backend whose load (relative to its weight) is above
//!   the balance factor times the average while another below its cap is within it.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use lb_core::{
    Action, BackendId, BackendSpec, Balancer, Config, Lease, Outcome, Policy, PrefixHashConfig,
    ProbeOutcome, Reject, RequestKey, RequestMeta, Route,
};
use proptest::prelude::*;
use rand::{rngs::SmallRng, SeedableRng};

fn config(factor: u32, units: usize) -> Config {
    Config {
        policy: Policy::PrefixHash,
        status_interval: None,
        prefix_hash: PrefixHashConfig {
            units,
            balance_factor: factor,
        },
        ..Config::default()
    }
}

/// A balancer over `specs` (added in the order given), every backend proven by a first
/// sweep whose probes all pass.
fn balancer(config: Config, seed: u64, specs: &[BackendSpec], now: Instant) -> Balancer {
    let mut b = Balancer::new(config, SmallRng::seed_from_u64(seed), now);
    for s in specs {
        b.add_backend(now, s.clone()).unwrap();
    }
    b.handle_timeout(now);
    while let Some(Action::StartProbe { probe, .. }) = b.poll_action() {
        b.probe_result(now, probe, ProbeOutcome::Status(200));
    }
    b
}

fn id_of(b: &Balancer, url: &str) -> BackendId {
    b.backends().find(|v| &*v.url == url).unwrap().id
}

fn url_of(b: &Balancer, id: BackendId) -> String {
    b.backend(id).unwrap().url.to_string()
}

/// Fails one probe of the backend `url` (fall 1: it turns unhealthy).
fn eject(b: &mut Balancer, url: &str, now: Instant) {
    let id = id_of(b, url);
    let at = b.poll_timeout().unwrap().max(now);
    b.handle_timeout(at);
    while let Some(Action::StartProbe { probe, .. }) = b.poll_action() {
        let status = if probe.backend() == id { 503 } else { 200 };
        b.probe_result(at, probe, ProbeOutcome::Status(status));
    }
}

/// The request a generated key stands for: a prompt chain of 1 to 6 units (its first
/// units shared with other keys of the same family), a `user` key, or a client address.
fn meta_parts(k: u8) -> (RequestKey, Option<Vec<u8>>, IpAddr) {
    let family = u64::from(k % 4);
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, k % 7));
    match k % 10 {
        0 => (RequestKey::None, Some(vec![k]), ip),
        1 => (RequestKey::None, None, ip),
        n => {
            let len = usize::from(n % 6) + 1;
            let chain = (0..len as u64).map(|i| family * 1000 + i).collect();
            (RequestKey::Prefix(chain), None, ip)
        }
    }
}

/// Leases a failing property leaves behind: forgotten rather than dropped (a dropped
/// lease panics in debug builds and would hide the failure).
struct Held<T>(Vec<T>);

impl<T> Drop for Held<T> {
    fn drop(&mut self) {
        for l in self.0.drain(..) {
            std::mem::forget(l);
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Select(u8),
    Release(usize),
    Eject(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Select),
        3 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Eject),
    ]
}

fn specs() -> impl Strategy<Value = Vec<BackendSpec>> {
    prop::collection::vec((1u32..=4, 0u32..=5), 1..=7).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (weight, max_conns))| BackendSpec {
                url: format!("http://10.1.0.{i}:8000"),
                weight,
                max_conns,
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Replicas agree: two balancers with the same settings, seeded differently and
    /// with their backends in opposite slot orders, see the same requests, releases and
    /// health changes and pick the same backend (or refuse the same way) every time.
    #[test]
    fn independent_cores_agree(
        specs in specs(),
        factor in 1001u32..3000,
        units in 1usize..=8,
        seeds in (any::<u64>(), any::<u64>()),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let now = Instant::now();
        let reversed: Vec<BackendSpec> = specs.iter().rev().cloned().collect();
        let mut a = balancer(config(factor, units), seeds.0, &specs, now);
        let mut b = balancer(config(factor, units), seeds.1, &reversed, now);
        let mut held: Held<(Lease, Lease)> = Held(Vec::new());
        for op in ops {
            match op {
                Op::Select(k) => {
                    let (key, hash_key, ip) = meta_parts(k);
                    let mut meta = RequestMeta::from_ip(ip).with_affinity(&key);
                    if let Some(h) = &hash_key {
                        meta = meta.with_key(h);
                    }
                    match (a.select(now, &meta), b.select(now, &meta)) {
                        (Ok(la), Ok(lb)) => {
                            let (ua, ub) = (url_of(&a, la.backend()), url_of(&b, lb.backend()));
                            let (ra, rb) = (la.route(), lb.route());
                            held.0.push((la, lb));
                            prop_assert_eq!(ua, ub);
                            prop_assert_eq!(ra, rb);
                        }
                        (Err(ra), Err(rb)) => prop_assert_eq!(ra, rb),
                        (ra, rb) => {
                            let (ra, rb) = (ra.map(std::mem::forget).is_ok(), rb.map(std::mem::forget).is_ok());
                            prop_assert!(false, "one replica picked, the other refused: {} {}", ra, rb);
                        }
                    }
                }
                Op::Release(i) if !held.0.is_empty() => {
                    let (la, lb) = held.0.swap_remove(i % held.0.len());
                    a.release(now, la, Outcome::Response(200));
                    b.release(now, lb, Outcome::Response(200));
                }
                Op::Release(_) => {}
                Op::Eject(i) => {
                    let url = specs[i % specs.len()].url.clone();
                    eject(&mut a, &url, now);
                    eject(&mut b, &url, now);
                }
            }
        }
        for (la, lb) in held.0.drain(..) {
            a.release(now, la, Outcome::Cancelled);
            b.release(now, lb, Outcome::Cancelled);
        }
    }

    /// The bounded walk: a backend whose `load / weight` is above `factor × Σload / Σweight`
    /// is picked only when every other healthy backend below its cap is above it too.
    /// (Loads as they were just before the pick.)
    #[test]
    fn no_pick_above_the_bound_while_another_is_within(
        specs in specs(),
        factor in 1001u32..3000,
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let now = Instant::now();
        let mut b = balancer(config(factor, 3), 1, &specs, now);
        let mut held: Held<Lease> = Held(Vec::new());
        for op in ops {
            match op {
                Op::Select(k) => {
                    let before: Vec<_> = b.backends().filter(|v| v.healthy).collect();
                    let (key, hash_key, ip) = meta_parts(k);
                    let mut meta = RequestMeta::from_ip(ip).with_affinity(&key);
                    if let Some(h) = &hash_key {
                        meta = meta.with_key(h);
                    }
                    let total_load: u128 = before.iter().map(|v| u128::from(v.in_flight)).sum();
                    let total_weight: u128 = before.iter().map(|v| u128::from(v.weight)).sum();
                    let within = |load: u32, weight: u32| {
                        u128::from(load) * total_weight * 1000
                            <= u128::from(factor) * total_load * u128::from(weight)
                    };
                    let room = |v: &lb_core::BackendView| v.max_conns == 0 || v.in_flight < v.max_conns;
                    match b.select(now, &meta) {
                        Ok(l) => {
                            let id = l.backend();
                            held.0.push(l);
                            let v = before.iter().find(|v| v.id == id).unwrap();
                            prop_assert!(room(v));
                            if !within(v.in_flight, v.weight) {
                                let other = before
                                    .iter()
                                    .find(|o| o.id != v.id && room(o) && within(o.in_flight, o.weight));
                                prop_assert!(other.is_none(), "picked {:?} above the bound while {:?} was within", v, other);
                            }
                        }
                        Err(r) => {
                            prop_assert_eq!(r, if before.is_empty() { Reject::NoHealthyBackend } else { Reject::AllAtCapacity });
                            prop_assert!(before.iter().all(|v| !room(v)));
                        }
                    }
                }
                Op::Release(i) if !held.0.is_empty() => {
                    let l = held.0.swap_remove(i % held.0.len());
                    b.release(now, l, Outcome::Response(200));
                }
                Op::Release(_) => {}
                Op::Eject(i) => eject(&mut b, &specs[i % specs.len()].url, now),
            }
        }
        for l in held.0.drain(..) {
            b.release(now, l, Outcome::Cancelled);
        }
    }
}

/// A hot prefix: its own backend while within the bound, then the next in its order, and
/// back once the load falls. The key is the first `units` units: longer prompts that
/// share them go to the same backend; a prompt shorter than that is its own key.
#[test]
fn a_hot_prefix_walks_on_and_comes_back() {
    let now = Instant::now();
    let specs: Vec<_> = (0..3)
        .map(|i| BackendSpec::new(format!("http://10.2.0.{i}:8000")))
        .collect();
    let mut b = balancer(config(1250, 2), 7, &specs, now);
    let turn = |n: u64| RequestKey::Prefix((0..n).map(|i| 500 + i).collect());
    let (k2, k5) = (turn(2), turn(5));
    let first = b
        .select(now, &RequestMeta::default().with_affinity(&k2))
        .unwrap();
    assert_eq!(first.route(), Route::Hit { depth: 2 });
    let home = first.backend();
    b.release(now, first, Outcome::Response(200));
    // A longer conversation with the same first two units: the same backend.
    let longer = b
        .select(now, &RequestMeta::default().with_affinity(&k5))
        .unwrap();
    assert_eq!(longer.backend(), home);
    assert_eq!(longer.route(), Route::Hit { depth: 2 });
    // While it is in flight, home is at 1 against an average of 1/3: above 1.25 × that,
    // so the next request with the prefix walks on.
    let second = b
        .select(now, &RequestMeta::default().with_affinity(&k2))
        .unwrap();
    assert_ne!(second.backend(), home);
    assert_eq!(second.route(), Route::Overflow { depth: 0 });
    let third = b
        .select(now, &RequestMeta::default().with_affinity(&k2))
        .unwrap();
    assert!(third.backend() != home && third.backend() != second.backend());
    // All at 1: home is within the bound again.
    let fourth = b
        .select(now, &RequestMeta::default().with_affinity(&k2))
        .unwrap();
    assert_eq!(fourth.backend(), home);
    for l in [longer, second, third, fourth] {
        b.release(now, l, Outcome::Response(200));
    }
    let again = b
        .select(now, &RequestMeta::default().with_affinity(&k2))
        .unwrap();
    assert_eq!(
        (again.backend(), again.route()),
        (home, Route::Hit { depth: 2 })
    );
    b.release(now, again, Outcome::Response(200));
}

/// Without a prompt the `user` key, then the client address, picks; the key's backend
/// leaving moves only its keys.
#[test]
fn falls_back_to_the_user_then_the_address() {
    let now = Instant::now();
    let specs: Vec<_> = (0..4)
        .map(|i| BackendSpec::new(format!("http://10.3.0.{i}:8000")))
        .collect();
    let mut b = balancer(config(1250, 4), 3, &specs, now);
    let ip = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 9));
    let pick = |b: &mut Balancer, meta: &RequestMeta<'_>| {
        let l = b.select(now, meta).unwrap();
        let (id, route) = (l.backend(), l.route());
        b.release(now, l, Outcome::Response(200));
        (id, route)
    };
    let by_user = pick(&mut b, &RequestMeta::from_ip(ip).with_key(b"alice"));
    assert_eq!(by_user.1, Route::Hit { depth: 0 });
    for _ in 0..5 {
        assert_eq!(
            pick(&mut b, &RequestMeta::from_ip(ip).with_key(b"alice")),
            by_user
        );
    }
    let by_ip = pick(&mut b, &RequestMeta::from_ip(ip));
    for _ in 0..5 {
        assert_eq!(pick(&mut b, &RequestMeta::from_ip(ip)), by_ip);
    }
    // 64 keys, one backend ejected: only the keys it had move.
    let keys: Vec<RequestKey> = (0..64)
        .map(|i| RequestKey::Prefix(vec![i * 7919]))
        .collect();
    let before: Vec<_> = keys
        .iter()
        .map(|k| pick(&mut b, &RequestMeta::default().with_affinity(k)).0)
        .collect();
    let gone = before[0];
    let gone_url = url_of(&b, gone);
    eject(&mut b, &gone_url, now);
    for (k, was) in keys.iter().zip(&before) {
        let now_at = pick(&mut b, &RequestMeta::default().with_affinity(k)).0;
        if *was != gone {
            assert_eq!(now_at, *was);
        } else {
            assert_ne!(now_at, gone);
        }
    }
}

#[test]
fn validation_names_what_is_wrong() {
    let mut c = config(1000, 4);
    assert!(c.validate(&[]).unwrap_err().0.contains("balance factor"));
    c.prefix_hash.balance_factor = 1250;
    c.prefix_hash.units = 0;
    assert!(c.validate(&[]).unwrap_err().0.contains("units"));
    c.prefix_hash.units = 4;
    assert!(c.validate(&[]).is_ok());
}
