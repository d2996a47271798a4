//! Counts by status code without a map: a small table of (code, count) slots claimed on
//! first use. A backend sees a handful of codes; past the table's size, codes are
//! counted under `other`.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

const SLOTS: usize = 24;

#[derive(Debug)]
pub(crate) struct Codes {
    slots: [(AtomicU16, AtomicU64); SLOTS],
    other: AtomicU64,
}

impl Default for Codes {
    fn default() -> Self {
        Codes {
            slots: std::array::from_fn(|_| (AtomicU16::new(0), AtomicU64::new(0))),
            other: AtomicU64::new(0),
        }
    }
}

impl Codes {
    /// Counts one response with `code` (0 is not a code: it counts under `other`).
    #[inline]
    pub(crate) fn add(&self, code: u16) {
        if code != 0 {
            for (c, n) in &self.slots {
                let mut seen = c.load(Ordering::Acquire);
                if seen == 0 {
                    seen = match c.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => code,
                        Err(other) => other,
                    };
                }
                if seen == code {
                    n.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        self.other.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the counts into `into`, by code (`None`: other).
    pub(crate) fn add_to(&self, into: &mut Vec<(Option<u16>, u64)>) {
        let mut put = |k: Option<u16>, v: u64| {
            if v == 0 {
                return;
            }
            match into.iter_mut().find(|(c, _)| *c == k) {
                Some((_, n)) => *n += v,
                None => into.push((k, v)),
            }
        };
        for (c, n) in &self.slots {
            let code = c.load(Ordering::Acquire);
            if code != 0 {
                put(Some(code), n.load(Ordering::Relaxed));
            }
        }
        put(None, self.other.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_counted_apart_and_overflow_into_other() {
        let c = Codes::default();
        c.add(200);
        c.add(200);
        c.add(429);
        for code in 100..100 + SLOTS as u16 {
            c.add(code);
        }
        let mut out = Vec::new();
        c.add_to(&mut out);
        assert!(out.contains(&(Some(200), 2)));
        assert!(out.contains(&(Some(429), 1)));
        // 200 and 429 took two slots: the last two codes of the loop did not fit.
        assert!(out.contains(&(None, 2)));
        let total: u64 = out.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 3 + SLOTS as u64);
    }
}
