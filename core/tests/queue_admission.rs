//! The admission queue: FIFO hand-off of freed slots, deadlines, bounds and cancellation.

use std::time::{Duration, Instant};

use lb_core::{
    Admission, BackendId, BackendSpec, Balancer, Config, Event, Lease, Outcome, OwnedMeta, Policy,
    QueueConfig, Reject, RequestKey, RequestMeta, Ticket,
};
use rand::rngs::SmallRng;
use rand::SeedableRng;

const MS: Duration = Duration::from_millis(1);

fn balancer(policy: Policy, queue: QueueConfig) -> (Balancer, Instant) {
    let now = Instant::now();
    let config = Config {
        policy,
        status_interval: None,
        queue,
        ..Config::default()
    };
    (Balancer::new(config, SmallRng::seed_from_u64(9), now), now)
}

fn queue(timeout_ms: u64, size: usize) -> QueueConfig {
    QueueConfig {
        timeout: Some(Duration::from_millis(timeout_ms)),
        size,
    }
}

fn capped(url: &str, max_conns: u32) -> BackendSpec {
    BackendSpec {
        max_conns,
        ..BackendSpec::new(url)
    }
}

fn select(b: &mut Balancer, now: Instant) -> Result<Lease, Reject> {
    b.select(now, &RequestMeta::default())
}

fn enqueue(b: &mut Balancer, now: Instant) -> Result<Ticket, Reject> {
    b.enqueue(now, OwnedMeta::default())
}

fn admitted(b: &mut Balancer) -> (Ticket, Lease) {
    match b.poll_admission() {
        Some(Admission::Admitted(t, l)) => (t, l),
        other => panic!("expected an admission, got {other:?}"),
    }
}

#[test]
fn off_by_default_full_means_429_at_once() {
    let (mut b, now) = balancer(Policy::LeastConn, QueueConfig::default());
    b.add_backend(now, capped("http://a", 1)).unwrap();
    let l = select(&mut b, now).unwrap();
    assert_eq!(select(&mut b, now), Err(Reject::AllAtCapacity));
    assert_eq!(enqueue(&mut b, now), Err(Reject::AllAtCapacity));
    assert_eq!(b.queued(), 0);
    assert!(b.queue_stats().is_none());
    b.release(now, l, Outcome::Response(200));
    assert!(b.poll_admission().is_none());
}

#[test]
fn freed_slots_go_to_waiters_in_order() {
    let (mut b, now) = balancer(Policy::RoundRobin, queue(1000, 8));
    let a = b.add_backend(now, capped("http://a", 1)).unwrap();
    let l0 = select(&mut b, now).unwrap();
    let t1 = enqueue(&mut b, now).unwrap();
    let t2 = enqueue(&mut b, now + MS).unwrap();
    assert!(t1 < t2);
    assert_eq!(b.queued(), 2);
    assert!(b.poll_admission().is_none(), "nothing free yet");
    assert_eq!(
        select(&mut b, now),
        Err(Reject::AllAtCapacity),
        "no overtaking"
    );
    b.release(now + 2 * MS, l0, Outcome::Response(200));
    let (t, l1) = admitted(&mut b);
    assert_eq!(t, t1);
    assert_eq!(l1.backend(), a);
    assert!(b.poll_admission().is_none());
    assert_eq!(
        b.backend(a).unwrap().in_flight,
        1,
        "the slot went straight to t1"
    );
    b.release(now + 3 * MS, l1, Outcome::Response(200));
    let (t, l2) = admitted(&mut b);
    assert_eq!(t, t2);
    b.release(now + 4 * MS, l2, Outcome::Response(200));
    assert!(b.poll_admission().is_none());
    assert_eq!(b.outstanding(), 0);
    let s = b.queue_stats().unwrap();
    assert_eq!((s.waiting, s.enqueued, s.admitted, s.expired), (0, 2, 2, 0));
}

#[test]
fn waiters_expire_at_their_deadline() {
    let (mut b, t0) = balancer(Policy::LeastConn, queue(100, 8));
    b.add_backend(t0, capped("http://a", 1)).unwrap();
    b.handle_timeout(t0); // first probe sweep
    while b.poll_action().is_some() {}
    let l = select(&mut b, t0).unwrap();
    let t1 = enqueue(&mut b, t0).unwrap();
    let t2 = enqueue(&mut b, t0 + 30 * MS).unwrap();
    assert_eq!(
        b.poll_timeout(),
        Some(t0 + 100 * MS),
        "the first deadline is due first"
    );
    b.handle_timeout(t0 + 100 * MS);
    assert_eq!(b.poll_admission(), Some(Admission::Expired(t1)));
    assert!(b.poll_admission().is_none());
    assert_eq!(b.poll_timeout(), Some(t0 + 130 * MS));
    b.handle_timeout(t0 + 200 * MS);
    assert_eq!(b.poll_admission(), Some(Admission::Expired(t2)));
    assert!(b.poll_timeout().unwrap() > t0 + 200 * MS, "no busy loop");
    // A release after the deadline, before handle_timeout, does not admit a late waiter.
    let t3 = enqueue(&mut b, t0 + 300 * MS).unwrap();
    b.release(t0 + 400 * MS, l, Outcome::Response(200));
    assert_eq!(b.poll_admission(), Some(Admission::Expired(t3)));
    assert_eq!(b.queue_stats().unwrap().expired, 3);
}

#[test]
fn a_full_queue_refuses_and_a_cancel_frees_a_place() {
    let (mut b, now) = balancer(Policy::LeastConn, queue(1000, 2));
    b.add_backend(now, capped("http://a", 1)).unwrap();
    let l = select(&mut b, now).unwrap();
    let t1 = enqueue(&mut b, now).unwrap();
    let t2 = enqueue(&mut b, now).unwrap();
    assert_eq!(enqueue(&mut b, now), Err(Reject::AllAtCapacity));
    assert!(b.cancel(now, t1));
    assert!(!b.cancel(now, t1), "only once");
    let t3 = enqueue(&mut b, now).unwrap();
    b.release(now, l, Outcome::Response(200));
    let (t, l) = admitted(&mut b);
    assert_eq!(t, t2, "the cancelled waiter is skipped");
    b.release(now, l, Outcome::Response(200));
    let (t, l) = admitted(&mut b);
    assert_eq!(t, t3);
    b.release(now, l, Outcome::Response(200));
    let s = b.queue_stats().unwrap();
    assert_eq!((s.full, s.cancelled, s.admitted), (1, 1, 2));
}

#[test]
fn cancelling_an_unpolled_admission_gives_its_slot_on() {
    let (mut b, now) = balancer(Policy::LeastConn, queue(1000, 8));
    let a = b.add_backend(now, capped("http://a", 1)).unwrap();
    let l = select(&mut b, now).unwrap();
    let t1 = enqueue(&mut b, now).unwrap();
    let t2 = enqueue(&mut b, now).unwrap();
    b.release(now, l, Outcome::Response(200));
    // t1 was admitted, but its client left before the adapter polled.
    assert!(b.cancel(now, t1));
    let (t, l) = admitted(&mut b);
    assert_eq!(t, t2, "t1's admission is withdrawn, its slot went to t2");
    assert_eq!(b.backend(a).unwrap().in_flight, 1);
    assert_eq!(b.outstanding(), 1);
    b.release(now, l, Outcome::Response(200));
    assert!(
        !b.cancel(now, t2),
        "already polled: the adapter owns the lease"
    );

    // An expiry not yet polled is withdrawn too.
    let l = select(&mut b, now).unwrap();
    let t3 = enqueue(&mut b, now).unwrap();
    b.handle_timeout(now + Duration::from_secs(2));
    while b.poll_action().is_some() {}
    assert!(b.cancel(now + Duration::from_secs(2), t3));
    assert!(b.poll_admission().is_none());
    let s = b.queue_stats().unwrap();
    assert_eq!(
        (s.enqueued, s.admitted, s.expired, s.cancelled),
        (3, 1, 0, 2)
    );
    b.release(now, l, Outcome::Response(200));
}

#[test]
fn capacity_that_appears_admits_waiters() {
    let (mut b, now) = balancer(Policy::P2c, queue(1000, 8));
    b.add_backend(now, capped("http://a", 1)).unwrap();
    let l = select(&mut b, now).unwrap();
    let t1 = enqueue(&mut b, now).unwrap();
    let c = b.add_backend(now, capped("http://c", 1)).unwrap();
    let (t, l1) = admitted(&mut b);
    assert_eq!((t, l1.backend()), (t1, c));
    // Free room at enqueue time (e.g. a slot freed between select and enqueue): at once.
    b.release(now, l, Outcome::Response(200));
    let t2 = enqueue(&mut b, now).unwrap();
    let (t, l2) = admitted(&mut b);
    assert_eq!(t, t2);
    for l in [l1, l2] {
        b.release(now, l, Outcome::Response(200));
    }
}

#[test]
fn no_healthy_backend_is_503_not_a_wait() {
    let (mut b, now) = balancer(Policy::LeastConn, queue(1000, 8));
    assert_eq!(enqueue(&mut b, now), Err(Reject::NoHealthyBackend));
}

#[test]
fn queued_requests_keep_their_routing_key() {
    // Consistent hashing: a waiter is admitted to its key's backend when that one frees.
    let (mut b, now) = balancer(Policy::ConsistentHash, queue(1000, 8));
    let ids: Vec<BackendId> = ["http://a", "http://b"]
        .iter()
        .map(|u| b.add_backend(now, capped(u, 1)).unwrap())
        .collect();
    let home = |b: &mut Balancer, k: &[u8]| {
        let l = b.select(now, &RequestMeta::default().with_key(k)).unwrap();
        let id = l.backend();
        b.release(now, l, Outcome::Response(200));
        id
    };
    let k1 = b"k1".as_slice();
    let h1 = home(&mut b, k1);
    let k2 = (0..50u8)
        .map(|i| vec![i])
        .find(|k| home(&mut b, k) != h1)
        .expect("some key lives on the other backend");
    let h2 = home(&mut b, &k2);
    assert!(ids.contains(&h1) && ids.contains(&h2) && h1 != h2);
    let l1 = b.select(now, &RequestMeta::default().with_key(k1)).unwrap();
    let l2 = b
        .select(now, &RequestMeta::default().with_key(&k2))
        .unwrap();
    let meta = OwnedMeta::from(RequestMeta::default().with_key(k1));
    let t = b.enqueue(now, meta).unwrap();
    b.release(now, l2, Outcome::Response(200)); // h2 frees first: the only free slot
    let (got, l) = admitted(&mut b);
    assert_eq!(
        (got, l.backend()),
        (t, h2),
        "load wins: the runner-up serves it"
    );
    for l in [l1, l] {
        b.release(now, l, Outcome::Response(200));
    }

    // Cache-aware: the chain travels with the waiter and is recorded on admission.
    let (mut b, now) = balancer(Policy::CacheAware, queue(1000, 8));
    b.add_backend(now, capped("http://a", 1)).unwrap();
    let key = RequestKey::Prefix(vec![1, 2, 3]);
    let l = b
        .select(now, &RequestMeta::default().with_affinity(&key))
        .unwrap();
    let meta = OwnedMeta {
        affinity: Some(key.clone()),
        ..OwnedMeta::default()
    };
    assert_eq!(meta.as_meta().affinity, Some(&key));
    b.enqueue(now, meta).unwrap();
    b.release(now, l, Outcome::Response(200));
    let (_, l) = admitted(&mut b);
    b.release(now, l, Outcome::Response(200));
    let s = b.routing_stats().unwrap();
    assert_eq!((s.requests, s.warm, s.cold), (2, 1, 1));
}

#[test]
fn status_reports_carry_queue_counters() {
    let now = Instant::now();
    let config = Config {
        status_interval: Some(Duration::from_secs(1)),
        queue: queue(10_000, 8),
        ..Config::default()
    };
    let mut b = Balancer::new(config, SmallRng::seed_from_u64(1), now);
    b.add_backend(now, capped("http://a", 1)).unwrap();
    let l = select(&mut b, now).unwrap();
    enqueue(&mut b, now).unwrap();
    enqueue(&mut b, now).unwrap();
    b.handle_timeout(now + Duration::from_secs(1));
    let q = std::iter::from_fn(|| b.poll_event())
        .find_map(|e| match e {
            Event::Status(r) => r.queue,
            _ => None,
        })
        .expect("queue counters");
    assert_eq!((q.waiting, q.enqueued, q.admitted), (2, 2, 0));
    assert_eq!(
        q.to_string(),
        "2 waiting (0 admitted, 0 expired, 0 full, 0 cancelled)"
    );
    b.release(now, l, Outcome::Response(200));
    let (_, l) = admitted(&mut b);
    b.release(now, l, Outcome::Response(200));
    let (_, l) = admitted(&mut b);
    b.release(now, l, Outcome::Response(200));
}

#[test]
fn dropping_the_balancer_with_pending_admissions_is_fine() {
    let (mut b, now) = balancer(Policy::LeastConn, queue(1000, 8));
    b.add_backend(now, capped("http://a", 1)).unwrap();
    let l = select(&mut b, now).unwrap();
    enqueue(&mut b, now).unwrap();
    b.release(now, l, Outcome::Response(200));
    drop(b); // an Admitted is pending: its lease dies with the balancer, no panic
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "dropped without Balancer::release")]
fn a_polled_admission_must_be_released() {
    let (mut b, now) = balancer(Policy::LeastConn, queue(1000, 8));
    b.add_backend(now, capped("http://a", 1)).unwrap();
    let l = select(&mut b, now).unwrap();
    enqueue(&mut b, now).unwrap();
    b.release(now, l, Outcome::Response(200));
    let _ = b.poll_admission();
}

#[test]
fn an_unclaimed_admission_passes_its_slot_to_the_next_waiter() {
    let (mut b, t0) = balancer(Policy::LeastConn, queue(1000, 8));
    let id = b.add_backend(t0, capped("http://a", 1)).unwrap();
    let busy = select(&mut b, t0).unwrap();
    let gone = enqueue(&mut b, t0).unwrap();
    let waiting = enqueue(&mut b, t0).unwrap();
    b.release(t0 + MS, busy, Outcome::Response(200));
    // The first waiter's request has gone: its admission is given back, its lease released,
    // and the second waiter is admitted and delivered in the same call.
    let mut delivered = Vec::new();
    b.deliver_admissions(t0 + MS, |adm| match adm {
        Admission::Admitted(t, _) if t == gone => Err(adm),
        Admission::Admitted(t, lease) => {
            delivered.push((t, lease));
            Ok(())
        }
        Admission::Expired(t) => panic!("{t} expired"),
    });
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].0, waiting);
    assert_eq!(b.poll_admission(), None);
    assert_eq!(
        b.backend(id).unwrap().in_flight,
        1,
        "only the delivered lease holds a slot"
    );
    assert_eq!(b.outstanding(), 1);
    let (_, lease) = delivered.pop().unwrap();
    b.release(t0 + MS, lease, Outcome::Response(200));
    assert_eq!(b.outstanding(), 0);
}
