//! Who may call what: JSON Web Tokens, checked once per request by [`authenticate`],
//! and a [`Principal`] that each handler asks for the scope it needs.
//!
//! A token comes in `Authorization: Bearer <token>`, or, on the handshake of a
//! websocket route only (a browser cannot set headers there), as
//! `?access_token=<token>`: a token in a URL ends up in proxy logs and browser
//! history, so no other request may use one. It is never logged: the request log has
//! only the path, and no error here repeats it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{FromRequestParts, MatchedPath, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::ApiError;
use super::upgrade::is_handshake;
use crate::error::{Error, ErrorKind};

/// Paths anyone may call, token or not: probes, and the static viewer page and its
/// assets (a browser loads them before it has a token to send).
const PUBLIC_PATHS: &[&str] = &["/", "/healthz", "/readyz"];
const PUBLIC_PREFIXES: &[&str] = &["/assets/"];

pub(super) fn is_public(path: &str) -> bool {
    PUBLIC_PATHS.contains(&path) || PUBLIC_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// Seconds of clock skew forgiven when checking `exp` and `nbf`; a stream opened with
/// a token lasts until its `exp` plus this, as long as the token is accepted.
pub(crate) const LEEWAY_SECONDS: u64 = 30;

/// The furthest a stream's end is set by its token.
const LONGEST_STREAM: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The routes that are websockets, as the routers name them: the only ones where a
/// token may come in the URL.
const WEBSOCKET_ROUTES: &[&str] = &["/v1/lr/stream", "/v2/sessions/{name}/stream", "/v2/sessions/{name}/watch"];

/// How tokens are checked: the key, and the one algorithm its kind allows.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key (an HS256 secret is one).
        f.debug_struct("Verifier").field("algorithms", &self.validation.algorithms).finish_non_exhaustive()
    }
}

/// Where the key comes from.
pub enum KeySource<'a> {
    /// HS256 with a shared secret.
    Secret(&'a [u8]),
    /// RS256 or ES256, from the kind of the public key in this PEM text.
    PublicPem(&'a [u8]),
}

impl Verifier {
    /// Pins the algorithm to the key's kind, so that no token can choose another (no
    /// `none`, no HS256 signed with an RSA public key's bytes); `exp` is required, and
    /// so are `aud` and `iss` when they are to be checked (jsonwebtoken checks only the
    /// claims a token has, unless told they are required).
    pub fn new(source: KeySource<'_>, audience: Option<&str>, issuer: Option<&str>) -> Result<Verifier, String> {
        let (key, algorithm) = match source {
            KeySource::Secret([]) => return Err("the JWT secret is empty".into()),
            KeySource::Secret(s) => (DecodingKey::from_secret(s), Algorithm::HS256),
            KeySource::PublicPem(pem) => public_key(pem)?,
        };
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["exp"];
        required.extend(audience.map(|_| "aud"));
        required.extend(issuer.map(|_| "iss"));
        validation.set_required_spec_claims(&required);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            // Else a token that names an audience would be refused for it.
            None => validation.validate_aud = false,
        }
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Verifier { key, validation })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.validation.algorithms.first().copied().unwrap_or(Algorithm::HS256)
    }

    /// The principal a token speaks for, or why not (safe to show the client).
    pub fn verify(&self, token: &str) -> Result<Principal, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| describe(&e))?;
        let claims = data.claims;
        let role = match claims.role.as_deref() {
            Some("admin") => Role::Admin,
            Some("consumer") => Role::Consumer,
            Some(other) => return Err(format!("the token's role {other:?} is neither \"admin\" nor \"consumer\"")),
            None => return Err("the token has no role claim (\"admin\" or \"consumer\")".into()),
        };
        let sessions = claims.sessions.unwrap_or_default().into_iter().collect();
        // Past what a SystemTime holds (exp near 2^63 s and beyond), it never expires.
        let expires = UNIX_EPOCH.checked_add(Duration::from_secs(claims.exp));
        Ok(Principal { role, sessions, subject: claims.sub, expires })
    }
}

/// An RSA key is RS256, an EC key ES256; anything else is refused at start.
fn public_key(pem: &[u8]) -> Result<(DecodingKey, Algorithm), String> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Ok((key, Algorithm::ES256));
    }
    Err("the JWT public key is neither an RSA nor an EC public key in PEM".into())
}

/// jsonwebtoken's errors, in words for the client; none of them contains the token.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidSignature => "the token's signature does not verify".into(),
        K::InvalidAlgorithm => "the token's algorithm is not the one this server accepts".into(),
        K::InvalidAudience => "the token's audience (aud) is not this server".into(),
        K::InvalidIssuer => "the token's issuer (iss) is not the one this server accepts".into(),
        K::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
        K::Json(_) => "the token's claims are not what this server expects (exp a number; sub and role strings; sessions a list of strings)".into(),
        _ => "the token is malformed".into(),
    }
}

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    sub: Option<String>,
    role: Option<String>,
    sessions: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Only the snapshots and streams of the sessions named in the token.
    Consumer,
}

/// Who is calling. Without auth configured everyone is an admin that never expires.
#[derive(Debug, Clone)]
pub struct Principal {
    pub role: Role,
    pub sessions: HashSet<String>,
    /// The token's `sub`, whom it was issued to.
    pub subject: Option<String>,
    /// When the token expires (its `exp`): a stream it opened ends a leeway later.
    /// None: no token, or one whose `exp` is past any time we can count to.
    pub expires: Option<SystemTime>,
}

impl Principal {
    fn unauthenticated() -> Principal {
        Principal { role: Role::Admin, sessions: HashSet::new(), subject: None, expires: None }
    }

    /// Whose client positions a stream reads and moves. A consumer with a `sub` has its
    /// own: another consumer of the same session naming the same client cannot move them
    /// (and so make it skip changes). An admin, or a consumer without `sub`, uses the
    /// session's shared client names.
    pub(crate) fn position_owner(&self) -> Option<&str> {
        match self.role {
            Role::Consumer => self.subject.as_deref(),
            Role::Admin => None,
        }
    }

    /// Whose share of the per-caller limits (watchers, snapshot reads) a request takes:
    /// a consumer's `sub`, or for a consumer token without one the sessions it names
    /// (tokens for the same sessions share one). None for an admin, whom only the
    /// server-wide limits bound.
    pub(crate) fn quota_key(&self) -> Option<String> {
        if self.role == Role::Admin {
            return None;
        }
        Some(match &self.subject {
            Some(sub) => format!("sub:{sub}"),
            None => {
                let mut sessions: Vec<&str> = self.sessions.iter().map(String::as_str).collect();
                sessions.sort_unstable();
                format!("sessions:{}", sessions.join(","))
            }
        })
    }

    /// May read the snapshot of, stream and ack the session (or v1 slot) `name`.
    pub(crate) fn may_use(&self, name: &str) -> bool {
        self.role == Role::Admin || self.sessions.contains(name)
    }

    pub(crate) fn require_session(&self, name: &str) -> Result<(), ApiError> {
        if self.may_use(name) {
            return Ok(());
        }
        Err(ApiError(Error::new(ErrorKind::Forbidden, format!("the token does not grant session {name:?}"))))
    }

    pub(crate) fn require_admin(&self) -> Result<(), ApiError> {
        if self.role == Role::Admin {
            return Ok(());
        }
        Err(ApiError(Error::new(ErrorKind::Forbidden, "this needs an admin token")))
    }

    /// When a stream opened with this token must end: when the token stops being
    /// accepted, its `exp` plus the leeway (so a token accepted within the leeway gets a
    /// stream until the leeway is up, not one closed at once). A century at most: a
    /// timer further out than that is no use, and near the end of what an Instant
    /// holds, adding to one overflows.
    pub(crate) fn stream_deadline(&self) -> Option<tokio::time::Instant> {
        let until = self.expires?.checked_add(Duration::from_secs(LEEWAY_SECONDS));
        let left = until.map_or(LONGEST_STREAM, |t| t.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO));
        tokio::time::Instant::now().checked_add(left.min(LONGEST_STREAM))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // [`authenticate`] runs before every route; a public route has no principal.
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError(Error::internal("no principal for this request: it was not authenticated")))
    }
}

/// The middleware: a public path passes; any other needs a valid token when auth is
/// configured (401 otherwise), and gets its [`Principal`].
pub async fn authenticate(State(auth): State<Option<Arc<Verifier>>>, mut req: Request, next: Next) -> Response {
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let principal = match &auth {
        None => Principal::unauthenticated(),
        Some(verifier) => match token(&req).map(|t| verifier.verify(&t)) {
            Ok(Ok(p)) => p,
            Ok(Err(why)) => return unauthorized(&why, true),
            Err(why) => return unauthorized(why, false),
        },
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// The bearer token of the request, or why there is none.
fn token(req: &Request) -> Result<String, &'static str> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| "the Authorization header is not ASCII")?;
        return match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
                Ok(token.trim().to_owned())
            }
            _ => Err("the Authorization header must be \"Bearer <token>\""),
        };
    }
    let websocket_route = req.extensions().get::<MatchedPath>().is_some_and(|p| WEBSOCKET_ROUTES.contains(&p.as_str()));
    if websocket_route && is_handshake(req.method(), req.headers()) {
        #[derive(Deserialize)]
        struct AccessToken {
            access_token: Option<String>,
        }
        if let Ok(Query(AccessToken { access_token: Some(t) })) = Query::<AccessToken>::try_from_uri(req.uri()) {
            return Ok(t);
        }
    }
    Err("no token: send Authorization: Bearer <token> (or ?access_token= on a websocket handshake)")
}

/// 401 with `WWW-Authenticate: Bearer` (RFC 6750), `error="invalid_token"` when a
/// token came and was refused.
fn unauthorized(why: &str, invalid_token: bool) -> Response {
    let mut response = (StatusCode::UNAUTHORIZED, Json(serde_json::json!({ "error": why }))).into_response();
    let challenge = if invalid_token { r#"Bearer error="invalid_token""# } else { "Bearer" };
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    response
}

/// RFC 7518 3.2: an HS256 key as long as the hash, at least.
const MIN_SECRET_BYTES: usize = 32;

/// Auth as configured from the flags, or why the server must not start.
pub(crate) fn from_settings(
    secret: Option<&str>,
    public_key_path: Option<&std::path::Path>,
    audience: Option<&str>,
    issuer: Option<&str>,
) -> Result<Option<Arc<Verifier>>, String> {
    let source_pem;
    let source = match (secret, public_key_path) {
        (Some(_), Some(_)) => {
            return Err("both a JWT secret and a JWT public key are set: choose one (HS256, or RS256/ES256)".into());
        }
        (None, None) => return Ok(None),
        (Some(s), None) => {
            if s.len() < MIN_SECRET_BYTES {
                tracing::warn!("the JWT secret is shorter than {MIN_SECRET_BYTES} bytes: easy to guess by brute force");
            }
            KeySource::Secret(s.as_bytes())
        }
        (None, Some(path)) => {
            source_pem =
                std::fs::read(path).map_err(|e| format!("cannot read the JWT public key {}: {e}", path.display()))?;
            KeySource::PublicPem(&source_pem)
        }
    };
    Verifier::new(source, audience, issuer).map(|v| Some(Arc::new(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_paths_are_few() {
        for p in ["/", "/healthz", "/readyz", "/assets/app.js"] {
            assert!(is_public(p), "{p}");
        }
        for p in ["/metrics", "/v1/init", "/healthz/x", "/assetsx", "/v2/sessions", ""] {
            assert!(!is_public(p), "{p}");
        }
    }

    #[test]
    fn secret_and_key_together_are_refused() {
        let e = from_settings(Some("s"), Some(std::path::Path::new("/nonexistent")), None, None).unwrap_err();
        assert!(e.contains("choose one"), "{e}");
        assert!(from_settings(None, None, None, None).unwrap().is_none());
        assert!(from_settings(Some(""), None, None, None).is_err());
    }

    #[test]
    fn stream_deadlines_never_overflow() {
        let far = Duration::from_secs(LONGEST_STREAM.as_secs() + 1);
        for exp in [0, 1 << 40, (1 << 62) + 7, (1 << 63) - 100, (1 << 63) - 1, 1 << 63, u64::MAX] {
            let principal = Principal {
                role: Role::Consumer,
                sessions: HashSet::new(),
                subject: None,
                expires: UNIX_EPOCH.checked_add(Duration::from_secs(exp)),
            };
            let deadline = principal.stream_deadline();
            if let Some(at) = deadline {
                assert!(at <= tokio::time::Instant::now() + far, "exp {exp}");
            }
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let in_leeway =
            Principal { expires: Some(UNIX_EPOCH + Duration::from_secs(now - 10)), ..Principal::unauthenticated() };
        let left = in_leeway.stream_deadline().unwrap() - tokio::time::Instant::now();
        assert!(left > Duration::from_secs(15) && left <= Duration::from_secs(20), "{left:?}");
    }

    #[test]
    fn a_pem_that_is_no_public_key_is_refused() {
        assert!(Verifier::new(KeySource::PublicPem(b"not a pem"), None, None).is_err());
    }
}
