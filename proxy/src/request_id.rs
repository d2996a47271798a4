//! Request ids: the client's `X-Request-Id` when it is a sane token, else one `lb`
//! makes. The id goes to the backend and back to the client (`X-Request-Id`), and into the
//! access log, the `--log-to` record, error bodies and error log lines.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The longest client id taken as is.
pub const MAX_LEN: usize = 128;

/// The header that carries it, lower-case.
pub const HEADER: &str = "x-request-id";

/// One request's id: 1 to [`MAX_LEN`] visible ASCII characters. Ids up to [`INLINE`]
/// bytes (ours, UUIDs, most tracing ids) are held inline; a longer client id is boxed.
/// Small on purpose: an id rides in every request's account and lease, which move with
/// the request's future.
#[derive(Clone)]
pub struct RequestId(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Boxed(Box<str>),
}

/// The longest id held without an allocation.
const INLINE: usize = 46;

impl RequestId {
    /// The id for a request whose `X-Request-Id` is `sent`: taken when it is a sane
    /// token (1 to 128 characters, each visible ASCII: no spaces, no control characters),
    /// else a new one. The second value says whether the client's was taken.
    pub fn for_request(sent: Option<&[u8]>) -> (RequestId, bool) {
        match sent {
            Some(v) if is_sane(v) => (RequestId::taken(v), true),
            _ => (RequestId::generate(), false),
        }
    }

    fn taken(v: &[u8]) -> RequestId {
        if v.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..v.len()].copy_from_slice(v);
            let len = u8::try_from(v.len()).expect("INLINE fits in a u8");
            RequestId(Repr::Inline { len, bytes })
        } else {
            let s = std::str::from_utf8(v).expect("sane ids are ASCII");
            RequestId(Repr::Boxed(s.into()))
        }
    }

    /// A new id: 32 lowercase hex digits, a random 64-bit prefix drawn once per process
    /// then a per-thread sequence, so ids never repeat within a process and replicas do
    /// not share prefixes.
    pub fn generate() -> RequestId {
        struct Local {
            /// The process prefix in hex, then the thread's number.
            head: [u8; 16],
            thread: u64,
            next: u64,
        }
        static PREFIX: OnceLock<[u8; 16]> = OnceLock::new();
        static THREADS: AtomicU64 = AtomicU64::new(0);
        thread_local! {
            static LOCAL: Cell<Option<Local>> = const { Cell::new(None) };
        }
        let (head, low) = LOCAL.with(|cell| {
            let mut local = cell.take().unwrap_or_else(|| Local {
                head: *PREFIX.get_or_init(|| {
                    use rand::{RngCore, SeedableRng};
                    let mut h = [0; 16];
                    hex(rand::rngs::SmallRng::from_os_rng().next_u64(), &mut h);
                    h
                }),
                thread: THREADS.fetch_add(1, Ordering::Relaxed),
                next: 0,
            });
            // 16 bits of thread, 48 of sequence: unique for 2^48 requests per thread.
            let low = (local.thread << 48) | (local.next & ((1 << 48) - 1));
            local.next = local.next.wrapping_add(1);
            let head = local.head;
            cell.set(Some(local));
            (head, low)
        });
        let mut bytes = [0; INLINE];
        bytes[..16].copy_from_slice(&head);
        hex(low, &mut bytes[16..32]);
        RequestId(Repr::Inline { len: 32, bytes })
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { .. } => std::str::from_utf8(self.as_bytes()).expect("ids are ASCII"),
            Repr::Boxed(s) => s,
        }
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Boxed(s) => s.as_bytes(),
        }
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

impl PartialEq for RequestId {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for RequestId {}

/// A sane id: 1 to [`MAX_LEN`] bytes, each visible ASCII (`!` to `~`).
pub fn is_sane(v: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&v.len()) && v.iter().all(|b| (0x21..=0x7e).contains(b))
}

fn hex(v: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, o) in out.iter_mut().enumerate() {
        *o = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_client_id_is_kept_and_anything_else_replaced() {
        let (id, taken) = RequestId::for_request(Some(b"abc-123_XYZ:9"));
        assert!(taken);
        assert_eq!(id.as_str(), "abc-123_XYZ:9");
        for bad in [
            &b""[..],
            b"has space",
            b"ctl\x01",
            b"tab\t",
            b"caf\xc3\xa9",
            &[b'a'; 129],
        ] {
            let (id, taken) = RequestId::for_request(Some(bad));
            assert!(!taken, "{bad:?}");
            assert_eq!(id.as_str().len(), 32);
        }
        for n in [INLINE, INLINE + 1, 128] {
            let (id, taken) = RequestId::for_request(Some(&[b'a'; 128][..n]));
            assert!(taken && id.as_str() == "a".repeat(n), "{n}");
        }
    }

    #[test]
    fn generated_ids_are_hex_and_distinct() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a, b);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            &a.as_str()[..16],
            &b.as_str()[..16],
            "one prefix per process"
        );
        let other = std::thread::spawn(RequestId::generate).join().unwrap();
        assert_ne!(other, a);
        assert_eq!(&other.as_str()[..16], &a.as_str()[..16]);
        assert!(std::mem::size_of::<RequestId>() <= 48);
    }
}
