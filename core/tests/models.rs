//! Model pools: a request naming a model goes only to backends that serve it
//! ([`Balancer::set_models`]); a backend without a list serves every model; a model no
//! backend serves goes anywhere, or is refused under `strict_models`.

use std::time::{Duration, Instant};

use lb_core::{
    Action, Admission, BackendId, BackendSpec, Balancer, Config, Lease, Outcome, OwnedMeta, Policy,
    ProbeOutcome, QueueConfig, Reject, RequestKey, RequestMeta,
};
use proptest::prelude::*;
use rand::{rngs::SmallRng, SeedableRng};

fn balancer(
    policy: Policy,
    strict: bool,
    caps: &[u32],
    now: Instant,
) -> (Balancer, Vec<BackendId>) {
    let config = Config {
        policy,
        status_interval: None,
        strict_models: strict,
        queue: QueueConfig {
            timeout: Some(Duration::from_secs(10)),
            size: 16,
        },
        ..Config::default()
    };
    let mut b = Balancer::new(config, SmallRng::seed_from_u64(5), now);
    let ids = caps
        .iter()
        .enumerate()
        .map(|(i, &max_conns)| {
            let spec = BackendSpec {
                max_conns,
                ..BackendSpec::new(format!("http://10.9.0.{i}:8000"))
            };
            b.add_backend(now, spec).unwrap()
        })
        .collect();
    b.handle_timeout(now);
    while let Some(Action::StartProbe { probe, .. }) = b.poll_action() {
        b.probe_result(now, probe, ProbeOutcome::Status(200));
    }
    (b, ids)
}

fn list(models: &[&str]) -> Option<Vec<String>> {
    Some(models.iter().map(|m| m.to_string()).collect())
}

fn pick(b: &mut Balancer, now: Instant, model: &str) -> Result<BackendId, Reject> {
    let l = b.select(now, &RequestMeta::default().with_model(model))?;
    let id = l.backend();
    b.release(now, l, Outcome::Response(200));
    Ok(id)
}

#[test]
fn requests_go_to_the_backends_that_serve_their_model() {
    let now = Instant::now();
    for policy in Policy::ALL {
        let (mut b, ids) = balancer(policy, false, &[4, 4, 4, 4], now);
        b.set_models(now, ids[0], list(&["llama", "qwen"]));
        b.set_models(now, ids[1], list(&["llama"]));
        b.set_models(now, ids[2], list(&["mistral"]));
        // ids[3] has no list: it serves every model.
        for _ in 0..20 {
            let at = pick(&mut b, now, "llama").unwrap();
            assert!([ids[0], ids[1], ids[3]].contains(&at), "{policy}: {at}");
            let at = pick(&mut b, now, "mistral").unwrap();
            assert!([ids[2], ids[3]].contains(&at), "{policy}: {at}");
            // Listed by none: anywhere, as if it named no model.
            assert!(pick(&mut b, now, "phi").is_ok(), "{policy}");
        }
        // A request with no model goes anywhere.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..64u8 {
            let ip = std::net::IpAddr::from([10, 0, 0, i]);
            let key = RequestKey::Prefix(vec![u64::from(i)]);
            let l = b
                .select(now, &RequestMeta::from_ip(ip).with_affinity(&key))
                .unwrap();
            seen.insert(l.backend());
            b.release(now, l, Outcome::Response(200));
        }
        assert!(seen.len() > 1, "{policy}");
    }
}

#[test]
fn a_model_nobody_serves_goes_anywhere_or_is_refused_when_strict() {
    let now = Instant::now();
    for strict in [false, true] {
        let (mut b, ids) = balancer(Policy::RoundRobin, strict, &[0, 0], now);
        b.set_models(now, ids[0], list(&["a"]));
        b.set_models(now, ids[1], list(&["b"]));
        if strict {
            assert_eq!(pick(&mut b, now, "c"), Err(Reject::UnknownModel));
        } else {
            let picks: Vec<_> = (0..4).map(|_| pick(&mut b, now, "c").unwrap()).collect();
            assert!(picks.contains(&ids[0]) && picks.contains(&ids[1]));
        }
        // An empty list serves every model: strict sends an unlisted model there only.
        b.set_models(now, ids[1], Some(Vec::new()));
        assert!(b.backend(ids[1]).unwrap().models.is_none());
        if strict {
            for _ in 0..4 {
                assert_eq!(pick(&mut b, now, "c"), Ok(ids[1]));
            }
        }
        // A listed model goes to its lister and to the backend without a list.
        let picks: Vec<_> = (0..4).map(|_| pick(&mut b, now, "a").unwrap()).collect();
        assert!(picks.contains(&ids[0]) && picks.contains(&ids[1]));
        // No list anywhere: no model is unknown, strict or not.
        b.set_models(now, ids[0], None);
        assert!(pick(&mut b, now, "c").is_ok());
    }
}

#[test]
fn a_pool_down_is_503_and_a_pool_full_is_429() {
    let now = Instant::now();
    let (mut b, ids) = balancer(Policy::LeastConn, true, &[1, 1], now);
    b.set_models(now, ids[0], list(&["a"]));
    b.set_models(now, ids[1], list(&["b"]));
    let held = b
        .select(now, &RequestMeta::default().with_model("a"))
        .unwrap();
    assert_eq!(held.backend(), ids[0]);
    // a's pool is full though b's has room.
    assert_eq!(pick(&mut b, now, "a"), Err(Reject::AllAtCapacity));
    assert_eq!(pick(&mut b, now, "b"), Ok(ids[1]));
    b.release(now, held, Outcome::Response(200));
    // a's only backend fails its probe: a is down (503), b still serves.
    let at = b.poll_timeout().unwrap();
    b.handle_timeout(at);
    while let Some(Action::StartProbe { probe, .. }) = b.poll_action() {
        let status = if probe.backend() == ids[0] { 503 } else { 200 };
        b.probe_result(at, probe, ProbeOutcome::Status(status));
    }
    assert_eq!(pick(&mut b, at, "a"), Err(Reject::NoHealthyBackend));
    assert_eq!(pick(&mut b, at, "b"), Ok(ids[1]));
}

/// A waiter for a full model pool does not hold up a waiter for another pool.
#[test]
fn queued_requests_of_one_model_do_not_block_another() {
    let now = Instant::now();
    let (mut b, ids) = balancer(Policy::LeastConn, false, &[1, 1], now);
    b.set_models(now, ids[0], list(&["a"]));
    b.set_models(now, ids[1], list(&["b"]));
    let la = b
        .select(now, &RequestMeta::default().with_model("a"))
        .unwrap();
    let lb = b
        .select(now, &RequestMeta::default().with_model("b"))
        .unwrap();
    let meta = |m: &str| OwnedMeta {
        model: Some(m.into()),
        ..OwnedMeta::default()
    };
    let ta = b.enqueue(now, meta("a")).unwrap();
    let tb = b.enqueue(now, meta("b")).unwrap();
    // b's backend frees first: the b waiter gets it though the a waiter is older.
    b.release(now, lb, Outcome::Response(200));
    let admitted: Vec<Lease> = std::iter::from_fn(|| b.poll_admission())
        .map(|a| match a {
            Admission::Admitted(t, l) => {
                assert_eq!(t, tb);
                assert_eq!(l.backend(), ids[1]);
                l
            }
            Admission::Expired(t) => panic!("{t:?} expired"),
        })
        .collect();
    assert_eq!(admitted.len(), 1);
    assert_eq!(b.queued(), 1);
    b.release(now, la, Outcome::Response(200));
    let Some(Admission::Admitted(t, l)) = b.poll_admission() else {
        panic!("the a waiter gets a's backend");
    };
    assert_eq!((t, l.backend()), (ta, ids[0]));
    for l in admitted.into_iter().chain([l]) {
        b.release(now, l, Outcome::Response(200));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Against a reference: with random lists (some missing, some empty) over a few
    /// model names, caps and loads, a model some backend lists goes to a lister or a
    /// backend without a list; a model nobody lists goes anywhere, or when strict to a
    /// backend without a list, and with none of those is refused as unknown; a refusal
    /// for capacity happens only when no eligible backend has room.
    #[test]
    fn picks_stay_in_the_model_pool(
        policy_i in 0usize..Policy::ALL.len(),
        strict in any::<bool>(),
        backends in prop::collection::vec((0u32..=3, prop::option::of(prop::collection::vec(0u8..4, 0..3))), 1..6),
        requests in prop::collection::vec((0u8..5, any::<bool>()), 1..60),
    ) {
        let now = Instant::now();
        let policy = Policy::ALL[policy_i];
        let caps: Vec<u32> = backends.iter().map(|(c, _)| *c).collect();
        let (mut b, ids) = balancer(policy, strict, &caps, now);
        let name = |m: u8| format!("m{m}");
        for (id, (_, models)) in ids.iter().zip(&backends) {
            b.set_models(now, *id, models.as_ref().map(|l| l.iter().map(|&m| name(m)).collect()));
        }
        // What the reference says: a backend lists a model, or has no list.
        let listless = |i: usize| backends[i].1.as_ref().is_none_or(Vec::is_empty);
        let lists = |i: usize, m: &str| {
            backends[i].1.as_ref().is_some_and(|l| l.iter().any(|&x| name(x) == m))
        };
        let mut held: Vec<Lease> = Vec::new();
        let mut failure = None;
        for (m, keep) in requests {
            let model = name(m);
            let views: Vec<_> = ids.iter().map(|&id| b.backend(id).unwrap()).collect();
            let room = |i: usize| views[i].max_conns == 0 || views[i].in_flight < views[i].max_conns;
            let all: Vec<usize> = (0..ids.len()).collect();
            let pool: Vec<usize> = if all.iter().any(|&i| lists(i, &model)) {
                all.iter().copied().filter(|&i| lists(i, &model) || listless(i)).collect()
            } else if strict {
                all.iter().copied().filter(|&i| listless(i)).collect()
            } else {
                all.clone()
            };
            let eligible = pool.clone();
            match b.select(now, &RequestMeta::default().with_model(&model)) {
                Ok(l) => {
                    let i = ids.iter().position(|&id| id == l.backend()).unwrap();
                    held.push(l);
                    if !eligible.contains(&i) || !room(i) {
                        failure = Some(format!("{policy}: {model} went to backend {i} (pool {pool:?})"));
                        break;
                    }
                }
                Err(Reject::UnknownModel) => {
                    if !(strict && pool.is_empty()) {
                        failure = Some(format!("{policy}: {model} refused as unknown (pool {pool:?})"));
                        break;
                    }
                }
                Err(r) => {
                    if pool.is_empty() || eligible.iter().any(|&i| room(i)) {
                        failure = Some(format!("{policy}: {model} refused ({r:?}) with room in {eligible:?}"));
                        break;
                    }
                }
            }
            if !keep {
                if let Some(l) = held.pop() {
                    b.release(now, l, Outcome::Response(200));
                }
            }
        }
        for l in held {
            b.release(now, l, Outcome::Cancelled);
        }
        prop_assert!(failure.is_none(), "{}", failure.unwrap_or_default());
    }
}
