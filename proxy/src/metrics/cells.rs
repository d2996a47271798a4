//! Per-thread recording: each thread that records writes its own cache line, so a
//! request never contends with another shard's, and a scrape sums the cells.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One value per recording thread (more threads than cells share them; their writes
/// are atomic adds, so sharing costs contention, never a lost count).
#[derive(Debug)]
pub(crate) struct Cells<T> {
    cells: Box<[Padded<T>]>,
}

/// A cell on cache lines of its own (128 bytes: adjacent-line prefetching pairs lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl<T: Default> Cells<T> {
    /// `n` cells (at least one).
    pub(crate) fn new(n: usize) -> Self {
        Cells {
            cells: (0..n.max(1)).map(|_| Padded::default()).collect(),
        }
    }
}

impl<T> Cells<T> {
    /// The calling thread's cell.
    #[inline]
    pub(crate) fn mine(&self) -> &T {
        &self.cells[thread_index() % self.cells.len()].0
    }

    /// Every cell, to be summed.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.cells.iter().map(|c| &c.0)
    }
}

/// How many cells to make: one per shard (a thread per CPU) and one for the rest (the
/// control path, a blocking resolver).
pub(crate) fn default_cells() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) + 1
}

/// The calling thread's index: threads are numbered in the order they first record.
#[inline]
fn thread_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        let mut v = i.get();
        if v == usize::MAX {
            v = NEXT.fetch_add(1, Ordering::Relaxed);
            i.set(v);
        }
        v
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn threads_sharing_cells_lose_no_count() {
        let cells = std::sync::Arc::new(Cells::<AtomicU64>::new(2));
        let threads: Vec<_> = (0..5)
            .map(|_| {
                let c = cells.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.mine().fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = cells.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 5000);
    }
}
