//! Taking the data out of a chunked body the [`BodyFramer`](super::BodyFramer) has
//! already accepted.

/// The data of a chunked body, from bytes `lb_http1::BodyFramer` has accepted.
///
/// The framer delimits bodies without decoding them (a proxy forwards them verbatim);
/// the request log and content-based routing need the chunks' data, which this takes out. Validation is the framer's: this only needs to tell size lines, data, line ends
/// and trailers apart in input known to be well-formed.
#[derive(Default)]
pub struct Dechunk {
    state: Chunk,
}

#[derive(Clone, Copy)]
enum Chunk {
    /// Reading the hex size (this much so far).
    Size { size: u64 },
    /// Past the size (extensions, CR) up to LF.
    Line { size: u64 },
    /// In the chunk's data.
    Data { left: u64 },
    /// After the data, up to LF.
    DataEnd,
    /// The last chunk was read: trailers and the end, nothing more of interest.
    Trailers,
}

impl Default for Chunk {
    fn default() -> Self {
        Chunk::Size { size: 0 }
    }
}

impl Dechunk {
    /// Feeds wire bytes; calls `data` with each run of data bytes in them.
    pub fn feed(&mut self, wire: &[u8], mut data: impl FnMut(&[u8])) {
        let mut pos = 0;
        while pos < wire.len() {
            let b = wire[pos];
            self.state = match self.state {
                Chunk::Size { size } => match (b as char).to_digit(16) {
                    Some(d) => {
                        pos += 1;
                        Chunk::Size {
                            size: size.wrapping_shl(4) | u64::from(d),
                        }
                    }
                    None => Chunk::Line { size },
                },
                Chunk::Line { size } => {
                    pos += 1;
                    match b {
                        b'\n' if size == 0 => Chunk::Trailers,
                        b'\n' => Chunk::Data { left: size },
                        _ => Chunk::Line { size },
                    }
                }
                Chunk::Data { left } => {
                    let n =
                        usize::try_from(left).map_or(wire.len() - pos, |l| l.min(wire.len() - pos));
                    data(&wire[pos..pos + n]);
                    pos += n;
                    match left - n as u64 {
                        0 => Chunk::DataEnd,
                        left => Chunk::Data { left },
                    }
                }
                Chunk::DataEnd => {
                    pos += 1;
                    match b {
                        b'\n' => Chunk::Size { size: 0 },
                        _ => Chunk::DataEnd,
                    }
                }
                Chunk::Trailers => return,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(wire: &[u8], split: usize) -> Vec<u8> {
        let mut d = Dechunk::default();
        let mut out = Vec::new();
        let (a, b) = wire.split_at(split);
        d.feed(a, |x| out.extend_from_slice(x));
        d.feed(b, |x| out.extend_from_slice(x));
        out
    }

    #[test]
    fn chunked_data_whatever_the_split() {
        let wire = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..=wire.len() {
            assert_eq!(
                decode(wire, split),
                b"helloabcdefghijklmnopqrstuvwxyz",
                "split at {split}"
            );
        }
    }

    #[test]
    fn bytes_after_the_last_chunk_are_not_data() {
        assert_eq!(decode(b"3\r\nabc\r\n0\r\n\r\n", 4), b"abc");
    }
}
