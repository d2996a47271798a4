//! Request ids: the client's `X-Request-Id` when it is a sane token, else one `lb`
//! makes. The id goes to the backend and back to the client (`X-Request-Id`), and into the
//! access log, the `--log-to` record, error bodies and error log lines.

use std::cell::Cell;
use std::fmt;
use std::sync::OnceLock;

/// The longest client id taken as is.
pub const MAX_LEN: usize = 128;

/// The header that carries it, lower-case.
pub const HEADER: &str = "x-request-id";

/// One request's id: 1 to [`MAX_LEN`] visible ASCII characters, held inline (no
/// allocation per request).
#[derive(Clone)]
pub struct RequestId {
    len: u8,
    bytes: [u8; MAX_LEN],
}

impl RequestId {
    /// The id for a request whose `X-Request-Id` is `sent`: taken when it is a sane
    /// token (1 to 128 characters, each visible ASCII: no spaces, no control characters),
    /// else a new one. The second value says whether the client's was taken.
    pub fn for_request(sent: Option<&[u8]>) -> (RequestId, bool) {
        match sent {
            Some(v) if is_sane(v) => {
                let mut bytes = [0; MAX_LEN];
                bytes[..v.len()].copy_from_slice(v);
                let len = u8::try_from(v.len()).expect("MAX_LEN fits in a u8");
                (RequestId { len, bytes }, true)
            }
            _ => (RequestId::generate(), false),
        }
    }

    /// A new id: 32 lowercase hex digits, a random 64-bit prefix drawn once per process
    /// then a per-thread sequence, so ids never repeat within a process and replicas do
    /// not share prefixes.
    pub fn generate() -> RequestId {
        static PREFIX: OnceLock<u64> = OnceLock::new();
        thread_local! {
            static NEXT: Cell<u64> = const { Cell::new(0) };
            static THREAD: Cell<u64> = const { Cell::new(u64::MAX) };
        }
        let prefix = *PREFIX.get_or_init(|| {
            use rand::{RngCore, SeedableRng};
            rand::rngs::SmallRng::from_os_rng().next_u64()
        });
        let thread = THREAD.with(|t| {
            if t.get() == u64::MAX {
                static THREADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                t.set(THREADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            }
            t.get()
        });
        let seq = NEXT.with(|n| {
            let v = n.get();
            n.set(v.wrapping_add(1));
            v
        });
        // 16 bits of thread, 48 of sequence: unique for 2^48 requests per thread.
        let low = (thread << 48) | (seq & ((1 << 48) - 1));
        let mut bytes = [0; MAX_LEN];
        hex(prefix, &mut bytes[..16]);
        hex(low, &mut bytes[16..32]);
        RequestId { len: 32, bytes }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).expect("ids are ASCII")
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
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
        let (id, taken) = RequestId::for_request(Some(&[b'a'; 128]));
        assert!(taken && id.as_str().len() == 128);
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
    }
}
