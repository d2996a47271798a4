//! Property test of the admission queue against a FIFO model: each wait ends exactly
//! once, in order, never late; no slot stays free while someone waits; bounds hold.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use lb_core::{
    Action, Admission, BackendSpec, Balancer, Config, Lease, Outcome, Policy, ProbeOutcome,
    QueueConfig, Reject, RequestKey, RequestMeta, Ticket,
};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::SeedableRng;

#[derive(Clone, Debug)]
enum Op {
    /// A request arrives (with this cache-aware chain unit / hash key).
    Arrive(u8),
    Release(usize),
    /// The client of the waiter at this index (modulo) leaves.
    Cancel(usize),
    /// A client leaves after its wait has already ended (a stale ticket).
    CancelStale(usize),
    Advance(u16),
    Tick,
    AddBackend(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<u8>().prop_map(Op::Arrive),
        4 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => any::<usize>().prop_map(Op::CancelStale),
        2 => (1u16..300).prop_map(Op::Advance),
        1 => Just(Op::Tick),
        1 => (1u8..3).prop_map(Op::AddBackend),
    ]
}

struct Harness {
    bal: Balancer,
    now: Instant,
    timeout: Duration,
    size: usize,
    /// Waiting tickets with their deadlines, oldest first.
    waiting: VecDeque<(Ticket, Instant)>,
    ended: Vec<Ticket>,
    held: Vec<Lease>,
    backends: usize,
}

impl Harness {
    fn drain(&mut self) {
        while let Some(a) = self.bal.poll_admission() {
            let (t, deadline) = self
                .waiting
                .pop_front()
                .expect("an admission for a ticket that is not waiting");
            assert_eq!(a.ticket(), t, "admissions come in FIFO order");
            match a {
                Admission::Admitted(_, lease) => {
                    assert!(deadline > self.now, "admitted after its deadline");
                    self.held.push(lease);
                }
                Admission::Expired(_) => assert!(deadline <= self.now, "expired early"),
            }
            self.ended.push(t);
        }
        while self.bal.poll_event().is_some() {}
        assert_eq!(self.bal.queued(), self.waiting.len());
        assert!(self.waiting.len() <= self.size);
        assert_eq!(self.bal.outstanding(), self.held.len() as u64);
        if !self.waiting.is_empty() {
            // Serving: healthy, not draining, and proven if any such backend is.
            let up: Vec<_> = self
                .bal
                .backends()
                .filter(|b| b.healthy && !b.draining)
                .collect();
            let any_proven = up.iter().any(|b| b.proven);
            let free = up
                .iter()
                .filter(|b| !any_proven || b.proven)
                .any(|b| b.in_flight < b.max_conns);
            assert!(!free, "a slot is free while requests wait");
        }
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::Arrive(k) => {
                let key = RequestKey::Prefix(vec![u64::from(k % 8)]);
                let kb = [k % 8];
                let meta = RequestMeta::default().with_affinity(&key).with_key(&kb);
                match self.bal.select(self.now, &meta) {
                    Ok(l) => {
                        assert!(self.waiting.is_empty(), "overtook the queue");
                        self.held.push(l);
                    }
                    Err(Reject::AllAtCapacity) => match self.bal.enqueue(self.now, meta.into()) {
                        Ok(t) => self.waiting.push_back((t, self.now + self.timeout)),
                        Err(r) => {
                            assert_eq!(r, Reject::AllAtCapacity);
                            assert_eq!(self.waiting.len(), self.size, "refused below the bound");
                        }
                    },
                    Err(Reject::NoHealthyBackend | Reject::UnknownModel) => {
                        unreachable!("backends never fail here, and no model is named")
                    }
                }
            }
            Op::Release(i) => {
                if !self.held.is_empty() {
                    let l = self.held.swap_remove(i % self.held.len());
                    self.bal.release(self.now, l, Outcome::Response(200));
                }
            }
            Op::Cancel(i) => {
                if !self.waiting.is_empty() {
                    let (t, _) = self.waiting.remove(i % self.waiting.len()).unwrap();
                    assert!(self.bal.cancel(self.now, t));
                    self.ended.push(t);
                }
            }
            Op::CancelStale(i) => {
                if !self.ended.is_empty() {
                    let t = self.ended[i % self.ended.len()];
                    assert!(!self.bal.cancel(self.now, t), "{t} already ended");
                }
            }
            Op::Advance(ms) => self.now += Duration::from_millis(u64::from(ms)),
            Op::Tick => {
                self.bal.handle_timeout(self.now);
                while let Some(Action::StartProbe { probe, .. }) = self.bal.poll_action() {
                    self.bal
                        .probe_result(self.now, probe, ProbeOutcome::Status(200));
                }
                self.drain();
                assert!(self.bal.poll_timeout().is_none_or(|t| t > self.now));
            }
            Op::AddBackend(cap) => {
                if self.backends < 4 {
                    let spec = BackendSpec {
                        max_conns: u32::from(cap),
                        ..BackendSpec::new(format!("http://b{}", self.backends))
                    };
                    self.bal.add_backend(self.now, spec).unwrap();
                    self.backends += 1;
                }
            }
        }
        self.drain();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_queue_matches_a_fifo_model(
        policy in proptest::sample::select(Policy::ALL.to_vec()),
        caps in proptest::collection::vec(1u32..3, 1..3),
        timeout_ms in 1u64..500,
        size in 1usize..6,
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..250),
    ) {
        let now = Instant::now();
        let config = Config {
            policy,
            status_interval: Some(Duration::from_millis(700)),
            queue: QueueConfig { timeout: Some(Duration::from_millis(timeout_ms)), size },
            ..Config::default()
        };
        let mut bal = Balancer::new(config, SmallRng::seed_from_u64(seed), now);
        for (i, &c) in caps.iter().enumerate() {
            bal.add_backend(now, BackendSpec { max_conns: c, ..BackendSpec::new(format!("http://b{i}")) }).unwrap();
        }
        let mut h = Harness {
            bal,
            now,
            timeout: Duration::from_millis(timeout_ms),
            size,
            waiting: VecDeque::new(),
            ended: Vec::new(),
            held: Vec::new(),
            backends: caps.len(),
        };
        for op in ops {
            h.run(op);
        }
        // Wind down: release everything, expire the rest.
        while let Some(l) = h.held.pop() {
            h.bal.release(h.now, l, Outcome::Cancelled);
            h.drain();
        }
        h.now += h.timeout;
        h.bal.handle_timeout(h.now);
        while h.bal.poll_action().is_some() {}
        h.drain();
        while let Some(l) = h.held.pop() {
            h.bal.release(h.now, l, Outcome::Cancelled);
            h.drain();
        }
        prop_assert!(h.waiting.is_empty());
        prop_assert_eq!(h.bal.outstanding(), 0);
        let s = h.bal.queue_stats().unwrap();
        prop_assert_eq!(s.enqueued, s.admitted + s.expired + s.cancelled);
        prop_assert_eq!(s.waiting, 0);
    }
}
