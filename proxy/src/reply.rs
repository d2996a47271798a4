//! What the proxy answers by itself: `/health`, and errors in the OpenAI error shape.
//!
//! Both adapters answer from here so the two builds say the same bytes.

use lb_core::{Reject, Summary};

use crate::metrics::{rejection_for, Rejection};
use crate::request_id::RequestId;

/// A complete small response: status, extra headers, JSON body (or none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Extra headers besides `Content-Length` (and `Content-Type: application/json` when
    /// there is a body).
    pub headers: &'static [(&'static str, &'static str)],
    /// The JSON body; empty for [`refused`].
    pub body: String,
    /// The request's id, sent as `X-Request-Id` (and in the body of an error).
    pub request_id: Option<RequestId>,
    /// Why `lb` refused the request, where this reply is the refusal that counts
    /// (rejections the core decides are counted where it decides them).
    pub rejection: Option<Rejection>,
}

/// The answer to a request head refused before anything else happens (malformed, a
/// target or head over the limit, a refused method, a bad `Host` or framing): the status
/// alone, no body, and the connection closes, in both builds the form hyper gives its own
/// refusals (`400`, `414`, `431` with `Content-Length: 0` and `Connection: close`).
pub fn refused(status: u16) -> Reply {
    Reply {
        status,
        headers: &[("connection", "close")],
        body: String::new(),
        request_id: None,
        rejection: Some(rejection_for(status)),
    }
}

/// The answer to `GET /health`: 200 `ok` when a backend is healthy, else 503 `degraded`.
pub fn health(summary: Summary) -> Reply {
    let (status, word) = if summary.healthy > 0 {
        (200, "ok")
    } else {
        (503, "degraded")
    };
    Reply {
        status,
        headers: &[("cache-control", "no-store")],
        body: format!(
            r#"{{"status":"{word}","healthy_backends":{},"total_backends":{},"active_conns":{}}}"#,
            summary.healthy, summary.total, summary.in_flight
        ),
        request_id: None,
        rejection: None,
    }
}

/// Why the proxy itself answers with an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// The core found no backend (503) or every backend full (429).
    Rejected(Reject),
    /// The backend could not be reached or failed before a response head (502).
    BadGateway,
    /// The request's deadline passed before the response head (504).
    GatewayTimeout,
    /// The backend's response was not valid HTTP (502).
    BadResponse,
    /// The request was malformed (400).
    BadRequest,
    /// The request head was too large (431).
    HeadTooLarge,
    /// The request head did not arrive in time (408).
    HeadTimeout,
    /// The request body stalled: nothing of it for `--client-body-timeout` (408).
    BodyTimeout,
    /// The proxy is shutting down (503).
    ShuttingDown,
}

/// The error response for `e`, in the OpenAI error shape
/// `{"error":{"message":..,"type":..,"param":null,"code":..}}`. A 429 carries
/// `Retry-After: 1`.
pub fn error(e: ProxyError) -> Reply {
    error_for(e, None)
}

/// [`error`] for the request with `id`: the body also says
/// `"request_id":".."` (beside `error`, which keeps OpenAI's shape), and the reply carries
/// the id for its `X-Request-Id`.
pub fn error_for(e: ProxyError, id: Option<&RequestId>) -> Reply {
    let (status, kind, code, message): (u16, &str, &str, &str) = match e {
        ProxyError::Rejected(Reject::NoHealthyBackend) => (
            503,
            "server_error",
            "no_healthy_backend",
            "no healthy backend is available",
        ),
        ProxyError::Rejected(Reject::UnknownModel) => (
            404,
            "invalid_request_error",
            "model_not_found",
            "the requested model does not exist: no backend serves it",
        ),
        ProxyError::Rejected(Reject::AllAtCapacity) => (
            429,
            "rate_limit_error",
            "all_backends_busy",
            "every backend is at its connection limit; retry shortly",
        ),
        ProxyError::BadGateway => (
            502,
            "server_error",
            "bad_gateway",
            "the backend failed before answering",
        ),
        ProxyError::GatewayTimeout => (
            504,
            "server_error",
            "gateway_timeout",
            "the backend did not answer in time",
        ),
        ProxyError::BadResponse => (
            502,
            "server_error",
            "bad_gateway",
            "the backend sent an invalid response",
        ),
        ProxyError::BadRequest => (
            400,
            "invalid_request_error",
            "bad_request",
            "malformed HTTP request",
        ),
        ProxyError::HeadTooLarge => (
            431,
            "invalid_request_error",
            "request_header_fields_too_large",
            "request head too large",
        ),
        ProxyError::BodyTimeout => (
            408,
            "invalid_request_error",
            "request_timeout",
            "request body stalled: nothing received for --client-body-timeout",
        ),
        ProxyError::HeadTimeout => (
            408,
            "invalid_request_error",
            "request_timeout",
            "request head not received in time",
        ),
        ProxyError::ShuttingDown => (
            503,
            "server_error",
            "shutting_down",
            "the load balancer is shutting down",
        ),
    };
    let headers: &'static [(&'static str, &'static str)] = if status == 429 {
        &[("retry-after", "1")]
    } else {
        &[]
    };
    let rejection = match e {
        // The core's refusals are counted where they are decided.
        ProxyError::Rejected(_)
        | ProxyError::BadGateway
        | ProxyError::GatewayTimeout
        | ProxyError::BadResponse => None,
        ProxyError::BadRequest | ProxyError::HeadTooLarge => Some(Rejection::BadRequest),
        ProxyError::HeadTimeout | ProxyError::BodyTimeout => Some(Rejection::Timeout),
        ProxyError::ShuttingDown => Some(Rejection::ShuttingDown),
    };
    let mut body = format!(
        r#"{{"error":{{"message":"{message}","type":"{kind}","param":null,"code":"{code}"}}"#
    );
    if let Some(id) = id {
        // Ids are visible ASCII; a quote or backslash in a client's id is escaped.
        body.push_str(r#","request_id":"#);
        body.push_str(&crate::reqlog::json_string(id.as_str()));
    }
    body.push('}');
    Reply {
        status,
        headers,
        body,
        request_id: id.cloned(),
        rejection,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_bodies() {
        let ok = health(Summary {
            healthy: 3,
            total: 3,
            in_flight: 5,
        });
        assert_eq!(ok.status, 200);
        assert_eq!(
            ok.body,
            r#"{"status":"ok","healthy_backends":3,"total_backends":3,"active_conns":5}"#
        );
        let down = health(Summary {
            healthy: 0,
            total: 2,
            in_flight: 0,
        });
        assert_eq!(down.status, 503);
        assert!(down.body.contains(r#""status":"degraded""#));
    }

    #[test]
    fn rate_limit_has_retry_after() {
        let r = error(ProxyError::Rejected(Reject::AllAtCapacity));
        assert_eq!(r.status, 429);
        assert_eq!(r.headers, &[("retry-after", "1")]);
        assert!(r.body.contains(r#""type":"rate_limit_error""#));
        assert_eq!(
            error(ProxyError::Rejected(Reject::NoHealthyBackend)).status,
            503
        );
        assert_eq!(error(ProxyError::GatewayTimeout).status, 504);
        let r = error(ProxyError::Rejected(Reject::UnknownModel));
        assert_eq!(r.status, 404);
        assert!(r.body.contains(r#""code":"model_not_found""#), "{}", r.body);
    }
}
