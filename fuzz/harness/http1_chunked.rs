//! Fuzz harness: the chunked body framer of `lb_http1`.
//!
//! `run` must never panic. It checks that feeding the input in one piece,
//! in two pieces split at a data-derived point, and one byte at a time all
//! give the same verdict, and that `Progress` is self-consistent.

use lb_http1::{BodyFramer, BodyKind, Error};

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let whole = feed(&[data]);
    let cut = split_point(data);
    assert_eq!(feed(&[&data[..cut], &data[cut..]]), whole, "split at {cut}");
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    assert_eq!(feed(&bytes), whole, "byte by byte");
    if let Ok((consumed, done)) = whole {
        assert!(consumed <= data.len());
        assert!(done || consumed == data.len());
    }
}

/// Feeds `pieces` to a fresh chunked framer: total consumed and done, or
/// the error.
fn feed(pieces: &[&[u8]]) -> Result<(usize, bool), Error> {
    let mut framer = BodyFramer::new(BodyKind::Chunked);
    let mut total = 0;
    for piece in pieces {
        let progress = framer.push(piece)?;
        assert!(progress.consumed <= piece.len());
        assert!(progress.done || progress.consumed == piece.len());
        assert_eq!(progress.done, framer.is_done());
        total += progress.consumed;
        if progress.done {
            assert_eq!(framer.finish(), Ok(()));
            break;
        }
    }
    if !framer.is_done() {
        assert!(framer.finish().is_err());
    }
    Ok((total, framer.is_done()))
}

/// A cut point in `0..=data.len()` derived from the data itself.
fn split_point(data: &[u8]) -> usize {
    let seed = data
        .iter()
        .take(4)
        .fold(0usize, |acc, &b| acc * 31 + usize::from(b));
    seed % (data.len() + 1)
}
