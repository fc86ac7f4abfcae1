//! UTF-8 repair for the recording: a character split across two reads is held back and
//! recorded whole; bytes that are not UTF-8 become U+FFFD (one per maximal invalid subpart,
//! as `String::from_utf8_lossy` does). The user's terminal never sees this: it gets the bytes.

/// Streaming UTF-8 repair. Allocation-free once its scratch buffers have grown to the
/// largest read.
#[derive(Debug, Default)]
pub struct Utf8Repair {
    /// An incomplete character at the end of the previous read (at most 3 bytes).
    tail: [u8; 4],
    tail_len: usize,
    joined: Vec<u8>,
    text: String,
}

impl Utf8Repair {
    pub fn new() -> Self {
        Self::default()
    }

    /// Repairs the next read. The result borrows `input` when it is clean UTF-8 (the common
    /// case), else an internal buffer.
    pub fn push<'a>(&'a mut self, input: &'a [u8]) -> &'a str {
        if self.tail_len == 0 {
            // Validate once, up to a character the read cut in two.
            let cut = incomplete_tail_start(input);
            if let Ok(s) = validate(&input[..cut]) {
                let held = &input[cut..];
                self.tail[..held.len()].copy_from_slice(held);
                self.tail_len = held.len();
                return s;
            }
            self.text.clear();
            return lossy_into(input, &mut self.text, &mut self.tail, &mut self.tail_len);
        }
        if let Some(need) = self.completes_tail(input) {
            // The common case: the held-back character is completed by the first bytes of
            // this read; the rest takes the fast path.
            let mut ch = [0u8; 4];
            let width = self.tail_len + need;
            ch[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            ch[self.tail_len..width].copy_from_slice(&input[..need]);
            if let Ok(c) = std::str::from_utf8(&ch[..width]) {
                self.text.clear();
                self.text.push_str(c);
                self.tail_len = 0;
                let rest = &input[need..];
                let cut = incomplete_tail_start(rest);
                return match validate(&rest[..cut]) {
                    Ok(r) => {
                        self.text.push_str(r);
                        let held = &rest[cut..];
                        self.tail[..held.len()].copy_from_slice(held);
                        self.tail_len = held.len();
                        self.text.as_str()
                    }
                    Err(_) => lossy_into(rest, &mut self.text, &mut self.tail, &mut self.tail_len),
                };
            }
        }
        self.joined.clear();
        self.joined.extend_from_slice(&self.tail[..self.tail_len]);
        self.joined.extend_from_slice(input);
        self.tail_len = 0;
        self.text.clear();
        lossy_into(
            &self.joined,
            &mut self.text,
            &mut self.tail,
            &mut self.tail_len,
        )
    }

    /// How many bytes of `input` complete the held-back character, if they are all there.
    fn completes_tail(&self, input: &[u8]) -> Option<usize> {
        let width = match self.tail[0] {
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => return None,
        };
        let need = width - self.tail_len.min(width);
        let cont = input.get(..need)?;
        (need > 0 && cont.iter().all(|b| b & 0xc0 == 0x80)).then_some(need)
    }

    /// At the end of the stream: what is left over becomes U+FFFD, one per maximal invalid
    /// subpart (`\xe0\x80` is two, as `from_utf8_lossy` has it; `\xe2\x82` one).
    pub fn finish(&mut self) -> &str {
        let held = std::mem::take(&mut self.tail_len);
        self.text.clear();
        self.text
            .push_str(&String::from_utf8_lossy(&self.tail[..held]));
        &self.text
    }
}

/// The fast path: every read is checked once, so this is most of the recorder's work besides
/// escaping. simdutf8 checks 32 or 64 bytes a step (the CPU's best, picked at run time) where
/// `std::str::from_utf8` goes character by character through non-ASCII text; on an error the
/// caller redoes the slice with std's detailed error to find where.
fn validate(b: &[u8]) -> Result<&str, simdutf8::basic::Utf8Error> {
    simdutf8::basic::from_utf8(b)
}

/// Where a multi-byte character that the end of `b` cuts short begins (`b.len()` if none).
/// Only looks at the last four bytes; whether they are valid is checked later.
fn incomplete_tail_start(b: &[u8]) -> usize {
    let n = b.len();
    let mut i = n;
    while i > 0 && n - i < 3 && b[i - 1] & 0xc0 == 0x80 {
        i -= 1;
    }
    if i == 0 {
        return n;
    }
    let width = match b[i - 1] {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return n,
    };
    if n - (i - 1) < width {
        i - 1
    } else {
        n
    }
}

fn lossy_into<'a>(
    input: &[u8],
    out: &'a mut String,
    tail: &mut [u8; 4],
    tail_len: &mut usize,
) -> &'a str {
    let mut chunks = input.utf8_chunks().peekable();
    while let Some(chunk) = chunks.next() {
        out.push_str(chunk.valid());
        let bad = chunk.invalid();
        if bad.is_empty() {
            continue;
        }
        // The last invalid piece may be the start of a character the next read completes.
        let incomplete = chunks.peek().is_none()
            && bad.len() < 4
            && matches!(std::str::from_utf8(bad), Err(e) if e.error_len().is_none());
        if incomplete {
            tail[..bad.len()].copy_from_slice(bad);
            *tail_len = bad.len();
        } else {
            out.push('\u{FFFD}');
        }
    }
    out.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(reads: &[&[u8]]) -> String {
        let mut r = Utf8Repair::new();
        let mut s = String::new();
        for b in reads {
            s.push_str(r.push(b));
        }
        s.push_str(r.finish());
        s
    }

    #[test]
    fn split_and_invalid() {
        let e = "é🙂漢".as_bytes();
        for cut in 0..=e.len() {
            assert_eq!(run(&[&e[..cut], &e[cut..]]), "é🙂漢", "cut {cut}");
        }
        // Split one byte at a time.
        let parts: Vec<&[u8]> = e.chunks(1).collect();
        assert_eq!(run(&parts), "é🙂漢");
        assert_eq!(run(&[b"a\xffb"]), "a\u{FFFD}b");
        assert_eq!(run(&[b"a\xe2\x82", b"Ab"]), "a\u{FFFD}Ab");
        assert_eq!(run(&[b"a\xf0\x9f"]), "a\u{FFFD}");
        // Left over at the end: as many U+FFFD as the lossy decoding of the whole has.
        for end in [
            &b"\xe0\x80"[..],
            b"\xed\xa0",
            b"\xf4\x90",
            b"\xf0\x80\x80",
            b"\xf0\x8f\x80",
            b"\xe2\x82",
            b"\xf0\x9f\x99",
        ] {
            let whole = [&b"x"[..], end].concat();
            assert_eq!(run(&[&whole]), String::from_utf8_lossy(&whole), "{end:?}");
            assert_eq!(
                run(&[b"x", end]),
                String::from_utf8_lossy(&whole),
                "{end:?}"
            );
        }
        let noise: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        for cut in [1, 100, 129, 1000, 4999] {
            assert_eq!(
                run(&[&noise[..cut], &noise[cut..]]),
                String::from_utf8_lossy(&noise),
                "cut {cut}"
            );
        }
    }

    /// Any bytes, cut into reads anywhere: the recording gets what `from_utf8_lossy` makes of
    /// the whole stream. The bytes are drawn mostly from the edges of UTF-8 (lead bytes whose
    /// next byte has a narrower range, continuation bytes, bytes never valid), where holding
    /// a tail back or not changes the result.
    #[test]
    fn any_reads_of_any_bytes_repair_as_the_whole_stream_would() {
        const EDGES: [u8; 24] = [
            b'a', b'\n', 0x1b, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf,
            0xe0, 0xe1, 0xed, 0xee, 0xef, 0xf0, 0xf1, 0xf4, 0xf5, 0xff,
        ];
        // xorshift64: the same cases on every run, no dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..20_000 {
            let n = (next() % 40) as usize;
            let bytes: Vec<u8> = (0..n)
                .map(|_| match next() {
                    r if r % 3 == 0 => (r >> 8) as u8,
                    r => EDGES[((r >> 8) % EDGES.len() as u64) as usize],
                })
                .collect();
            let mut cuts: Vec<usize> = (0..next() % 6).map(|_| next() as usize % (n + 1)).collect();
            cuts.sort_unstable();
            let mut reads = Vec::new();
            let mut from = 0;
            for cut in cuts.iter().copied().chain([n]) {
                reads.push(&bytes[from..cut]);
                from = cut;
            }
            assert_eq!(
                run(&reads),
                String::from_utf8_lossy(&bytes),
                "case {case}: {bytes:x?} cut at {cuts:?}"
            );
        }
    }
}
