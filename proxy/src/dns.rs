//! Name resolution for `--discover dns://NAME:PORT`: blocking, on the discovery thread
//! (see [`crate::discovery`]), the same in both builds.
//!
//! - With `--resolver ADDR:PORT`: A and AAAA queries to that server over UDP (one retry,
//!   then TCP when an answer comes back truncated), the name taken as absolute (no search
//!   domains, as `dig` does). The answer's TTLs say when to ask again. Messages are
//!   encoded and decoded by `hickory-proto` (the DNS library of the Hickory project,
//!   default features off: no runtime, no sockets); the sockets are std's.
//! - Without: the system resolver (`getaddrinfo`: `/etc/hosts`, `/etc/resolv.conf` and
//!   its search domains, as any program in a Kubernetes pod sees them). It says nothing
//!   of TTLs: the name is looked up every `--discover-interval`.
//!
//! A lookup that fails, or finds no address, is an error: the caller keeps what it had.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

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
            for kind in [RecordType::A, RecordType::AAAA] {
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
fn ask(server: SocketAddr, name: &str, kind: RecordType) -> Result<Vec<(IpAddr, u32)>, String> {
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
fn encode(id: u16, name: &str, kind: RecordType) -> Result<Vec<u8>, String> {
    let mut qname = Name::from_ascii(name).map_err(|e| format!("'{name}': {e}"))?;
    qname.set_fqdn(true);
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(qname, kind));
    msg.to_vec().map_err(|e| e.to_string())
}

/// Reads the reply to the question `id` (`kind` for `name`). The addresses are those of
/// `name` or of the names it is an alias of (CNAME chains), whatever else the reply
/// holds. A reply that is not an answer to the question is an error.
fn decode(reply: &[u8], id: u16, name: &str, kind: RecordType) -> Result<Answer, String> {
    let msg = Message::from_vec(reply).map_err(|e| format!("unreadable answer: {e}"))?;
    let meta = &msg.metadata;
    if meta.id != id || meta.message_type != MessageType::Response {
        return Err("an answer to another question".into());
    }
    if meta.truncation {
        return Ok(Answer::Truncated);
    }
    match meta.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Err("no such name (NXDOMAIN)".into()),
        code => return Err(format!("the server answered {code}")),
    }
    let mut qname = Name::from_ascii(name).map_err(|e| e.to_string())?;
    qname.set_fqdn(true);
    // The name and its aliases: each round adds the CNAME targets of names already in;
    // at most one round per record.
    let mut names = vec![qname];
    for _ in 0..msg.answers.len() {
        let before = names.len();
        for r in &msg.answers {
            if let RData::CNAME(target) = &r.data {
                if names.contains(&r.name) && !names.contains(&target.0) {
                    names.push(target.0.clone());
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
        let ip = match (&r.data, kind) {
            (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
            (RData::AAAA(a), RecordType::AAAA) => IpAddr::V6(a.0),
            _ => continue,
        };
        found.push((ip, r.ttl));
    }
    Ok(Answer::Records(found))
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
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::Record;

    fn name(s: &str) -> Name {
        let mut n = Name::from_ascii(s).unwrap();
        n.set_fqdn(true);
        n
    }

    /// A reply to the question `id` with `answers`.
    fn reply(id: u16, code: ResponseCode, answers: Vec<Record>) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.metadata.response_code = code;
        m.add_query(Query::query(name("vllm.test"), RecordType::A));
        m.add_answers(answers);
        m.to_vec().unwrap()
    }

    #[test]
    fn a_query_asks_one_question_with_recursion() {
        let q = encode(0x1234, "vllm.test", RecordType::AAAA).unwrap();
        let m = Message::from_vec(&q).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Query);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].name(), &name("vllm.test"));
        assert_eq!(m.queries[0].query_type(), RecordType::AAAA);
        // The header and the question: 12 + (1+4+1+4+1) + 4 bytes.
        assert_eq!(q.len(), 12 + 11 + 4);
        assert!(encode(1, "bad name", RecordType::A).is_err());
    }

    #[test]
    fn answers_give_the_addresses_of_the_name_and_its_aliases() {
        let v4 = |n: &str, ip: [u8; 4], ttl| {
            Record::from_rdata(name(n), ttl, RData::A(A::from(Ipv4Addr::from(ip))))
        };
        let answers = vec![
            Record::from_rdata(
                name("vllm.test"),
                30,
                RData::CNAME(CNAME(name("pods.test"))),
            ),
            v4("pods.test", [10, 0, 0, 1], 7),
            v4("PODS.test", [10, 0, 0, 2], 9),
            // Not the name asked, nor an alias of it: left out.
            v4("other.test", [10, 9, 9, 9], 1),
            // Not the kind asked: left out.
            Record::from_rdata(
                name("vllm.test"),
                1,
                RData::AAAA(AAAA::from(Ipv6Addr::LOCALHOST)),
            ),
        ];
        let got = decode(
            &reply(7, ResponseCode::NoError, answers),
            7,
            "vllm.test",
            RecordType::A,
        );
        assert_eq!(
            got,
            Ok(Answer::Records(vec![
                (IpAddr::from([10, 0, 0, 1]), 7),
                (IpAddr::from([10, 0, 0, 2]), 9)
            ]))
        );
        // No record of the kind asked: an empty answer, not an error.
        let got = decode(
            &reply(7, ResponseCode::NoError, vec![]),
            7,
            "vllm.test",
            RecordType::AAAA,
        );
        assert_eq!(got, Ok(Answer::Records(vec![])));
    }

    #[test]
    fn errors_truncation_and_strangers_are_told_apart() {
        let nx = decode(
            &reply(3, ResponseCode::NXDomain, vec![]),
            3,
            "vllm.test",
            RecordType::A,
        );
        assert!(nx.unwrap_err().contains("NXDOMAIN"));
        let fail = decode(
            &reply(3, ResponseCode::ServFail, vec![]),
            3,
            "vllm.test",
            RecordType::A,
        );
        assert!(fail.is_err());
        assert!(decode(
            &reply(3, ResponseCode::NoError, vec![]),
            4,
            "vllm.test",
            RecordType::A
        )
        .is_err());
        // A query is not an answer.
        let q = encode(5, "vllm.test", RecordType::A).unwrap();
        assert!(decode(&q, 5, "vllm.test", RecordType::A).is_err());
        let mut m = Message::new(6, MessageType::Response, OpCode::Query);
        m.metadata.truncation = true;
        assert_eq!(
            decode(&m.to_vec().unwrap(), 6, "vllm.test", RecordType::A),
            Ok(Answer::Truncated)
        );
        // Bytes that are no DNS message at all, of any length, are refused without a panic.
        for n in 0..40 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode(&junk, 0, "vllm.test", RecordType::A);
        }
    }

    /// A one-shot DNS server on loopback: answers each query with `answer(query)`.
    fn server(answer: impl Fn(&Message) -> Vec<u8> + Send + 'static) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let q = Message::from_vec(&buf[..n]).unwrap();
                let _ = sock.send_to(&answer(&q), from);
            }
        });
        addr
    }

    #[test]
    fn lookup_asks_a_and_aaaa_and_keeps_the_smallest_ttl() {
        let addr = server(|q| {
            let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            let qn = q.queries[0].name().clone();
            m.add_query(q.queries[0].clone());
            match q.queries[0].query_type() {
                RecordType::A => {
                    m.add_answer(Record::from_rdata(
                        qn.clone(),
                        20,
                        RData::A(A::new(127, 0, 0, 3)),
                    ));
                    m.add_answer(Record::from_rdata(qn, 8, RData::A(A::new(127, 0, 0, 2))));
                }
                _ => {
                    m.add_answer(Record::from_rdata(
                        qn,
                        60,
                        RData::AAAA(AAAA::from(Ipv6Addr::LOCALHOST)),
                    ));
                }
            }
            m.to_vec().unwrap()
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
            let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            m.add_query(q.queries[0].clone());
            if q.queries[0].query_type() == RecordType::A {
                let qn = q.queries[0].name().clone();
                m.add_answer(Record::from_rdata(qn, 5, RData::A(A::new(127, 0, 0, 4))));
            } else {
                m.metadata.response_code = ResponseCode::Refused;
            }
            m.to_vec().unwrap()
        });
        let found = lookup("vllm.test", Some(refuses)).unwrap();
        assert_eq!(found.addrs, vec![IpAddr::from([127, 0, 0, 4])]);
        assert_eq!(found.ttl, Some(Duration::from_secs(5)));

        // No record at all is an error; so is a server that is not there.
        let empty = server(|q| {
            let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            m.add_query(q.queries[0].clone());
            m.to_vec().unwrap()
        });
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
