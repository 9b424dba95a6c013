//! The wire format: the only module that knows JSON.
//!
//! Readers ([`crate::client`]) call [`parse_client_frame`] on every text frame; the hub
//! ([`crate::hub`]) calls the `encode_*` functions once per event and shares the bytes with every
//! member of the room. PROTOCOL.md is the human-readable version of this file.

use serde::{Deserialize, Serialize};
use tungstenite::Utf8Bytes;

/// Longest name, in Unicode code points, after trimming.
pub const MAX_NAME_CHARS: usize = 32;
/// Longest message text, in Unicode code points, after trimming.
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest session id a client may send.
pub const MAX_SESSION_CHARS: usize = 64;
/// Longest client-chosen id of a `say` (`cid`), in Unicode code points.
pub const MAX_CID_CHARS: usize = 64;
/// Most messages one `history` request may ask for, and how many it gets by default.
pub const MAX_HISTORY_PAGE: usize = 100;
pub const DEFAULT_HISTORY_PAGE: usize = 50;
/// Deepest nesting of objects and arrays a client frame may have; every frame of PROTOCOL.md is
/// one flat object. serde_json recurses once per level (up to 128 levels), and in a debug build
/// 119 levels overflowed a reader's 256 KiB stack, which aborts the whole server: so the depth
/// is checked first, by a scan that does not recurse.
pub const MAX_NESTING: usize = 8;

/// A frame a client sends, after parsing.
#[derive(Debug, PartialEq)]
pub enum ClientFrame {
    Hello {
        name: String,
        since: Option<u64>,
        epoch: Option<String>,
        session: Option<String>,
    },
    /// `cid`: the client's own id for this say, so a resend after a reconnect is answered
    /// with the original message instead of becoming a second one.
    Say {
        text: String,
        cid: Option<String>,
    },
    Typing,
    /// The page of history before id `before`: at most `limit` messages, oldest first.
    History {
        before: u64,
        limit: usize,
    },
}

/// Why a client frame was refused: becomes an `error` frame, and the connection stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    NotJoined,
    BadName,
    TooLong,
    Empty,
    RateLimited,
    /// The rooms' shared store (Redis, `--redis`) cannot be reached: the say was not sent.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::BadName => "bad_name",
            ErrorCode::TooLong => "too_long",
            ErrorCode::Empty => "empty",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// A refusal with the human words the page shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    /// The refused `say`'s text (trimmed). The error for a refused say can reach the client
    /// before the echo of an earlier say, so the page finds the refused text by content, not
    /// by position.
    pub text: Option<String>,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            text: None,
        }
    }

    /// The same refusal, naming the `say` text it refuses.
    pub fn of_text(self, text: &str) -> Self {
        Refusal {
            text: Some(text.to_owned()),
            ..self
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum RawFrame {
    Hello {
        name: String,
        #[serde(default)]
        since: Option<u64>,
        #[serde(default)]
        epoch: Option<String>,
        #[serde(default)]
        session: Option<String>,
    },
    Say {
        text: String,
        #[serde(default)]
        cid: Option<String>,
    },
    Typing,
    History {
        #[serde(default)]
        before: Option<serde_json::Value>,
        #[serde(default)]
        limit: Option<serde_json::Value>,
    },
}

/// Parses and validates one text frame from a client. Names and texts come back trimmed.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, Refusal> {
    if nesting_depth_exceeds(text, MAX_NESTING) {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            format!("That frame nests objects or arrays more than {MAX_NESTING} deep."),
        ));
    }
    let raw: RawFrame = serde_json::from_str(text).map_err(|err| {
        Refusal::new(
            ErrorCode::BadRequest,
            format!("That frame is not a message this server understands ({err})."),
        )
    })?;
    match raw {
        RawFrame::Hello {
            name,
            since,
            epoch,
            session,
        } => {
            let name = validate_name(&name)?;
            let session = match session {
                Some(s) if s.is_empty() || s.chars().count() > MAX_SESSION_CHARS => {
                    return Err(Refusal::new(
                        ErrorCode::BadRequest,
                        format!("A session id has 1 to {MAX_SESSION_CHARS} characters."),
                    ))
                }
                other => other,
            };
            Ok(ClientFrame::Hello {
                name,
                since,
                epoch,
                session,
            })
        }
        RawFrame::Say { text, cid } => {
            let text = validate_text(&text)?;
            if let Some(cid) = &cid {
                if cid.is_empty() || cid.chars().count() > MAX_CID_CHARS {
                    return Err(Refusal::new(
                        ErrorCode::BadRequest,
                        format!("A cid is a string of 1 to {MAX_CID_CHARS} characters."),
                    )
                    .of_text(&text));
                }
            }
            Ok(ClientFrame::Say { text, cid })
        }
        RawFrame::Typing => Ok(ClientFrame::Typing),
        RawFrame::History { before, limit } => {
            let whole = |value: &serde_json::Value| value.as_u64().filter(|n| *n > 0);
            let Some(before) = before.as_ref().and_then(whole) else {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    "A history request needs \"before\": a positive whole number (an id).",
                ));
            };
            let limit = match limit {
                None => DEFAULT_HISTORY_PAGE,
                Some(value) => match whole(&value) {
                    Some(n) if n as usize <= MAX_HISTORY_PAGE => n as usize,
                    _ => {
                        return Err(Refusal::new(
                            ErrorCode::BadRequest,
                            format!(
                                "A history request's \"limit\" is a whole number from 1 to \
                                 {MAX_HISTORY_PAGE}."
                            ),
                        ))
                    }
                },
            };
            Ok(ClientFrame::History { before, limit })
        }
    }
}

/// At most this many combining marks may follow one character in a name: enough for any
/// script's accents, too few to draw over the neighbouring lines of the page.
const MAX_MARKS_PER_CHAR: usize = 3;

/// A name is 1–32 characters after normalization (NFC) and trimming, with no control
/// characters, no bidirectional controls (which reorder the text around them), something
/// visible once invisible characters are set aside, and at most [`MAX_MARKS_PER_CHAR`]
/// combining marks on one character.
pub fn validate_name(name: &str) -> Result<String, Refusal> {
    use unicode_normalization::UnicodeNormalization;
    let name: String = name.nfc().collect();
    let name = name.trim();
    let refuse = |why: &str| Err(Refusal::new(ErrorCode::BadName, why));
    if name.is_empty() {
        return refuse("Please choose a name.");
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(Refusal::new(
            ErrorCode::BadName,
            format!("Names have at most {MAX_NAME_CHARS} characters."),
        ));
    }
    if name.chars().any(char::is_control) {
        return refuse("Names cannot contain control characters.");
    }
    if name.chars().any(is_bidi_control) {
        return refuse("Names cannot contain characters that change the direction of text.");
    }
    if name.chars().all(|c| c.is_whitespace() || is_invisible(c)) {
        return refuse("Names need at least one visible character.");
    }
    let mut marks = 0;
    for c in name.chars() {
        marks = if unicode_normalization::char::is_combining_mark(c) {
            marks + 1
        } else {
            0
        };
        if marks > MAX_MARKS_PER_CHAR {
            return refuse("Names cannot pile marks on one character.");
        }
    }
    Ok(name.to_owned())
}

/// Characters that change the direction of the text around them (Unicode bidi controls).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Characters that draw nothing: Unicode's default-ignorable code points (zero-width spaces
/// and joiners, format characters, variation selectors, fillers) and the blank braille
/// pattern. A name made of them only would show as nothing on the page.
pub fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{2800}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}' | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

/// A text is 1–4000 characters after trimming; line breaks are welcome.
pub fn validate_text(text: &str) -> Result<String, Refusal> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Refusal::new(ErrorCode::Empty, "Empty messages are not sent.").of_text(text));
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(Refusal::new(
            ErrorCode::TooLong,
            format!("Messages have at most {MAX_TEXT_CHARS} characters."),
        )
        .of_text(text));
    }
    Ok(text.to_owned())
}

/// One chat message as stored in history and sent to members.
#[derive(Serialize)]
struct MessageOut<'a> {
    r#type: &'static str,
    id: u64,
    room: &'a str,
    name: &'a str,
    text: &'a str,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cid: Option<&'a str>,
}

/// A `message` frame; `cid` is the sender's own id for it, when its say carried one.
pub fn encode_message(
    id: u64,
    room: &str,
    name: &str,
    text: &str,
    ts: u64,
    cid: Option<&str>,
) -> Utf8Bytes {
    to_bytes(&MessageOut {
        r#type: "message",
        id,
        room,
        name,
        text,
        ts,
        cid,
    })
}

/// The answer to a `history` request: `frames` are `message` frames, oldest first, copied byte
/// for byte; `more` says whether older messages exist.
pub fn encode_history<'a>(frames: impl IntoIterator<Item = &'a str>, more: bool) -> Utf8Bytes {
    let messages = join_message_frames(frames);
    Utf8Bytes::from(format!(
        "{{\"type\":\"history\",\"messages\":{messages},\"more\":{more}}}"
    ))
}

/// Several `message` frames as one JSON array, `[frame,frame,…]`: how the store keeps a batch
/// of one room's messages in one row. The frames are copied byte for byte.
pub fn join_message_frames<'a>(frames: impl IntoIterator<Item = &'a str>) -> String {
    let mut array = String::from("[");
    for frame in frames {
        if array.len() > 1 {
            array.push(',');
        }
        array.push_str(frame);
    }
    array.push(']');
    array
}

#[derive(Deserialize)]
struct MessageId {
    id: u64,
}

/// The frames of an array made by [`join_message_frames`], oldest first, each with its id and
/// exactly the bytes that were joined.
pub fn split_message_frames(array: &str) -> Result<Vec<(u64, Utf8Bytes)>, serde_json::Error> {
    let frames: Vec<&serde_json::value::RawValue> = serde_json::from_str(array)?;
    frames
        .into_iter()
        .map(|frame| {
            let MessageId { id } = serde_json::from_str(frame.get())?;
            Ok((id, Utf8Bytes::from(frame.get())))
        })
        .collect()
}

#[derive(Serialize)]
struct PresenceOut<'a> {
    r#type: &'static str,
    name: &'a str,
    ts: u64,
}

pub fn encode_joined(name: &str, ts: u64) -> Utf8Bytes {
    to_bytes(&PresenceOut {
        r#type: "joined",
        name,
        ts,
    })
}

pub fn encode_left(name: &str, ts: u64) -> Utf8Bytes {
    to_bytes(&PresenceOut {
        r#type: "left",
        name,
        ts,
    })
}

#[derive(Serialize)]
struct TypingOut<'a> {
    r#type: &'static str,
    name: &'a str,
}

pub fn encode_typing(name: &str) -> Utf8Bytes {
    to_bytes(&TypingOut {
        r#type: "typing",
        name,
    })
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    r#type: &'static str,
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

pub fn encode_error(refusal: &Refusal) -> Utf8Bytes {
    to_bytes(&ErrorOut {
        r#type: "error",
        code: refusal.code.as_str(),
        message: &refusal.message,
        text: refusal.text.as_deref(),
    })
}

#[derive(Serialize)]
struct WelcomeHead<'a> {
    r#type: &'static str,
    room: &'a str,
    name: &'a str,
    epoch: &'a str,
    users: &'a [&'a str],
}

/// Builds a welcome. `history` holds already-encoded messages, which are spliced in as they are
/// rather than parsed and encoded again.
pub fn encode_welcome<'a>(
    room: &str,
    name: &str,
    epoch: &str,
    users: &[&str],
    history: impl Iterator<Item = &'a str>,
) -> Utf8Bytes {
    let head = serde_json::to_string(&WelcomeHead {
        r#type: "welcome",
        room,
        name,
        epoch,
        users,
    })
    .expect("welcome head serializes");
    // Replace the closing brace with the history array.
    let mut out = String::with_capacity(head.len() + 64);
    out.push_str(&head[..head.len() - 1]);
    out.push_str(",\"history\":[");
    for (i, message) in history.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(message);
    }
    out.push_str("]}");
    Utf8Bytes::from(out)
}

#[derive(Serialize)]
struct HealthOut<'a> {
    status: &'static str,
    /// The service thread that died (`hub`, `store`, …), or null.
    failed: Option<&'a str>,
    clients: usize,
    rooms: usize,
    store: StoreHealthOut<'a>,
    memory: MemoryOut,
    disk: Option<DiskOut>,
    /// Absent without `--redis`.
    #[serde(skip_serializing_if = "Option::is_none")]
    bus: Option<BusOut>,
}

/// Redis, with `--redis`: `state` `up` or `down` (says are refused while down), where it is
/// (`host:port`), and the last error while down.
#[derive(Serialize)]
pub struct BusOut {
    pub state: &'static str,
    pub redis: String,
    pub error: Option<String>,
}

/// History in memory against `--memory-budget`, in bytes.
#[derive(Serialize)]
pub struct MemoryOut {
    pub used: u64,
    pub budget: u64,
}

/// The history database against `--max-disk`, in bytes: `used` is its pages in use (what the
/// budget holds), `file` what its files take (the file never shrinks by itself), `budget` null
/// without a limit. Absent (null) with `--data none`.
#[derive(Serialize)]
pub struct DiskOut {
    pub used: u64,
    pub file: u64,
    pub budget: Option<u64>,
}

/// The history store's part of `/healthz`.
#[derive(Serialize)]
pub struct StoreHealthOut<'a> {
    /// `memory`, `ok` or `failing`.
    pub state: &'a str,
    pub written: u64,
    pub unwritten: u64,
    pub dropped: u64,
    pub read_errors: u64,
    pub error: Option<&'a str>,
}

/// The body of `GET /healthz`: counts only, never a room name (names are secrets). `status`
/// is `failed` when a service thread has died (`failed` names it; the server must be
/// restarted), else `degraded` while the store is failing (chat works, history is not being
/// kept), else `ok`.
pub fn encode_health(
    failed: Option<&str>,
    clients: usize,
    rooms: usize,
    store: StoreHealthOut<'_>,
    memory: MemoryOut,
    disk: Option<DiskOut>,
    bus: Option<BusOut>,
) -> String {
    let bus_down = bus.as_ref().is_some_and(|b| b.state == "down");
    let status = match (failed, store.state) {
        (Some(_), _) => "failed",
        (None, "failing") => "degraded",
        (None, _) if bus_down => "degraded",
        (None, _) => "ok",
    };
    serde_json::to_string(&HealthOut {
        status,
        failed,
        clients,
        rooms,
        store,
        memory,
        disk,
        bus,
    })
    .expect("health serializes")
}

fn to_bytes(value: &impl Serialize) -> Utf8Bytes {
    // Serializing these plain structs of strings and numbers cannot fail.
    Utf8Bytes::from(serde_json::to_string(value).expect("event serializes"))
}

/// Whether `text` opens more than `limit` objects or arrays inside each other (brackets inside
/// strings do not count). Malformed JSON is left for the parser to refuse.
fn nesting_depth_exceeds(text: &str, limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
        let refusal = parse_client_frame(&deep).unwrap_err();
        assert!(refusal.message.contains("deep"), "{}", refusal.message);
        let arrays = format!(
            "{{\"type\":\"say\",\"text\":\"x\",\"x\":{}{}}}",
            "[".repeat(9),
            "]".repeat(9)
        );
        assert!(parse_client_frame(&arrays).is_err());
        // Brackets inside strings are text, and shallow extras are fine.
        let text = "{{{{{{{{{{[[[[[[[[[[ \\\" }";
        let frame = serde_json::json!({"type": "say", "text": text, "x": [[1]]}).to_string();
        assert!(
            matches!(parse_client_frame(&frame), Ok(ClientFrame::Say { text: t, .. }) if t == text)
        );
    }

    #[test]
    fn joined_frames_split_back_into_the_same_bytes_and_ids() {
        let frames = [
            encode_message(7, "r", "alice", "plain", 1, None),
            encode_message(8, "r", "bob", "],[{\"id\":99}, \\ \n é 🦀", 2, None),
            encode_message(10, "r", "carol", "\u{0}\u{2028}", 3, Some("c-1")),
        ];
        let array = join_message_frames(frames.iter().map(|f| f.as_str()));
        let split = split_message_frames(&array).unwrap();
        let ids: Vec<u64> = split.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [7, 8, 10]);
        for ((_, got), want) in split.iter().zip(&frames) {
            assert_eq!(got.as_str(), want.as_str());
        }
        assert_eq!(join_message_frames([]), "[]");
        assert!(split_message_frames("[{\"type\":\"message\"}]").is_err());
    }

    #[test]
    fn hello_with_options_parses_and_trims() {
        let frame = parse_client_frame(
            r#"{"type":"hello","name":"  alice ","since":4,"epoch":"e","session":"s1"}"#,
        )
        .unwrap();
        assert_eq!(
            frame,
            ClientFrame::Hello {
                name: "alice".into(),
                since: Some(4),
                epoch: Some("e".into()),
                session: Some("s1".into())
            }
        );
    }

    #[test]
    fn refusals_carry_their_codes() {
        let code = |s: &str| parse_client_frame(s).unwrap_err().code;
        assert_eq!(code("not json"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"say"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"say","text":"  "}"#), ErrorCode::Empty);
        assert_eq!(code(r#"{"type":"hello","name":""}"#), ErrorCode::BadName);
        assert_eq!(
            code(r#"{"type":"hello","name":"a\u0007b"}"#),
            ErrorCode::BadName
        );
        let long = "x".repeat(MAX_TEXT_CHARS + 1);
        assert_eq!(
            code(&format!(r#"{{"type":"say","text":"{long}"}}"#)),
            ErrorCode::TooLong
        );
    }

    #[test]
    fn lengths_count_code_points_not_bytes() {
        assert!(validate_text(&"é".repeat(MAX_TEXT_CHARS)).is_ok());
        assert!(validate_name(&"é".repeat(MAX_NAME_CHARS)).is_ok());
        // Decomposed é is normalized to one character, so 32 of them fit.
        assert!(validate_name(&"e\u{301}".repeat(MAX_NAME_CHARS)).is_ok());
        assert_eq!(validate_name("e\u{301}va").unwrap(), "éva");
        for blank in [
            "\u{200B}",
            "\u{FEFF}\u{FEFF}",
            "\u{3164}",
            "\u{2800}",
            " \u{200D} ",
        ] {
            assert!(validate_name(blank).is_err(), "{blank:?}");
        }
        for reorders in ["\u{202E}evil", "a\u{2066}b", "x\u{200F}"] {
            assert!(validate_name(reorders).is_err(), "{reorders:?}");
        }
        assert!(validate_name("a\u{300}\u{301}\u{302}").is_ok());
        assert!(validate_name(&format!("a{}", "\u{300}".repeat(31))).is_err());
        // Scripts that need joiners keep them.
        assert!(validate_name("می\u{200C}خواهم").is_ok());
        assert!(validate_name("👩\u{200D}👩\u{200D}👧").is_ok());
        assert!(validate_name(&"é".repeat(MAX_NAME_CHARS + 1)).is_err());
    }

    #[test]
    fn welcome_splices_history_as_valid_json() {
        let m1 = encode_message(1, "r", "a", "hi \"there\"", 5, None);
        let m2 = encode_message(2, "r", "b", "yo", 6, None);
        let w = encode_welcome(
            "r",
            "a",
            "e1",
            &["a", "b"],
            [m1.as_str(), m2.as_str()].into_iter(),
        );
        let v: serde_json::Value = serde_json::from_str(w.as_str()).unwrap();
        assert_eq!(v["type"], "welcome");
        assert_eq!(v["users"][1], "b");
        assert_eq!(v["history"][0]["text"], "hi \"there\"");
        assert_eq!(v["history"][1]["id"], 2);
        let empty = encode_welcome("r", "a", "e1", &[], std::iter::empty());
        let v: serde_json::Value = serde_json::from_str(empty.as_str()).unwrap();
        assert_eq!(v["history"].as_array().unwrap().len(), 0);
    }
}
