//! What a stored message carries. A transaction is one message, the text a websocket
//! client receives; one larger than the server's `max_payload` is stored as numbered
//! pieces, cut between UTF-8 characters, which the gateway joins back into one message
//! (and its websocket cuts into frames of `--frame-size`, as the server's does).
//! Headers say which transaction (`nextlsn`) and which piece.
//!
//! A piece is published as soon as it is full, before the transaction's end has been
//! decoded, so the publisher never needs a whole transaction in memory (nor does a
//! gateway: it hands each piece on as a body of the message). So only the last piece
//! knows how many there are (`i/n`); the others say `i/+`.

use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};

use crate::types::Lsn;

/// The transaction's `nextlsn`, `X/Y`; absent on a non-transactional logical message.
pub(crate) const NEXTLSN: &str = "Pgdeltastream-Nextlsn";
/// `i/n`: piece i (from 1), the last of n; `i/+`: piece i, more to come.
pub const PIECE: &str = "Pgdeltastream-Piece";
const MORE: &str = "+";
/// The slot the message was published from: which incarnation of the session it is of.
pub const SLOT: &str = "Pgdeltastream-Slot";

/// The slot a stored message names; none on messages stored before it was recorded.
pub fn slot_of(headers: Option<&HeaderMap>) -> Option<&str> {
    headers.and_then(|h| h.get(SLOT)).map(|v| v.as_str())
}

/// Whether a message belongs to the incarnation `slot` (unknown on either side: yes).
pub(crate) fn of_incarnation(headers: Option<&HeaderMap>, slot: Option<&str>) -> bool {
    match (slot_of(headers), slot) {
        (Some(published), Some(slot)) => published == slot,
        _ => true,
    }
}

/// Room left in `max_payload` for the headers, which count against it.
pub(crate) const HEADER_ROOM: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub nextlsn: Option<Lsn>,
    pub piece: u32,
    /// Whether this piece ends the message.
    pub last: bool,
}

impl Meta {
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(lsn) = self.nextlsn {
            headers.insert(NEXTLSN, lsn.to_string());
        }
        let of = if self.last { self.piece.to_string() } else { MORE.to_owned() };
        headers.insert(PIECE, format!("{}/{of}", self.piece));
        headers
    }

    /// The `Nats-Msg-Id`: `<nextlsn>` or `<nextlsn>/<piece>`. A logical message has no
    /// nextlsn: it is named after the transaction before it and its place since then,
    /// which a publisher resuming from that transaction reads again in the same order.
    pub(crate) fn message_id(&self, after: Lsn, unackable: u32) -> String {
        let base = match self.nextlsn {
            Some(lsn) => lsn.to_string(),
            None => format!("{after}+m{unackable}"),
        };
        if self.last && self.piece == 1 { base } else { format!("{base}/{}", self.piece) }
    }

    pub(crate) fn from_headers(headers: Option<&HeaderMap>) -> Result<Meta, String> {
        let get = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let nextlsn = get(NEXTLSN)
            .map(|v| v.parse::<Lsn>().map_err(|e| format!("bad {NEXTLSN} header {v:?}: {e}")))
            .transpose()?;
        let (piece, last) = match get(PIECE) {
            None => (1, true),
            Some(v) => v
                .split_once('/')
                .and_then(|(i, n)| {
                    let i = i.parse::<u32>().ok().filter(|&i| i >= 1)?;
                    match n {
                        MORE => Some((i, false)),
                        // `i/n` with i < n: as a publisher that knew n up front wrote.
                        n => n.parse::<u32>().ok().filter(|&n| n >= i).map(|n| (i, n == i)),
                    }
                })
                .ok_or_else(|| format!("bad {PIECE} header {v:?}"))?,
        };
        Ok(Meta { nextlsn, piece, last })
    }
}

/// Takes a full piece off the front of `text`: at most `max` bytes (at least 4, a
/// character's most), ending between characters, when more than `max` are there (so
/// something is left for a later piece). Where the pieces of a message are cut depends
/// only on its text, not on how it arrived: a re-publish cuts them the same.
pub(crate) fn full_piece(text: &mut BytesMut, max: usize) -> Option<Bytes> {
    let max = max.max(4);
    if text.len() <= max {
        return None;
    }
    // A UTF-8 continuation byte is 10xxxxxx: cut before a byte that is not one.
    let mut cut = max;
    while cut > 0 && text[cut] & 0xC0 == 0x80 {
        cut -= 1;
    }
    if cut == 0 {
        cut = max;
    }
    Some(text.split_to(cut).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let middle = Meta { nextlsn: Some(Lsn(0x1_0000_00A0)), piece: 2, last: false };
        assert_eq!(Meta::from_headers(Some(&middle.headers())), Ok(middle));
        assert_eq!(middle.message_id(Lsn(5), 0), "1/A0/2");
        let end = Meta { nextlsn: Some(Lsn(0x1_0000_00A0)), piece: 3, last: true };
        assert_eq!(Meta::from_headers(Some(&end.headers())), Ok(end));
        assert_eq!(end.message_id(Lsn(5), 0), "1/A0/3");
        let first = Meta { piece: 1, ..middle };
        assert_eq!(first.message_id(Lsn(5), 0), "1/A0/1");
        let whole = Meta { nextlsn: Some(Lsn(0xA0)), piece: 1, last: true };
        assert_eq!(whole.message_id(Lsn(5), 0), "0/A0");
        let logical = Meta { nextlsn: None, piece: 1, last: true };
        assert_eq!(logical.message_id(Lsn(0x50), 2), "0/50+m2");
        assert_eq!(Meta::from_headers(None), Ok(logical));
        let mut counted = HeaderMap::new();
        counted.insert(PIECE, "2/3");
        assert_eq!(Meta::from_headers(Some(&counted)), Ok(Meta { nextlsn: None, piece: 2, last: false }));
        for bad in ["3/2", "0/+", "0/0", "x/+", "2", "1/-"] {
            let mut headers = HeaderMap::new();
            headers.insert(PIECE, bad);
            assert!(Meta::from_headers(Some(&headers)).is_err(), "{bad}");
        }
    }

    #[test]
    fn pieces_end_between_characters_wherever_the_text_was_split() {
        let text = "aé€😀".repeat(50);
        for max in [4, 5, 7, 100, 1000] {
            let mut cuts = Vec::new();
            for arrival in [1, 3, 64, text.len()] {
                let (mut buf, mut pieces) = (BytesMut::new(), Vec::new());
                for chunk in text.as_bytes().chunks(arrival) {
                    buf.extend_from_slice(chunk);
                    while let Some(piece) = full_piece(&mut buf, max) {
                        pieces.push(piece);
                    }
                }
                pieces.push(buf.freeze());
                assert!(pieces.iter().all(|p| p.len() <= max && std::str::from_utf8(p).is_ok()), "{max}");
                assert_eq!(pieces.concat(), text.as_bytes());
                cuts.push(pieces);
            }
            assert!(cuts.windows(2).all(|w| w[0] == w[1]), "{max}: cut differently");
        }
        assert_eq!(full_piece(&mut BytesMut::from("abc"), 10), None);
    }
}
