//! Sans-IO HTTP/1.1 framing for the proxy.
//!
//! Everything here is a pure function or a small state machine over byte
//! slices: no I/O, no clocks. Parsing is done by [`httparse`] plus explicit
//! checks for what it is lenient about; bodies are never decoded, only
//! delimited, so the proxy forwards them byte for byte.
//!
//! * [`parse_request`] / [`parse_response`]: bytes in, `Complete(head,
//!   consumed)` / `Partial` / [`Error`] out. Heads are owned.
//! * [`RequestHead::body_kind`] / [`ResponseHead::body_kind`]: how the body
//!   is delimited (RFC 9112 §6.3), as a [`BodyKind`].
//! * [`rewrite_request`] / [`rewrite_response`]: the head for the other side
//!   (hop-by-hop headers removed, `X-Forwarded-*`, backend `Host` and path
//!   prefix, framing headers consistent with the body).
//! * [`BodyFramer`]: feed body bytes, learn how many belong to this message
//!   and when it ends (content-length, chunked with extensions and trailers,
//!   close-delimited, tunnel).
//!
//! Every rejection is an [`Error`] variant. For a request answer
//! [`Error::status`] (400 or 431) and close; for a response answer 502.
//!
//! # Driving one exchange
//!
//! ```text
//! loop {                                              // one request per turn
//!     let (req, n) = match parse_request(&client_buf, &limits) {
//!         Ok(Complete(head, n)) => (head, n),
//!         Ok(Partial) => { read more from client (EOF: close); continue }
//!         Err(e) => { answer e.status() with Connection: close; close }
//!     };
//!     client_buf.drain(..n);
//!     out.clear();
//!     let req_body = rewrite_request(&req, &fwd, &mut out)?;   // never fails here
//!     send out to backend;
//!     let mut framer = BodyFramer::new(req_body);
//!     while !framer.is_done() {            // (with Expect: 100-continue, do this
//!         let p = framer.push(&client_buf)?;  //  concurrently with reading the response)
//!         send client_buf[..p.consumed] to backend; client_buf.drain(..p.consumed);
//!         if !p.done { read more from client (EOF: framer.finish() fails -> close) }
//!     }
//!     let plan = loop {
//!         let (resp, n) = parse_response(&backend_buf, &limits)?;   // Partial: read more
//!         backend_buf.drain(..n);                                    // error: 502
//!         out.clear();
//!         let plan = rewrite_response(&resp, &req, shutting_down, Some(&date), &mut out)?;
//!         send out to client;
//!         if !resp.is_interim() { break plan; }    // 100/103: wait for the final head
//!     };
//!     if plan.is_upgrade() { copy both ways until either side closes; return }
//!     let mut framer = BodyFramer::new(plan.body);
//!     loop {                                // same as the request body; on backend EOF
//!         ...                               // framer.finish() is Ok only if complete
//!     }                                     // (CloseDelimited ends at EOF)
//!     reuse backend conn only if resp.keep_alive() and the body was self-delimited;
//!     if !plan.keep_alive { close client; return }
//!     // leftover client_buf bytes are the next pipelined request
//! }
//! ```

mod body;
mod date;
mod dechunk;
mod error;
mod field;
mod framing;
mod head;
mod rewrite;
pub mod rules;

pub use body::{
    BodyFramer, Progress, MAX_CHUNK_EXTENSION, MAX_CHUNK_EXTENSIONS_TOTAL, MAX_TRAILER_BYTES,
};
pub use date::{http_date, HTTP_DATE_LEN};
pub use dechunk::Dechunk;
pub use error::Error;
pub use field::FieldBytes;
pub use framing::{chunked, content_length, BodyKind};
pub use head::{
    cannot_start_request, keep_alive_timeout, may_end_head, parse_request, parse_response, Header,
    Limits, RequestHead, ResponseHead, Status, Version, DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_HEAD_BYTES,
};
pub use rewrite::{rewrite_request, rewrite_response, Forwarding, ResponsePlan};

#[cfg(test)]
mod tests_body;
#[cfg(test)]
mod tests_head;
#[cfg(test)]
mod tests_rewrite;
