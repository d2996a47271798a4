//! Body framing: where does this message's body end?
//!
//! [`BodyFramer`] does not decode anything: the body is forwarded verbatim
//! (chunk-size lines, extensions and trailers included). It only tracks the
//! framing so the caller knows how many of the bytes it holds belong to the
//! current message and when the message is over.
//!
//! # Chunked decoder
//!
//! ```text
//!             hex digit (1 to 16)      SP/HT
//!              +--+                    +--+
//!              v  |     SP/HT          v  |     ';'
//!  +------> [ Size ] ---------------> [SizeWs] ---------+
//!  |          |  |                                       v
//!  |          |  +------------------ ';' ------------> [Ext] --+ text byte
//!  |          |                                          | ^---+ (<= 4 KiB)
//!  |          | CR                                       | CR
//!  |          v                                          |
//!  |       [SizeLf] <------------------------------------+
//!  |          | LF
//!  |          +-- size > 0 --> [Data] --size bytes--> [DataCr] --CR--> [DataLf] --+
//!  |          |                                                                   | LF
//!  +----------|-------------------------------------------------------------------+
//!             | size == 0
//!             v
//!  +---> [TrailerStart] --CR--> [EndLf] --LF--> [Done]
//!  |          | tchar
//!  |          v
//!  |    [TrailerName] --':'--> [TrailerValue] --CR--> [TrailerLf] --+
//!  |      ^   | tchar            ^   | text byte                    | LF
//!  |      +---+                  +---+                              |
//!  +----------------------------------------------------------------+
//!
//!  text byte = HTAB / SP / VCHAR / obs-text; the trailer section is <= 64 KiB.
//! ```
//!
//! Any byte without an arrow is an error ([`Error::InvalidChunkSize`] in the
//! size states, [`Error::ChunkSizeOverflow`] for a 17th digit,
//! [`Error::InvalidChunk`] elsewhere). The machine consumes one byte per step
//! except in `Data`, so any split of the input gives the same result as the
//! whole: feeding one byte at a time is equivalent to feeding everything.

use super::{BodyKind, Error};

/// Longest chunk extension accepted on one chunk-size line, in bytes.
pub const MAX_CHUNK_EXTENSION: usize = 4096;
/// Most chunk-extension bytes accepted in one body, all chunks together (hyper's limit
/// too): a body of one-byte chunks each carrying a long extension costs its reader about
/// nothing per byte of data otherwise.
pub const MAX_CHUNK_EXTENSIONS_TOTAL: u64 = 16 * 1024;
/// Largest trailer section accepted, in bytes (hyper's limit too).
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Progress reported by [`BodyFramer::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// How many bytes at the start of the input belong to this message's
    /// body; forward them as is. If `done` is false this is the whole input.
    pub consumed: usize,
    /// How many of the `consumed` bytes are body data (chunk framing and trailers
    /// left out).
    pub data: usize,
    /// Whether the body is complete. Bytes after `consumed` belong to the
    /// next message (pipelining / keep-alive).
    pub done: bool,
}

/// Tracks one message body. Create it from the [`BodyKind`] of the head,
/// then [`push`](BodyFramer::push) every byte received after the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyFramer {
    state: State,
    /// Chunk-extension bytes seen so far.
    extensions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `Length(n)` with this many bytes left.
    Length(u64),
    /// Ends only with the connection (close-delimited or tunnel).
    UntilEof,
    Chunked(Chunk),
    Done,
    Failed(Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size { size: u64, digits: u8 },
    SizeWs { size: u64 },
    Ext { size: u64, len: usize },
    SizeLf { size: u64 },
    Data { left: u64 },
    DataCr,
    DataLf,
    TrailerStart { total: usize },
    TrailerName { total: usize },
    TrailerValue { total: usize },
    TrailerLf { total: usize },
    EndLf,
}

impl BodyFramer {
    /// A framer for a body delimited as `kind`.
    pub fn new(kind: BodyKind) -> BodyFramer {
        let state = match kind {
            BodyKind::None | BodyKind::Length(0) => State::Done,
            BodyKind::Length(n) => State::Length(n),
            BodyKind::Chunked => State::Chunked(Chunk::Size { size: 0, digits: 0 }),
            BodyKind::CloseDelimited | BodyKind::Tunnel => State::UntilEof,
        };
        BodyFramer {
            state,
            extensions: 0,
        }
    }

    /// Feeds the next bytes of the stream.
    ///
    /// Returns how many of them belong to this body and whether it is now
    /// complete. Once complete, further calls return `consumed: 0, done:
    /// true`. An error is final: the same error is returned again and the
    /// connection must be closed.
    pub fn push(&mut self, input: &[u8]) -> Result<Progress, Error> {
        let mut pos = 0;
        let mut data = 0;
        while pos < input.len() {
            match self.state {
                State::Done => break,
                State::Failed(e) => return Err(e),
                State::UntilEof => {
                    data += input.len() - pos;
                    pos = input.len();
                }
                State::Length(left) => {
                    let n = clamp(left, input.len() - pos);
                    pos += n;
                    data += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                }
                State::Chunked(Chunk::Data { left }) => {
                    let n = clamp(left, input.len() - pos);
                    pos += n;
                    data += n;
                    let left = left - n as u64;
                    let next = if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data { left }
                    };
                    self.state = State::Chunked(next);
                }
                State::Chunked(chunk) => {
                    if let Chunk::Ext { .. } = chunk {
                        self.extensions += 1;
                        if self.extensions > MAX_CHUNK_EXTENSIONS_TOTAL {
                            self.state = State::Failed(Error::InvalidChunk);
                            return Err(Error::InvalidChunk);
                        }
                    }
                    self.state = match step(chunk, input[pos]) {
                        Ok(Some(next)) => State::Chunked(next),
                        Ok(None) => State::Done,
                        Err(e) => State::Failed(e),
                    };
                    if let State::Failed(e) = self.state {
                        return Err(e);
                    }
                    pos += 1;
                }
            }
        }
        match self.state {
            State::Failed(e) => Err(e),
            state => Ok(Progress {
                consumed: pos,
                data,
                done: state == State::Done,
            }),
        }
    }

    /// Whether the body is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Call when the connection reached end of stream: `Ok` if the body is
    /// complete (a close-delimited body or tunnel is complete at EOF),
    /// otherwise [`Error::IncompleteBody`] (or the earlier error).
    pub fn finish(&self) -> Result<(), Error> {
        match self.state {
            State::Done | State::UntilEof => Ok(()),
            State::Failed(e) => Err(e),
            State::Length(_) | State::Chunked(_) => Err(Error::IncompleteBody),
        }
    }
}

fn clamp(left: u64, available: usize) -> usize {
    usize::try_from(left).map_or(available, |left| left.min(available))
}

/// One step of the chunked machine on byte `b`; `Ok(None)` means done.
/// (`Data` is handled in bulk by the caller.)
fn step(chunk: Chunk, b: u8) -> Result<Option<Chunk>, Error> {
    use Chunk::*;
    let next = match chunk {
        Size { size, digits } => match b {
            _ if b.is_ascii_hexdigit() => {
                if digits == 16 {
                    return Err(Error::ChunkSizeOverflow);
                }
                let d = (b as char).to_digit(16).unwrap_or(0);
                Size {
                    size: size << 4 | u64::from(d),
                    digits: digits + 1,
                }
            }
            _ if digits == 0 => return Err(Error::InvalidChunkSize),
            b' ' | b'\t' => SizeWs { size },
            b';' => Ext { size, len: 0 },
            b'\r' => SizeLf { size },
            _ => return Err(Error::InvalidChunkSize),
        },
        SizeWs { size } => match b {
            b' ' | b'\t' => SizeWs { size },
            b';' => Ext { size, len: 0 },
            _ => return Err(Error::InvalidChunkSize),
        },
        Ext { size, len } => match b {
            b'\r' => SizeLf { size },
            _ if is_text(b) && len < MAX_CHUNK_EXTENSION => Ext { size, len: len + 1 },
            _ => return Err(Error::InvalidChunk),
        },
        SizeLf { size } => match b {
            b'\n' if size == 0 => TrailerStart { total: 0 },
            b'\n' => Data { left: size },
            _ => return Err(Error::InvalidChunk),
        },
        Data { .. } => return Err(Error::InvalidChunk), // handled by the caller
        DataCr => match b {
            b'\r' => DataLf,
            _ => return Err(Error::InvalidChunk),
        },
        DataLf => match b {
            b'\n' => Size { size: 0, digits: 0 },
            _ => return Err(Error::InvalidChunk),
        },
        TrailerStart { total } => match b {
            b'\r' => EndLf,
            _ if is_tchar(b) => TrailerName {
                total: trailer_total(total)?,
            },
            _ => return Err(Error::InvalidChunk),
        },
        TrailerName { total } => match b {
            b':' => TrailerValue {
                total: trailer_total(total)?,
            },
            _ if is_tchar(b) => TrailerName {
                total: trailer_total(total)?,
            },
            _ => return Err(Error::InvalidChunk),
        },
        TrailerValue { total } => match b {
            b'\r' => TrailerLf {
                total: trailer_total(total)?,
            },
            _ if is_text(b) => TrailerValue {
                total: trailer_total(total)?,
            },
            _ => return Err(Error::InvalidChunk),
        },
        TrailerLf { total } => match b {
            b'\n' => TrailerStart {
                total: trailer_total(total)?,
            },
            _ => return Err(Error::InvalidChunk),
        },
        EndLf => match b {
            b'\n' => return Ok(None),
            _ => return Err(Error::InvalidChunk),
        },
    };
    Ok(Some(next))
}

fn trailer_total(total: usize) -> Result<usize, Error> {
    if total >= MAX_TRAILER_BYTES {
        Err(Error::InvalidChunk)
    } else {
        Ok(total + 1)
    }
}

/// HTAB, SP, VCHAR, obs-text: what may appear in a field value or extension.
fn is_text(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

/// A token character (RFC 9110 §5.6.2).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
