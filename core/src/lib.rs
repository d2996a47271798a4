//! lb-core (being written)
#![forbid(unsafe_code)]
pub mod http1;
