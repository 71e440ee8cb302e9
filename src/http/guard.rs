//! What web pages may make a browser do here. A page on any origin can make the
//! visitor's browser send requests to us: open websockets (no CORS applies to them),
//! send "simple" requests (GET, and POST with a form or `text/plain` body) without a
//! preflight, and, by DNS rebinding, make its own name point at us and read our answers
//! as same-origin. Without auth nothing else stands in the way; with auth, a page that
//! holds a token (the viewer's, say) should still be one the operator chose. So, on
//! every request, server and gateway alike:
//!
//! - an `Origin` that is neither the server's own (the `Host` the request came to) nor
//!   in the configured list is refused (403). Browsers send `Origin` on every websocket
//!   handshake and every POST; a client that is no browser usually sends none, and is
//!   let through (a token is its credential, or, without auth, loopback is);
//! - a request made from another site's page (`Sec-Fetch-Site: cross-site` or
//!   `same-site`: an `<img>`, a link, a form) is refused (403) unless its `Origin` is
//!   in the list, except the public paths (the viewer's page may be linked to);
//! - a request body must be declared `application/json` (415): the types a page may
//!   send without a preflight are not. A body declaring no type at all is let through
//!   when no `Origin` says a browser sent it (clients of the original send none);
//! - without auth, a `Host` that is neither an IP address, `localhost` nor a configured
//!   name is refused (421 Misdirected Request: the request was meant for another
//!   server, by name). DNS rebinding needs a name the attacker controls; the address
//!   literals and `localhost` never resolve through the attacker's DNS.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::uri::{Authority, Scheme};
use axum::http::{HeaderMap, Method, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use super::auth::is_public;
use crate::error::{Error, ErrorKind};

/// Who may send what: built once from the settings.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Origins besides the server's own whose pages may use the API.
    origins: AllowedOrigins,
    /// Host names besides addresses and `localhost`.
    hosts: Vec<String>,
    /// Whether `Host` is checked: only without auth (with auth, a page rebound to us has
    /// no token to send, and a proxy in front may use any name).
    check_hosts: bool,
}

#[derive(Debug, Clone)]
enum AllowedOrigins {
    OwnOnly,
    List(Vec<Origin>),
    Any,
}

/// A web origin: scheme, host (lower case, IPv6 in brackets) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    https: bool,
    host: String,
    port: u16,
}

impl Origin {
    /// `http(s)://host[:port]`, nothing after; None for anything else (`null` too).
    fn parse(text: &str) -> Option<Origin> {
        let uri: Uri = text.parse().ok()?;
        let https = match uri.scheme() {
            Some(s) if *s == Scheme::HTTPS => true,
            Some(s) if *s == Scheme::HTTP => false,
            _ => return None,
        };
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") || text.ends_with('/') {
            return None;
        }
        let authority = uri.authority()?;
        if authority.as_str().contains('@') {
            return None;
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        Some(Origin { https, host: authority.host().to_ascii_lowercase(), port })
    }

    /// True when this origin is the one the request's `Host` names. The scheme is not
    /// compared: behind a proxy that ends TLS we cannot know the client's; a `Host`
    /// without a port is reached on the default port of the origin's scheme.
    fn is_host(&self, host: &Authority) -> bool {
        let port = host.port_u16().unwrap_or(if self.https { 443 } else { 80 });
        self.host.eq_ignore_ascii_case(host.host()) && self.port == port
    }
}

impl Default for Guard {
    fn default() -> Guard {
        Guard { origins: AllowedOrigins::OwnOnly, hosts: Vec::new(), check_hosts: true }
    }
}

impl Guard {
    /// `origins`: `*` (any), or `http(s)://host[:port]` each. `hosts`: names the server
    /// is reached by besides its addresses and `localhost`.
    pub fn new(origins: &[String], hosts: &[String]) -> Result<Guard, String> {
        let origins = if origins.iter().any(|o| o.trim() == "*") {
            AllowedOrigins::Any
        } else if origins.iter().all(|o| o.trim().is_empty()) {
            AllowedOrigins::OwnOnly
        } else {
            let list = origins
                .iter()
                .map(|o| o.trim())
                .filter(|o| !o.is_empty())
                .map(|o| o.strip_suffix('/').unwrap_or(o))
                .map(|o| {
                    Origin::parse(o).ok_or_else(|| {
                        format!("allowed origin {o:?} is not `*` or scheme://host[:port] (http or https, no path)")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            AllowedOrigins::List(list)
        };
        let hosts = hosts.iter().map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()).collect();
        Ok(Guard { origins, hosts, check_hosts: true })
    }

    /// This guard for a server with auth (`Host` not checked) or without.
    pub(crate) fn for_auth(mut self, auth: bool) -> Guard {
        self.check_hosts = !auth;
        self
    }

    fn listed(&self, origin: &Origin) -> bool {
        match &self.origins {
            AllowedOrigins::OwnOnly => false,
            AllowedOrigins::List(list) => list.contains(origin),
            AllowedOrigins::Any => true,
        }
    }

    /// Why this request is refused, if it is.
    fn check(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<(), Error> {
        let host = request_host(uri, headers)?;
        if let Some(host) = host.as_ref().filter(|_| self.check_hosts) {
            if !is_local_name(host.host(), &self.hosts) {
                return Err(Error::new(
                    ErrorKind::MisdirectedRequest,
                    format!(
                        "this server is not {:?}: reach it by its address or localhost, or name the host in \
                         PGDELTASTREAM_ALLOWED_HOSTS (--allowed-hosts)",
                        host.host()
                    ),
                ));
            }
        }
        let origin = match headers.get(header::ORIGIN) {
            None => None,
            Some(value) => {
                let text = value.to_str().unwrap_or("");
                let origin = Origin::parse(text);
                let own = origin.as_ref().zip(host.as_ref()).is_some_and(|(o, h)| o.is_host(h));
                if !own && !origin.as_ref().is_some_and(|o| self.listed(o)) {
                    return Err(forbidden(format!(
                        "requests from pages of origin {text:?} are refused: add it to \
                         PGDELTASTREAM_ALLOWED_ORIGINS (--allowed-origins) to allow them"
                    )));
                }
                origin
            }
        };
        let fetch_site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
        let from_elsewhere = matches!(fetch_site, Some(b"cross-site" | b"same-site"));
        if from_elsewhere && !is_public(uri.path()) && !origin.is_some_and(|o| self.listed(&o)) {
            return Err(forbidden("requests made by pages of other sites are refused".into()));
        }
        check_body_type(method, headers)
    }
}

/// The host the request is for: the request target's authority (absolute form), else
/// `Host`. None when neither says (an HTTP/1.0 client: no browser).
fn request_host(uri: &Uri, headers: &HeaderMap) -> Result<Option<Authority>, Error> {
    if let Some(authority) = uri.authority() {
        return Ok(Some(authority.clone()));
    }
    // RFC 9112 3.2: two Host headers, or one that is no host[:port], are a 400.
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err(Error::bad_request("the request has more than one Host header"));
    }
    let Some(value) = headers.get(header::HOST) else { return Ok(None) };
    let host = value.to_str().ok().and_then(|h| h.parse::<Authority>().ok()).filter(|a| !a.as_str().contains('@'));
    host.map(Some).ok_or_else(|| Error::bad_request("the Host header is not host[:port]"))
}

/// An address literal, `localhost` (browsers resolve it, and its subdomains, to
/// loopback themselves), or a configured name.
fn is_local_name(host: &str, names: &[String]) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(&host);
    bare.parse::<std::net::IpAddr>().is_ok()
        || host == "localhost"
        || host.ends_with(".localhost")
        || names.iter().any(|n| n.trim_end_matches('.') == host)
}

/// A body must say it is JSON. Which requests have one: those that declare a length
/// above 0 or a transfer coding, and every POST (a page's form POST may be empty).
fn check_body_type(method: &Method, headers: &HeaderMap) -> Result<(), Error> {
    let declared_length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
    let has_body = *method == Method::POST
        || headers.contains_key(header::TRANSFER_ENCODING)
        || declared_length.is_some_and(|v| v.trim() != "0");
    if !has_body {
        return Ok(());
    }
    match headers.get(header::CONTENT_TYPE) {
        None if !headers.contains_key(header::ORIGIN) => Ok(()),
        Some(value) if is_json(value.as_bytes()) => Ok(()),
        _ => {
            Err(Error::new(ErrorKind::UnsupportedMediaType, "the request body must be Content-Type: application/json"))
        }
    }
}

/// `application/json`, with parameters or not (`; charset=utf-8`).
fn is_json(content_type: &[u8]) -> bool {
    let essence = content_type.split(|&b| b == b';').next().unwrap_or_default();
    essence.trim_ascii().eq_ignore_ascii_case(b"application/json")
}

fn forbidden(message: String) -> Error {
    Error::new(ErrorKind::Forbidden, message)
}

/// The middleware, before auth: a refusal here never looks at a token.
pub async fn guard(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    match guard.check(req.method(), req.uri(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => ApiError(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn check(guard: &Guard, method: Method, path: &str, pairs: &[(&'static str, &'static str)]) -> Option<ErrorKind> {
        guard.check(&method, &path.parse().unwrap(), &headers(pairs)).err().map(|e| e.kind)
    }

    #[test]
    fn origins_parse_strictly() {
        let o = Origin::parse("HTTPS://Dash.Example:8443").unwrap();
        assert_eq!(o, Origin { https: true, host: "dash.example".into(), port: 8443 });
        assert_eq!(Origin::parse("http://[::1]").unwrap().port, 80);
        for bad in ["null", "", "ftp://x", "http://x/", "http://x/path", "x", "http://u@x", "http://x?q"] {
            assert!(Origin::parse(bad).is_none(), "{bad}");
        }
        assert!(Guard::new(&["https://x/path".into()], &[]).is_err());
    }

    #[test]
    fn own_origin_and_listed_ones_pass() {
        let g = Guard::new(&["https://dash.example/".into()], &[]).unwrap();
        let ws = [("host", "localhost:12312"), ("upgrade", "websocket")];
        assert_eq!(check(&g, Method::GET, "/v1/lr/stream", &ws), None, "no Origin: no browser");
        let own = [("host", "localhost:12312"), ("origin", "http://localhost:12312")];
        assert_eq!(check(&g, Method::GET, "/v1/lr/stream", &own), None);
        let other_port = [("host", "localhost:12312"), ("origin", "http://localhost:3000")];
        assert_eq!(check(&g, Method::GET, "/v1/lr/stream", &other_port), Some(ErrorKind::Forbidden));
        let listed =
            [("host", "localhost:12312"), ("origin", "https://dash.example"), ("sec-fetch-site", "cross-site")];
        assert_eq!(check(&g, Method::GET, "/v1/lr/stream", &listed), None);
        let null = [("host", "localhost:12312"), ("origin", "null")];
        assert_eq!(check(&g, Method::GET, "/v1/lr/stream", &null), Some(ErrorKind::Forbidden));
        let any = Guard::new(&["*".into()], &[]).unwrap().for_auth(true);
        let evil = [("host", "x"), ("origin", "http://evil.example")];
        assert_eq!(check(&any, Method::GET, "/v1/lr/stream", &evil), None);
    }

    #[test]
    fn other_sites_pages_cannot_call_but_may_link_to_the_viewer() {
        let g = Guard::new(&[], &[]).unwrap();
        let img = [("host", "127.0.0.1:12312"), ("sec-fetch-site", "cross-site")];
        assert_eq!(check(&g, Method::GET, "/v1/init", &img), Some(ErrorKind::Forbidden));
        let sibling = [("host", "127.0.0.1:12312"), ("sec-fetch-site", "same-site")];
        assert_eq!(check(&g, Method::GET, "/v1/init", &sibling), Some(ErrorKind::Forbidden));
        assert_eq!(check(&g, Method::GET, "/", &img), None);
        let typed = [("host", "127.0.0.1:12312"), ("sec-fetch-site", "none")];
        assert_eq!(check(&g, Method::GET, "/v1/init", &typed), None);
        assert_eq!(check(&g, Method::GET, "/v1/init", &[("host", "127.0.0.1:12312")]), None, "curl");
    }

    #[test]
    fn bodies_must_be_json() {
        let g = Guard::new(&[], &[]).unwrap();
        let json = [("content-type", "Application/JSON; charset=utf-8"), ("content-length", "2")];
        assert_eq!(check(&g, Method::POST, "/v2/sessions", &json), None);
        assert_eq!(check(&g, Method::PATCH, "/v2/sessions/x", &json), None);
        let patch_form = [("content-type", "text/plain"), ("content-length", "2")];
        assert_eq!(check(&g, Method::PATCH, "/v2/sessions/x", &patch_form), Some(ErrorKind::UnsupportedMediaType));
        let plain = [("content-type", "text/plain"), ("content-length", "2")];
        assert_eq!(check(&g, Method::POST, "/v2/sessions", &plain), Some(ErrorKind::UnsupportedMediaType));
        assert_eq!(check(&g, Method::POST, "/v2/sessions", &[("content-length", "2")]), None, "an old client");
        let blob = [("content-length", "2"), ("origin", "http://localhost"), ("host", "localhost")];
        assert_eq!(check(&g, Method::POST, "/v2/sessions", &blob), Some(ErrorKind::UnsupportedMediaType));
        let form = [("content-type", "application/x-www-form-urlencoded"), ("content-length", "0")];
        assert_eq!(check(&g, Method::POST, "/v2/sessions", &form), Some(ErrorKind::UnsupportedMediaType));
        assert_eq!(check(&g, Method::GET, "/v2/sessions", &[("content-type", "text/plain")]), None, "no body");
        let chunked = [("content-type", "text/plain"), ("transfer-encoding", "chunked")];
        assert_eq!(check(&g, Method::DELETE, "/v1/snapshot", &chunked), Some(ErrorKind::UnsupportedMediaType));
    }

    #[test]
    fn without_auth_only_local_names_are_served() {
        let g = Guard::new(&[], &["pgds.internal".into()]).unwrap();
        for ok in
            ["localhost:1", "LOCALHOST", "127.0.0.1:12312", "[::1]:5", "10.1.2.3", "a.localhost", "pgds.internal:1"]
        {
            let h = [("host", ok)];
            assert_eq!(check(&g, Method::GET, "/v1/sessions", &h), None, "{ok}");
        }
        for bad in ["evil.example:12312", "evil.example", "x", "localhost.evil.example", "pgds.internal.evil"] {
            let h = [("host", bad)];
            assert_eq!(check(&g, Method::GET, "/v1/sessions", &h), Some(ErrorKind::MisdirectedRequest), "{bad}");
        }
        assert_eq!(
            check(&g, Method::GET, "http://evil.example/v1/sessions", &[("host", "localhost")]),
            Some(ErrorKind::MisdirectedRequest)
        );
        assert_eq!(check(&g, Method::GET, "/v1/sessions", &[]), None, "HTTP/1.0, no Host");
        let two = [("host", "localhost"), ("host", "evil.example")];
        assert_eq!(check(&g, Method::GET, "/v1/sessions", &two), Some(ErrorKind::BadRequest));
        assert_eq!(check(&g, Method::GET, "/v1/sessions", &[("host", "a b")]), Some(ErrorKind::BadRequest));
        let with_auth = Guard::new(&[], &[]).unwrap().for_auth(true);
        assert_eq!(check(&with_auth, Method::GET, "/v1/sessions", &[("host", "evil.example")]), None);
    }
}
