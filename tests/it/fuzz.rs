//! Property-based tests: random and mutated frames for the protocol decoder and a live reader.
//!
//! The decoder ([`protocol::parse_client_frame`]) gets random strings, random JSON values,
//! deeply nested arrays and mutations of valid `hello`/`say`/`typing` frames: it must never
//! panic, what it accepts must obey PROTOCOL.md's rules, and every refusal must encode to an
//! `error` frame with a known code.
//!
//! The reader gets, after a real handshake on one shared in-process server, sequences of
//! hand-built frames (random first bytes, opcodes and reserved bits, unmasked frames, huge
//! declared lengths, non-minimal lengths, fragments, invalid UTF-8, close frames with any code,
//! frames over 64 KiB) and raw bytes, then a ping with a unique payload as a sentinel, then the
//! end of its stream (a half-close), so every case ends on an event rather than a timeout. The
//! server must answer only well-formed frames and end the connection well: with a close frame
//! whose code is one the protocol names for bad input (1002, 1007, 1008, 1009) or the echo of a
//! close the client sent, or by answering the sentinel (the connection stayed open). When the
//! bytes sent were whole frames, one of those two must happen: a silent cut is a failure. After
//! every case the server must still be healthy.
//!
//! Cases are random on each run (set `PROPTEST_RNG_SEED` to replay one); no regression file is
//! written into the tree (`failure_persistence: None`): a failure prints the shrunk input.

use std::io::Write;
use std::net::{Shutdown, TcpStream};

use chatroom::protocol::{
    self, ClientFrame, MAX_CID_CHARS, MAX_HISTORY_PAGE, MAX_NAME_CHARS, MAX_SESSION_CHARS,
    MAX_TEXT_CHARS,
};
use chatroom::ServerHandle;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{TestCaseError, TestError, TestRunner};
use serde_json::{json, Value};

use crate::support::{
    client_frame, config, get, raw_ws_handshake, read_server_frame, start, together, unique,
    wait_until, FIN, OP_BINARY, OP_CONTINUATION, OP_TEXT, RSV1,
};

const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Error codes PROTOCOL.md names.
const ERROR_CODES: [&str; 6] = [
    "bad_request",
    "not_joined",
    "bad_name",
    "too_long",
    "empty",
    "rate_limited",
];

/// Close codes the server sends for bad input (PROTOCOL.md: 1002 protocol violation, 1007
/// invalid UTF-8, 1008 policy, 1009 too big); any other must echo a close the client sent.
const BAD_INPUT_CLOSES: [u16; 4] = [1002, 1007, 1008, 1009];

/// The fields frames have, so random objects often hit a real one.
const KEYS: [&str; 6] = ["type", "name", "text", "since", "epoch", "session"];

/// Random cases with no regression file in the tree, and shrinking bounded so a failure
/// reports within a minute or so.
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    })
}

/// Runs a property, failing the test with proptest's report (the shrunk input) on a failure.
fn check<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    match runner(cases).run(&strategy, test) {
        Ok(()) => {}
        Err(TestError::Fail(why, input)) => panic!("{why}\nminimal failing input: {input:#?}"),
        Err(e) => panic!("{e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(&KEYS[..]).prop_map(String::from),
        1 => any::<String>(),
    ]
}

/// Any JSON value, with numbers at the edges (negative, fractional, beyond u64).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        prop::sample::select(&["hello", "say", "typing", "Hello", ""][..]).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..5)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// Names and texts near the rules' edges: blank, invisible, bidi controls, piled combining
/// marks, control characters, and lengths around the limits.
fn tricky_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,40}",
        "[ a\u{0301}\u{200B}\u{202E}\u{2066}\u{3164}\u{FEFF}\u{0000}\n\t]{0,40}",
        (0usize..40).prop_map(|n| "e\u{0301}".repeat(n)),
        (MAX_TEXT_CHARS - 2..MAX_TEXT_CHARS + 3).prop_map(|n| "é".repeat(n)),
        any::<String>(),
    ]
}

/// A valid-looking `hello`, `say` or `typing` (some of them refused for their values).
fn frame_value() -> impl Strategy<Value = Value> {
    let hello = (
        tricky_text(),
        prop::option::of(any::<u64>()),
        prop::option::of("[a-z0-9]{0,12}"),
        prop::option::of("[a-z0-9]{0,70}"),
    )
        .prop_map(|(name, since, epoch, session)| {
            let mut hello = json!({"type": "hello", "name": name});
            for (field, value) in [
                ("since", since.map(Value::from)),
                ("epoch", epoch.map(Value::from)),
                ("session", session.map(Value::from)),
            ] {
                if let Some(value) = value {
                    hello[field] = value;
                }
            }
            hello
        });
    prop_oneof![
        hello,
        tricky_text().prop_map(|text| json!({"type": "say", "text": text})),
        Just(json!({"type": "typing"})),
    ]
}

/// A valid-looking frame, changed: fields set to any value or removed, then the text itself
/// edited (characters inserted, removed or replaced, cut short, a slice repeated).
fn mutated_frame() -> impl Strategy<Value = String> {
    let field_edit = (key(), prop::option::of(json_value()));
    let text_edit = (0u8..5, any::<Index>(), any::<Index>(), any::<char>());
    (
        frame_value(),
        prop::collection::vec(field_edit, 0..3),
        prop::collection::vec(text_edit, 0..4),
    )
        .prop_map(|(mut frame, field_edits, text_edits)| {
            for (field, value) in field_edits {
                let object = frame.as_object_mut().expect("frames are objects");
                match value {
                    Some(value) => object.insert(field, value),
                    None => object.remove(&field),
                };
            }
            let mut chars: Vec<char> = frame.to_string().chars().collect();
            for (kind, at, other, c) in text_edits {
                let i = at.index(chars.len() + 1);
                match kind {
                    0 => chars.insert(i, c),
                    1 if i < chars.len() => chars[i] = c,
                    2 if i < chars.len() => {
                        chars.remove(i);
                    }
                    3 => {
                        let j = other.index(chars.len() + 1);
                        let (a, b) = (i.min(j), i.max(j));
                        let slice: Vec<char> = chars[a..b].to_vec();
                        chars.splice(b..b, slice);
                    }
                    _ => chars.truncate(i),
                }
            }
            chars.into_iter().collect()
        })
}

/// `1` inside `depth` arrays or objects (`{"a":…}`), alone (`place` 0), as a `say`'s text (1)
/// or as an extra field of a `hello` (2).
fn nested(depth: usize, objects: bool, place: u8) -> String {
    let (open, close) = if objects {
        (r#"{"a":"#.repeat(depth), "}".repeat(depth))
    } else {
        ("[".repeat(depth), "]".repeat(depth))
    };
    let nested = format!("{open}1{close}");
    match place {
        0 => nested,
        1 => format!(r#"{{"type":"say","text":{nested}}}"#),
        _ => format!(r#"{{"x":{nested},"type":"hello","name":"n"}}"#),
    }
}

/// Nesting up to far past serde_json's recursion limit (128).
fn deeply_nested() -> impl Strategy<Value = String> {
    (1usize..2000, any::<bool>(), 0u8..3)
        .prop_map(|(depth, objects, place)| nested(depth, objects, place))
}

/// Any text a client could send in one text frame. Deep nesting is in it: 119 objects deep
/// once overflowed a reader's stack in a debug build (serde_json recursing), which this test
/// found; the decoder now refuses more than `protocol::MAX_NESTING` levels before parsing.
fn frame_text() -> impl Strategy<Value = String> {
    prop_oneof![4 => flat_text(), 1 => deeply_nested()]
}

/// Text frames without deliberate deep nesting.
fn flat_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<String>(),
        2 => json_value().prop_map(|v| v.to_string()),
        4 => mutated_frame(),
        2 => frame_value().prop_map(|v| v.to_string()),
    ]
}

// ---------------------------------------------------------------------------------------------
// The decoder
// ---------------------------------------------------------------------------------------------

/// Whether `v` is an `error` frame as PROTOCOL.md describes it.
fn is_error_frame(v: &Value) -> bool {
    let Some(object) = v.as_object() else {
        return false;
    };
    let known = object
        .keys()
        .all(|k| ["type", "code", "message", "text"].contains(&k.as_str()));
    known
        && v["type"] == "error"
        && v["code"].as_str().is_some_and(|c| ERROR_CODES.contains(&c))
        && v["message"].as_str().is_some_and(|m| !m.is_empty())
        && (v.get("text").is_none() || v["text"].is_string())
}

/// What the decoder does with `input`: accepted frames obey the rules, refusals encode to a
/// well-formed error frame.
fn decode(input: &str) -> Result<(), TestCaseError> {
    let chars = |s: &str| s.chars().count();
    match protocol::parse_client_frame(input) {
        Ok(ClientFrame::Hello { name, session, .. }) => {
            prop_assert_eq!(name.trim(), name.as_str());
            prop_assert!((1..=MAX_NAME_CHARS).contains(&chars(&name)), "{name:?}");
            prop_assert!(!name.chars().any(char::is_control), "{name:?}");
            if let Some(session) = session {
                prop_assert!((1..=MAX_SESSION_CHARS).contains(&chars(&session)));
            }
        }
        Ok(ClientFrame::Say { text, cid }) => {
            prop_assert_eq!(text.trim(), text.as_str());
            prop_assert!((1..=MAX_TEXT_CHARS).contains(&chars(&text)));
            if let Some(cid) = cid {
                prop_assert!((1..=MAX_CID_CHARS).contains(&chars(&cid)), "{cid:?}");
            }
        }
        Ok(ClientFrame::History { before, limit }) => {
            prop_assert!(before >= 1);
            prop_assert!((1..=MAX_HISTORY_PAGE).contains(&limit));
        }
        Ok(ClientFrame::Typing) => {}
        Err(refusal) => {
            let encoded = protocol::encode_error(&refusal);
            let value: Value = serde_json::from_str(encoded.as_str())
                .map_err(|e| TestCaseError::fail(format!("error frame is not JSON: {e}")))?;
            prop_assert!(is_error_frame(&value), "malformed error frame {value}");
        }
    }
    Ok(())
}

#[test]
fn the_decoder_never_panics_and_every_refusal_is_a_well_formed_error() {
    check(1024, frame_text(), |input| decode(&input));
}

// ---------------------------------------------------------------------------------------------
// The reader
// ---------------------------------------------------------------------------------------------

/// How a frame declares its payload length.
#[derive(Clone, Copy, Debug)]
enum Length {
    /// The shortest form (RFC 6455 section 5.2).
    Minimal,
    /// Always the 8-byte form, even for short payloads.
    Wide,
    /// A length over 64 KiB (up to 2^64 - 1) that the bytes sent do not match.
    Declared(u64),
}

/// One piece of what a fuzzing client sends after its handshake.
#[derive(Clone)]
enum Piece {
    /// A frame: its first byte (FIN, RSV bits, opcode), its payload, its mask (`None`:
    /// unmasked, which a client must never send) and how it declares its length.
    Frame {
        first: u8,
        payload: Vec<u8>,
        mask: Option<[u8; 4]>,
        length: Length,
    },
    /// Bytes with no framing at all.
    Raw(Vec<u8>),
}

/// Payloads shown as text (invalid UTF-8 as U+FFFD) with their length, so a failure reads.
impl std::fmt::Debug for Piece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = |bytes: &[u8]| {
            let shown: String = String::from_utf8_lossy(bytes).chars().take(300).collect();
            format!("{} bytes: {shown:?}", bytes.len())
        };
        match self {
            Piece::Raw(bytes) => write!(f, "Raw({})", text(bytes)),
            Piece::Frame {
                first,
                payload,
                mask,
                length,
            } => write!(
                f,
                "Frame(first {first:#04x}, {length:?}, mask {mask:?}, {})",
                text(payload)
            ),
        }
    }
}

impl Piece {
    fn encode(&self, out: &mut Vec<u8>) {
        let (first, payload, mask, length) = match self {
            Piece::Raw(bytes) => return out.extend_from_slice(bytes),
            Piece::Frame {
                first,
                payload,
                mask,
                length,
            } => (*first, payload, *mask, *length),
        };
        out.push(first);
        let masked = if mask.is_some() { 0x80 } else { 0 };
        match (length, payload.len()) {
            (Length::Minimal, n) if n < 126 => out.push(masked | n as u8),
            (Length::Minimal, n) if n <= 0xffff => {
                out.push(masked | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            (Length::Declared(n), _) => {
                out.push(masked | 127);
                out.extend_from_slice(&n.to_be_bytes());
            }
            (_, n) => {
                out.push(masked | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = mask.unwrap_or_default();
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }
}

/// The first byte of a frame: mostly what clients send, sometimes anything at all.
fn first_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        16 => Just(FIN | OP_TEXT),
        2 => Just(OP_TEXT),
        2 => Just(OP_CONTINUATION),
        2 => Just(FIN | OP_CONTINUATION),
        1 => Just(FIN | OP_BINARY),
        1 => Just(FIN | OP_CLOSE),
        1 => Just(FIN | OP_PING),
        1 => Just(FIN | OP_PONG),
        1 => Just(FIN | RSV1 | OP_TEXT),
        2 => any::<u8>(),
    ]
}

/// A payload: text (often JSON, often a frame), random bytes, text with invalid UTF-8 in it, a
/// close frame's body, or a frame over 64 KiB.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    let invalid_utf8 =
        (frame_text(), any::<Index>(), 0x80u8..=0xff).prop_map(|(text, at, byte)| {
            let mut bytes = text.into_bytes();
            bytes.insert(at.index(bytes.len() + 1), byte);
            bytes
        });
    let close_body = (any::<u16>(), "\\PC{0,20}").prop_map(|(code, reason)| {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(reason.as_bytes());
        body
    });
    prop_oneof![
        12 => frame_text().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => invalid_utf8,
        2 => close_body,
        1 => (64 * 1024 - 2..64 * 1024 + 3usize).prop_map(|n| vec![b'a'; n]),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    let mask = prop_oneof![19 => any::<[u8; 4]>().prop_map(Some), 1 => Just(None)];
    let length = prop_oneof![
        8 => Just(Length::Minimal),
        1 => Just(Length::Wide),
        1 => (64 * 1024 + 1..=u64::MAX).prop_map(Length::Declared),
    ];
    let frame =
        (first_byte(), payload(), mask, length).prop_map(|(first, payload, mask, length)| {
            Piece::Frame {
                first,
                payload,
                mask,
                length,
            }
        });
    prop_oneof![
        9 => frame,
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Piece::Raw),
    ]
}

/// What the server can make of the bytes a client sent: the close frames in them (`Some`
/// code, or `None` for a close without a body), and whether they are whole frames only.
fn frames_in(mut bytes: &[u8]) -> (Vec<Option<u16>>, bool) {
    let mut closes = Vec::new();
    let whole = loop {
        let [first, second, rest @ ..] = bytes else {
            break bytes.is_empty();
        };
        let (len, rest) = match second & 0x7f {
            126 if rest.len() >= 2 => (
                u64::from(u16::from_be_bytes([rest[0], rest[1]])),
                &rest[2..],
            ),
            127 if rest.len() >= 8 => {
                let wide: [u8; 8] = rest[..8].try_into().unwrap();
                (u64::from_be_bytes(wide), &rest[8..])
            }
            126 | 127 => break false,
            n => (u64::from(n), rest),
        };
        let mask_len = if second & 0x80 != 0 { 4 } else { 0 };
        let fits = |n: &usize| n.checked_add(mask_len).is_some_and(|end| end <= rest.len());
        let Some(len) = usize::try_from(len).ok().filter(fits) else {
            break false;
        };
        let mask: [u8; 4] = rest[..mask_len].try_into().unwrap_or_default();
        let payload: Vec<u8> = rest[mask_len..mask_len + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        if first & 0x0f == OP_CLOSE {
            closes.push((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])));
        }
        bytes = &rest[mask_len + len..];
    };
    (closes, whole)
}

/// Whether a text frame from the server is one PROTOCOL.md describes (an object with a known
/// type; an error with a known code and a message).
fn well_formed_text(payload: &[u8]) -> Result<(), TestCaseError> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| {
        let text = String::from_utf8_lossy(payload);
        TestCaseError::fail(format!("server text frame is not JSON ({e}): {text}"))
    })?;
    let kinds = ["welcome", "message", "joined", "left", "typing", "error"];
    let kind = value["type"].as_str().unwrap_or_default();
    prop_assert!(kinds.contains(&kind), "unknown server frame {value}");
    if kind == "error" {
        prop_assert!(is_error_frame(&value), "malformed error frame {value}");
    }
    Ok(())
}

/// One connection: handshake, `hello` if asked, the pieces, a sentinel ping, then the end of
/// the client's stream (a half-close); judges every frame the server sends until it ends the
/// connection. Every wait is for an event (the pong, a close frame, the end of the stream),
/// bounded by the support timeout.
fn fuzz_connection(
    server: &ServerHandle,
    hello: bool,
    pieces: &[Piece],
) -> Result<(), TestCaseError> {
    let mut stream: TcpStream =
        raw_ws_handshake(server.ws_addr(), &format!("/ws/{}", unique("fuzz")));
    let mut bytes = Vec::new();
    if hello {
        bytes.extend(client_frame(
            FIN | OP_TEXT,
            br#"{"type":"hello","name":"fuzz"}"#,
        ));
    }
    for piece in pieces {
        piece.encode(&mut bytes);
    }
    let (client_closes, whole) = frames_in(&bytes);
    let sentinel = unique("sentinel");
    bytes.extend(client_frame(FIN | OP_PING, sentinel.as_bytes()));
    // The server may end the connection before it has read everything: a failed write is
    // one of the outcomes, and what it answered is still in our receive buffer.
    let _ = stream.write_all(&bytes);
    // Bytes that end inside a frame swallow the sentinel: the end of the stream (a half-close)
    // is then what the server waits for. Otherwise the end comes after the sentinel's pong,
    // so nothing the server queued before the pong is cut off by it.
    if !whole {
        let _ = stream.shutdown(Shutdown::Write);
    }
    let (mut close, mut ponged, mut seen) = (None, false, Vec::new());
    // `read_server_frame` fails the case if the server neither answers nor ends the
    // connection within the support timeout.
    while let Some((opcode, payload)) = read_server_frame(&mut stream) {
        seen.push(format!("{opcode:#x} {}", String::from_utf8_lossy(&payload)));
        prop_assert!(close.is_none(), "a frame after the close frame");
        match opcode {
            OP_TEXT => well_formed_text(&payload)?,
            OP_PING => {}
            OP_PONG if payload == sentinel.as_bytes() => {
                ponged = true;
                let _ = stream.shutdown(Shutdown::Write);
            }
            OP_PONG => {}
            OP_CLOSE => {
                prop_assert!(payload.len() != 1, "a close frame with a one-byte body");
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                prop_assert!(std::str::from_utf8(payload.get(2..).unwrap_or_default()).is_ok());
                close = Some(code);
            }
            other => prop_assert!(false, "unexpected opcode {other:#x} from the server"),
        }
    }
    if let Some(code) = close {
        let bad_input = code.is_some_and(|c| BAD_INPUT_CLOSES.contains(&c));
        prop_assert!(
            bad_input || client_closes.contains(&code),
            "close {code:?} is neither for bad input nor an echo of {client_closes:?}"
        );
    }
    prop_assert!(
        close.is_some() || ponged || !whole,
        "whole frames, yet neither a close frame nor the sentinel's pong; the server sent {seen:?}"
    );
    Ok(())
}

/// The server after the fuzz: nothing left connected, `/healthz` 200, two clients can chat,
/// no service thread failed.
fn assert_healthy(server: &ServerHandle) {
    wait_until("every fuzzed connection has ended", || {
        server.client_count() == 0
    });
    assert_eq!(get(server.http_addr(), "/healthz").status, 200);
    let [mut alice, mut bob] = together(server, "after-the-fuzz", ["alice", "bob"]);
    alice.say("still here");
    alice.expect_said("alice", "still here");
    bob.expect_said("alice", "still here");
    assert!(server.failure().is_none(), "{:?}", server.failure());
}

#[test]
fn the_reader_answers_random_and_mutated_frames_well_and_the_server_stays_healthy() {
    let server = start(config());
    let case = (any::<bool>(), prop::collection::vec(piece(), 1..6));
    check(192, case, |(hello, pieces)| {
        fuzz_connection(&server, hello, &pieces)
    });
    assert_healthy(&server);
    server.shutdown();
}
