//! Cache-aware routing, rule by rule: longest prefix, overflow, recording, TTL, epoch
//! invalidation, the memory bound, counters and validation.

use std::time::{Duration, Instant};

use lb_core::affinity::UNCAPPED_CONNS;
use lb_core::{
    Action, AffinityConfig, BackendId, BackendSpec, Balancer, Config, Event, Lease, Outcome,
    Policy, ProbeOutcome, RequestKey, RequestMeta, RoutingStats,
};
use rand::rngs::SmallRng;
use rand::SeedableRng;

const SEC: Duration = Duration::from_secs(1);

fn config(affinity: AffinityConfig) -> Config {
    Config {
        policy: Policy::CacheAware,
        status_interval: None,
        affinity,
        ..Config::default()
    }
}

fn pool(n: usize, max_conns: u32, affinity: AffinityConfig) -> (Balancer, Instant, Vec<BackendId>) {
    let now = Instant::now();
    let mut b = Balancer::new(config(affinity), SmallRng::seed_from_u64(3), now);
    let ids = (0..n)
        .map(|i| {
            b.add_backend(
                now,
                BackendSpec {
                    max_conns,
                    ..BackendSpec::new(format!("http://b{i}"))
                },
            )
            .unwrap()
        })
        .collect();
    (b, now, ids)
}

fn chain(units: &[u64]) -> RequestKey {
    RequestKey::Prefix(units.to_vec())
}

fn pick(b: &mut Balancer, now: Instant, key: &RequestKey) -> Lease {
    b.select(now, &RequestMeta::default().with_affinity(key))
        .expect("a backend is free")
}

fn serve(b: &mut Balancer, now: Instant, key: &RequestKey) -> BackendId {
    let l = pick(b, now, key);
    let id = l.backend();
    b.release(now, l, Outcome::Response(200));
    id
}

fn stats(b: &Balancer) -> RoutingStats {
    b.routing_stats().expect("cache-aware keeps counters")
}

#[test]
fn longest_known_prefix_wins() {
    let (mut b, now, _) = pool(4, 10, AffinityConfig::default());
    let x = serve(&mut b, now, &chain(&[1, 2, 3, 4]));
    // Other chains land by least connections (all idle: anywhere); pin them apart.
    let y = serve(&mut b, now, &chain(&[1, 2, 9]));
    assert_eq!(y, x, "shares [1, 2] with the first: warm on its backend");
    assert_eq!(serve(&mut b, now, &chain(&[1, 2, 3, 4, 5, 6])), x);
    assert_eq!(serve(&mut b, now, &chain(&[1])), x);
    let s = stats(&b);
    assert_eq!((s.requests, s.warm, s.cold, s.overflow), (4, 3, 1, 0));
    assert_eq!(s.keys, 7, "units 1, 2, 3, 4, 9, 5 and 6");
}

#[test]
fn deeper_entries_beat_shallower_ones_on_other_backends() {
    // max_conns 5, 20 %: a holder may be 1 ahead.
    let (mut b, now, _) = pool(3, 5, AffinityConfig::default());
    let deep = chain(&[1, 2, 3]);
    let l1 = pick(&mut b, now, &deep);
    let x = l1.backend();
    let l2 = pick(&mut b, now, &deep);
    assert_eq!(l2.backend(), x);
    // [1] lives on x, which is 2 ahead: [1] overflows to y and is re-pointed there.
    let l3 = pick(&mut b, now, &chain(&[1]));
    let y = l3.backend();
    assert_ne!(y, x);
    for l in [l1, l2, l3] {
        b.release(now, l, Outcome::Response(200));
    }
    assert_eq!(
        serve(&mut b, now, &chain(&[1, 5])),
        y,
        "only [1] matches: on y"
    );
    assert_eq!(
        serve(&mut b, now, &chain(&[1, 2, 3, 4])),
        x,
        "deepest match: 3, on x"
    );
    assert_eq!(
        serve(&mut b, now, &chain(&[1, 6])),
        x,
        "[1] followed the last request"
    );
}

fn all_holders() -> AffinityConfig {
    AffinityConfig {
        all_holders: true,
        ..AffinityConfig::default()
    }
}

#[test]
fn all_holders_remembers_every_backend_of_a_prefix() {
    // The same start as above, with every holder remembered.
    let (mut b, now, _) = pool(3, 5, all_holders());
    let deep = chain(&[1, 2, 3]);
    let l1 = pick(&mut b, now, &deep);
    let x = l1.backend();
    let l2 = pick(&mut b, now, &deep);
    let l3 = pick(&mut b, now, &chain(&[1]));
    let y = l3.backend();
    assert_eq!(l2.backend(), x);
    assert_ne!(y, x);
    for l in [l1, l2, l3] {
        b.release(now, l, Outcome::Response(200));
    }
    // [1] is known on x and y: the less loaded of them takes it.
    let busy = pick(&mut b, now, &chain(&[1, 2, 3]));
    assert_eq!(busy.backend(), x);
    assert_eq!(
        serve(&mut b, now, &chain(&[1, 6])),
        y,
        "both hold [1]; y is idle"
    );
    b.release(now, busy, Outcome::Response(200));
    let busy = pick(&mut b, now, &chain(&[1, 6]));
    assert_eq!(busy.backend(), y);
    assert_eq!(
        serve(&mut b, now, &chain(&[1, 7])),
        x,
        "now x is the idle one"
    );
    b.release(now, busy, Outcome::Response(200));
}

#[test]
fn all_holders_overflow_prefers_a_shorter_known_prefix() {
    // max_conns 5, 20 %: a holder may be 1 ahead of the least loaded.
    let (mut b, now, _) = pool(3, 5, all_holders());
    let x = serve(&mut b, now, &chain(&[1]));
    let a1 = pick(&mut b, now, &chain(&[1]));
    let a2 = pick(&mut b, now, &chain(&[1]));
    assert_eq!((a1.backend(), a2.backend()), (x, x));
    // x is 2 ahead: [1, 2, 3] overflows by least connections, to y.
    let l1 = pick(&mut b, now, &chain(&[1, 2, 3]));
    let y = l1.backend();
    assert_ne!(y, x);
    b.release(now, a1, Outcome::Response(200));
    b.release(now, a2, Outcome::Response(200));
    // x 0, y 1: y holds the longest prefix and is 1 ahead: warm.
    let l2 = pick(&mut b, now, &chain(&[1, 2, 3, 8]));
    assert_eq!(l2.backend(), y);
    // [1] is held by x and y; y is 2 ahead, so x takes it.
    let l3 = pick(&mut b, now, &chain(&[1]));
    assert_eq!(l3.backend(), x);
    // x 1, y 2, z 0: y (longest prefix) is too far ahead; x holds [1] and is within the
    // guard, so the request goes there rather than to the idle z.
    let l4 = pick(&mut b, now, &chain(&[1, 2, 3, 9]));
    assert_eq!(l4.backend(), x);
    let s = stats(&b);
    assert_eq!((s.warm, s.overflow, s.cold), (4, 2, 1));
    for l in [l1, l2, l3, l4] {
        b.release(now, l, Outcome::Response(200));
    }
}

#[test]
fn unknown_prefixes_and_keyless_requests_go_by_least_connections() {
    let (mut b, now, ids) = pool(3, 10, AffinityConfig::default());
    let mut held = Vec::new();
    for i in 0..6u64 {
        held.push(pick(&mut b, now, &chain(&[100 + i])));
    }
    let mut per = vec![0; 3];
    for l in &held {
        per[ids.iter().position(|&i| i == l.backend()).unwrap()] += 1;
    }
    assert_eq!(per, [2, 2, 2], "cold picks spread like least-conn");
    held.push(b.select(now, &RequestMeta::default()).unwrap());
    let s = stats(&b);
    assert_eq!((s.cold, s.unkeyed, s.warm), (7, 1, 0));
    for l in held {
        b.release(now, l, Outcome::Response(200));
    }
}

#[test]
fn overflow_when_too_far_ahead_or_full() {
    // max_conns 10, 20 %: the holder may be at most 2 ahead of the least loaded.
    let (mut b, now, _) = pool(2, 10, AffinityConfig::default());
    let hot = chain(&[42]);
    let x = serve(&mut b, now, &hot);
    let mut held = Vec::new();
    for _ in 0..2 {
        let l = pick(&mut b, now, &hot);
        assert_eq!(l.backend(), x, "ahead by 0, then 1: warm");
        held.push(l);
    }
    // x has 2 in flight, the other 0: ahead by 2 = 20 % of 10, still warm.
    let l = pick(&mut b, now, &hot);
    assert_eq!(l.backend(), x);
    held.push(l);
    // Now ahead by 3 > 2: overflow to the other backend, and the prefix follows it.
    let l = pick(&mut b, now, &hot);
    let y = l.backend();
    assert_ne!(y, x);
    held.push(l);
    let s = stats(&b);
    assert_eq!((s.warm, s.overflow, s.cold), (3, 1, 1));
    let l = pick(&mut b, now, &hot);
    assert_eq!(l.backend(), y, "re-pointed to where it was served");
    held.push(l);
    for l in held {
        b.release(now, l, Outcome::Response(200));
    }

    // At its cap, the holder overflows even when the others are as loaded as allowed.
    let cfg = AffinityConfig {
        overflow_percent: 1000,
        ..AffinityConfig::default()
    };
    let (mut b, now, _) = pool(2, 2, cfg);
    let x = serve(&mut b, now, &hot);
    let a = pick(&mut b, now, &hot);
    let c = pick(&mut b, now, &hot);
    assert_eq!(
        (a.backend(), c.backend()),
        (x, x),
        "1000 % never overflows on load"
    );
    let d = pick(&mut b, now, &hot);
    assert_ne!(d.backend(), x, "full: overflow");
    assert_eq!(stats(&b).overflow, 1);
    for l in [a, c, d] {
        b.release(now, l, Outcome::Response(200));
    }
}

#[test]
fn ttl_is_sliding() {
    let cfg = AffinityConfig {
        ttl: 10 * SEC,
        ..AffinityConfig::default()
    };
    let (mut b, t0, _) = pool(3, 10, cfg);
    let key = chain(&[1, 2]);
    let x = serve(&mut b, t0, &key);
    // Used again at 9 s: the entry now lives until 19 s.
    assert_eq!(serve(&mut b, t0 + 9 * SEC, &key), x);
    let warm = stats(&b).warm;
    assert_eq!(serve(&mut b, t0 + 18 * SEC, &key), x);
    assert_eq!(stats(&b).warm, warm + 1);
    // 10 s idle: forgotten (cold), whichever backend least-conn picks.
    serve(&mut b, t0 + 28 * SEC, &key);
    assert_eq!(stats(&b).warm, warm + 1);
    assert_eq!(stats(&b).cold, 2);
    // The sweep reclaims expired entries.
    assert!(stats(&b).keys >= 2);
    b.handle_timeout(t0 + 60 * SEC);
    assert_eq!(stats(&b).keys, 0);
}

/// Drives probes at `now` with the given result for `target` (others pass).
fn probe_round(b: &mut Balancer, now: Instant, target: BackendId, status: u16) {
    b.handle_timeout(now);
    while let Some(Action::StartProbe { probe, .. }) = b.poll_action() {
        let s = if probe.backend() == target {
            status
        } else {
            200
        };
        b.probe_result(now, probe, ProbeOutcome::Status(s));
    }
    while b.poll_event().is_some() {}
}

#[test]
fn an_ejected_backend_loses_all_its_entries_at_once() {
    let (mut b, t0, _) = pool(3, 10, AffinityConfig::default());
    let first = b.backends().next().unwrap().id;
    probe_round(&mut b, t0, first, 200);
    let keys: Vec<RequestKey> = (0..30u64).map(|i| chain(&[i, 1000 + i])).collect();
    let homes: Vec<BackendId> = keys.iter().map(|k| serve(&mut b, t0, k)).collect();
    let victim = homes[0];
    let on_victim = homes.iter().filter(|&&h| h == victim).count();
    assert!(on_victim >= 5);
    assert_eq!(stats(&b).keys, 60);
    // Eject the victim (one failed probe), then bring it back (two passes).
    let interval = b.config().health.interval;
    let mut now = t0 + interval;
    probe_round(&mut b, now, victim, 500);
    assert!(!b.backend(victim).unwrap().healthy);
    assert_eq!(b.backend(victim).unwrap().epoch, 1);
    assert_eq!(
        stats(&b).keys,
        60,
        "dead at once, reclaimed at the next sweep"
    );
    b.handle_timeout(now);
    assert_eq!(
        stats(&b).keys,
        60 - 2 * on_victim,
        "the sweep reclaimed its entries"
    );
    for _ in 0..2 {
        now += interval;
        probe_round(&mut b, now, victim, 200);
    }
    assert!(b.backend(victim).unwrap().healthy);
    let before = stats(&b);
    for (k, &home) in keys.iter().zip(&homes) {
        let l = pick(&mut b, now, k);
        if home != victim {
            assert_eq!(l.backend(), home, "other backends keep their prefixes");
        }
        b.release(now, l, Outcome::Response(200));
    }
    let after = stats(&b);
    assert_eq!(after.cold - before.cold, on_victim as u64);
    assert_eq!(after.warm - before.warm, (30 - on_victim) as u64);
}

#[test]
fn draining_and_removed_backends_are_not_warm_targets() {
    let (mut b, now, ids) = pool(2, 10, AffinityConfig::default());
    let key = chain(&[5]);
    let x = serve(&mut b, now, &key);
    b.drain_backend(now, x);
    let y = serve(&mut b, now, &key);
    assert_ne!(y, x);
    assert_eq!(stats(&b).cold, 2);
    assert_eq!(serve(&mut b, now, &key), y);
    // A new backend reusing a removed one's slot does not inherit its entries.
    assert!(b.backend(x).is_none(), "drained and idle: removed");
    b.remove_backend(now, y);
    let z = b
        .add_backend(
            now,
            BackendSpec {
                max_conns: 10,
                ..BackendSpec::new("http://z")
            },
        )
        .unwrap();
    assert_eq!(z.slot(), y.slot(), "the slot is reused");
    assert!(ids.contains(&y));
    let cold = stats(&b).cold;
    assert_eq!(serve(&mut b, now, &key), z);
    assert_eq!(stats(&b).cold, cold + 1);
}

#[test]
fn a_million_distinct_prefixes_stay_within_the_bound() {
    // 4 backends × max_conns 2 × 8 entries per connection: 64 entries at most.
    let cfg = AffinityConfig {
        entries_per_conn: 8,
        ..AffinityConfig::default()
    };
    let (mut b, now, _) = pool(4, 2, cfg);
    let bound = 4 * 2 * 8;
    let mut key = RequestKey::Prefix(vec![0]);
    for i in 0..1_000_000u64 {
        if let RequestKey::Prefix(c) = &mut key {
            c[0] = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        let l = pick(&mut b, now, &key);
        b.release(now, l, Outcome::Response(200));
        if i % 4096 == 0 {
            assert!(stats(&b).keys <= bound, "{} keys at {i}", stats(&b).keys);
        }
    }
    let s = stats(&b);
    assert!(s.keys <= bound);
    assert_eq!(s.requests, 1_000_000);
    // Long chains too: each request brings 256 new units.
    let mut chain_units: Vec<u64> = (0..256).collect();
    for i in 0..2000u64 {
        for u in chain_units.iter_mut() {
            *u = u.wrapping_add(i << 20);
        }
        let key = RequestKey::Prefix(chain_units.clone());
        let l = pick(&mut b, now, &key);
        b.release(now, l, Outcome::Response(200));
        assert!(stats(&b).keys <= bound);
    }
}

#[test]
fn users_are_one_prefix_each() {
    let (mut b, now, _) = pool(4, 10, AffinityConfig::default());
    let alice =
        RequestKey::from_body(br#"{"user":"alice","messages":[{"role":"user","content":"a"}]}"#);
    let again =
        RequestKey::from_body(br#"{"user":"alice","messages":[{"role":"user","content":"b"}]}"#);
    assert_eq!(alice, again);
    let x = serve(&mut b, now, &alice);
    for _ in 0..5 {
        assert_eq!(serve(&mut b, now, &again), x);
    }
}

#[test]
fn chat_sessions_stick_to_their_backend() {
    let (mut b, now, _) = pool(4, 10, AffinityConfig::default());
    let mut homes = Vec::new();
    for s in 0..8 {
        let mut messages =
            vec![r#"{"role":"system","content":"You are a helpful assistant."}"#.to_string()];
        let mut home = None;
        for turn in 0..5 {
            messages.push(format!(
                r#"{{"role":"user","content":"session {s} turn {turn}"}}"#
            ));
            let body = format!(r#"{{"model":"m","messages":[{}]}}"#, messages.join(","));
            let key = RequestKey::from_body(body.as_bytes());
            let got = serve(&mut b, now, &key);
            assert!(
                home.is_none_or(|h| h == got),
                "session {s} moved at turn {turn}"
            );
            home = Some(got);
            messages.push(format!(
                r#"{{"role":"assistant","content":"answer {turn}"}}"#
            ));
        }
        homes.push(home.unwrap());
    }
    let s = stats(&b);
    assert_eq!(s.requests, 40);
    assert_eq!(
        s.cold, 1,
        "only the very first request is cold: the system prompt is shared"
    );
}

#[test]
fn status_reports_carry_interval_counters() {
    let now = Instant::now();
    let cfg = Config {
        policy: Policy::CacheAware,
        status_interval: Some(SEC),
        ..Config::default()
    };
    let mut b = Balancer::new(cfg, SmallRng::seed_from_u64(1), now);
    b.add_backend(
        now,
        BackendSpec {
            max_conns: 4,
            ..BackendSpec::new("http://a")
        },
    )
    .unwrap();
    for i in 0..10u64 {
        serve(&mut b, now, &chain(&[i % 4]));
    }
    b.handle_timeout(now + SEC);
    while b.poll_action().is_some() {}
    let report = std::iter::from_fn(|| b.poll_event())
        .find_map(|e| match e {
            Event::Status(r) => Some(r),
            _ => None,
        })
        .expect("a status report");
    let r = report.routing.expect("routing counters");
    assert_eq!(
        (r.requests, r.warm, r.cold, r.overflow, r.keys),
        (10, 6, 4, 0, 4)
    );
    assert_eq!(r.to_string(), "warm 60% cold 40% ovfl 0% (10 reqs, 4 keys)");
    assert!(report.queue.is_none(), "queue off");
    serve(&mut b, now + SEC, &chain(&[0]));
    b.handle_timeout(now + 2 * SEC);
    let r = std::iter::from_fn(|| b.poll_event())
        .find_map(|e| match e {
            Event::Status(r) => r.routing,
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (r.requests, r.warm),
        (1, 1),
        "counts since the previous report"
    );

    // Other policies report no routing counters.
    let mut plain = Balancer::new(Config::default(), SmallRng::seed_from_u64(1), now);
    assert!(plain.routing_stats().is_none());
    plain.handle_timeout(now);
}

#[test]
fn validate_wants_a_connection_limit() {
    let capped = BackendSpec {
        max_conns: 8,
        ..BackendSpec::new("http://a")
    };
    let uncapped = BackendSpec::new("http://b");
    let cfg = config(AffinityConfig::default());
    assert!(cfg.validate(std::slice::from_ref(&capped)).is_ok());
    let err = cfg
        .validate(&[capped.clone(), uncapped.clone()])
        .unwrap_err();
    assert!(err.to_string().contains("--max-conns"), "{err}");
    assert!(Config::default()
        .validate(std::slice::from_ref(&uncapped))
        .is_ok());
    let mut bad = cfg.clone();
    bad.affinity.entries_per_conn = 0;
    assert!(bad.validate(std::slice::from_ref(&capped)).is_err());
    let mut bad = Config::default();
    bad.queue.timeout = Some(SEC);
    bad.queue.size = 0;
    assert!(bad.validate(&[]).is_err());

    // Skipping validation is still safe: an uncapped backend counts as UNCAPPED_CONNS.
    let now = Instant::now();
    let mut b = Balancer::new(cfg, SmallRng::seed_from_u64(1), now);
    b.add_backend(now, uncapped).unwrap();
    let key = chain(&[1]);
    let held: Vec<Lease> = (0..UNCAPPED_CONNS + 5)
        .map(|_| pick(&mut b, now, &key))
        .collect();
    assert_eq!(stats(&b).warm, u64::from(UNCAPPED_CONNS) + 4);
    for l in held {
        b.release(now, l, Outcome::Cancelled);
    }
}
