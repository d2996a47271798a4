//! The affinity table: chain unit → the backends that served it, with per-backend LRU
//! lists, a sliding TTL and epoch invalidation.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::backend::BackendId;
use crate::hash::mix64;

const NIL: u32 = u32::MAX;

/// Who owns a backend list: the backend in that slot and its epoch when the list was
/// started. A list whose owner no longer matches the slot's ready backend is dead.
pub(crate) type Owner = (BackendId, u64);

/// One (unit, backend) pair: "this backend served a prompt with this prefix".
#[derive(Clone, Copy, Debug)]
struct Node {
    key: u64,
    used: Instant,
    /// The slot whose LRU list holds this node.
    slot: u32,
    /// Neighbours in the slot's LRU list.
    prev: u32,
    next: u32,
    /// The next node of the same unit (on another slot).
    sibling: u32,
}

#[derive(Clone, Copy, Debug)]
struct List {
    owner: Option<Owner>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    len: u32,
}

impl Default for List {
    fn default() -> Self {
        List {
            owner: None,
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

/// Hashes keys (already well-mixed chain hashes) with a secret from the balancer's RNG, so
/// that clients who can choose chain values still cannot aim them at one bucket.
#[derive(Clone, Copy, Debug)]
struct Keyed(u64);

#[derive(Clone, Copy, Debug)]
struct KeyedHasher {
    secret: u64,
    h: u64,
}

impl BuildHasher for Keyed {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher {
            secret: self.0,
            h: 0,
        }
    }
}

impl Hasher for KeyedHasher {
    fn finish(&self) -> u64 {
        self.h
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.h = mix64(self.h ^ u64::from(b) ^ self.secret);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.h = mix64(n ^ self.secret);
    }
}

/// Chain unit → the backends holding it, bounded.
///
/// Nodes (one per unit and backend) live in a slab. Each sits in the doubly linked LRU
/// list of its backend's slot and in the short singly linked list of its unit's holders,
/// which the hash map points to. Touching, adding and evicting are O(1) plus a walk of
/// one unit's holders (at most one per backend); nothing scans the table on the request
/// path. Each list holds at most the cap its backend is given at insertion; a list whose
/// owner changed (the backend was ejected, removed or replaced) is dead at once and
/// reclaimed whole at the next sweep or insertion.
#[derive(Debug)]
pub(crate) struct Table {
    /// Unit → its first holder node.
    map: HashMap<u64, u32, Keyed>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    lists: Vec<List>,
    /// Nodes in use.
    len: usize,
}

impl Table {
    pub(crate) fn new(secret: u64) -> Self {
        Table {
            map: HashMap::with_hasher(Keyed(secret)),
            nodes: Vec::new(),
            free: Vec::new(),
            lists: Vec::new(),
            len: 0,
        }
    }

    /// Nodes held (dead ones not yet reclaimed included): what the bound limits.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Slab size: the most nodes ever held at once.
    #[cfg(test)]
    pub(crate) fn slab_len(&self) -> usize {
        self.nodes.len()
    }

    fn live(
        &self,
        n: &Node,
        now: Instant,
        ttl: Duration,
        owner: &impl Fn(u32) -> Option<Owner>,
    ) -> bool {
        if now.saturating_duration_since(n.used) >= ttl {
            return false;
        }
        let list = &self.lists[n.slot as usize];
        list.owner.is_some() && list.owner == owner(n.slot)
    }

    /// Looks `units` up from the deepest: returns the depth (1-based) of the deepest unit
    /// with a live holder, and of the deepest unit with a live holder that `accept`
    /// takes. `accept` is called with the slot of each live holder of the units scanned,
    /// deepest first, and the scan stops after the first unit with an accepted holder.
    ///
    /// A node is live if it was used less than `ttl` ago and its list's owner is still
    /// `owner(slot)` (the ready backend in that slot and its epoch; `None` when the slot
    /// holds no ready backend). One probe when the whole chain is known and its holder
    /// accepted; at most `units.len()`.
    pub(crate) fn lookup(
        &self,
        now: Instant,
        ttl: Duration,
        units: &[u64],
        owner: impl Fn(u32) -> Option<Owner>,
        mut accept: impl FnMut(u32) -> bool,
    ) -> (Option<usize>, Option<usize>) {
        let mut deepest = None;
        for (i, unit) in units.iter().enumerate().rev() {
            let Some(&first) = self.map.get(unit) else {
                continue;
            };
            let mut accepted = false;
            let mut ix = first;
            while ix != NIL {
                let n = &self.nodes[ix as usize];
                if self.live(n, now, ttl, &owner) {
                    deepest = deepest.or(Some(i + 1));
                    accepted |= accept(n.slot);
                }
                ix = n.sibling;
            }
            if accepted {
                return (deepest, Some(i + 1));
            }
        }
        (deepest, None)
    }

    /// Records that `slot` (owned by `owner`) served a prompt with every unit of `units`,
    /// touching those nodes at `now`. Other holders of those units are dropped if
    /// `exclusive` (re-pointing), kept otherwise. The list of `slot` keeps at most `cap`
    /// nodes (least recently used evicted first).
    ///
    /// Units are recorded deepest first, so the shallow units a chain shares with others
    /// (a system prompt) end up most recent in the list and are evicted last.
    pub(crate) fn record(
        &mut self,
        now: Instant,
        units: &[u64],
        slot: u32,
        owner: Owner,
        cap: usize,
        exclusive: bool,
    ) {
        let cap = cap.max(1);
        let s = slot as usize;
        if self.lists.len() <= s {
            self.lists.resize(s + 1, List::default());
        }
        if self.lists[s].owner != Some(owner) {
            self.clear(slot);
            self.lists[s].owner = Some(owner);
        }
        for &unit in units.iter().rev() {
            let mut ix = self.map.get(&unit).copied().unwrap_or(NIL);
            while ix != NIL && self.nodes[ix as usize].slot != slot {
                ix = self.nodes[ix as usize].sibling;
            }
            if exclusive {
                self.drop_other_holders(unit, slot);
            }
            if ix != NIL {
                self.unlink(ix);
                self.link_head(ix, slot);
                self.nodes[ix as usize].used = now;
                continue;
            }
            self.make_room(slot, cap);
            // Eviction may have removed the unit's other holders: read the head again.
            let head = self.map.get(&unit).copied().unwrap_or(NIL);
            let node = Node {
                key: unit,
                used: now,
                slot,
                prev: NIL,
                next: NIL,
                sibling: head,
            };
            let ix = match self.free.pop() {
                Some(ix) => {
                    self.nodes[ix as usize] = node;
                    ix
                }
                None => {
                    self.nodes.push(node);
                    u32::try_from(self.nodes.len() - 1).expect("fewer than 2^32 nodes")
                }
            };
            self.link_head(ix, slot);
            self.map.insert(unit, ix);
            self.len += 1;
        }
    }

    /// Reclaims dead lists (owner changed) and nodes idle for `ttl` or more.
    pub(crate) fn sweep(
        &mut self,
        now: Instant,
        ttl: Duration,
        owner: impl Fn(u32) -> Option<Owner>,
    ) {
        for slot in 0..self.lists.len() as u32 {
            let list = self.lists[slot as usize];
            if list.owner.is_none() {
                continue;
            }
            if list.owner != owner(slot) {
                self.clear(slot);
                continue;
            }
            loop {
                let tail = self.lists[slot as usize].tail;
                if tail == NIL
                    || now.saturating_duration_since(self.nodes[tail as usize].used) < ttl
                {
                    break;
                }
                self.remove(tail);
            }
        }
    }

    /// Drops the nodes of `unit` on slots other than `slot`.
    fn drop_other_holders(&mut self, unit: u64, slot: u32) {
        loop {
            let mut ix = self.map.get(&unit).copied().unwrap_or(NIL);
            while ix != NIL && self.nodes[ix as usize].slot == slot {
                ix = self.nodes[ix as usize].sibling;
            }
            if ix == NIL {
                return;
            }
            self.remove(ix);
        }
    }

    /// Drops every node of `slot`'s list, and its owner.
    fn clear(&mut self, slot: u32) {
        if slot as usize >= self.lists.len() {
            return;
        }
        while self.lists[slot as usize].tail != NIL {
            let tail = self.lists[slot as usize].tail;
            self.remove(tail);
        }
        self.lists[slot as usize] = List::default();
    }

    /// Evicts from the tail of `slot`'s list until it has room for one more.
    fn make_room(&mut self, slot: u32, cap: usize) {
        while self.lists[slot as usize].len as usize >= cap {
            let tail = self.lists[slot as usize].tail;
            debug_assert_ne!(tail, NIL);
            self.remove(tail);
        }
    }

    /// Frees a node: out of its slot's list and its unit's holders.
    fn remove(&mut self, ix: u32) {
        self.unlink(ix);
        let Node { key, sibling, .. } = self.nodes[ix as usize];
        let first = self.map[&key];
        if first == ix {
            if sibling == NIL {
                self.map.remove(&key);
            } else {
                self.map.insert(key, sibling);
            }
        } else {
            let mut prev = first;
            while self.nodes[prev as usize].sibling != ix {
                prev = self.nodes[prev as usize].sibling;
            }
            self.nodes[prev as usize].sibling = sibling;
        }
        self.free.push(ix);
        self.len -= 1;
    }

    fn unlink(&mut self, ix: u32) {
        let Node {
            slot, prev, next, ..
        } = self.nodes[ix as usize];
        let l = &mut self.lists[slot as usize];
        if prev == NIL {
            l.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            l.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        l.len -= 1;
        let n = &mut self.nodes[ix as usize];
        n.prev = NIL;
        n.next = NIL;
    }

    fn link_head(&mut self, ix: u32, slot: u32) {
        let l = &mut self.lists[slot as usize];
        let old = l.head;
        l.head = ix;
        if old == NIL {
            l.tail = ix;
        } else {
            self.nodes[old as usize].prev = ix;
        }
        l.len += 1;
        let n = &mut self.nodes[ix as usize];
        n.slot = slot;
        n.prev = NIL;
        n.next = old;
    }

    /// Checks the lists against the map (tests only).
    #[cfg(test)]
    fn check(&self) {
        let mut seen = 0;
        for (s, l) in self.lists.iter().enumerate() {
            let mut n = 0;
            let mut prev = NIL;
            let mut ix = l.head;
            while ix != NIL {
                let node = &self.nodes[ix as usize];
                assert_eq!(node.slot as usize, s);
                assert_eq!(node.prev, prev);
                // Reachable from its unit, once per slot.
                let mut h = self.map[&node.key];
                let mut hits = 0;
                while h != NIL {
                    hits += usize::from(h == ix);
                    assert!(h == ix || self.nodes[h as usize].slot != node.slot);
                    h = self.nodes[h as usize].sibling;
                }
                assert_eq!(hits, 1);
                prev = ix;
                ix = node.next;
                n += 1;
            }
            assert_eq!(l.tail, prev);
            assert_eq!(l.len, n);
            seen += n as usize;
        }
        assert_eq!(seen, self.len);
        assert_eq!(self.nodes.len(), self.len + self.free.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(slot: u32) -> BackendId {
        BackendId { slot, gen: 0 }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn holders(
        t: &Table,
        now: Instant,
        ttl: Duration,
        units: &[u64],
        owner: impl Fn(u32) -> Option<Owner>,
    ) -> Option<(usize, Vec<u32>)> {
        let mut slots = Vec::new();
        let (_, depth) = t.lookup(now, ttl, units, owner, |s| {
            slots.push(s);
            true
        });
        slots.sort_unstable();
        Some((depth?, slots))
    }

    #[test]
    fn deepest_live_unit_and_all_its_holders() {
        let now = Instant::now();
        let mut t = Table::new(1);
        let all = |s: u32| Some((id(s), 0));
        t.record(now, &[1, 2, 3, 4], 0, (id(0), 0), 100, false);
        t.record(now, &[1, 2], 1, (id(1), 0), 100, false);
        t.check();
        assert_eq!(t.len(), 6);
        assert_eq!(
            holders(&t, now, HOUR, &[1, 2, 3, 4, 5], all),
            Some((4, vec![0]))
        );
        assert_eq!(
            holders(&t, now, HOUR, &[1, 2, 9], all),
            Some((2, vec![0, 1]))
        );
        assert_eq!(holders(&t, now, HOUR, &[7], all), None);
        // Backend 0 ejected (epoch 1): its nodes are dead at once.
        let ejected = |s: u32| Some((id(s), u64::from(s == 0)));
        assert_eq!(
            holders(&t, now, HOUR, &[1, 2, 3, 4], ejected),
            Some((2, vec![1]))
        );
        t.sweep(now, HOUR, ejected);
        t.check();
        assert_eq!(t.len(), 2);
        // A new owner of slot 0 starts from an empty list.
        t.record(now, &[1], 0, (id(0), 1), 100, false);
        t.check();
        assert_eq!(holders(&t, now, HOUR, &[1, 2], ejected), Some((2, vec![1])));
        assert_eq!(holders(&t, now, HOUR, &[1], ejected), Some((1, vec![0, 1])));
    }

    #[test]
    fn exclusive_recording_repoints() {
        let now = Instant::now();
        let mut t = Table::new(3);
        let all = |s: u32| Some((id(s), 0));
        t.record(now, &[1, 2, 3], 0, (id(0), 0), 100, true);
        t.record(now, &[1, 2], 1, (id(1), 0), 100, false);
        assert_eq!(holders(&t, now, HOUR, &[1, 2], all), Some((2, vec![0, 1])));
        t.record(now, &[1, 2], 2, (id(2), 0), 100, true);
        t.check();
        assert_eq!(holders(&t, now, HOUR, &[1, 2], all), Some((2, vec![2])));
        assert_eq!(holders(&t, now, HOUR, &[1, 2, 3], all), Some((3, vec![0])));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn ttl_slides_and_lru_bounds_each_list() {
        let t0 = Instant::now();
        let mut t = Table::new(2);
        let all = |s: u32| Some((id(s), 0));
        let ttl = Duration::from_secs(10);
        t.record(t0, &[1, 2], 0, (id(0), 0), 3, false);
        t.record(t0 + Duration::from_secs(8), &[1], 0, (id(0), 0), 3, false);
        let at = t0 + Duration::from_secs(12);
        assert_eq!(
            holders(&t, at, ttl, &[1, 2], all),
            Some((1, vec![0])),
            "2 expired, 1 slid"
        );
        t.sweep(at, ttl, all);
        t.check();
        assert_eq!(t.len(), 1);
        // Cap 3: the fourth distinct unit evicts the least recently used.
        t.record(at, &[10, 11, 12], 0, (id(0), 0), 3, false);
        t.check();
        assert_eq!(t.len(), 3);
        assert_eq!(holders(&t, at, ttl, &[1], all), None);
        for k in 0..10_000u64 {
            let s = (k % 4) as u32;
            // Overlapping chains, so units gather several holders.
            t.record(
                at,
                &[k % 7, k % 11 + 100, k * 3 + 1000],
                s,
                (id(s), 0),
                5,
                k % 3 == 0,
            );
            if k % 97 == 0 {
                t.check();
            }
        }
        t.check();
        assert!(t.len() <= 20);
        assert!(t.slab_len() <= 20, "the slab never outgrows the bound");
    }
}
