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
pub(crate) fn bind(addr: SocketAddr, shards: usize) -> io::Result<Vec<TcpListener>> {
    let reuse_port = shards > 1;
    let first = bind_one(addr, reuse_port)?;
    let addr = first.local_addr()?;
    let mut all = Vec::with_capacity(shards);
    all.push(first);
    for _ in 1..shards {
        all.push(bind_one(addr, reuse_port)?);
    }
    Ok(all)
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    net::sockopt::set_socket_reuseaddr(&fd, true)?;
    if reuse_port {
        net::sockopt::set_socket_reuseport(&fd, true)?;
    }
    net::bind(&fd, &addr)?;
    net::listen(&fd, BACKLOG)?;
    Ok(TcpListener::from(fd))
}
