//! WebSocket frames as the server sends them (RFC 6455, section 5.2), encoded once and shared.
//!
//! Pure: no sockets. A server's frames are never masked, so a frame's bytes are the same for
//! every receiver: the hub encodes a broadcast once, and each member's copy of the [`Frame`] is
//! a 2–10 byte header and a reference to the same payload. [`crate::connection`] writes the
//! header and the payload of many frames with one `sendmsg`, without copying either into a
//! per-client buffer. (Reading stays with tungstenite: client frames are masked and need its
//! parser.)

use tungstenite::{Bytes, Utf8Bytes};

/// Opcodes of the frames the server sends.
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
/// The FIN bit: every frame the server sends is a whole message.
const FIN: u8 = 0x80;
/// Longest header: 2 bytes and a 64-bit length.
const MAX_HEAD: usize = 10;
/// A close frame's reason must leave its payload within a control frame's 125 bytes.
const MAX_CLOSE_REASON: usize = 123;

/// One encoded frame: its header and its (shared) payload. Cloning copies the header and
/// bumps the payload's reference count.
#[derive(Clone, Debug)]
pub struct Frame {
    head: [u8; MAX_HEAD],
    head_len: u8,
    payload: Bytes,
}

impl Frame {
    fn new(opcode: u8, payload: Bytes) -> Frame {
        let mut head = [0u8; MAX_HEAD];
        head[0] = FIN | opcode;
        let len = payload.len();
        let head_len = if len < 126 {
            head[1] = len as u8;
            2
        } else if let Ok(len) = u16::try_from(len) {
            head[1] = 126;
            head[2..4].copy_from_slice(&len.to_be_bytes());
            4
        } else {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Frame {
            head,
            head_len,
            payload,
        }
    }

    /// A text frame carrying `text` (a protocol event's JSON).
    pub fn text(text: Utf8Bytes) -> Frame {
        Frame::new(OP_TEXT, Bytes::from(text))
    }

    /// A ping with no payload (the heartbeat).
    pub fn ping() -> Frame {
        Frame::new(OP_PING, Bytes::new())
    }

    /// The answer to a client's ping: the same payload.
    pub fn pong(payload: Bytes) -> Frame {
        Frame::new(OP_PONG, payload)
    }

    /// A close frame: with a code and a reason (cut to fit), or empty (the echo of an empty
    /// close).
    pub fn close(code: Option<(u16, &str)>) -> Frame {
        let payload = match code {
            None => Bytes::new(),
            Some((code, reason)) => {
                let mut cut = reason.len().min(MAX_CLOSE_REASON);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                let mut payload = Vec::with_capacity(2 + cut);
                payload.extend_from_slice(&code.to_be_bytes());
                payload.extend_from_slice(&reason.as_bytes()[..cut]);
                Bytes::from(payload)
            }
        };
        Frame::new(OP_CLOSE, payload)
    }

    /// Whether this is a close frame (after it, nothing more may be sent).
    pub fn is_close(&self) -> bool {
        self.head[0] & 0x0F == OP_CLOSE
    }

    /// The frame's size on the wire.
    pub fn len(&self) -> usize {
        usize::from(self.head_len) + self.payload.len()
    }

    /// Never true: a frame always has a header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The frame's bytes from `offset` on, as (part of the header, part of the payload).
    pub fn parts_from(&self, offset: usize) -> (&[u8], &[u8]) {
        let head = &self.head[..usize::from(self.head_len)];
        if offset < head.len() {
            (&head[offset..], &self.payload)
        } else {
            (&[], &self.payload[offset - head.len()..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::protocol::Role;
    use tungstenite::{Message, WebSocket};

    fn bytes(frame: &Frame) -> Vec<u8> {
        let (head, payload) = frame.parts_from(0);
        [head, payload].concat()
    }

    /// Decodes `wire` as a client would, with tungstenite.
    fn decode(wire: Vec<u8>) -> Vec<Message> {
        let stream = std::io::Cursor::new(wire);
        let mut socket = WebSocket::from_raw_socket(stream, Role::Client, None);
        let mut messages = Vec::new();
        while let Ok(message) = socket.read() {
            let close = matches!(message, Message::Close(_));
            messages.push(message);
            if close {
                break;
            }
        }
        messages
    }

    #[test]
    fn frames_of_every_length_class_decode_as_sent() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 200_000] {
            let text = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let frame = Frame::text(Utf8Bytes::from(text.clone()));
            assert_eq!(frame.len(), bytes(&frame).len());
            assert_eq!(decode(bytes(&frame)), vec![Message::Text(text.into())]);
        }
    }

    #[test]
    fn control_frames_decode_as_sent() {
        let mut wire = bytes(&Frame::ping());
        wire.extend(bytes(&Frame::pong(Bytes::from_static(b"abc"))));
        wire.extend(bytes(&Frame::close(Some((1008, "too slow")))));
        let messages = decode(wire);
        assert_eq!(messages[0], Message::Ping(Bytes::new()));
        assert_eq!(messages[1], Message::Pong(Bytes::from_static(b"abc")));
        let Message::Close(Some(close)) = &messages[2] else {
            panic!("{messages:?}");
        };
        assert_eq!(close.code, CloseCode::Policy);
        assert_eq!(close.reason, "too slow");
        assert!(Frame::close(None).is_close() && !Frame::ping().is_close());
    }

    #[test]
    fn a_long_close_reason_is_cut_at_a_character_boundary() {
        let frame = Frame::close(Some((1001, &"é".repeat(100))));
        assert!(frame.len() <= 2 + 125);
        let Message::Close(Some(close)) = &decode(bytes(&frame))[0] else {
            panic!("not a close");
        };
        assert_eq!(close.reason.chars().count(), 61);
    }

    #[test]
    fn parts_from_an_offset_skip_what_was_sent() {
        let frame = Frame::text(Utf8Bytes::from_static("hello"));
        let all = bytes(&frame);
        for offset in 0..all.len() {
            let (head, payload) = frame.parts_from(offset);
            assert_eq!([head, payload].concat(), all[offset..]);
        }
    }
}
