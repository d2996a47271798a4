//! [`FieldBytes`]: a header name or value, kept inline when short.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// The most bytes kept without a heap allocation (the enum is then 32 bytes, a `Vec`'s
/// 24 plus a word).
const INLINE: usize = 30;

/// The bytes of a header name or value. Up to 30 bytes (most names, and most values
/// but long ones such as a browser's `User-Agent` or a cookie) live in the value itself,
/// so that parsing a head does not allocate once per field; longer ones are boxed. Reads
/// as a `&[u8]` (it derefs to one); compares, hashes and prints as its bytes.
#[derive(Clone)]
pub struct FieldBytes(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl FieldBytes {
    /// A copy of `bytes`.
    pub fn new(bytes: &[u8]) -> FieldBytes {
        if bytes.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..bytes.len()].copy_from_slice(bytes);
            FieldBytes(Repr::Inline {
                len: bytes.len() as u8,
                buf,
            })
        } else {
            FieldBytes(Repr::Heap(bytes.into()))
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, buf } => &buf[..usize::from(*len)],
            Repr::Heap(b) => b,
        }
    }
}

impl Deref for FieldBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for FieldBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for FieldBytes {
    fn eq(&self, other: &FieldBytes) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for FieldBytes {}

impl PartialEq<[u8]> for FieldBytes {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_slice() == other
    }
}

impl PartialEq<&[u8]> for FieldBytes {
    fn eq(&self, other: &&[u8]) -> bool {
        self.as_slice() == *other
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for FieldBytes {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl PartialEq<str> for FieldBytes {
    fn eq(&self, other: &str) -> bool {
        self.as_slice() == other.as_bytes()
    }
}

impl PartialEq<&str> for FieldBytes {
    fn eq(&self, other: &&str) -> bool {
        self.as_slice() == other.as_bytes()
    }
}

impl Hash for FieldBytes {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl fmt::Debug for FieldBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.as_slice().escape_ascii())
    }
}

impl From<&[u8]> for FieldBytes {
    fn from(b: &[u8]) -> FieldBytes {
        FieldBytes::new(b)
    }
}

impl From<&str> for FieldBytes {
    fn from(s: &str) -> FieldBytes {
        FieldBytes::new(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_bytes_read_back() {
        for n in [0, 1, 29, 30, 31, 200] {
            let bytes: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let f = FieldBytes::new(&bytes);
            assert_eq!(f.as_slice(), &bytes[..]);
            assert_eq!(f.clone(), f);
            assert_eq!(f.len(), n);
        }
        assert_ne!(FieldBytes::from("a"), FieldBytes::from("b"));
        assert_eq!(FieldBytes::from("a\"b"), "a\"b");
        assert_eq!(format!("{:?}", FieldBytes::from("a\"b")), "\"a\\\"b\"");
        assert_eq!(std::mem::size_of::<FieldBytes>(), 32);
    }
}
