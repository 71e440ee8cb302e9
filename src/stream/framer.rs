//! A message cut into websocket frames sized by bytes: the websocket sink's own cutting.
//!
//! Clients limit the number of *fragments* of a message (Python `websockets`: 4,096,
//! Node `ws`: 16,384), not only its size, so a frame per change would make any large
//! transaction undeliverable to them, and an undeliverable transaction comes back on
//! every reconnect. Frames of `frame_bytes` keep a 1 GB message under 4,096 frames,
//! while memory stays bounded by one frame. A message that fits goes out as one frame.
//!
//! Where the frames are cut depends only on the message's text and the frame size, not
//! on how its bodies arrived: the server's clients and a gateway's get the same frames.
//! A body is only ever cut at a UTF-8 character boundary, so every frame is valid text.

use bytes::{Buf, Bytes, BytesMut};

use super::message::{Finish, Part};

/// The default size of the frames a message is cut into.
pub const DEFAULT_FRAME_BYTES: usize = 256 * 1024;
/// The largest frame we send: some clients refuse larger ones.
pub(crate) const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Where a frame sits in its websocket message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A message on its own.
    Whole,
    /// The first frame of a message sent in pieces.
    First,
    Middle,
    /// The frame that completes the message.
    Last,
}

/// One websocket frame of a text message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFrame {
    pub payload: Bytes,
    pub fragment: Fragment,
    /// On the frame that completes the message: how the message finished.
    pub end: Option<Finish>,
}

#[derive(Debug)]
pub struct Framer {
    frame_bytes: usize,
    buf: BytesMut,
    /// The message's first body while it is all there is and fits a frame: a message of
    /// one body goes out as it came, without a copy.
    first: Option<Bytes>,
    /// A frame of the current message has gone out already.
    started: bool,
}

impl Framer {
    pub fn new(frame_bytes: usize) -> Framer {
        let frame_bytes = frame_bytes.clamp(16, MAX_FRAME_BYTES);
        Framer { frame_bytes, buf: BytesMut::new(), first: None, started: false }
    }

    /// Takes one part; appends the frames that are complete to `out`.
    pub fn push(&mut self, part: Part, out: &mut Vec<WsFrame>) {
        match part {
            // Each message ends with its finish, which leaves the framer empty.
            Part::Start(_) => {}
            Part::Body(data) => {
                if let Some(first) = self.first.take() {
                    self.append(first, out);
                    self.append(data, out);
                } else if self.buf.is_empty() && !self.started && data.len() <= self.frame_bytes {
                    self.first = Some(data);
                } else {
                    self.append(data, out);
                }
            }
            Part::Finish(finish) => {
                let (payload, fragment) = match self.first.take() {
                    Some(first) => (first, Fragment::Whole),
                    None if self.started => (self.buf.split().freeze(), Fragment::Last),
                    None => (self.buf.split().freeze(), Fragment::Whole),
                };
                self.started = false;
                out.push(WsFrame { payload, fragment, end: Some(finish) });
            }
        }
    }

    /// Adds bytes to the frame being filled, sending out each frame that fills up.
    /// Large bodies are cut into frames without being copied.
    fn append(&mut self, mut data: Bytes, out: &mut Vec<WsFrame>) {
        loop {
            let room = self.frame_bytes - self.buf.len();
            if data.len() <= room {
                self.buf.extend_from_slice(&data);
                return;
            }
            let mut cut = char_floor(&data, room);
            if cut == 0 && self.buf.is_empty() {
                cut = room; // not UTF-8 at all: any cut beats none
            }
            // With less room than the next character, the frame goes out as it is.
            let payload = if self.buf.is_empty() {
                data.split_to(cut)
            } else {
                self.buf.extend_from_slice(&data[..cut]);
                data.advance(cut);
                self.buf.split().freeze()
            };
            let fragment = if self.started { Fragment::Middle } else { Fragment::First };
            self.started = true;
            out.push(WsFrame { payload, fragment, end: None });
        }
    }
}

/// The largest cut at or before `n` that falls between two UTF-8 characters of `data`.
fn char_floor(data: &[u8], n: usize) -> usize {
    let mut n = n.min(data.len());
    // Continuation bytes are 0b10xx_xxxx; a character is at most 4 bytes.
    while n > 0 && data.get(n).is_some_and(|b| b & 0xC0 == 0x80) {
        n -= 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::message::{MessageKind, Start};
    use crate::types::Lsn;
    use proptest::prelude::*;

    fn end(changes: u32) -> Finish {
        Finish { nextlsn: Some(Lsn(42)), kind: MessageKind::Data, changes }
    }

    /// The frames of one message of these bodies.
    fn frames(framer: &mut Framer, bodies: &[&str], out: &mut Vec<WsFrame>) {
        framer.push(Part::Start(Start::default()), out);
        for body in bodies {
            framer.push(Part::Body(Bytes::copy_from_slice(body.as_bytes())), out);
        }
        framer.push(Part::Finish(end(7)), out);
    }

    fn shape(frames: &[WsFrame]) -> Vec<(Fragment, String)> {
        frames.iter().map(|f| (f.fragment, String::from_utf8(f.payload.to_vec()).unwrap())).collect()
    }

    #[test]
    fn a_small_transaction_is_one_frame() {
        let mut out = Vec::new();
        frames(&mut Framer::new(64), &["{\"change\":[", "1", ",2", "]}"], &mut out);
        assert_eq!(shape(&out), [(Fragment::Whole, "{\"change\":[1,2]}".to_owned())]);
        assert_eq!(out[0].end, Some(end(7)));
    }

    #[test]
    fn a_message_of_one_body_goes_out_as_it_came() {
        let body = Bytes::from_static(b"{\"action\":\"I\"}");
        let mut out = Vec::new();
        let mut framer = Framer::new(64);
        for part in Part::whole(Start::default(), body.clone(), end(0)) {
            framer.push(part, &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].payload.as_ptr(), body.as_ptr(), "no copy");
    }

    #[test]
    fn frames_fill_up_and_cut_between_characters() {
        let mut framer = Framer::new(16);
        let mut out = Vec::new();
        framer.push(Part::Start(Start::default()), &mut out);
        framer.push(Part::Body(Bytes::from_static(b"0123456789")), &mut out);
        assert!(out.is_empty(), "nothing goes out before a frame is full");
        framer.push(Part::Body(Bytes::copy_from_slice("abcdé€xyz".as_bytes())), &mut out);
        framer.push(Part::Body(Bytes::from_static(b"]")), &mut out);
        framer.push(Part::Finish(end(3)), &mut out);
        assert_eq!(
            shape(&out),
            [(Fragment::First, "0123456789abcdé".to_owned()), (Fragment::Last, "€xyz]".to_owned())]
        );
        assert_eq!((out[0].end, out[1].end), (None, Some(end(3))), "the count stays on the frame that ends it");
    }

    #[test]
    fn a_large_body_is_cut_without_copies() {
        let mut framer = Framer::new(16);
        let mut out = Vec::new();
        let big = Bytes::from("x".repeat(40));
        let at = big.as_ptr();
        for part in Part::whole(Start::default(), big, end(0)) {
            framer.push(part, &mut out);
        }
        let sizes: Vec<_> = out.iter().map(|f| (f.fragment, f.payload.len())).collect();
        assert_eq!(sizes, [(Fragment::First, 16), (Fragment::Middle, 16), (Fragment::Last, 8)]);
        assert_eq!(out[0].payload.as_ptr(), at, "the first frame is a slice of the body");
    }

    proptest! {
        /// Whatever the bodies and the frame size: each message's frames join to its
        /// bodies, every frame is UTF-8 and at most the frame size, only the last frame
        /// of a message says how it ended, every frame but the last is full, and the
        /// frames depend on the text alone, not on how it was split into bodies.
        #[test]
        fn framing_keeps_messages_whole(
            messages in proptest::collection::vec(proptest::collection::vec("[a-zé€😀]{0,40}", 1..6), 0..6),
            frame_bytes in 16usize..64,
        ) {
            let mut framer = Framer::new(frame_bytes);
            let mut out = Vec::new();
            for bodies in &messages {
                let bodies: Vec<&str> = bodies.iter().map(String::as_str).collect();
                frames(&mut framer, &bodies, &mut out);
            }
            let mut frames_iter = out.iter();
            for bodies in &messages {
                let mut joined = String::new();
                let mut own = Vec::new();
                loop {
                    let f = frames_iter.next().expect("a frame for every message");
                    own.push(f.clone());
                    prop_assert!(f.payload.len() <= frame_bytes);
                    joined.push_str(std::str::from_utf8(&f.payload).expect("UTF-8 frame"));
                    if matches!(f.fragment, Fragment::Whole | Fragment::Last) {
                        prop_assert_eq!(f.end, Some(end(7)));
                        break;
                    }
                    prop_assert!(f.end.is_none());
                    prop_assert!(f.payload.len() + 4 > frame_bytes, "a frame that is not full went out");
                }
                prop_assert_eq!(&joined, &bodies.concat());
                let mut again = Vec::new();
                frames(&mut Framer::new(frame_bytes), &[joined.as_str()], &mut again);
                prop_assert_eq!(shape(&again), shape(&own), "cut otherwise as one body");
            }
            prop_assert!(frames_iter.next().is_none());
        }
    }
}
