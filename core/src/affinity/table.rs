//! The affinity table: chain unit → the backend that last served it, with per-backend LRU
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

#[derive(Clone, Copy, Debug)]
struct Entry {
    key: u64,
    used: Instant,
    /// The slot whose list holds this entry.
    list: u32,
    prev: u32,
    next: u32,
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

/// Chain unit → backend, bounded.
///
/// Entries live in a slab and sit in the doubly linked LRU list of the backend slot that
/// owns them, so re-pointing, touching and evicting are O(1), a lookup is a hash probe,
/// and nothing is scanned on the request path. Each list holds at most the cap its backend
/// is given at insertion; a list whose owner changed (the backend was ejected, removed or
/// replaced) is dead at once and reclaimed whole at the next sweep or insertion.
#[derive(Debug)]
pub(crate) struct Table {
    map: HashMap<u64, u32, Keyed>,
    entries: Vec<Entry>,
    free: Vec<u32>,
    lists: Vec<List>,
}

impl Table {
    pub(crate) fn new(secret: u64) -> Self {
        Table {
            map: HashMap::with_hasher(Keyed(secret)),
            entries: Vec::new(),
            free: Vec::new(),
            lists: Vec::new(),
        }
    }

    /// Entries held (dead ones not yet reclaimed included).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Slab size: the most entries ever held at once (what the memory bound limits).
    #[cfg(test)]
    pub(crate) fn slab_len(&self) -> usize {
        self.entries.len()
    }

    /// The deepest unit of `units` with a live entry: its depth (1-based) and its slot.
    ///
    /// An entry is live if it was used less than `ttl` ago and its list's owner is still
    /// `owner(slot)` (the ready backend in that slot and its epoch; `None` when the slot
    /// holds no ready backend). Scans from the deepest unit: at most `units.len()` probes,
    /// one when the whole chain is known.
    pub(crate) fn lookup(
        &self,
        now: Instant,
        ttl: Duration,
        units: &[u64],
        owner: impl Fn(u32) -> Option<Owner>,
    ) -> Option<(usize, u32)> {
        for (i, unit) in units.iter().enumerate().rev() {
            let Some(&ix) = self.map.get(unit) else {
                continue;
            };
            let e = &self.entries[ix as usize];
            if now.saturating_duration_since(e.used) >= ttl {
                continue;
            }
            let list = &self.lists[e.list as usize];
            if list.owner.is_some() && list.owner == owner(e.list) {
                return Some((i + 1, e.list));
            }
        }
        None
    }

    /// Points every unit of `units` at `slot` (owned by `owner`), touching them at `now`.
    /// The list of `slot` keeps at most `cap` entries (least recently used evicted first).
    ///
    /// Units are inserted deepest first, so the shallow units a chain shares with others
    /// (a system prompt) end up most recent and are evicted last.
    pub(crate) fn record(
        &mut self,
        now: Instant,
        units: &[u64],
        slot: u32,
        owner: Owner,
        cap: usize,
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
            match self.map.get(&unit).copied() {
                Some(ix) => {
                    self.unlink(ix);
                    self.make_room(slot, cap);
                    self.link_head(ix, slot);
                    self.entries[ix as usize].used = now;
                }
                None => {
                    self.make_room(slot, cap);
                    let e = Entry {
                        key: unit,
                        used: now,
                        list: slot,
                        prev: NIL,
                        next: NIL,
                    };
                    let ix = match self.free.pop() {
                        Some(ix) => {
                            self.entries[ix as usize] = e;
                            ix
                        }
                        None => {
                            self.entries.push(e);
                            u32::try_from(self.entries.len() - 1).expect("fewer than 2^32 entries")
                        }
                    };
                    self.link_head(ix, slot);
                    self.map.insert(unit, ix);
                }
            }
        }
    }

    /// Reclaims dead lists (owner changed) and entries idle for `ttl` or more.
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
                    || now.saturating_duration_since(self.entries[tail as usize].used) < ttl
                {
                    break;
                }
                self.remove(tail);
            }
        }
    }

    /// Drops every entry of `slot`'s list, and its owner.
    fn clear(&mut self, slot: u32) {
        let Some(list) = self.lists.get_mut(slot as usize) else {
            return;
        };
        let mut ix = list.head;
        *list = List::default();
        while ix != NIL {
            let e = self.entries[ix as usize];
            self.map.remove(&e.key);
            self.free.push(ix);
            ix = e.next;
        }
    }

    /// Evicts from the tail of `slot`'s list until it has room for one more.
    fn make_room(&mut self, slot: u32, cap: usize) {
        while self.lists[slot as usize].len as usize >= cap {
            let tail = self.lists[slot as usize].tail;
            debug_assert_ne!(tail, NIL);
            self.remove(tail);
        }
    }

    fn remove(&mut self, ix: u32) {
        self.unlink(ix);
        let key = self.entries[ix as usize].key;
        self.map.remove(&key);
        self.free.push(ix);
    }

    fn unlink(&mut self, ix: u32) {
        let Entry {
            list, prev, next, ..
        } = self.entries[ix as usize];
        let l = &mut self.lists[list as usize];
        if prev == NIL {
            l.head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            l.tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        l.len -= 1;
        let e = &mut self.entries[ix as usize];
        e.prev = NIL;
        e.next = NIL;
    }

    fn link_head(&mut self, ix: u32, slot: u32) {
        let l = &mut self.lists[slot as usize];
        let old = l.head;
        l.head = ix;
        if old == NIL {
            l.tail = ix;
        } else {
            self.entries[old as usize].prev = ix;
        }
        l.len += 1;
        let e = &mut self.entries[ix as usize];
        e.list = slot;
        e.prev = NIL;
        e.next = old;
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
                let e = &self.entries[ix as usize];
                assert_eq!(e.list as usize, s);
                assert_eq!(e.prev, prev);
                assert_eq!(self.map.get(&e.key), Some(&ix));
                prev = ix;
                ix = e.next;
                n += 1;
            }
            assert_eq!(l.tail, prev);
            assert_eq!(l.len, n);
            seen += n as usize;
        }
        assert_eq!(seen, self.map.len());
        assert_eq!(self.entries.len(), self.map.len() + self.free.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(slot: u32) -> BackendId {
        BackendId { slot, gen: 0 }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn longest_live_unit_wins_and_records_repoint() {
        let now = Instant::now();
        let mut t = Table::new(1);
        let all = |s: u32| Some((id(s), 0));
        t.record(now, &[1, 2, 3, 4], 0, (id(0), 0), 100);
        t.record(now, &[1, 2], 1, (id(1), 0), 100);
        t.check();
        assert_eq!(t.len(), 4);
        assert_eq!(t.lookup(now, HOUR, &[1, 2, 3, 4, 5], all), Some((4, 0)));
        assert_eq!(t.lookup(now, HOUR, &[1, 2, 9], all), Some((2, 1)));
        assert_eq!(t.lookup(now, HOUR, &[7], all), None);
        // Backend 0 ejected (epoch 1): its entries are dead at once.
        let ejected = |s: u32| Some((id(s), u64::from(s == 0)));
        assert_eq!(t.lookup(now, HOUR, &[1, 2, 3, 4], ejected), Some((2, 1)));
        t.sweep(now, HOUR, ejected);
        t.check();
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn ttl_slides_and_lru_bounds_each_list() {
        let t0 = Instant::now();
        let mut t = Table::new(2);
        let all = |s: u32| Some((id(s), 0));
        let ttl = Duration::from_secs(10);
        t.record(t0, &[1, 2], 0, (id(0), 0), 3);
        t.record(t0 + Duration::from_secs(8), &[1], 0, (id(0), 0), 3);
        let at = t0 + Duration::from_secs(12);
        assert_eq!(
            t.lookup(at, ttl, &[1, 2], all),
            Some((1, 0)),
            "2 expired, 1 slid"
        );
        t.sweep(at, ttl, all);
        t.check();
        assert_eq!(t.len(), 1);
        // Cap 3: the fourth distinct unit evicts the least recently used.
        t.record(at, &[10, 11, 12], 0, (id(0), 0), 3);
        t.check();
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(at, ttl, &[1], all), None);
        for k in 0..10_000u64 {
            t.record(
                at,
                &[k * 3, k * 3 + 1, k * 3 + 2],
                (k % 4) as u32,
                (id((k % 4) as u32), 0),
                5,
            );
        }
        t.check();
        assert!(t.len() <= 20);
        assert!(t.slab_len() <= 20 + 3, "the slab never outgrows the bound");
    }
}
