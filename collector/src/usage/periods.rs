//! Periods: the time zone rows are cut in, the steps, and the request's
//! row boundaries (fixed lengths aligned in local time; days and months
//! from local midnight, or from an anchor's local wall-clock time and day
//! of the month; or one row for the whole period).

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

use super::{MAX_ROWS, QUARTER, UsageError};
use crate::ledger::{DAY, HOUR, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Minute,
    Quarter,
    Hour,
    Day,
    Month,
    /// One row for the whole period.
    Total,
}

impl Step {
    pub fn parse(s: &str) -> Result<Self, UsageError> {
        Ok(match s {
            "1m" => Step::Minute,
            "15m" => Step::Quarter,
            "1h" => Step::Hour,
            "1d" => Step::Day,
            "month" => Step::Month,
            "total" => Step::Total,
            other => return Err(UsageError::Step(other.to_string())),
        })
    }

    /// The length of a row, for steps of fixed length.
    pub fn fixed_seconds(self) -> Option<i64> {
        match self {
            Step::Minute => Some(60),
            Step::Quarter => Some(QUARTER),
            Step::Hour => Some(HOUR),
            Step::Day | Step::Month | Step::Total => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Step::Minute => "1m",
            Step::Quarter => "15m",
            Step::Hour => "1h",
            Step::Day => "1d",
            Step::Month => "month",
            Step::Total => "total",
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
            // The database's own name (it is looked up ignoring case): a
            // zone has one name in answers and page tokens.
            Some(n) => TimeZone::get(n)
                .map(|tz| Self {
                    name: tz.iana_name().unwrap_or(n).to_string(),
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

    /// `unix` in this zone.
    fn zoned(&self, unix: i64) -> Option<jiff::ZonedDateTime> {
        Timestamp::from_second(unix)
            .ok()
            .map(|t| t.to_zoned_datetime(self.tz.clone()))
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
    /// Where daily or monthly rows are anchored, if not at local midnight
    /// (on the 1st).
    pub anchor: Option<i64>,
    /// Row boundaries: row `i` is `[bounds[i], bounds[i + 1])`.
    pub bounds: Vec<i64>,
}

pub(super) fn parse_time(param: &'static str, value: Option<&str>) -> Result<i64, UsageError> {
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
    /// Checks the parameters of one request for `tenants` tenants (at most
    /// `MAX_ROWS` rows in all).
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        step: Option<&str>,
        tz: Option<&str>,
        tenants: usize,
    ) -> Result<Self, UsageError> {
        let zone = Zone::parse(tz)?;
        let step = Step::parse(step.unwrap_or("1h"))?;
        let (from, to) = (parse_time("from", from)?, parse_time("to", to)?);
        let tenants = tenants.max(1) as i64;
        Self::build(from, to, step, zone, None, MAX_ROWS / tenants).map_err(|e| match e {
            UsageError::TooManyRows { rows, .. } => UsageError::TooManyRows {
                rows: rows.saturating_mul(tenants),
                max: MAX_ROWS,
            },
            e => e,
        })
    }

    /// The rows of `[from, to)` by `step` in `zone`, daily and monthly ones
    /// from `anchor` (Unix seconds) if given: at most `max_rows`.
    pub fn build(
        from: i64,
        to: i64,
        step: Step,
        zone: Zone,
        anchor: Option<i64>,
        max_rows: i64,
    ) -> Result<Self, UsageError> {
        let grid = Grid::build(from, to, step, &zone, anchor, max_rows)?;
        let bounds = grid.bounds(0, grid.rows())?;
        Ok(Self {
            from,
            to,
            step,
            zone,
            anchor,
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
            check_bound(b, minutes_from, hours_from)?;
        }
        Ok(())
    }
}

/// A row boundary `b` must fit the rollups that hold the time at it.
fn check_bound(b: i64, minutes_from: i64, hours_from: i64) -> Result<(), UsageError> {
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
    Ok(())
}

/// The row boundaries of a period, computed on demand: boundary `i` of
/// `rows() + 1`, so that a page of a long walk costs its own rows only
/// (index arithmetic for fixed steps, one calendar step from the anchor
/// for days and months).
#[derive(Debug, Clone)]
pub struct Grid {
    from: i64,
    to: i64,
    rows: i64,
    kind: GridKind,
    step: Step,
    tz: String,
}

#[derive(Debug, Clone)]
enum GridKind {
    Fixed(i64),
    Total,
    Calendar { calendar: Calendar, first: i64 },
}

impl Grid {
    /// Checks the period as `Query::build` does and counts its rows (at
    /// most `max_rows`) without listing them.
    pub fn build(
        from: i64,
        to: i64,
        step: Step,
        zone: &Zone,
        anchor: Option<i64>,
        max_rows: i64,
    ) -> Result<Self, UsageError> {
        let misaligned = |param| UsageError::Misaligned {
            param,
            step: step.label(),
            tz: zone.name.clone(),
        };
        let too_many = |rows: i64| UsageError::TooManyRows {
            rows,
            max: max_rows,
        };
        if anchor.is_some() && !matches!(step, Step::Day | Step::Month) {
            return Err(UsageError::AnchorStep(step.label()));
        }
        let (rows, kind) = match step.fixed_seconds() {
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
                ((to - from) / len, GridKind::Fixed(len))
            }
            // The whole period, on minute boundaries (the ledger's buckets).
            None if step == Step::Total => {
                for (param, t) in [("from", from), ("to", to)] {
                    if t.rem_euclid(60) != 0 {
                        return Err(misaligned(param));
                    }
                }
                if from >= to {
                    return Err(UsageError::Empty);
                }
                // Held to the minutes of the longest walk (its p95 windows
                // are held in memory).
                let minutes = (to - from) / 60;
                if minutes > super::paged::MAX_WALK_ROWS {
                    return Err(UsageError::TooManyRows {
                        rows: minutes,
                        max: super::paged::MAX_WALK_ROWS,
                    });
                }
                (1, GridKind::Total)
            }
            None => {
                let calendar =
                    Calendar::new(zone, step, anchor).ok_or_else(|| misaligned("anchor"))?;
                let first = calendar.index_of(from).ok_or_else(|| misaligned("from"))?;
                let last = calendar.index_of(to).ok_or_else(|| misaligned("to"))?;
                if from >= to {
                    return Err(UsageError::Empty);
                }
                (last - first, GridKind::Calendar { calendar, first })
            }
        };
        if rows > max_rows {
            return Err(too_many(rows));
        }
        Ok(Self {
            from,
            to,
            rows,
            kind,
            step,
            tz: zone.name.clone(),
        })
    }

    /// How many rows the period holds.
    pub fn rows(&self) -> i64 {
        self.rows
    }

    /// Boundary `i`, from 0 (`from`) to `rows()` (`to`).
    fn bound(&self, i: i64) -> Option<i64> {
        if !(0..=self.rows).contains(&i) {
            return None;
        }
        match &self.kind {
            _ if i == 0 => Some(self.from),
            _ if i == self.rows => Some(self.to),
            GridKind::Fixed(len) => Some(self.from + i * len),
            GridKind::Total => None,
            GridKind::Calendar { calendar, first } => calendar.bound(first + i),
        }
    }

    /// Boundaries `lo..=hi`: the rows `lo..hi`.
    pub fn bounds(&self, lo: i64, hi: i64) -> Result<Vec<i64>, UsageError> {
        (lo..=hi)
            .map(|i| {
                self.bound(i).ok_or_else(|| UsageError::Misaligned {
                    param: "to",
                    step: self.step.label(),
                    tz: self.tz.clone(),
                })
            })
            .collect()
    }

    /// `Query::check_detail` for the whole period, visiting only the
    /// boundaries before the minutes kept (at most ten years of hours).
    pub fn check_detail(&self, usage: &Usage) -> Result<(), UsageError> {
        if self.from < usage.days_from {
            return Err(UsageError::Expired {
                before: rfc3339(usage.days_from),
            });
        }
        for i in 0..=self.rows {
            match self.bound(i) {
                Some(b) if b < usage.minutes_from => {
                    check_bound(b, usage.minutes_from, usage.hours_from)?
                }
                _ => break,
            }
        }
        Ok(())
    }

    /// The index of the row starting at `unix`, if one does.
    pub fn row_starting_at(&self, unix: i64) -> Option<i64> {
        let i = match &self.kind {
            GridKind::Fixed(len) => {
                let off = unix.checked_sub(self.from)?;
                (off.rem_euclid(*len) == 0).then_some(off.div_euclid(*len))?
            }
            GridKind::Total => 0,
            GridKind::Calendar { calendar, first } => calendar.index_of(unix)? - first,
        };
        ((0..self.rows).contains(&i) && self.bound(i) == Some(unix)).then_some(i)
    }
}

/// Daily or monthly row boundaries: the anchor's local date and wall-clock
/// time plus whole days or months (a day is 23 or 25 hours across a
/// daylight-saving change; a month anchored on the 29th to 31st starts on
/// the last day of a shorter month, and on the anchor's day again after).
/// A wall-clock time a change skips moves on by the change (02:30 on a
/// day that goes from 02:00 to 03:00 is 03:30); one a change repeats is
/// its first occurrence, except the anchor itself, which is the instant
/// given.
#[derive(Debug, Clone)]
struct Calendar {
    start: jiff::ZonedDateTime,
    months: bool,
    /// The anchor's instant: boundary 0, whatever its wall-clock time.
    anchor: Option<i64>,
}

impl Calendar {
    /// Local midnight of 2000-01-01 where no anchor is given (so days start
    /// at midnight and months on the 1st).
    fn new(zone: &Zone, step: Step, anchor: Option<i64>) -> Option<Self> {
        let start = match anchor {
            Some(a) => zone.zoned(a)?,
            None => Date::new(2000, 1, 1)
                .ok()?
                .to_zoned_datetime(zone.tz.clone())
                .ok()?,
        };
        Some(Self {
            start,
            months: step == Step::Month,
            anchor,
        })
    }

    /// Boundary `i` (negative: before the anchor), Unix seconds.
    fn bound(&self, i: i64) -> Option<i64> {
        if let (0, Some(a)) = (i, self.anchor) {
            return Some(a);
        }
        let span = if self.months {
            jiff::Span::new().try_months(i).ok()?
        } else {
            jiff::Span::new().try_days(i).ok()?
        };
        // From the anchor each time, not from the previous boundary: a month
        // anchored on the 31st comes back to the 31st after February.
        let at = self.start.datetime().checked_add(span).ok()?;
        let z = at.to_zoned_datetime(self.start.time_zone().clone()).ok()?;
        Some(z.timestamp().as_second())
    }

    /// The `i` whose boundary is `unix`, if it is one.
    fn index_of(&self, unix: i64) -> Option<i64> {
        let at = Timestamp::from_second(unix)
            .ok()?
            .to_zoned_datetime(self.start.time_zone().clone());
        let (d, a) = (at.date(), self.start.date());
        let guess = if self.months {
            i64::from(d.year() - a.year()) * 12 + i64::from(d.month() - a.month())
        } else {
            i64::from(a.until(d).ok()?.get_days())
        };
        (guess - 1..=guess + 1).find(|i| self.bound(*i) == Some(unix))
    }
}

/// `unix` (clamped at 1970) as RFC 3339 in UTC, `Z` and whole seconds.
pub fn rfc3339(unix: i64) -> String {
    Zone::utc().format(unix.max(0))
}
