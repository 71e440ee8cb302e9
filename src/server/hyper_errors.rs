//! hyper answers a request it cannot parse by itself (`on_parse_error` in its
//! `proto/h1/conn.rs`): a 400, 414 or 431 with `content-length: 0` and no body, written
//! before our service ever sees a request. Every other error of ours carries
//! `{"error":"..."}`, so the connection's [`super::io::Io`] recognises that one head,
//! alone in a write, and sends it with a JSON body instead. Our own responses never
//! match: each of them has a content type.

/// The status lines hyper writes on a parse error, and what we tell the client.
const ANSWERS: [(&[u8], &str); 3] = [
    (b"HTTP/1.1 400 Bad Request\r\n", "the request is not valid HTTP/1.1"),
    (b"HTTP/1.1 414 URI Too Long\r\n", "the request's URI is too long (at most 65534 bytes)"),
    (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        "the request's head is too large (at most 100 headers and 96 KiB)",
    ),
];

const EMPTY: &[u8] = b"\r\ncontent-length: 0\r\n";

/// Our version of `write` when it is one of hyper's bodiless error answers.
pub(super) fn with_json_body(write: &[u8]) -> Option<Vec<u8>> {
    let message = ANSWERS.iter().find(|(line, _)| write.starts_with(line))?.1;
    let head_end = find(write, b"\r\n\r\n")?;
    if head_end + 4 != write.len() || find(&write.to_ascii_lowercase(), b"\r\ncontent-type:").is_some() {
        return None;
    }
    let at = find(write, EMPTY)?;
    let body = serde_json::json!({ "error": message }).to_string();
    let mut out = Vec::with_capacity(write.len() + body.len() + 64);
    out.extend_from_slice(&write[..at]);
    out.extend_from_slice(
        format!("\r\ncontent-type: application/json\r\ncontent-length: {}\r\n", body.len()).as_bytes(),
    );
    out.extend_from_slice(&write[at + EMPTY.len()..]);
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::with_json_body;

    const DATE: &str = "date: Sun, 29 Nov 2026 16:16:18 GMT\r\n";

    #[test]
    fn hyper_answers_get_a_json_body() {
        for (line, status) in
            [("400 Bad Request", 400), ("414 URI Too Long", 414), ("431 Request Header Fields Too Large", 431)]
        {
            let head = format!("HTTP/1.1 {line}\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n");
            let out = String::from_utf8(with_json_body(head.as_bytes()).unwrap()).unwrap();
            let (head, body) = out.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
            assert!(head.contains("\r\nconnection: close\r\n"), "{out}");
            assert!(head.contains(DATE.trim_end()), "{out}");
            assert!(head.contains("\r\ncontent-type: application/json\r\n"), "{out}");
            assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())), "{out}");
            assert!(!head.contains("content-length: 0"), "{out}");
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{out}");
        }
    }

    #[test]
    fn other_writes_pass_untouched() {
        let ours =
            format!("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n{DATE}\r\n");
        let with_body = format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n{DATE}\r\n{{}}");
        let partial = "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n";
        let other = format!("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n{DATE}\r\n");
        for write in [ours.as_str(), &with_body, partial, &other, "", "\u{81}\u{5}hello"] {
            assert!(with_json_body(write.as_bytes()).is_none(), "{write:?}");
        }
    }
}
