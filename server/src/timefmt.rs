//! Timestamps as the API and the SQLite schema write them: RFC 3339 in UTC with
//! microseconds, fixed width (`2026-03-17T10:00:00.123456Z`), so text order is time order.

use time::format_description::FormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

const FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// Now, truncated to microseconds (what both databases keep).
pub fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1000 * 1000)
        .unwrap_or(t)
}

pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    t.format(FORMAT)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// SQLite's own `datetime()` text (`2026-03-17 10:00:00`, UTC), maybe with a fraction.
const SQLITE_FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second][optional [.[subsecond]]]");

/// What we write, and also what a person or a script puts in the SQLite file by hand (any
/// RFC 3339 time, or SQLite's `datetime('now', '-100 days')`): a row edited so must not make
/// `get` and `list` fail.
pub fn parse(s: &str) -> Option<OffsetDateTime> {
    PrimitiveDateTime::parse(s, FORMAT)
        .map(|p| p.assume_utc())
        .or_else(|_| OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339))
        .or_else(|_| PrimitiveDateTime::parse(s, SQLITE_FORMAT).map(|p| p.assume_utc()))
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn roundtrip() {
        let t = super::now();
        let s = super::format(t);
        assert_eq!(s.len(), 27);
        assert!(s.ends_with('Z'));
        assert_eq!(super::parse(&s), Some(t));
    }

    #[test]
    fn hand_written_times_parse() {
        let want = time::macros::datetime!(2020-01-02 03:04:05 UTC);
        for s in [
            "2020-01-02T03:04:05Z",
            "2020-01-02T03:04:05.000Z",
            "2020-01-02T04:04:05+01:00",
            "2020-01-02 03:04:05",
            "2020-01-02 03:04:05.000",
        ] {
            assert_eq!(super::parse(s), Some(want), "{s}");
        }
        assert_eq!(super::parse("yesterday"), None);
    }
}
