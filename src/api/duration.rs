//! The duration strings used in specs (`15m`, `1h30m`, `90s`): their grammar, the CEL rules that
//! enforce it at the apiserver, and the parser the operator uses.
//!
//! The grammar is a strict subset of Go's `time.ParseDuration` (whole hours, minutes and seconds,
//! in that order), so CEL's `duration()` and [`parse`] always agree on what a string means.

use std::time::Duration;

use kube::core::{Message, Rule};

/// The grammar, as a regular expression understood by both CEL (RE2) and humans.
pub const PATTERN: &str = "^([0-9]{1,6}h)?([0-9]{1,6}m)?([0-9]{1,6}s)?$";

/// The smallest grant duration the schema accepts.
pub const MIN_GRANT: Duration = Duration::from_secs(10);
/// The hard ceiling for any grant and any identity's `maxGrantDuration`.
pub const MAX_GRANT: Duration = Duration::from_secs(24 * 3600);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The string is not of the form `1h30m`, `15m`, `90s`.
    #[error("{0:?} is not a duration such as 90s, 15m or 1h30m (whole h, m, s, in that order)")]
    Format(String),
}

/// Parses `1h30m`, `15m`, `90s` into a [`Duration`]. Refuses anything the CEL rule refuses.
pub fn parse(s: &str) -> Result<Duration, Error> {
    let bad = || Error::Format(s.to_string());
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    // Units must appear at most once each, in this order.
    for (unit, seconds) in [('h', 3600u64), ('m', 60), ('s', 1)] {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || rest.as_bytes().get(digits) != Some(&(unit as u8)) {
            continue;
        }
        if digits > 6 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        total += n * seconds;
        rest = &rest[digits + 1..];
    }
    if rest.is_empty() { Ok(Duration::from_secs(total)) } else { Err(bad()) }
}

/// Formats a duration in the same grammar, e.g. `1h30m`, `45s`, `0s`.
pub fn format(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// CEL rule: the string follows [`PATTERN`].
pub fn format_rule() -> Rule {
    Rule::new(format!("self != '' && self.matches('{PATTERN}')"))
        .message("must be a duration such as 90s, 15m or 1h30m (whole hours, minutes, seconds)")
}

/// CEL rule: a well-formed duration lies within `min..=max` (both in the grammar, e.g. `10s`).
/// Malformed strings pass this rule so that only [`format_rule`]'s message is shown for them.
pub fn range_rule(min: &str, max: &str) -> Rule {
    Rule::new(format!(
        "self == '' || !self.matches('{PATTERN}') || \
         (duration(self) >= duration('{min}') && duration(self) <= duration('{max}'))"
    ))
    .message(Message::Message(format!("must be between {min} and {max}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_grammar() {
        let cases = [
            ("10s", 10),
            ("15m", 900),
            ("1h", 3600),
            ("1h30m", 5400),
            ("1h0m5s", 3605),
            ("24h", 86400),
            ("90m", 5400),
            ("0s", 0),
        ];
        for (s, secs) in cases {
            assert_eq!(parse(s), Ok(Duration::from_secs(secs)), "{s}");
        }
    }

    #[test]
    fn refuses_what_the_schema_refuses() {
        for s in ["", "forever", "-5m", "1.5h", "5", "h", "1m1h", "1s1m", "1h1h", "1d", " 1h", "1h ", "1234567s", "+5m"]
        {
            assert!(parse(s).is_err(), "{s:?} should be refused");
        }
    }

    #[test]
    fn format_round_trips() {
        for secs in [0, 1, 59, 60, 61, 3599, 3600, 3661, 86400] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse(&format(d)), Ok(d));
        }
        assert_eq!(format(Duration::from_secs(5400)), "1h30m");
    }

    #[test]
    fn rules_embed_the_pattern() {
        assert!(format_rule().rule.contains(PATTERN));
        assert!(range_rule("10s", "24h").rule.contains("duration('24h')"));
    }
}
