//! The listening sockets: like `std::net::TcpListener::bind` (with `SO_REUSEADDR`), but with
//! a backlog of 4096 instead of 128, so that a burst of a thousand connections is not
//! dropped by the kernel; and one socket per shard, all bound to the same address with
//! `SO_REUSEPORT`, so that the kernel spreads connections among the shards' threads.

use std::io;
use std::net::{SocketAddr, TcpListener};

use rustix::net::{self, AddressFamily, SocketFlags, SocketType};

const BACKLOG: i32 = 4096;

/// `shards` listening sockets on `addr` (one without `SO_REUSEPORT` when `shards` is 1).
/// With port 0, the first socket picks the port and the others bind that one.
///
/// `SO_REUSEPORT` would also let the shards join a group another process already listens
/// with (a second `lb` started by mistake), silently splitting its traffic; so the address
/// is first claimed by a socket without it, which fails like a plain bind when the address
/// is in use, and is closed before the shards bind.
pub(crate) fn bind(addr: SocketAddr, shards: usize) -> io::Result<Vec<TcpListener>> {
    let reuse_port = shards > 1;
    if reuse_port && addr.port() != 0 {
        let probe = net::socket_with(family(addr), SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
        net::sockopt::set_socket_reuseaddr(&probe, true)?;
        net::bind(&probe, &addr)?;
    }
    let first = bind_one(addr, reuse_port)?;
    let addr = first.local_addr()?;
    let mut all = Vec::with_capacity(shards);
    all.push(first);
    for _ in 1..shards {
        all.push(bind_one(addr, reuse_port)?);
    }
    Ok(all)
}

pub(crate) fn family(addr: SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    }
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let fd = net::socket_with(family(addr), SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    net::sockopt::set_socket_reuseaddr(&fd, true)?;
    if reuse_port {
        net::sockopt::set_socket_reuseport(&fd, true)?;
    }
    net::bind(&fd, &addr)?;
    net::listen(&fd, BACKLOG)?;
    Ok(TcpListener::from(fd))
}
