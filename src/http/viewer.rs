//! The viewer: a page for operators at `/`, its assets at `/assets/{file}`, all built
//! into the binary (no CDN, nothing to build with Node). Served without a token: the
//! page asks for one when the API answers 401. Each answer carries a strict
//! Content-Security-Policy (scripts, styles and connections only to this origin: CSP 3's
//! `'self'` covers its ws: and wss: too, where bare `ws: wss:` would allow any host),
//! `nosniff`, and an ETag, so a browser revalidates cheaply.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::error::Error;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: &'static str,
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("viewer/", $name)),
            etag: {
                const HASH: u64 = fnv1a(include_bytes!(concat!("viewer/", $name)));
                const HEX: [u8; 18] = etag_hex(HASH);
                match std::str::from_utf8(&HEX) {
                    Ok(s) => s,
                    Err(_) => panic!("an etag is ASCII"),
                }
            },
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("sessions.js", JS),
    asset!("feed.js", JS),
    asset!("snapshot.js", JS),
    asset!("dom.js", JS),
];

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `GET /`
pub async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers).unwrap_or_else(IntoResponse::into_response)
}

/// `GET /assets/{file}`
pub(crate) async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers).unwrap_or_else(IntoResponse::into_response)
}

fn serve(file: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let asset =
        ASSETS.iter().find(|a| a.name == file).ok_or_else(|| Error::not_found(format!("no asset named {file:?}")))?;
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim() == asset.etag || t.trim() == "*"));
    let common = [
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        // Revalidate every time: the ETag makes that a 304 until the binary changes.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, HeaderValue::from_static(asset.etag)),
    ];
    if fresh {
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    let content_type = [(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type))];
    Ok((common, content_type, asset.body).into_response())
}

/// FNV-1a, 64 bits: computed at build time, so the ETag changes exactly when the asset does.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"` + 16 hex digits + `"`.
const fn etag_hex(hash: u64) -> [u8; 18] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = DIGITS[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_a_distinct_quoted_etag() {
        for a in ASSETS {
            assert_eq!(a.etag.len(), 18, "{}", a.name);
            assert!(a.etag.starts_with('"') && a.etag.ends_with('"'));
        }
        let mut tags: Vec<_> = ASSETS.iter().map(|a| a.etag).collect();
        tags.sort();
        tags.dedup();
        assert_eq!(tags.len(), ASSETS.len());
    }
}
