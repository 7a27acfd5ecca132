//! Durations in config files: read in humantime syntax (`250ms`, `1h 30m`,
//! `35days`), written back in days, hours, minutes, seconds and their
//! fractions only, never in humantime's months and years (averages of
//! 30.44 and 365.25 days, so 35 days would print as `1month 4days 13h 26m
//! 24s`). Use with `#[serde(with = "capwatch_common::duration")]`, or
//! `capwatch_common::duration::option` for an `Option<Duration>`.

use std::time::Duration;

use serde::{Deserializer, Serializer};

/// `d` as humantime reads it back exactly: `35d`, `1h 30m`, `250ms`, `0s`.
pub fn format(d: Duration) -> String {
    let mut parts = Vec::new();
    let mut secs = d.as_secs();
    for (size, unit) in [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")] {
        if secs >= size {
            parts.push(format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    let nanos = d.subsec_nanos();
    for (n, unit) in [
        (nanos / 1_000_000, "ms"),
        (nanos / 1_000 % 1_000, "us"),
        (nanos % 1_000, "ns"),
    ] {
        if n > 0 {
            parts.push(format!("{n}{unit}"));
        }
    }
    if parts.is_empty() {
        return "0s".into();
    }
    parts.join(" ")
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    humantime_serde::deserialize(d)
}

pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&super::format(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        humantime_serde::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_read_back_exactly() {
        // (duration, how it is written)
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(5400), "1h 30m"),
            (Duration::from_secs(35 * 86_400), "35d"),
            (Duration::from_secs(400 * 86_400), "400d"),
            (Duration::new(90_061, 1_001_001), "1d 1h 1m 1s 1ms 1us 1ns"),
        ];
        for (d, text) in cases {
            assert_eq!(format(d), text);
            assert_eq!(humantime::parse_duration(text).unwrap(), d, "{text}");
        }
    }
}
