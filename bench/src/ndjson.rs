//! Reads an HTTP response body to its end as it arrives (chunked, sized, or up to the
//! close), counting its lines and bytes without keeping it: a 1M-row export is
//! hundreds of MB.

use std::time::Instant;

use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Result;

/// The first line kept for a look at its shape; the tail kept for error messages.
const KEEP_FIRST: usize = 4096;
const KEEP_TAIL: usize = 512;
/// A chunk-size line or a response head longer than this is not HTTP we expect.
const MAX_LINE: usize = 1024;
const MAX_HEAD: usize = 64 * 1024;

/// What the body held, and when it came.
#[derive(Debug)]
pub struct Body {
    pub status: u16,
    pub content_type: String,
    pub lines: u64,
    /// Body bytes (without the chunked framing).
    pub bytes: u64,
    /// The first line, up to 4 KiB, and the last bytes of the body.
    pub first_line: Vec<u8>,
    pub tail: Vec<u8>,
    /// When the head was complete and when the body ended.
    pub head_at: Instant,
    pub end_at: Instant,
}

/// `GET path` with `Accept: accept` (HTTP/1.1, Connection: close), read to the end of
/// the body. A response that ends before its framing says is an error.
pub async fn get(port: u16, path: &str, accept: &str, deadline: tokio::time::Instant) -> Result<Body> {
    tokio::time::timeout_at(deadline, read(port, path, accept)).await.map_err(|_| format!("GET {path}: timed out"))?
}

async fn read(port: u16, path: &str, accept: &str) -> Result<Body> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let body_start = loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(format!("GET {path}: the connection closed inside the response head").into());
        }
        let searched_from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(at) = memmem::find(&head[searched_from..], b"\r\n\r\n") {
            break searched_from + at + 4;
        }
        if head.len() > MAX_HEAD {
            return Err(format!("GET {path}: a response head over {MAX_HEAD} bytes").into());
        }
    };
    let head_at = Instant::now();
    let text = String::from_utf8_lossy(&head[..body_start]).into_owned();
    let status: u16 = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("malformed HTTP status")?;
    let header = |name: &str| {
        text.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let mut framing = match (header("transfer-encoding"), header("content-length")) {
        (Some(te), _) if te.eq_ignore_ascii_case("chunked") => Framing::Chunked(Dechunker::default()),
        (Some(te), _) => return Err(format!("GET {path}: transfer-encoding {te}").into()),
        (None, Some(len)) => Framing::Sized(len.parse().map_err(|_| format!("GET {path}: content-length {len}"))?),
        (None, None) => Framing::UntilClose,
    };
    let mut lines = Lines::default();
    let mut done = framing.feed(&head[body_start..], &mut lines)?;
    while !done {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            if matches!(framing, Framing::UntilClose) {
                break;
            }
            return Err(format!("GET {path}: the body ended early after {} bytes", lines.bytes).into());
        }
        done = framing.feed(&buf[..n], &mut lines)?;
    }
    Ok(Body {
        status,
        content_type: header("content-type").unwrap_or_default(),
        lines: lines.lines,
        bytes: lines.bytes,
        first_line: lines.first_line,
        tail: lines.tail,
        head_at,
        end_at: Instant::now(),
    })
}

enum Framing {
    Chunked(Dechunker),
    Sized(u64),
    UntilClose,
}

impl Framing {
    /// Feeds bytes off the socket; true once the body is complete.
    fn feed(&mut self, input: &[u8], out: &mut Lines) -> Result<bool> {
        match self {
            Framing::Chunked(d) => d.feed(input, &mut |data| out.feed(data)),
            Framing::Sized(left) => {
                let take = input.len().min(*left as usize);
                out.feed(&input[..take]);
                *left -= take as u64;
                Ok(*left == 0)
            }
            Framing::UntilClose => {
                out.feed(input);
                Ok(false)
            }
        }
    }
}

/// Counts lines and bytes, keeping the first line and the tail.
#[derive(Default)]
struct Lines {
    lines: u64,
    bytes: u64,
    first_line: Vec<u8>,
    first_done: bool,
    tail: Vec<u8>,
}

impl Lines {
    fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        self.lines += memchr::memchr_iter(b'\n', data).count() as u64;
        if !self.first_done {
            let end = memchr::memchr(b'\n', data);
            let piece = &data[..end.unwrap_or(data.len())];
            let room = KEEP_FIRST.saturating_sub(self.first_line.len());
            self.first_line.extend_from_slice(&piece[..piece.len().min(room)]);
            self.first_done = end.is_some();
        }
        let keep = &data[data.len().saturating_sub(KEEP_TAIL)..];
        self.tail.extend_from_slice(keep);
        let extra = self.tail.len().saturating_sub(KEEP_TAIL);
        self.tail.drain(..extra);
    }
}

/// Chunked transfer coding (RFC 9112, 7.1), decoded as it arrives.
#[derive(Default)]
struct Dechunker {
    state: ChunkState,
    /// The chunk-size line (or the CRLF after a chunk) read so far.
    line: Vec<u8>,
}

#[derive(Default)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Done,
}

impl Dechunker {
    /// Feeds raw bytes, handing each piece of chunk data to `out`; true once the last
    /// chunk (size 0) has come. Trailers after it are not read: the connection closes.
    fn feed(&mut self, mut input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<bool> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Done => return Ok(true),
                ChunkState::Data(left) => {
                    let take = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    out(&input[..take]);
                    input = &input[take..];
                    self.state =
                        if left == take as u64 { ChunkState::DataEnd } else { ChunkState::Data(left - take as u64) };
                }
                ChunkState::Size | ChunkState::DataEnd => {
                    let Some(at) = memchr::memchr(b'\n', input) else {
                        self.line.extend_from_slice(input);
                        return self.check_line().map(|()| false);
                    };
                    self.line.extend_from_slice(&input[..at]);
                    input = &input[at + 1..];
                    self.check_line()?;
                    self.end_line()?;
                }
            }
        }
        Ok(matches!(self.state, ChunkState::Done))
    }

    fn check_line(&self) -> Result<()> {
        if self.line.len() > MAX_LINE {
            return Err("chunked body: a chunk-size line over 1 KiB".into());
        }
        Ok(())
    }

    fn end_line(&mut self) -> Result<()> {
        let line = std::str::from_utf8(&self.line).map_err(|_| "chunked body: a chunk-size line not UTF-8")?;
        let line = line.trim_end_matches('\r');
        self.state = match self.state {
            ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
            ChunkState::DataEnd => return Err(format!("chunked body: {line:?} after a chunk").into()),
            _ => {
                // Extensions (`;name=value`) are allowed and mean nothing here.
                let size = line.split(';').next().unwrap_or("").trim();
                match u64::from_str_radix(size, 16) {
                    Ok(0) => ChunkState::Done,
                    Ok(n) => ChunkState::Data(n),
                    Err(_) => return Err(format!("chunked body: chunk size {size:?}").into()),
                }
            }
        };
        self.line.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            out.extend_from_slice(format!("{n:x}{}\r\n", if i % 3 == 1 { ";ext=1" } else { "" }).as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[test]
    fn dechunks_whatever_the_reads() {
        let body: Vec<u8> = (0..2000).flat_map(|i| format!("{{\"id\":{i}}}\n").into_bytes()).collect();
        let wire = chunked(&body, &[1, 7, 300, 4096, 13]);
        for read in [1, 2, 3, 5, 64, 1000, wire.len()] {
            let mut d = Dechunker::default();
            let mut lines = Lines::default();
            let mut done_at = None;
            for (i, piece) in wire.chunks(read).enumerate() {
                if d.feed(piece, &mut |data| lines.feed(data)).unwrap() {
                    done_at = Some(i * read + piece.len());
                    break;
                }
            }
            // Done at the last chunk's size line; the empty trailer section's CRLF is
            // left unread.
            let done_at = done_at.unwrap_or_else(|| panic!("never done (reads of {read})"));
            assert!(done_at >= wire.len() - 2, "done at {done_at} of {} (reads of {read})", wire.len());
            assert_eq!((lines.lines, lines.bytes), (2000, body.len() as u64), "reads of {read}");
            assert_eq!(lines.first_line, b"{\"id\":0}");
            assert!(lines.tail.ends_with(b"{\"id\":1999}\n"));
        }
    }

    #[test]
    fn refuses_bad_framing() {
        let mut d = Dechunker::default();
        assert!(d.feed(b"zz\r\n", &mut |_| {}).is_err());
        let mut d = Dechunker::default();
        assert!(d.feed(b"2\r\nabX\r\n", &mut |_| {}).is_err());
    }
}
