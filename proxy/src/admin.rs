//! The admin listener's routes (`--admin-bind`): `/metrics`, `/health` and `/live`, and
//! the admin API under `/admin/backends` (see [`crate::fleet`]), answered here for both
//! builds; the adapters only read requests and write the answer. Everything else is
//! `404`.
//!
//! Access: `/metrics`, `/health` and `/live` answer anyone (read-only, no secrets).
//! `/admin/*` needs `Authorization: Bearer <token>` when `--admin-token-file` is given
//! (`401` without it or with another); without a token it is open on a loopback admin
//! listener and refused (`403`) on any other address.

use std::net::{SocketAddr, TcpListener};

use lb_core::BackendSpec;
use serde_json::{json, Value};

use crate::fleet::{parse_serial, FleetError, Origin};

use crate::metrics::Format;
use crate::proxy::Proxy;
use crate::settings::{Notice, Settings};
use crate::start::StartError;

use crate::runtime::Runtime;

/// The most request body bytes an admin request may carry.
pub const MAX_BODY: usize = 64 * 1024;

/// An admin request, as the adapter read it.
#[derive(Clone, Copy, Debug)]
pub struct AdminRequest<'a> {
    /// Method.
    pub method: &'a str,
    /// Target (path and query).
    pub target: &'a str,
    /// The `Accept` header, if any.
    pub accept: Option<&'a [u8]>,
    /// The `Authorization` header, if any.
    pub authorization: Option<&'a [u8]>,
    /// The client's address.
    pub client: SocketAddr,
    /// The body (at most [`MAX_BODY`] bytes).
    pub body: &'a [u8],
}

/// The answer to an admin request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminResponse {
    /// Status.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Extra headers.
    pub headers: &'static [(&'static str, &'static str)],
    /// Body.
    pub body: String,
}

const JSON: &str = "application/json";

impl AdminResponse {
    fn json(status: u16, body: String) -> Self {
        AdminResponse {
            status,
            content_type: JSON,
            headers: &[("cache-control", "no-store")],
            body,
        }
    }

    /// An error in the proxy's OpenAI shape.
    fn error(status: u16, kind: &str, code: &str, message: &str) -> Self {
        AdminResponse::json(
            status,
            format!(
                r#"{{"error":{{"message":{},"type":"{kind}","param":null,"code":"{code}"}}}}"#,
                crate::reqlog::json_string(message)
            ),
        )
    }
}

impl<R: Runtime> Proxy<R> {
    /// Answers one admin request.
    pub fn admin(&self, req: &AdminRequest<'_>) -> AdminResponse {
        let path = req.target.split('?').next().unwrap_or("");
        let read_only = matches!(req.method, "GET" | "HEAD");
        match path {
            "/metrics" | "/health" | "/live" if !read_only => AdminResponse {
                headers: &[("allow", "GET, HEAD")],
                ..AdminResponse::error(
                    405,
                    "invalid_request_error",
                    "method_not_allowed",
                    &format!("{path} answers GET and HEAD"),
                )
            },
            "/metrics" => {
                let format = Format::from_accept(req.accept);
                AdminResponse {
                    status: 200,
                    content_type: format.content_type(),
                    headers: &[("cache-control", "no-store")],
                    body: self.scrape(format),
                }
            }
            "/health" => {
                let r = self.health();
                AdminResponse::json(r.status, r.body)
            }
            "/live" => AdminResponse::json(200, r#"{"status":"live"}"#.into()),
            p if p == "/admin" || p.starts_with("/admin/") => match self.admin_access(req) {
                Some(refused) => refused,
                None => self.admin_api(req, path),
            },
            _ => AdminResponse::error(
                404,
                "invalid_request_error",
                "not_found",
                &format!("no admin route {path}; try /metrics, /health, /live or /admin/backends"),
            ),
        }
    }

    /// `None` when `req` may use `/admin/*`, else the refusal.
    fn admin_access(&self, req: &AdminRequest<'_>) -> Option<AdminResponse> {
        let settings = self.settings();
        match &settings.admin_token {
            Some(token) => {
                let given = req
                    .authorization
                    .and_then(|a| a.strip_prefix(b"Bearer "))
                    .map(|t| t.trim_ascii());
                if given.is_some_and(|g| same_secret(g, token.as_bytes())) {
                    None
                } else {
                    Some(AdminResponse {
                        headers: &[("www-authenticate", "Bearer")],
                        ..AdminResponse::error(
                            401,
                            "authentication_error",
                            "invalid_token",
                            "/admin/* needs Authorization: Bearer <the token in --admin-token-file>",
                        )
                    })
                }
            }
            None if settings.admin.is_some_and(|a| a.ip().is_loopback()) => None,
            None => Some(AdminResponse::error(
                403,
                "permission_error",
                "admin_api_closed",
                "/admin/* is closed on an admin listener off loopback without --admin-token-file",
            )),
        }
    }

    /// The admin API (after the access check).
    fn admin_api(&self, req: &AdminRequest<'_>, path: &str) -> AdminResponse {
        let origin = Origin::api(req.client);
        let query = req.target.split_once('?').map_or("", |(_, q)| q);
        let rest = path.strip_prefix("/admin/backends");
        let (id, action) = match rest {
            Some("") | Some("/") => (None, None),
            Some(r) if r.starts_with('/') => {
                let mut parts = r[1..].splitn(2, '/');
                let id = parts.next().unwrap_or("");
                match parse_serial(id) {
                    Some(n) => (Some(n), parts.next()),
                    None => return not_found(path),
                }
            }
            _ => return not_found(path),
        };
        let method = req.method;
        let result = match (method, id, action) {
            ("GET" | "HEAD", None, None) => {
                return AdminResponse::json(200, self.backends_json().to_string())
            }
            ("POST", None, None) => {
                let body = match parse_body(req.body) {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let Some(url) = body.get("url").and_then(Value::as_str) else {
                    return bad_request(
                        "the body needs \"url\": a backend URL, as --backends takes",
                    );
                };
                let weight = match body.get("weight") {
                    None => 1,
                    Some(w) => match w.as_u64().and_then(|w| u32::try_from(w).ok()) {
                        Some(w) => w,
                        None => {
                            return bad_request("\"weight\" must be a whole number from 1 to 1000")
                        }
                    },
                };
                let trust = body.get("trust").and_then(Value::as_bool).unwrap_or(false);
                let spec = BackendSpec {
                    url: url.to_string(),
                    weight,
                    max_conns: self.settings().max_conns,
                };
                return match self.add_backend(spec, trust, origin) {
                    Ok(serial) => self.one_backend(201, serial),
                    Err(e) => fleet_error(e),
                };
            }
            ("GET" | "HEAD", Some(n), None) => return self.one_backend(200, n),
            ("POST", Some(n), Some("drain")) => self.drain_backend(n, false, origin).map(|()| n),
            ("DELETE", Some(n), None) => {
                let force = query
                    .split('&')
                    .any(|kv| kv == "force=true" || kv == "force=1");
                if force {
                    self.remove_backend_now(n, origin).map(|()| n)
                } else {
                    self.drain_backend(n, true, origin).map(|()| n)
                }
            }
            ("PATCH", Some(n), None) => {
                let body = match parse_body(req.body) {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let Some(w) = body
                    .get("weight")
                    .and_then(Value::as_u64)
                    .and_then(|w| u32::try_from(w).ok())
                else {
                    return bad_request("PATCH takes {\"weight\": N}, N from 1 to 1000");
                };
                self.set_weight(n, w, origin).map(|()| n)
            }
            (_, None, None) => return method_not_allowed("GET, POST"),
            (_, Some(_), None) => return method_not_allowed("GET, PATCH, DELETE"),
            (_, Some(_), Some("drain")) => return method_not_allowed("POST"),
            _ => return not_found(path),
        };
        match result {
            // Answered with what is left of it (a removed backend: its last view).
            Ok(n) => match self.backend_entry(n) {
                Some(entry) => AdminResponse::json(200, entry.to_string()),
                None => AdminResponse::json(200, json!({"id": n, "state": "removed"}).to_string()),
            },
            Err(e) => fleet_error(e),
        }
    }

    /// One backend's entry, as in the listing.
    fn backend_entry(&self, serial: u64) -> Option<Value> {
        let all = self.backends_json();
        all["backends"]
            .as_array()?
            .iter()
            .find(|b| b["id"] == serial)
            .cloned()
    }

    fn one_backend(&self, status: u16, serial: u64) -> AdminResponse {
        match self.backend_entry(serial) {
            Some(entry) => AdminResponse::json(status, entry.to_string()),
            None => fleet_error(FleetError::NotFound(serial)),
        }
    }
}

/// Compares a secret without an early exit on the first differing byte.
fn same_secret(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn parse_body(body: &[u8]) -> Result<Value, AdminResponse> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(bad_request("the body must be a JSON object")),
        Err(e) => Err(bad_request(&format!("the body is not JSON: {e}"))),
    }
}

fn bad_request(message: &str) -> AdminResponse {
    AdminResponse::error(400, "invalid_request_error", "invalid_body", message)
}

fn not_found(path: &str) -> AdminResponse {
    AdminResponse::error(
        404,
        "invalid_request_error",
        "not_found",
        &format!("no admin route {path}"),
    )
}

fn method_not_allowed(allow: &'static str) -> AdminResponse {
    AdminResponse {
        headers: match allow {
            "GET, POST" => &[("allow", "GET, POST")],
            "POST" => &[("allow", "POST")],
            _ => &[("allow", "GET, PATCH, DELETE")],
        },
        ..AdminResponse::error(
            405,
            "invalid_request_error",
            "method_not_allowed",
            &format!("this route answers {allow}"),
        )
    }
}

fn fleet_error(e: FleetError) -> AdminResponse {
    match e {
        FleetError::Invalid(m) => {
            AdminResponse::error(400, "invalid_request_error", "invalid_backend", &m)
        }
        FleetError::Duplicate(url) => AdminResponse::error(
            409,
            "invalid_request_error",
            "duplicate_backend",
            &format!("{url} is in the pool already"),
        ),
        FleetError::NotFound(n) => AdminResponse::error(
            404,
            "invalid_request_error",
            "backend_not_found",
            &format!("no backend with id {n}"),
        ),
    }
}

/// Binds the admin listener (`--admin-bind`), non-blocking, for the adapter to serve:
/// `None` when it is off, or when the default address cannot be bound (a warning notice
/// says so and `lb` runs without it, so that two `lb`s on one machine both start); an
/// explicit `--admin-bind` that cannot be bound is a start-up error.
pub fn bind(settings: &Settings, log: &dyn Fn(Notice)) -> Result<Option<TcpListener>, StartError> {
    let Some(addr) = settings.admin else {
        return Ok(None);
    };
    match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
        Ok(l) => Ok(Some(l)),
        Err(e) if settings.admin_required => Err(StartError::AdminBind(addr, e)),
        Err(e) => {
            log(Notice::AdminUnavailable {
                addr,
                error: e.to_string(),
            });
            Ok(None)
        }
    }
}
