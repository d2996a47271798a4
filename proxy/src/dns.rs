//! Name resolution for `--discover dns://NAME:PORT`: blocking, on the discovery thread
//! (see [`crate::discovery`]), the same in both builds.
//!
//! - With `--resolver ADDR:PORT`: A and AAAA queries to that server over UDP (one retry,
//!   then TCP when an answer comes back truncated), the name taken as absolute (no search
//!   domains, as `dig` does). The answer's TTLs say when to ask again. Messages are
//!   encoded and decoded by `simple-dns` (pure: no runtime, no sockets); the sockets are
//!   std's.
//! - Without: the system resolver (`getaddrinfo`: `/etc/hosts`, `/etc/resolv.conf` and
//!   its search domains, as any program in a Kubernetes pod sees them). It says nothing
//!   of TTLs: the name is looked up every `--discover-interval`.
//!
//! A lookup that fails, or finds no address, is an error: the caller keeps what it had.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use simple_dns::rdata::{RData, CNAME};
use simple_dns::{Name, Packet, PacketFlag, Question, CLASS, RCODE, TYPE};

/// How long one query may wait for its answer (each of two UDP tries, or TCP).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest DNS message read over UDP (EDNS is not used: 512 is what a server may
/// send; more is read in case it sends more anyway).
const UDP_BUF: usize = 4096;

/// What a lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The addresses, sorted, without duplicates; never empty.
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL of the records used (from `--resolver` only).
    pub ttl: Option<Duration>,
}

/// Resolves `name` (A and AAAA) through `server`, or the system resolver when `None`.
/// The error says why, in a few words (without the name).
pub fn lookup(name: &str, server: Option<SocketAddr>) -> Result<Found, String> {
    match server {
        None => system(name),
        Some(server) => {
            // An address family whose question fails counts as having no address when
            // the other found some (a server may refuse AAAA for a name it only has A
            // records for); the lookup fails when nothing is found.
            let mut records = Vec::new();
            let mut error = None;
            for kind in [TYPE::A, TYPE::AAAA] {
                match ask(server, name, kind) {
                    Ok(r) => records.extend(r),
                    Err(e) => error = error.or(Some(e)),
                }
            }
            let mut addrs: Vec<IpAddr> = records.iter().map(|(ip, _)| *ip).collect();
            addrs.sort();
            addrs.dedup();
            if addrs.is_empty() {
                return Err(
                    error.unwrap_or_else(|| format!("{server} knows no A or AAAA record for it"))
                );
            }
            let ttl = records.iter().map(|(_, ttl)| *ttl).min();
            Ok(Found {
                addrs,
                ttl: ttl.map(|t| Duration::from_secs(t.into())),
            })
        }
    }
}

/// The system resolver (`getaddrinfo`).
fn system(name: &str) -> Result<Found, String> {
    // The port does not matter: only the addresses are kept.
    let mut addrs: Vec<IpAddr> = (name, 0)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .map(|a| a.ip())
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err("no address".into());
    }
    Ok(Found { addrs, ttl: None })
}

/// One question (`kind` A or AAAA) to `server`: the addresses with their TTLs.
fn ask(server: SocketAddr, name: &str, kind: TYPE) -> Result<Vec<(IpAddr, u32)>, String> {
    let id: u16 = {
        use rand::{Rng, SeedableRng};
        rand::rngs::SmallRng::from_os_rng().random()
    };
    let query = encode(id, name, kind)?;
    let mut last = String::new();
    for _try in 0..2 {
        match udp(server, &query, id) {
            Ok(reply) => {
                return match decode(&reply, id, name, kind)? {
                    Answer::Records(r) => Ok(r),
                    Answer::Truncated => match decode(&tcp(server, &query)?, id, name, kind)? {
                        Answer::Records(r) => Ok(r),
                        Answer::Truncated => Err(format!("{server}: truncated answer over TCP")),
                    },
                };
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// What a reply says.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The addresses (and TTLs) for the name; empty when it has none of the kind asked.
    Records(Vec<(IpAddr, u32)>),
    /// It did not fit in a datagram: ask again over TCP.
    Truncated,
}

/// The question `kind` for `name` (absolute), with the id `id` and recursion desired.
fn encode(id: u16, name: &str, kind: TYPE) -> Result<Vec<u8>, String> {
    let qname = qname(name)?;
    let mut msg = Packet::new_query(id);
    msg.set_flags(PacketFlag::RECURSION_DESIRED);
    msg.questions
        .push(Question::new(qname, kind.into(), CLASS::IN.into(), false));
    msg.build_bytes_vec().map_err(|e| e.to_string())
}

/// `name` as a DNS name: labels of ASCII letters, digits, `-` (not first) and `_`, of 1 to
/// 63 bytes, 255 bytes in all on the wire; one trailing dot allowed (the name is taken as
/// absolute either way).
fn qname(name: &str) -> Result<Name<'_>, String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && l.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    if !bare.split('.').all(label_ok) {
        return Err(format!("'{name}': not a valid DNS name"));
    }
    Name::new(bare).map_err(|_| format!("'{name}': not a valid DNS name (too long)"))
}

/// The most aliases (CNAME records) followed from the name asked, as resolvers bound
/// their chains too (BIND follows 16).
const MAX_ALIASES: usize = 16;

/// Reads the reply to the question `id` (`kind` for `name`). The addresses are those of
/// `name` or of the names it is an alias of (CNAME chains), whatever else the reply
/// holds. A reply that is not an answer to the question is an error.
fn decode(reply: &[u8], id: u16, name: &str, kind: TYPE) -> Result<Answer, String> {
    // The header alone says whose answer this is, and whether it was cut short (then the
    // rest may not parse: it is asked again over TCP).
    let Some(head) = reply.get(..12) else {
        return Err("unreadable answer: shorter than a DNS header".into());
    };
    let flags = PacketFlag::from_bits_truncate(u16::from_be_bytes([head[2], head[3]]));
    if u16::from_be_bytes([head[0], head[1]]) != id || !flags.contains(PacketFlag::RESPONSE) {
        return Err("an answer to another question".into());
    }
    if flags.contains(PacketFlag::TRUNCATION) {
        return Ok(Answer::Truncated);
    }
    // Each question takes 5 bytes at least, each record 11: counts that cannot fit are
    // refused before the parser reserves room for them.
    let count: usize = (4..12)
        .step_by(2)
        .map(|i| usize::from(u16::from_be_bytes([head[i], head[i + 1]])))
        .sum();
    if count * 5 > reply.len() - 12 {
        return Err("unreadable answer: more records than bytes".into());
    }
    let msg = Packet::parse(reply).map_err(|e| format!("unreadable answer: {e}"))?;
    match msg.rcode() {
        RCODE::NoError => {}
        RCODE::NameError => return Err("no such name (NXDOMAIN)".into()),
        code => return Err(format!("the server answered {}", rcode_name(code, head[3]))),
    }
    // The name and its aliases: each round adds the CNAME targets of names already in;
    // at most one round per record, and at most MAX_ALIASES aliases (a reply of thousands
    // of chained records costs rounds × records × names). Names compare without regard
    // to ASCII case.
    let mut names = vec![qname(name)?];
    for _ in 0..msg.answers.len().min(MAX_ALIASES) {
        let before = names.len();
        for r in &msg.answers {
            if let RData::CNAME(CNAME(target)) = &r.rdata {
                if names.len() <= MAX_ALIASES && names.contains(&r.name) && !names.contains(target)
                {
                    names.push(target.clone());
                }
            }
        }
        if names.len() == before {
            break;
        }
    }
    let mut found = Vec::new();
    for r in &msg.answers {
        if !names.contains(&r.name) {
            continue;
        }
        let ip = match (&r.rdata, kind) {
            (RData::A(a), TYPE::A) => IpAddr::V4(Ipv4Addr::from(a.address)),
            (RData::AAAA(a), TYPE::AAAA) => IpAddr::V6(Ipv6Addr::from(a.address)),
            _ => continue,
        };
        found.push((ip, r.ttl));
    }
    Ok(Answer::Records(found))
}

/// The usual short name of a response code (as `dig` prints it); `flags` is the header's
/// fourth byte, whose low four bits are the code (EDNS, which extends it, is not used).
fn rcode_name(code: RCODE, flags: u8) -> String {
    match code {
        RCODE::FormatError => "FORMERR".into(),
        RCODE::ServerFailure => "SERVFAIL".into(),
        RCODE::NotImplemented => "NOTIMP".into(),
        RCODE::Refused => "REFUSED".into(),
        RCODE::Reserved => format!("RCODE{}", flags & 0x0f),
        other => format!("{other:?}"),
    }
}

/// Sends `query` over UDP and returns the first datagram from `server` that carries the
/// id `id`, within [`QUERY_TIMEOUT`].
fn udp(server: SocketAddr, query: &[u8], id: u16) -> Result<Vec<u8>, String> {
    let e = |e: std::io::Error| format!("{server}: {}", crate::words::io_error(&e));
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).map_err(e)?;
    // Connected: datagrams from anywhere else are not delivered.
    sock.connect(server).map_err(e)?;
    sock.send(query).map_err(e)?;
    let deadline = Instant::now() + QUERY_TIMEOUT;
    let mut buf = vec![0u8; UDP_BUF];
    // Bounded: a stray datagram (an old answer) costs one round.
    for _ in 0..16 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left)).map_err(e)?;
        let n = sock.recv(&mut buf).map_err(e)?;
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
    Err(format!("{server}: no answer within {QUERY_TIMEOUT:?}"))
}

/// Sends `query` over TCP (two-byte length prefix) and reads one message back.
fn tcp(server: SocketAddr, query: &[u8]) -> Result<Vec<u8>, String> {
    let e = |e: std::io::Error| format!("{server} (TCP): {}", crate::words::io_error(&e));
    let mut s = TcpStream::connect_timeout(&server, QUERY_TIMEOUT).map_err(e)?;
    s.set_read_timeout(Some(QUERY_TIMEOUT)).map_err(e)?;
    s.set_write_timeout(Some(QUERY_TIMEOUT)).map_err(e)?;
    let len = u16::try_from(query.len()).map_err(|_| "query too long".to_string())?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(query);
    s.write_all(&out).map_err(e)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).map_err(e)?;
    let mut reply = vec![0u8; u16::from_be_bytes(len).into()];
    s.read_exact(&mut reply).map_err(e)?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::rdata::{A, AAAA};
    use simple_dns::ResourceRecord;

    fn name(s: &str) -> Name<'_> {
        Name::new(s).unwrap()
    }

    fn record(n: &str, ttl: u32, data: RData<'static>) -> ResourceRecord<'static> {
        ResourceRecord::new(name(n).into_owned(), CLASS::IN, ttl, data)
    }

    fn a(ip: [u8; 4]) -> RData<'static> {
        RData::A(A::from(Ipv4Addr::from(ip)))
    }

    fn aaaa(ip: Ipv6Addr) -> RData<'static> {
        RData::AAAA(AAAA::from(ip))
    }

    /// A reply to the question `id` with `answers`.
    fn reply(id: u16, code: RCODE, answers: Vec<ResourceRecord<'_>>) -> Vec<u8> {
        let mut m = Packet::new_reply(id);
        *m.rcode_mut() = code;
        m.questions.push(Question::new(
            name("vllm.test"),
            TYPE::A.into(),
            CLASS::IN.into(),
            false,
        ));
        m.answers = answers;
        m.build_bytes_vec().unwrap()
    }

    #[test]
    fn a_query_asks_one_question_with_recursion() {
        let q = encode(0x1234, "vllm.test", TYPE::AAAA).unwrap();
        let m = Packet::parse(&q).unwrap();
        assert_eq!(m.id(), 0x1234);
        assert!(!m.has_flags(PacketFlag::RESPONSE));
        assert!(m.has_flags(PacketFlag::RECURSION_DESIRED));
        assert_eq!(m.questions.len(), 1);
        assert_eq!(m.questions[0].qname, name("vllm.test"));
        assert_eq!(m.questions[0].qtype, TYPE::AAAA.into());
        assert_eq!(m.questions[0].qclass, CLASS::IN.into());
        // The header and the question: 12 + (1+4+1+4+1) + 4 bytes.
        assert_eq!(q.len(), 12 + 11 + 4);
        // A trailing dot changes nothing.
        assert_eq!(encode(0x1234, "vllm.test.", TYPE::AAAA).unwrap(), q);
        for bad in [
            "bad name",
            "",
            ".",
            "a..b",
            "-a.test",
            "a\\.b",
            "caf\u{e9}.test",
            &"x".repeat(64),
            &["x"; 128].join("."),
        ] {
            assert!(encode(1, bad, TYPE::A).is_err(), "{bad:?}");
        }
        assert!(encode(1, "_http._tcp.a-b.test", TYPE::A).is_ok());
    }

    #[test]
    fn answers_give_the_addresses_of_the_name_and_its_aliases() {
        let answers = vec![
            record("vllm.test", 30, RData::CNAME(CNAME(name("pods.test")))),
            record("pods.test", 7, a([10, 0, 0, 1])),
            record("PODS.test", 9, a([10, 0, 0, 2])),
            // Not the name asked, nor an alias of it: left out.
            record("other.test", 1, a([10, 9, 9, 9])),
            // Not the kind asked: left out.
            record("vllm.test", 1, aaaa(Ipv6Addr::LOCALHOST)),
        ];
        let got = decode(&reply(7, RCODE::NoError, answers), 7, "vllm.test", TYPE::A);
        assert_eq!(
            got,
            Ok(Answer::Records(vec![
                (IpAddr::from([10, 0, 0, 1]), 7),
                (IpAddr::from([10, 0, 0, 2]), 9)
            ]))
        );
        // A longer chain, listed out of order, ending in AAAA records.
        let answers = vec![
            record("b.test", 4, RData::CNAME(CNAME(name("c.test")))),
            record("c.test", 3, aaaa(Ipv6Addr::LOCALHOST)),
            record("vllm.test", 5, RData::CNAME(CNAME(name("b.test")))),
            // A loop back to the start adds nothing.
            record("c.test", 5, RData::CNAME(CNAME(name("VLLM.test")))),
        ];
        let got = decode(
            &reply(7, RCODE::NoError, answers),
            7,
            "vllm.test",
            TYPE::AAAA,
        );
        assert_eq!(
            got,
            Ok(Answer::Records(vec![(IpAddr::V6(Ipv6Addr::LOCALHOST), 3)]))
        );
        // A chain longer than MAX_ALIASES is followed that far, no further.
        let chain = |len: usize| {
            let mut answers: Vec<_> = (0..len)
                .map(|i| {
                    let from = if i == 0 {
                        "vllm.test".to_string()
                    } else {
                        format!("n{i}.test")
                    };
                    let to = name(&format!("n{}.test", i + 1)).into_owned();
                    record(&from, 5, RData::CNAME(CNAME(to)))
                })
                .collect();
            answers.push(record(&format!("n{len}.test"), 5, a([10, 0, 0, 3])));
            decode(&reply(7, RCODE::NoError, answers), 7, "vllm.test", TYPE::A)
        };
        assert_eq!(
            chain(MAX_ALIASES),
            Ok(Answer::Records(vec![(IpAddr::from([10, 0, 0, 3]), 5)]))
        );
        assert_eq!(chain(MAX_ALIASES + 1), Ok(Answer::Records(vec![])));
        // No record of the kind asked: an empty answer, not an error.
        let got = decode(
            &reply(7, RCODE::NoError, vec![]),
            7,
            "vllm.test",
            TYPE::AAAA,
        );
        assert_eq!(got, Ok(Answer::Records(vec![])));
    }

    #[test]
    fn errors_truncation_and_strangers_are_told_apart() {
        let nx = decode(&reply(3, RCODE::NameError, vec![]), 3, "vllm.test", TYPE::A);
        assert!(nx.unwrap_err().contains("NXDOMAIN"));
        let fail = decode(
            &reply(3, RCODE::ServerFailure, vec![]),
            3,
            "vllm.test",
            TYPE::A,
        );
        assert!(fail.unwrap_err().contains("SERVFAIL"));
        assert!(decode(&reply(3, RCODE::NoError, vec![]), 4, "vllm.test", TYPE::A).is_err());
        // A query is not an answer.
        let q = encode(5, "vllm.test", TYPE::A).unwrap();
        assert!(decode(&q, 5, "vllm.test", TYPE::A).is_err());
        let mut m = Packet::new_reply(6);
        m.set_flags(PacketFlag::TRUNCATION);
        assert_eq!(
            decode(&m.build_bytes_vec().unwrap(), 6, "vllm.test", TYPE::A),
            Ok(Answer::Truncated)
        );
        // Cut short after the header, as a server may send it: still truncated.
        let mut cut = reply(6, RCODE::NoError, vec![record("vllm.test", 1, a([1; 4]))]);
        cut[2] |= 0x02;
        cut.truncate(20);
        assert_eq!(decode(&cut, 6, "vllm.test", TYPE::A), Ok(Answer::Truncated));
        // Bytes that are no DNS message at all, of any length, are refused without a panic.
        for n in 0..40 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode(&junk, 0, "vllm.test", TYPE::A);
        }
    }

    #[test]
    fn damaged_answers_never_panic() {
        let good = reply(
            9,
            RCODE::NoError,
            vec![
                record("vllm.test", 30, RData::CNAME(CNAME(name("pods.test")))),
                record("pods.test", 7, a([10, 0, 0, 1])),
                record("pods.test", 7, aaaa(Ipv6Addr::LOCALHOST)),
            ],
        );
        // A fixed pseudo-random sequence (xorshift): each round flips, cuts or grows the
        // good answer at a few places; the id and the response bit are kept so that the
        // parser is reached.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut m = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % m.len();
                match next() % 4 {
                    0 => m.truncate(at.max(12)),
                    1 => m.push(next() as u8),
                    _ => m[at] = next() as u8,
                }
            }
            m[..2].copy_from_slice(&9u16.to_be_bytes());
            m[2] = (m[2] | 0x80) & !0x02;
            let _ = decode(&m, 9, "vllm.test", TYPE::A);
        }
    }

    /// A one-shot DNS server on loopback: answers each query with `answer(query)`.
    fn server(answer: impl Fn(&Packet<'_>) -> Vec<u8> + Send + 'static) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let q = Packet::parse(&buf[..n]).unwrap();
                let _ = sock.send_to(&answer(&q), from);
            }
        });
        addr
    }

    /// The start of a reply to `q`: its id and its question.
    fn reply_to<'a>(q: &Packet<'a>) -> Packet<'a> {
        let mut m = Packet::new_reply(q.id());
        m.questions.push(q.questions[0].clone());
        m
    }

    #[test]
    fn lookup_asks_a_and_aaaa_and_keeps_the_smallest_ttl() {
        let addr = server(|q| {
            let mut m = reply_to(q);
            let qn = q.questions[0].qname.clone();
            let rr = |ttl, data| ResourceRecord::new(qn.clone(), CLASS::IN, ttl, data);
            if q.questions[0].qtype == TYPE::A.into() {
                m.answers.push(rr(20, a([127, 0, 0, 3])));
                m.answers.push(rr(8, a([127, 0, 0, 2])));
            } else {
                m.answers.push(rr(60, aaaa(Ipv6Addr::LOCALHOST)));
            }
            m.build_bytes_vec().unwrap()
        });
        let found = lookup("vllm.test", Some(addr)).unwrap();
        assert_eq!(
            found.addrs,
            vec![
                IpAddr::from([127, 0, 0, 2]),
                IpAddr::from([127, 0, 0, 3]),
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            ]
        );
        assert_eq!(found.ttl, Some(Duration::from_secs(8)));

        // A refused AAAA question does not hide the A records.
        let refuses = server(|q| {
            let mut m = reply_to(q);
            if q.questions[0].qtype == TYPE::A.into() {
                let qn = q.questions[0].qname.clone();
                m.answers
                    .push(ResourceRecord::new(qn, CLASS::IN, 5, a([127, 0, 0, 4])));
            } else {
                *m.rcode_mut() = RCODE::Refused;
            }
            m.build_bytes_vec().unwrap()
        });
        let found = lookup("vllm.test", Some(refuses)).unwrap();
        assert_eq!(found.addrs, vec![IpAddr::from([127, 0, 0, 4])]);
        assert_eq!(found.ttl, Some(Duration::from_secs(5)));

        // No record at all is an error; so is a server that is not there.
        let empty = server(|q| reply_to(q).build_bytes_vec().unwrap());
        assert!(lookup("vllm.test", Some(empty)).is_err());
        let gone = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(lookup("vllm.test", Some(gone)).is_err());
    }

    #[test]
    fn the_system_resolver_reads_etc_hosts() {
        let found = lookup("localhost", None).unwrap();
        assert!(found.addrs.iter().all(|a| a.is_loopback()), "{found:?}");
        assert_eq!(found.ttl, None);
        assert!(lookup("no-such-name.invalid", None).is_err());
    }
}
