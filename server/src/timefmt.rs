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

pub fn parse(s: &str) -> Option<OffsetDateTime> {
    PrimitiveDateTime::parse(s, FORMAT)
        .ok()
        .map(|p| p.assume_utc())
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
}
