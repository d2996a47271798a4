//! The listening socket: like `std::net::TcpListener::bind` (with `SO_REUSEADDR`), but with
//! a backlog of 1024 instead of 128, so that a burst of a thousand connections is not
//! dropped by the kernel.

use std::io;
use std::net::{SocketAddr, TcpListener};

use async_io::Async;
use rustix::net::{self, AddressFamily, SocketFlags, SocketType};

const BACKLOG: i32 = 1024;

pub(crate) fn bind(addr: SocketAddr) -> io::Result<Async<TcpListener>> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    net::sockopt::set_socket_reuseaddr(&fd, true)?;
    net::bind(&fd, &addr)?;
    net::listen(&fd, BACKLOG)?;
    Async::new(TcpListener::from(fd))
}
