//! The rules every build of `lb` applies to a message, as pure functions over header
//! values: one table of hop-by-hop fields, the request target and `Host` checks, the
//! framing acceptance rules ([`chunked`](crate::chunked),
//! [`content_length`](crate::content_length)) and the `X-Forwarded-For` value.
//!
//! The smol build applies them through this crate's parser and rewriter; the tokio
//! build applies the same functions to hyper's `HeaderMap` (each value as bytes), so the
//! two builds cannot drift apart.

use std::io::Write as _;
use std::net::IpAddr;

use crate::head::{list_items, push_decimal, split_absolute};
use crate::{Error, Version};

/// Fields that describe one connection, not the message, and are never forwarded (RFC
/// 9110 §7.6.1), besides those a `Connection` field names. `Proxy-Authenticate` and
/// `Proxy-Authorization` are a proxy's own business (RFC 9110 §11.7): `lb` asks for no
/// proxy credentials, so it passes none on, in either direction. `Trailer` is not here: it
/// is end-to-end (RFC 9110 §6.6.2), and announcing trailers is what lets them through.
/// `Upgrade` is kept on an upgrade request and its `101`.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether `name` is hop-by-hop by itself ([`HOP_BY_HOP`], ASCII case-insensitive).
pub fn is_hop_by_hop(name: impl AsRef<[u8]>) -> bool {
    let name = name.as_ref();
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Whether a `Connection` field's values name `name` (its token list, case-insensitive):
/// then `name` is hop-by-hop too.
pub fn connection_names<'a>(connection: impl IntoIterator<Item = &'a [u8]>, name: &[u8]) -> bool {
    connection
        .into_iter()
        .flat_map(list_items)
        .any(|t| t.eq_ignore_ascii_case(name))
}

/// A request target `lb` forwards: origin-form (`/path?q`), absolute-form (`http` or
/// `https`, no user info) or `*` for `OPTIONS`. `CONNECT` (authority-form) is refused:
/// `lb` opens no tunnels to arbitrary hosts.
pub fn check_target(method: &str, target: &str) -> Result<(), Error> {
    if method == "CONNECT" || !target.is_ascii() {
        return Err(Error::InvalidTarget);
    }
    if target.starts_with('/') || (target == "*" && method == "OPTIONS") {
        return Ok(());
    }
    match split_absolute(target) {
        Some((authority, _)) if !authority.is_empty() && !authority.contains('@') => Ok(()),
        _ => Err(Error::InvalidTarget),
    }
}

/// `Host` (every line of it): HTTP/1.1 needs exactly one (RFC 9112 §3.2); in any version
/// one that is there must look like an authority (no spaces, no controls; empty is an
/// empty authority).
pub fn check_host<'a>(
    version: Version,
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(), Error> {
    let mut hosts = values.into_iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(Error::InvalidHost);
    }
    match first {
        None if version == Version::Http11 => Err(Error::InvalidHost),
        Some(v) if !v.iter().all(|&b| is_authority_byte(b)) => Err(Error::InvalidHost),
        _ => Ok(()),
    }
}

/// unreserved / sub-delims / pct-encoded / `:` / `[` / `]` (RFC 3986).
fn is_authority_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b)
}

/// Writes the `X-Forwarded-For` value to send: the client's list (every line of the
/// field, in order, folded into one) with `client` appended. Not merged when the client
/// named the field in `Connection` (it asked for it to be dropped): then only `client`.
pub fn forwarded_for<'a>(
    prior: impl IntoIterator<Item = &'a [u8]>,
    client: IpAddr,
    out: &mut Vec<u8>,
) {
    for item in prior.into_iter().flat_map(list_items) {
        out.extend_from_slice(item);
        out.extend_from_slice(b", ");
    }
    match client {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, u64::from(octet));
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "{client}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(name));
            assert!(is_hop_by_hop(name.to_ascii_uppercase()));
        }
        for name in ["trailer", "content-length", "x-forwarded-for", "host"] {
            assert!(!is_hop_by_hop(name), "{name}");
            assert!(
                !crate::head::Known::of(name.as_bytes()).is_hop_by_hop(),
                "{name}"
            );
        }
        // The parsed heads' tags say the same as the table.
        let tagged: std::collections::HashSet<_> = HOP_BY_HOP
            .iter()
            .map(|n| crate::head::Known::of(n.to_ascii_uppercase().as_bytes()))
            .collect();
        assert_eq!(tagged.len(), HOP_BY_HOP.len());
        assert!(tagged.iter().all(|k| k.is_hop_by_hop()));
        assert!(connection_names(
            [&b"close, X-Hop"[..], b" x-other"],
            b"x-other"
        ));
        assert!(!connection_names([&b"close"[..]], b"x-hop"));
    }

    #[test]
    fn targets() {
        assert!(check_target("GET", "/v1/models?x=1").is_ok());
        assert!(check_target("GET", "http://h:1/p").is_ok());
        assert!(check_target("OPTIONS", "*").is_ok());
        assert!(check_target("GET", "*").is_err());
        assert!(check_target("CONNECT", "example.com:443").is_err());
        assert!(check_target("GET", "http://user@h/").is_err());
        assert!(check_target("GET", "example.com:443").is_err());
    }

    #[test]
    fn hosts() {
        let v11 = Version::Http11;
        assert!(check_host(v11, [&b"a:1"[..]]).is_ok());
        assert!(check_host(v11, []).is_err());
        assert!(check_host(v11, [&b"a"[..], b"a"]).is_err());
        assert!(check_host(v11, [&b"a b"[..]]).is_err());
        // An empty value is a valid (empty) authority.
        assert!(check_host(v11, [&b""[..]]).is_ok());
        assert!(check_host(Version::Http10, []).is_ok());
        assert!(check_host(Version::Http10, [&b"a b"[..]]).is_err());
    }

    #[test]
    fn forwarded_for_folds_lines_and_appends() {
        let mut out = Vec::new();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        forwarded_for([&b"10.0.0.1, 10.0.0.2"[..], b" 10.0.0.3 "], ip, &mut out);
        assert_eq!(out, b"10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1");
        out.clear();
        forwarded_for([], ip, &mut out);
        assert_eq!(out, b"127.0.0.1");
    }
}
