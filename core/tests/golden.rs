//! Golden sequences: exact picks that must never change by accident.

use std::time::Instant;

use lb_core::{BackendId, BackendSpec, Balancer, Config, Lease, Outcome, Policy, RequestMeta};
use rand::{rngs::SmallRng, SeedableRng};

fn balancer(policy: Policy, backends: &[(&str, u32)]) -> (Balancer, Instant, Vec<BackendId>) {
    let now = Instant::now();
    let config = Config {
        policy,
        ..Config::default()
    };
    let mut bal = Balancer::new(config, SmallRng::seed_from_u64(42), now);
    let ids = backends
        .iter()
        .map(|&(url, weight)| {
            let spec = BackendSpec {
                weight,
                ..BackendSpec::new(url)
            };
            bal.add_backend(now, spec).unwrap()
        })
        .collect();
    (bal, now, ids)
}

/// The names of `n` picks; leases are released at once, or held until the end.
fn picks(bal: &mut Balancer, now: Instant, ids: &[BackendId], n: usize, hold: bool) -> String {
    let names = ["a", "b", "c", "d", "e"];
    let mut out = Vec::new();
    let mut held: Vec<Lease> = Vec::new();
    for _ in 0..n {
        let lease = bal.select(now, &RequestMeta::default()).unwrap();
        let i = ids.iter().position(|&id| id == lease.backend()).unwrap();
        out.push(names[i]);
        if hold {
            held.push(lease);
        } else {
            bal.release(now, lease, Outcome::Response(200));
        }
    }
    for l in held {
        bal.release(now, l, Outcome::Response(200));
    }
    assert_eq!(bal.outstanding(), 0);
    out.join(" ")
}

#[test]
fn smooth_wrr_5_1_1() {
    for hold in [false, true] {
        let (mut bal, now, ids) = balancer(
            Policy::WeightedRoundRobin,
            &[("http://a", 5), ("http://b", 1), ("http://c", 1)],
        );
        let period = "a a b a c a a";
        let want = [period; 4].join(" ");
        assert_eq!(picks(&mut bal, now, &ids, 28, hold), want, "hold: {hold}");
    }
}

#[test]
fn smooth_wrr_scaled_weights_give_the_same_sequence() {
    let (mut bal, now, ids) = balancer(
        Policy::WeightedRoundRobin,
        &[("http://a", 500), ("http://b", 100), ("http://c", 100)],
    );
    assert_eq!(
        picks(&mut bal, now, &ids, 14, false),
        "a a b a c a a a a b a c a a"
    );
}

#[test]
fn round_robin_a_b_c() {
    for hold in [false, true] {
        let (mut bal, now, ids) = balancer(
            Policy::RoundRobin,
            &[("http://a", 1), ("http://b", 1), ("http://c", 1)],
        );
        assert_eq!(
            picks(&mut bal, now, &ids, 9, hold),
            "a b c a b c a b c",
            "hold: {hold}"
        );
    }
}

#[test]
fn round_robin_ignores_weights() {
    let (mut bal, now, ids) = balancer(
        Policy::RoundRobin,
        &[("http://a", 5), ("http://b", 1), ("http://c", 1)],
    );
    assert_eq!(picks(&mut bal, now, &ids, 6, false), "a b c a b c");
}

/// nginx's smooth WRR, as published.
fn nginx_swrr(weights: &[u32], picks: usize) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    (0..picks)
        .map(|_| {
            let mut best = 0;
            for (i, &w) in weights.iter().enumerate() {
                current[i] += i64::from(w);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            best
        })
        .collect()
}

/// A pool too large for the precomputed schedule (sum of weights × backends above
/// 2^24) runs nginx's algorithm live: it must give the same sequence.
#[test]
fn smooth_wrr_live_path_is_nginx() {
    // 200 backends with weights 1..=1000 whose gcd is 1: ~10^5 × 200 steps > 2^24.
    let weights: Vec<u32> = (0..200u32).map(|i| 1 + (i * 7919 + 13) % 1000).collect();
    let sum: usize = weights.iter().map(|&w| w as usize).sum();
    assert!(sum * weights.len() > 1 << 24);
    let now = Instant::now();
    let config = Config {
        policy: Policy::WeightedRoundRobin,
        ..Config::default()
    };
    let mut bal = Balancer::new(config, SmallRng::seed_from_u64(1), now);
    let ids: Vec<BackendId> = weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            let spec = BackendSpec {
                weight,
                ..BackendSpec::new(format!("http://b{i}"))
            };
            bal.add_backend(now, spec).unwrap()
        })
        .collect();
    let want = nginx_swrr(&weights, sum);
    let mut counts = vec![0u32; weights.len()];
    for (k, &w) in want.iter().enumerate() {
        let lease = bal.select(now, &RequestMeta::default()).unwrap();
        let got = lease.backend();
        bal.release(now, lease, Outcome::Response(200));
        assert_eq!(got, ids[w], "pick {k}");
        counts[w] += 1;
    }
    assert_eq!(counts, weights, "one period gives each backend its weight");
}

/// Rendezvous hashing is pinned: a change of hash moves every affinity key, so it must
/// be deliberate (and this test updated with it).
#[test]
fn ip_hash_is_pinned() {
    let backends = [
        ("http://10.0.0.1:8000", 1),
        ("http://10.0.0.2:8000", 1),
        ("http://10.0.0.3:8000", 1),
    ];
    let (mut bal, now, ids) = balancer(Policy::IpHash, &backends);
    let names = ["a", "b", "c"];
    let mut got = Vec::new();
    for k in 0..12 {
        let key = format!("user-{k}");
        let meta = RequestMeta::default().with_key(key.as_bytes());
        let lease = bal.select(now, &meta).unwrap();
        let i = ids.iter().position(|&id| id == lease.backend()).unwrap();
        bal.release(now, lease, Outcome::Response(200));
        got.push(names[i]);
    }
    assert_eq!(got.join(" "), PINNED_UNIFORM);

    let weighted = [
        ("http://10.0.0.1:8000", 1),
        ("http://10.0.0.2:8000", 2),
        ("http://10.0.0.3:8000", 3),
    ];
    let (mut bal, now, ids) = balancer(Policy::IpHash, &weighted);
    let mut got = Vec::new();
    for k in 0..12 {
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 1, k));
        let lease = bal.select(now, &RequestMeta::from_ip(ip)).unwrap();
        let i = ids.iter().position(|&id| id == lease.backend()).unwrap();
        bal.release(now, lease, Outcome::Response(200));
        got.push(names[i]);
    }
    assert_eq!(got.join(" "), PINNED_WEIGHTED);
}

const PINNED_UNIFORM: &str = "c a c c c a c b c c b a";
const PINNED_WEIGHTED: &str = "c a b c c b b c c c b c";
