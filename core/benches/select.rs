//! `cargo bench -p lb-core`: one select + release per iteration, per policy, at 3, 100
//! and 1000 backends (weights 1..=4, a few requests already in flight on each backend).
//!
//! Names are `select_release/<policy>/<backends>`. Round robin, smooth WRR, random and
//! p2c are O(1) per pick; least-conn and ip-hash scan the ready backends (O(n)).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lb_core::{BackendSpec, Balancer, Config, Lease, Outcome, Policy, RequestMeta};
use rand::{rngs::SmallRng, Rng, SeedableRng};

fn balancer(policy: Policy, n: usize) -> (Balancer, Instant, Vec<Lease>) {
    let now = Instant::now();
    let config = Config {
        policy,
        ..Config::default()
    };
    let mut bal = Balancer::new(config, SmallRng::seed_from_u64(1), now);
    for i in 0..n {
        let spec = BackendSpec {
            weight: (i % 4) as u32 + 1,
            ..BackendSpec::new(format!("http://10.{}.{}.1:8000", i / 256, i % 256))
        };
        bal.add_backend(now, spec).unwrap();
    }
    // Background load: about two requests in flight per backend, unevenly spread.
    let mut rng = SmallRng::seed_from_u64(2);
    let mut held = Vec::new();
    for _ in 0..2 * n {
        let ip = IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()));
        held.push(bal.select(now, &RequestMeta::from_ip(ip)).unwrap());
    }
    (bal, now, held)
}

fn select_release(c: &mut Criterion) {
    let mut group = c.benchmark_group("select_release");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    let ips: Vec<IpAddr> = (0..1024u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i.wrapping_mul(2_654_435_761))))
        .collect();
    for policy in Policy::ALL {
        for n in [3usize, 100, 1000] {
            let (mut bal, now, held) = balancer(policy, n);
            let mut k = 0usize;
            group.bench_function(BenchmarkId::new(policy.name(), n), |b| {
                b.iter(|| {
                    k = (k + 1) & 1023;
                    let meta = RequestMeta::from_ip(ips[k]);
                    let lease = bal.select(now, black_box(&meta)).unwrap();
                    bal.release(now, black_box(lease), Outcome::Response(200));
                })
            });
            for lease in held {
                bal.release(now, lease, Outcome::Response(200));
            }
        }
    }
    group.finish();
}

criterion_group!(benches, select_release);
criterion_main!(benches);
