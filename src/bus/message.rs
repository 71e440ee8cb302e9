//! What a stored message carries. A transaction is one message, the text a websocket
//! client receives; one larger than the server's `max_payload` is stored as numbered
//! pieces, cut between UTF-8 characters, which the gateway sends as the frames of one
//! websocket message. Headers say which transaction (`nextlsn`) and which piece.

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::types::Lsn;

/// The transaction's `nextlsn`, `X/Y`; absent on a non-transactional logical message.
pub const NEXTLSN: &str = "Pgdeltastream-Nextlsn";
/// `i/n`: piece i (from 1) of n.
pub const PIECE: &str = "Pgdeltastream-Piece";

/// Room left in `max_payload` for the headers, which count against it.
pub const HEADER_ROOM: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub nextlsn: Option<Lsn>,
    pub piece: u32,
    pub pieces: u32,
}

impl Meta {
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(lsn) = self.nextlsn {
            headers.insert(NEXTLSN, lsn.to_string());
        }
        headers.insert(PIECE, format!("{}/{}", self.piece, self.pieces));
        headers
    }

    /// The `Nats-Msg-Id`: `<nextlsn>` or `<nextlsn>/<piece>`. A logical message has no
    /// nextlsn: it is named after the transaction before it and its place since then,
    /// which a publisher resuming from that transaction reads again in the same order.
    pub fn message_id(&self, after: Lsn, unackable: u32) -> String {
        let base = match self.nextlsn {
            Some(lsn) => lsn.to_string(),
            None => format!("{after}+m{unackable}"),
        };
        if self.pieces > 1 { format!("{base}/{}", self.piece) } else { base }
    }

    pub fn from_headers(headers: Option<&HeaderMap>) -> Result<Meta, String> {
        let get = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let nextlsn = get(NEXTLSN)
            .map(|v| v.parse::<Lsn>().map_err(|e| format!("bad {NEXTLSN} header {v:?}: {e}")))
            .transpose()?;
        let (piece, pieces) = match get(PIECE) {
            None => (1, 1),
            Some(v) => v
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse::<u32>().ok()?, n.parse::<u32>().ok()?)))
                .filter(|&(i, n)| i >= 1 && i <= n)
                .ok_or_else(|| format!("bad {PIECE} header {v:?}"))?,
        };
        Ok(Meta { nextlsn, piece, pieces })
    }

    pub fn is_last(&self) -> bool {
        self.piece == self.pieces
    }
}

/// Cuts `text` into pieces of at most `max` bytes (at least 4, a character's most),
/// each ending between characters.
pub fn split(text: Bytes, max: usize) -> Vec<Bytes> {
    let max = max.max(4);
    let mut pieces = Vec::with_capacity(text.len() / max + 1);
    let mut rest = text;
    while rest.len() > max {
        // A UTF-8 continuation byte is 10xxxxxx: cut before a byte that is not one.
        let mut cut = max;
        while cut > 0 && rest[cut] & 0xC0 == 0x80 {
            cut -= 1;
        }
        if cut == 0 {
            cut = max;
        }
        pieces.push(rest.split_to(cut));
    }
    pieces.push(rest);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let meta = Meta { nextlsn: Some(Lsn(0x1_0000_00A0)), piece: 2, pieces: 3 };
        assert_eq!(Meta::from_headers(Some(&meta.headers())), Ok(meta));
        assert_eq!(meta.message_id(Lsn(5), 0), "1/A0/2");
        let whole = Meta { nextlsn: Some(Lsn(0xA0)), piece: 1, pieces: 1 };
        assert_eq!(whole.message_id(Lsn(5), 0), "0/A0");
        let logical = Meta { nextlsn: None, piece: 1, pieces: 1 };
        assert_eq!(logical.message_id(Lsn(0x50), 2), "0/50+m2");
        assert_eq!(Meta::from_headers(None), Ok(logical));
        let mut bad = HeaderMap::new();
        bad.insert(PIECE, "3/2");
        assert!(Meta::from_headers(Some(&bad)).is_err());
    }

    #[test]
    fn splits_between_characters() {
        let text = Bytes::from("aé€😀".repeat(50));
        for max in [4, 5, 7, 100, 1000] {
            let pieces = split(text.clone(), max);
            assert!(pieces.iter().all(|p| p.len() <= max && std::str::from_utf8(p).is_ok()), "{max}");
            assert_eq!(pieces.concat(), text.to_vec());
        }
        assert_eq!(split(Bytes::from("abc"), 10), vec![Bytes::from("abc")]);
    }
}
