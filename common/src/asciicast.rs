//! asciicast v2: the header line, event lines `[time, code, data]`, a fast line encoder and a
//! strict parser used to validate what agents upload.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A terminal size. Always named, never two bare integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

impl Default for TtySize {
    fn default() -> Self {
        TtySize { cols: 80, rows: 24 }
    }
}

impl std::str::FromStr for TtySize {
    type Err = ();

    /// An `r` event's data, `"COLSxROWS"`: two whole numbers from 1 to 65535.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (c, r) = s.split_once('x').ok_or(())?;
        let num = |t: &str| -> Result<u16, ()> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            t.parse::<u16>().ok().filter(|n| *n > 0).ok_or(())
        };
        Ok(TtySize {
            cols: num(c)?,
            rows: num(r)?,
        })
    }
}

impl std::fmt::Display for TtySize {
    /// The `r` event's data: `"COLSxROWS"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.cols, self.rows)
    }
}

/// The asciicast v2 header line. Unknown keys are kept so a header round-trips.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub version: u8,
    pub width: u16,
    pub height: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Header {
    pub fn new(size: TtySize, timestamp: Option<i64>) -> Self {
        Header {
            version: 2,
            width: size.cols,
            height: size.rows,
            timestamp,
            env: None,
            command: None,
            title: None,
            extra: BTreeMap::new(),
        }
    }

    pub fn size(&self) -> TtySize {
        TtySize {
            cols: self.width,
            rows: self.height,
        }
    }

    /// The header as one JSON line, ending in `\n`.
    pub fn to_line(&self) -> String {
        // Serialising a struct of strings and numbers cannot fail.
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"version\":2}"));
        s.push('\n');
        s
    }
}

/// The event codes of asciicast v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventCode {
    Output,
    Input,
    Resize,
    Marker,
}

impl EventCode {
    pub fn as_str(self) -> &'static str {
        match self {
            EventCode::Output => "o",
            EventCode::Input => "i",
            EventCode::Resize => "r",
            EventCode::Marker => "m",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "o" => EventCode::Output,
            "i" => EventCode::Input,
            "r" => EventCode::Resize,
            "m" => EventCode::Marker,
            _ => return None,
        })
    }
}

/// One decoded event line.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Seconds since the start of the recording.
    pub time: f64,
    pub code: EventCode,
    pub data: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("line {line}: not JSON: {reason}")]
    NotJson { line: usize, reason: String },
    #[error("line {line}: an event must be a 3-element array [time, code, data]")]
    NotEvent { line: usize },
    #[error("line {line}: event time must be a number from 0 to {MAX_EVENT_TIME}")]
    BadTime { line: usize },
    #[error("line {line}: unknown event code {code:?}")]
    BadCode { line: usize, code: String },
    #[error("line {line}: event data must be a string")]
    BadData { line: usize },
    #[error("line {line}: a resize event's data must be \"COLSxROWS\", got {data:?}")]
    BadResize { line: usize, data: String },
    #[error("line {line}: header is not a valid asciicast v2 header: {reason}")]
    BadHeader { line: usize, reason: String },
    #[error("line {line}: event time goes backwards (events are in time order)")]
    TimeBackwards { line: usize },
    #[error("no events")]
    Empty,
}

impl ParseError {
    /// The same error, for text that starts `lines` lines further down.
    fn after(mut self, lines: usize) -> Self {
        match &mut self {
            ParseError::NotJson { line, .. }
            | ParseError::NotEvent { line }
            | ParseError::BadTime { line }
            | ParseError::BadCode { line, .. }
            | ParseError::BadData { line }
            | ParseError::BadResize { line, .. }
            | ParseError::BadHeader { line, .. }
            | ParseError::TimeBackwards { line } => *line += lines,
            ParseError::Empty => {}
        }
        self
    }
}

/// Parses one event line (without its trailing newline). `line` is for error messages.
pub fn parse_event_line(text: &str, line: usize) -> Result<Event, ParseError> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| ParseError::NotJson {
        line,
        reason: e.to_string(),
    })?;
    let arr = match v {
        serde_json::Value::Array(a) if a.len() == 3 => a,
        _ => return Err(ParseError::NotEvent { line }),
    };
    let time = arr[0]
        .as_f64()
        .filter(|t| (0.0..=MAX_EVENT_TIME).contains(t))
        .ok_or(ParseError::BadTime { line })?;
    let code_s = arr[1].as_str().ok_or(ParseError::NotEvent { line })?;
    let code = EventCode::parse(code_s).ok_or_else(|| ParseError::BadCode {
        line,
        code: code_s.to_string(),
    })?;
    let data = arr[2]
        .as_str()
        .ok_or(ParseError::BadData { line })?
        .to_string();
    if code == EventCode::Resize && data.parse::<TtySize>().is_err() {
        return Err(ParseError::BadResize { line, data });
    }
    Ok(Event { time, code, data })
}

/// What a validated block of event lines contains.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventsSummary {
    pub events: usize,
    /// The time of the last event, if there is one.
    pub last_time: Option<f64>,
}

/// The time and code of `text` when it is plainly an event line (a number, a code and a
/// string), read with no allocation: a chunk is hundreds of lines, and building a JSON value
/// of each, its data copied, was most of what checking one cost. `None` sends the caller to
/// [`parse_event_line`], which takes the same lines and says what is wrong with the others.
fn quick_event(text: &str) -> Option<(f64, EventCode)> {
    /// A JSON string, borrowed when it has no escapes (only a resize's is read).
    struct Text<'a>(Option<&'a str>);
    impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<'a>(std::marker::PhantomData<&'a str>);
            impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
                type Value = Option<&'a str>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                    Ok(Some(s))
                }
                fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                    Ok(None)
                }
            }
            d.deserialize_str(V(std::marker::PhantomData)).map(Text)
        }
    }
    #[derive(Deserialize)]
    struct Line<'a>(f64, &'a str, #[serde(borrow)] Text<'a>);
    let Line(time, code, data) = serde_json::from_str(text).ok()?;
    if !(0.0..=MAX_EVENT_TIME).contains(&time) {
        return None;
    }
    let code = EventCode::parse(code)?;
    if code == EventCode::Resize && data.0?.parse::<TtySize>().is_err() {
        return None;
    }
    Some((time, code))
}

/// JSON's whitespace (RFC 8259): the only bytes a blank line may hold, and the only ones
/// allowed around a line's array. Not Unicode's: a line of U+00A0 is not blank, it is wrong.
fn json_blank(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// `s` without the JSON whitespace at its start.
fn trim_json_start(s: &str) -> &str {
    s.trim_start_matches([' ', '\t', '\r', '\n'])
}

/// Validates text made only of event lines (a chunk). Blank lines are allowed and skipped
/// (a trailing newline produces one).
pub fn validate_events(text: &str) -> Result<EventsSummary, ParseError> {
    scan_events(text, |_| {}).map(|(summary, _)| summary)
}

/// Checks each event line of `text` and hands it, as stored, to `each`: without its `\n` and
/// without any `\r`. A `\r` that parses is whitespace between a line's tokens (in a string it
/// must be escaped), and players that read lines the way Python does take a bare one for the
/// end of a line. Also says whether `text` is already as stored (every line whole, none
/// blank, no `\r`), which is what an agent sends.
fn scan_events(
    text: &str,
    mut each: impl FnMut(&str),
) -> Result<(EventsSummary, bool), ParseError> {
    let mut summary = EventsSummary::default();
    let mut as_stored = text.is_empty() || text.ends_with('\n');
    let has_cr = text.as_bytes().contains(&b'\r');
    as_stored &= !has_cr;
    let pieces = text.strip_suffix('\n').unwrap_or(text);
    for (i, line) in pieces.split('\n').enumerate() {
        if json_blank(line) {
            as_stored = false;
            continue;
        }
        let time = match quick_event(line) {
            Some((time, _)) => time,
            None => parse_event_line(line, i + 1)?.time,
        };
        // The last event's time is the recording's duration: one that goes back in time
        // would make it a lie.
        if summary.last_time.is_some_and(|t| time < t) {
            return Err(ParseError::TimeBackwards { line: i + 1 });
        }
        summary.events += 1;
        summary.last_time = Some(time);
        if has_cr && line.contains('\r') {
            each(&line.replace('\r', ""));
        } else {
            each(line);
        }
    }
    Ok((summary, as_stored))
}

/// Validates text made only of event lines and returns it as stored: one event a line, each
/// ending in `\n`, with blank lines and `\r` dropped.
pub fn normalise_events(text: &str) -> Result<(String, EventsSummary), ParseError> {
    let mut out = String::with_capacity(text.len() + 1);
    let (summary, _) = scan_events(text, |line| {
        out.push_str(line);
        out.push('\n');
    })?;
    Ok((out, summary))
}

/// As [`normalise_events`], but `text` itself is returned when it is already as stored (no
/// copy of a chunk that an agent sent as it should be).
pub fn normalise_events_owned(text: String) -> Result<(String, EventsSummary), ParseError> {
    let (summary, as_stored) = scan_events(&text, |_| {})?;
    if as_stored {
        return Ok((text, summary));
    }
    normalise_events(&text)
}

/// The most a header may take as JSON (its `env` holds two variables; a title or command
/// longer than this is cut by the agent).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Checks a header object against asciicast v2: `version` 2, `width` and `height` whole
/// numbers from 1 to 65535, and the optional keys, when present and not `null`, of their
/// types (`timestamp` a whole number, `duration` and `idle_time_limit` numbers `>= 0`,
/// `command` and `title` strings, `env` an object of strings, `theme` an object). Other keys
/// are kept as they are. Players trust these, so a bad one is refused, not stored.
pub fn check_header(v: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    let Value::Object(h) = v else {
        return Err("must be a JSON object".into());
    };
    if h.get("version").and_then(Value::as_u64) != Some(2) {
        return Err("version must be 2".into());
    }
    for k in ["width", "height"] {
        match h.get(k).and_then(Value::as_u64) {
            Some(n) if (1..=u64::from(u16::MAX)).contains(&n) => {}
            _ => return Err(format!("{k} must be a whole number from 1 to 65535")),
        }
    }
    let present = |k: &str| h.get(k).filter(|x| !x.is_null());
    if present("timestamp").is_some_and(|t| t.as_i64().is_none()) {
        return Err("timestamp must be a whole number (Unix seconds)".into());
    }
    for k in ["duration", "idle_time_limit"] {
        if present(k).is_some_and(|x| !x.as_f64().is_some_and(|f| f >= 0.0)) {
            return Err(format!("{k} must be a number >= 0"));
        }
    }
    for k in ["command", "title"] {
        if present(k).is_some_and(|x| !x.is_string()) {
            return Err(format!("{k} must be a string"));
        }
    }
    match present("env") {
        None => {}
        Some(Value::Object(env)) if env.values().all(|x| x.is_string() || x.is_null()) => {}
        Some(_) => return Err("env must be an object of strings".into()),
    }
    if present("theme").is_some_and(|x| !x.is_object()) {
        return Err("theme must be an object".into());
    }
    if json_len(v) > MAX_HEADER_BYTES {
        return Err(format!(
            "must be at most {} KiB as JSON",
            MAX_HEADER_BYTES / 1024
        ));
    }
    Ok(())
}

/// How many bytes `v` takes as compact JSON.
pub fn json_len<T: Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing a Value to a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Cuts the longest strings of `v` (values, not keys) until it takes at most `max` bytes as
/// JSON: every string is cut to 16 KiB, then a quarter of that, and so on (a cut string ends
/// in `…`). Whether anything was cut. An agent does this to a session's header and metadata,
/// whose `command` (an `ssh host '…'` can carry a whole script) and `TERM` come from the
/// user, so that the backend never refuses them for their size.
pub fn clip_to_fit(v: &mut serde_json::Value, max: usize) -> bool {
    fn clip(v: &mut serde_json::Value, limit: usize) -> bool {
        use serde_json::Value;
        match v {
            Value::String(s) if s.len() > limit => {
                let mut end = limit;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
                s.push('…');
                true
            }
            Value::Array(a) => a.iter_mut().fold(false, |cut, x| clip(x, limit) | cut),
            Value::Object(m) => m.values_mut().fold(false, |cut, x| clip(x, limit) | cut),
            _ => false,
        }
    }
    let mut limit = 16 * 1024;
    let mut cut = false;
    while json_len(v) > max && limit >= 16 {
        cut |= clip(v, limit);
        limit /= 4;
    }
    cut
}

/// A transcript: an optional header line followed by event lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    pub header: Option<serde_json::Value>,
    /// The event lines, each ending in `\n`, header removed.
    pub events_text: String,
    pub summary: EventsSummary,
}

/// Splits and validates a transcript that may begin with an asciicast header line.
pub fn parse_transcript(text: &str) -> Result<Transcript, ParseError> {
    let trimmed = trim_json_start(text);
    // Line numbers in errors count from the text's first line, blank ones included.
    let skipped = text[..text.len() - trimmed.len()].matches('\n').count();
    let (header, rest, below) = if trimmed.starts_with('{') {
        let (first, rest) = trimmed.split_once('\n').unwrap_or((trimmed, ""));
        let line = skipped + 1;
        let v: serde_json::Value =
            serde_json::from_str(first).map_err(|e| ParseError::BadHeader {
                line,
                reason: e.to_string(),
            })?;
        check_header(&v).map_err(|reason| ParseError::BadHeader { line, reason })?;
        (Some(v), rest, line)
    } else {
        (None, trimmed, skipped)
    };
    let (events_text, summary) = normalise_events(rest).map_err(|e| e.after(below))?;
    Ok(Transcript {
        header,
        events_text,
        summary,
    })
}

/// The latest event time a recording may have (68 years): durations, and their sums over many
/// recordings, stay far inside a 64-bit integer.
pub const MAX_EVENT_TIME: f64 = 2_147_483_647.0;

/// Whole seconds of a recording whose last event is at `last_time`: rounded up.
pub fn duration_secs(last_time: Option<f64>) -> i64 {
    match last_time {
        Some(t) if t.is_finite() && t > 0.0 => t.ceil() as i64,
        _ => 0,
    }
}

/// Appends one event line (with its `\n`) to `out`. Time is written with microsecond
/// precision, as asciinema does. Allocation-free when `out` has capacity (see
/// [`push_json_string`]).
pub fn encode_event(out: &mut Vec<u8>, time: f64, code: EventCode, data: &str) {
    use std::io::Write as _;
    out.push(b'[');
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{:.6}", time.max(0.0));
    out.extend_from_slice(b", \"");
    out.extend_from_slice(code.as_str().as_bytes());
    out.extend_from_slice(b"\", ");
    push_json_string(out, data);
    out.extend_from_slice(b"]\n");
}

/// Appends `s` as a JSON string literal, escaped as serde_json escapes it (control characters,
/// `"` and `\`). The hot path of recording: terminal output has an escape every few bytes (ESC
/// opens every colour code, `\r\n` ends every line), and json-escape-simd (sonic-rs's kernel)
/// finds and writes them 16 or 32 bytes a step, in less than half the CPU of the
/// word-at-a-time walk it replaced (bench/README, runs 29–31). It reserves six times `s` past
/// the end of `out` (its stores run ahead of what it keeps); pages never written take no memory.
/// DEL goes out as it is, as serde_json writes it.
pub fn push_json_string(out: &mut Vec<u8>, s: &str) {
    json_escape_simd::escape_into(s, out);
}

/// Cuts `data` into the longest pieces (at character boundaries, none empty) whose event
/// lines take at most `max` bytes, where `overhead` is the length of the line with no data
/// (`[time, "o", ""]\n`). A character whose line alone is longer gets a piece of its own.
/// How output bigger than `chunk_max_bytes` in one read still makes chunks under the limit:
/// split into several events of the same time, it plays back the same.
pub fn split_event_data(data: &str, overhead: usize, max: usize) -> SplitEventData<'_> {
    SplitEventData {
        rest: data,
        budget: max.saturating_sub(overhead),
    }
}

/// The pieces of [`split_event_data`].
#[derive(Debug, Clone)]
pub struct SplitEventData<'a> {
    rest: &'a str,
    budget: usize,
}

impl<'a> Iterator for SplitEventData<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.rest.is_empty() {
            return None;
        }
        let bytes = self.rest.as_bytes();
        let (mut end, mut len) = (0, 0);
        while end < bytes.len() {
            let b = bytes[end];
            // As `push_json_string` writes it: only ASCII is escaped, other characters are
            // copied as they are.
            let (width, escaped) = match b {
                0x08 | b'\t' | b'\n' | 0x0c | b'\r' => (1, 2),
                0x00..=0x1f => (1, 6),
                b'"' | b'\\' => (1, 2),
                0x20..=0x7f => (1, 1),
                0xc0..=0xdf => (2, 2),
                0xe0..=0xef => (3, 3),
                _ => (4, 4),
            };
            if end > 0 && len + escaped > self.budget {
                break;
            }
            len += escaped;
            end += width;
        }
        let end = end.min(bytes.len());
        let (piece, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(piece)
    }
}

/// Rewrites an `o` or `i` event line (with its `\n`) longer than `max` bytes as several lines
/// of the same time, each at most `max` long where a character allows (see
/// [`split_event_data`]), appended to `out`. False, with nothing appended, for a line that is
/// not such an event or needs no cut.
pub fn split_event_line(line: &str, max: usize, out: &mut Vec<u8>) -> bool {
    if line.len() <= max {
        return false;
    }
    let Ok(ev) = parse_event_line(line.trim_end_matches('\n'), 1) else {
        return false;
    };
    if !matches!(ev.code, EventCode::Output | EventCode::Input) {
        return false;
    }
    let mut empty = Vec::new();
    encode_event(&mut empty, ev.time, ev.code, "");
    for piece in split_event_data(&ev.data, empty.len(), max) {
        encode_event(out, ev.time, ev.code, piece);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(time: f64, code: EventCode, data: &str) -> String {
        let mut line = Vec::new();
        encode_event(&mut line, time, code, data);
        String::from_utf8(line).unwrap()
    }

    #[test]
    fn a_chunk_already_as_stored_is_kept_not_copied() {
        let clean = String::from("[0, \"o\", \"a\\r\\n\"]\n[1, \"o\", \"b\"]\n");
        let at = clean.as_ptr();
        let (out, summary) = normalise_events_owned(clean.clone()).unwrap();
        assert_eq!((out.as_str(), summary.events), (clean.as_str(), 2));
        let (out, _) = normalise_events_owned(clean).unwrap();
        assert_eq!(out.as_ptr(), at);
        // Anything else is rewritten, the same as the borrowing version does.
        for text in [
            "[0, \"o\", \"a\"]",
            "[0, \"o\", \"a\"]\r\n",
            "[0,\r\"o\", \"a\"]\n",
            "\n[0, \"o\", \"a\"]\n",
            "[0, \"o\", \"a\"]\n \t\n",
        ] {
            let (out, _) = normalise_events_owned(text.to_string()).unwrap();
            assert_eq!(out, normalise_events(text).unwrap().0, "{text:?}");
            assert!(
                out.ends_with("\"]\n") && !out.contains('\r'),
                "{text:?}: {out:?}"
            );
        }
        // Only JSON's whitespace makes a line blank.
        assert!(validate_events("[0, \"o\", \"a\"]\n\u{a0}\n").is_err());
        assert!(validate_events("[0, \"o\", \"a\"]\n\u{2028}").is_err());
    }

    #[test]
    fn quick_check_takes_only_what_the_full_parse_takes() {
        let lines = [
            r#"[0, "o", "$ "]"#,
            r#"[1.5, "o", "a\"b\\c\u001b[0m\r\n"]"#,
            r#"[1e3, "i", "x"]"#,
            r#"[12, "r", "80x24"]"#,
            r#"[12, "r", "80\u0078 24"]"#,
            r#"[12, "r", "80\u007824"]"#,
            r#"[12, "r", "0x24"]"#,
            r#"[12, "r", "wide"]"#,
            r#"[2, "m", ""]"#,
            r#"[2, "\u006f", "escaped code"]"#,
            r#"[2, "x", "bad code"]"#,
            r#"[-1, "o", "negative"]"#,
            r#"[-0, "o", "minus zero"]"#,
            r#"[2147483648, "o", "late"]"#,
            r#"[1e400, "o", "huge"]"#,
            r#"[99999999999999999999999, "o", "big"]"#,
            r#"["1", "o", "time as text"]"#,
            r#"[1, "o"]"#,
            r#"[1, "o", "x", 4]"#,
            r#"[1, "o", 5]"#,
            r#"[1, "o", null]"#,
            r#"[1, "o", "\ud800"]"#,
            r#"[1, "o", "x"] trailing"#,
            r#"{"0": 1}"#,
            r#"  [ 3 ,"o" , "spaced" ]  "#,
        ];
        for line in lines {
            let full = parse_event_line(line, 1).map(|e| (e.time, e.code));
            match quick_event(line) {
                Some(q) => assert_eq!(Ok(q), full, "{line}"),
                None => assert!(
                    full.is_err() || line.contains(r"\u00"),
                    "{line}: the quick check refused a plain event line"
                ),
            }
        }
    }

    #[test]
    fn long_events_are_split_into_lines_under_the_limit() {
        // Every width class of the escaper: plain, two-byte escapes (short forms, `"`, `\`),
        // six-byte ones, DEL (not escaped), and 2-, 3- and 4-byte characters. The widths the
        // split counts must be the escaper's, or a piece is cut shorter or longer than it can be.
        let data = "ab\u{1b}[31mé\"\\😀 日本\r\n\u{7f}\u{8}\u{c}\t\u{1}".repeat(50);
        let line = encoded(1.5, EventCode::Output, &data);
        for max in [40, 64, 100, 333, line.len() - 1] {
            let mut out = Vec::new();
            assert!(split_event_line(&line, max, &mut out));
            let out = String::from_utf8(out).unwrap();
            let mut joined = String::new();
            for l in out.lines() {
                assert!(l.len() < max, "{max}: {l:?}");
                let ev = parse_event_line(l, 1).unwrap();
                assert_eq!((ev.time, ev.code), (1.5, EventCode::Output));
                assert!(!ev.data.is_empty());
                joined.push_str(&ev.data);
            }
            assert_eq!(joined, data, "{max}");
            // The longest pieces: two lines could not have been one.
            let lines: Vec<&str> = out.lines().collect();
            for w in lines.windows(2) {
                let a = parse_event_line(w[0], 1).unwrap().data;
                let b = parse_event_line(w[1], 1).unwrap().data;
                let next = b.chars().next().unwrap();
                let both = encoded(1.5, EventCode::Output, &format!("{a}{next}"));
                assert!(both.len() > max, "{max}: {a:?} + {next:?} fits");
            }
        }
        // Short lines, other events and a character over the limit alone.
        assert!(!split_event_line(&line, line.len(), &mut Vec::new()));
        let r = encoded(1.0, EventCode::Marker, &"m".repeat(100));
        assert!(!split_event_line(&r, 30, &mut Vec::new()));
        let mut out = Vec::new();
        assert!(split_event_line(
            "[0.000000, \"i\", \"\\u0001\\u0002\"]\n",
            20,
            &mut out
        ));
        assert_eq!(
            out,
            b"[0.000000, \"i\", \"\\u0001\"]\n[0.000000, \"i\", \"\\u0002\"]\n"
        );
    }

    #[test]
    fn clip_to_fit_cuts_long_strings_until_the_value_fits() {
        let long = "é".repeat(40_000); // 80,000 bytes
        let mut v = serde_json::json!({"command": long, "user": "alice", "uid": 1000,
            "nested": {"title": "t".repeat(30_000)}});
        assert!(json_len(&v) > 64 * 1024);
        assert!(clip_to_fit(&mut v, 64 * 1024));
        assert!(json_len(&v) <= 64 * 1024);
        // The first round (16 KiB a string) is enough here: short values are untouched, and
        // a cut never splits a character.
        let cmd = v["command"].as_str().unwrap();
        assert!(
            cmd.ends_with('…') && cmd.len() <= 16 * 1024 + 3,
            "{}",
            cmd.len()
        );
        assert!(cmd.starts_with("éé"));
        assert_eq!(v["user"], "alice");
        assert_eq!(v["uid"], 1000);
        // Many long values: it goes on cutting until they fit.
        let mut many = serde_json::json!((0..40)
            .map(|i| (i.to_string(), serde_json::Value::from("x".repeat(5000))))
            .collect::<serde_json::Map<_, _>>());
        assert!(clip_to_fit(&mut many, 64 * 1024));
        assert!(json_len(&many) <= 64 * 1024);
        // What already fits is left alone.
        let mut small = serde_json::json!({"a": "b"});
        assert!(!clip_to_fit(&mut small, 64 * 1024));
        assert_eq!(small, serde_json::json!({"a": "b"}));
    }

    #[test]
    fn events_out_of_time_order_are_refused() {
        assert_eq!(
            validate_events("[5, \"o\", \"a\"]\n[2, \"o\", \"b\"]\n"),
            Err(ParseError::TimeBackwards { line: 2 })
        );
        assert_eq!(
            validate_events("[1, \"o\", \"a\"]\n[1, \"o\", \"b\"]\n").map(|s| s.events),
            Ok(2)
        );
    }

    #[test]
    fn resize_data_is_cols_x_rows() {
        assert_eq!(
            "132x43".parse(),
            Ok(TtySize {
                cols: 132,
                rows: 43
            })
        );
        for bad in [
            "abc", "80x", "x24", "80x0", "0x24", "80x24x1", "-80x24", "+80x24", "99999x1",
        ] {
            assert!(bad.parse::<TtySize>().is_err(), "{bad}");
            assert!(
                matches!(
                    parse_event_line(&format!("[1, \"r\", \"{bad}\"]"), 3),
                    Err(ParseError::BadResize { line: 3, .. })
                ),
                "{bad}"
            );
        }
        assert!(parse_event_line("[1, \"r\", \"80x24\"]", 1).is_ok());
    }

    #[test]
    fn encode_roundtrips_through_parser() {
        let data = "a\"b\\c\n\r\t\u{0}\u{1b}[31m\u{7f}é🙂漢";
        let s = encoded(1.5, EventCode::Output, data);
        assert!(s.ends_with('\n'));
        let ev = parse_event_line(s.trim_end(), 1).unwrap();
        assert_eq!(ev.data, data);
        assert_eq!(ev.code, EventCode::Output);
        assert!((ev.time - 1.5).abs() < 1e-9);
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v[2].as_str().unwrap(), data);
    }

    /// Byte for byte what serde_json writes, at every offset from a SIMD block's start (the
    /// kernel steps 16 or 32 bytes at a time, then finishes the tail on its own), and into an
    /// `out` that already holds something.
    #[test]
    fn escaping_matches_serde_json_for_every_byte_position() {
        let mut samples: Vec<String> = (0u8..=0x7f).map(|b| (b as char).to_string()).collect();
        samples.push("plain ascii text long enough for words".into());
        samples.push("\u{1b}[31mred\u{1b}[0m \"q\" \\ é🙂漢\r\n\u{7f}\u{0}".into());
        samples.push("\u{1b}[1m".repeat(20));
        for base in samples {
            for pad in 0..40 {
                let s = format!("{}{}{}", "é".repeat(pad % 3), "x".repeat(pad), base);
                let mut out = b"[1, ".to_vec();
                push_json_string(&mut out, &s);
                let want = serde_json::to_string(&s).unwrap();
                assert_eq!(out[4..], *want.as_bytes(), "{s:?}");
            }
        }
    }

    #[test]
    fn transcript_with_and_without_header() {
        let t = parse_transcript("{\"version\": 2, \"width\": 80, \"height\": 24}\n[0, \"o\", \"$ \"]\n[1.2, \"o\", \"x\"]").unwrap();
        assert!(t.header.is_some());
        assert_eq!(t.summary.events, 2);
        assert_eq!(duration_secs(t.summary.last_time), 2);
        let t = parse_transcript("[0, \"o\", \"$ uname\\n\"]\n[0.5, \"o\", \"Linux\\n\"]").unwrap();
        assert!(t.header.is_none());
        assert_eq!(t.events_text.lines().count(), 2);
        assert!(parse_transcript("hello").is_err());
        assert!(parse_transcript("[0, \"x\", \"a\"]").is_err());
        assert!(parse_transcript("[-1, \"o\", \"a\"]").is_err());
        assert_eq!(parse_transcript("").unwrap().summary.last_time, None);
        // Errors name the line of the whole text (they counted from the line after the
        // header, and after leading blank lines).
        let h = "{\"version\": 2, \"width\": 80, \"height\": 24}";
        let e = parse_transcript(&format!("{h}\n{h}\n[1, \"o\", \"a\"]")).unwrap_err();
        assert!(e.to_string().starts_with("line 2:"), "{e}");
        let e = parse_transcript(&format!("\n\n{h}\n[0, \"o\", \"a\"]\n[0, \"x\", \"a\"]"))
            .unwrap_err();
        assert_eq!(
            e,
            ParseError::BadCode {
                line: 5,
                code: "x".into()
            }
        );
        let e = parse_transcript("\n{\"version\": 1}").unwrap_err();
        assert!(e.to_string().starts_with("line 2:"), "{e}");
    }

    #[test]
    fn header_line() {
        let h = Header::new(
            TtySize {
                cols: 100,
                rows: 30,
            },
            Some(1),
        );
        let line = h.to_line();
        let back: Header = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(back, h);
        assert_eq!(
            TtySize {
                cols: 100,
                rows: 30
            }
            .to_string(),
            "100x30"
        );
    }
}
