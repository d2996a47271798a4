//! The proxy layer of `lb`: everything both runtimes need that is not I/O itself.
//!
//! `lb-core` makes the balancing decisions and `lb-http1` frames HTTP/1.1 bytes; the
//! adapters (`lb-tokio`, `lb-smol`) move bytes and time. This crate sits between: the
//! validated [`Settings`], the error replies both builds send ([`reply`]), the request
//! log ([`reqlog`]), and the notices the CLI prints. It depends on no runtime.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod deadline;
pub mod reply;
pub mod reqlog;
pub mod settings;

pub use settings::{HashKey, Notice, NoticeSink, RouteKeys, Settings, Target, UrlError};
