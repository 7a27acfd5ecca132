//! Periods: the time zone rows are cut in, the steps, and the request's
//! row boundaries (fixed lengths aligned in local time, or local
//! midnights for days and months).

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use super::{MAX_ROWS, QUARTER, UsageError};
use crate::ledger::{DAY, HOUR, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Minute,
    Quarter,
    Hour,
    Day,
    Month,
}

impl Step {
    pub fn parse(s: &str) -> Result<Self, UsageError> {
        Ok(match s {
            "1m" => Step::Minute,
            "15m" => Step::Quarter,
            "1h" => Step::Hour,
            "1d" => Step::Day,
            "month" => Step::Month,
            other => return Err(UsageError::Step(other.to_string())),
        })
    }

    /// The length of a row, for steps of fixed length.
    pub fn fixed_seconds(self) -> Option<i64> {
        match self {
            Step::Minute => Some(60),
            Step::Quarter => Some(QUARTER),
            Step::Hour => Some(HOUR),
            Step::Day | Step::Month => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Step::Minute => "1m",
            Step::Quarter => "15m",
            Step::Hour => "1h",
            Step::Day => "1d",
            Step::Month => "month",
        }
    }
}

/// The time zone rows are cut in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    tz: TimeZone,
}

impl Zone {
    pub fn utc() -> Self {
        Self {
            name: "UTC".into(),
            tz: TimeZone::UTC,
        }
    }

    pub fn parse(name: Option<&str>) -> Result<Self, UsageError> {
        match name {
            None => Ok(Self::utc()),
            Some(n)
                if ["UTC", "Etc/UTC", "Z", "Etc/Zulu", "Zulu"]
                    .iter()
                    .any(|u| u.eq_ignore_ascii_case(n)) =>
            {
                Ok(Self::utc())
            }
            Some(n) => TimeZone::get(n)
                .map(|tz| Self {
                    name: n.to_string(),
                    tz,
                })
                .map_err(|_| UsageError::TimeZone(n.to_string())),
        }
    }

    fn is_utc(&self) -> bool {
        self.name == "UTC"
    }

    /// The UTC offset at `unix`, in seconds.
    fn offset(&self, unix: i64) -> i64 {
        Timestamp::from_second(unix).map_or(0, |t| i64::from(self.tz.to_offset(t).seconds()))
    }

    /// The local date at `unix`.
    fn date(&self, unix: i64) -> Option<Date> {
        Timestamp::from_second(unix)
            .ok()
            .map(|t| t.to_zoned_datetime(self.tz.clone()).date())
    }

    /// When local `date` starts (midnight, or the first instant after a
    /// skipped midnight).
    fn start_of(&self, date: Date) -> Option<i64> {
        date.to_zoned_datetime(self.tz.clone())
            .ok()
            .map(|z| z.timestamp().as_second())
    }

    /// `unix` as RFC 3339: `Z` in UTC, else the zone's offset at that time.
    pub fn format(&self, unix: i64) -> String {
        match Timestamp::from_second(unix) {
            Ok(t) if self.is_utc() => t.to_string(),
            Ok(t) => t.display_with_offset(self.tz.to_offset(t)).to_string(),
            Err(_) => unix.to_string(),
        }
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub from: i64,
    pub to: i64,
    pub step: Step,
    pub zone: Zone,
    /// Row boundaries: row `i` is `[bounds[i], bounds[i + 1])`.
    pub bounds: Vec<i64>,
}

fn parse_time(param: &'static str, value: Option<&str>) -> Result<i64, UsageError> {
    let value = value.ok_or(UsageError::Missing { param })?;
    let bad = || UsageError::Time {
        param,
        value: value.to_string(),
    };
    let t: Timestamp = value.parse().map_err(|_| bad())?;
    if t.subsec_nanosecond() != 0 || t.as_second() < 0 {
        return Err(bad());
    }
    Ok(t.as_second())
}

impl Query {
    /// Checks the parameters of one request for `tenants` tenants.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        step: Option<&str>,
        tz: Option<&str>,
        tenants: usize,
    ) -> Result<Self, UsageError> {
        let zone = Zone::parse(tz)?;
        let step = Step::parse(step.unwrap_or("1h"))?;
        let from = parse_time("from", from)?;
        let to = parse_time("to", to)?;
        let misaligned = |param| UsageError::Misaligned {
            param,
            step: step.label(),
            tz: zone.name.clone(),
        };
        let max_rows = MAX_ROWS / tenants.max(1) as i64;
        let too_many = |rows: i64| UsageError::TooManyRows {
            rows: rows.saturating_mul(tenants.max(1) as i64),
            max: MAX_ROWS,
        };
        let bounds = match step.fixed_seconds() {
            Some(len) => {
                for (param, t) in [("from", from), ("to", to)] {
                    if (t + zone.offset(t)).rem_euclid(len) != 0 {
                        return Err(misaligned(param));
                    }
                }
                if from >= to {
                    return Err(UsageError::Empty);
                }
                if (to - from) % len != 0 {
                    return Err(UsageError::Indivisible {
                        step: step.label(),
                        tz: zone.name.clone(),
                    });
                }
                let rows = (to - from) / len;
                if rows > max_rows {
                    return Err(too_many(rows));
                }
                (0..=rows).map(|i| from + i * len).collect()
            }
            None => {
                // Calendar rows: local midnights (on the 1st for months).
                let first_day = |param, t: i64| {
                    zone.date(t)
                        .filter(|d| zone.start_of(*d) == Some(t))
                        .filter(|d| step == Step::Day || d.day() == 1)
                        .ok_or_else(|| misaligned(param))
                };
                let start = first_day("from", from)?;
                let end = first_day("to", to)?;
                if from >= to {
                    return Err(UsageError::Empty);
                }
                let rows = match step {
                    Step::Month => {
                        i64::from(end.year() - start.year()) * 12
                            + i64::from(end.month() - start.month())
                    }
                    _ => start
                        .until(end)
                        .map_or(i64::MAX, |s| i64::from(s.get_days())),
                };
                if rows > max_rows {
                    return Err(too_many(rows));
                }
                let mut bounds = Vec::with_capacity(rows as usize + 1);
                for i in 0..=rows {
                    let date = match step {
                        Step::Month => start.checked_add((i as i32).months()),
                        _ => start.checked_add((i as i32).days()),
                    };
                    let t = date
                        .ok()
                        .and_then(|d| zone.start_of(d))
                        .ok_or_else(|| misaligned("to"))?;
                    bounds.push(t);
                }
                if bounds.last() != Some(&to) {
                    return Err(misaligned("to"));
                }
                bounds
            }
        };
        Ok(Self {
            from,
            to,
            step,
            zone,
            bounds,
        })
    }

    /// The usage to read: the period widened to whole quarter-hours, for
    /// peak demand.
    pub fn read_range(&self) -> (i64, i64) {
        (
            self.from.div_euclid(QUARTER) * QUARTER,
            (self.to + QUARTER - 1).div_euclid(QUARTER) * QUARTER,
        )
    }

    /// Rows before the minutes kept must fall on the rollups' boundaries:
    /// whole hours before `minutes_from`, whole UTC days before
    /// `hours_from`; nothing may start before `days_from`, where nothing
    /// is kept (a row there would read as zero usage).
    pub fn check_detail(&self, usage: &Usage) -> Result<(), UsageError> {
        let (minutes_from, hours_from) = (usage.minutes_from, usage.hours_from);
        if self.from < usage.days_from {
            return Err(UsageError::Expired {
                before: rfc3339(usage.days_from),
            });
        }
        for &b in &self.bounds {
            if b < hours_from && b.rem_euclid(DAY) != 0 {
                return Err(UsageError::Compacted {
                    before: rfc3339(hours_from),
                    granularity: "daily",
                    unit: "UTC days",
                });
            }
            if b < minutes_from && b.rem_euclid(HOUR) != 0 {
                return Err(UsageError::Compacted {
                    before: rfc3339(minutes_from),
                    granularity: "hourly",
                    unit: "hours",
                });
            }
        }
        Ok(())
    }
}

/// `unix` (clamped at 1970) as RFC 3339 in UTC, `Z` and whole seconds.
pub fn rfc3339(unix: i64) -> String {
    Zone::utc().format(unix.max(0))
}
