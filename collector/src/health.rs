//! Readiness, apart from liveness: `/healthz` says the process answers,
//! `/readyz` whether it is doing its job. Not ready while ledger commits
//! fail (nothing is acked, agents spool) or while the last tenant-file
//! reload failed (GPUs stay attributed by the previous file); each reason
//! clears on the next success.
//!
//! Shedding: once commits have failed for `shed_streams_after`, the
//! collector sheds its streams (ends them UNAVAILABLE, refuses Hellos)
//! until a commit succeeds, so that agents move to a collector that can
//! commit; [`Readiness::shed_signal`] tells the streams.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

#[derive(Debug)]
pub struct Readiness {
    /// The last commit's error, while commits fail.
    ledger: Mutex<Option<String>>,
    /// The last reload's error, while the tenant file is invalid.
    tenants: Mutex<Option<String>>,
    /// Since when commits have failed, while they fail.
    failing_since: Mutex<Option<Instant>>,
    /// How long commits may fail before the streams are shed; `None`:
    /// never shed.
    shed_after: Mutex<Option<Duration>>,
    /// Whether the streams are being shed.
    shed: watch::Sender<bool>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            ledger: Mutex::default(),
            tenants: Mutex::default(),
            failing_since: Mutex::default(),
            shed_after: Mutex::default(),
            shed: watch::channel(false).0,
        }
    }
}

fn set(slot: &Mutex<Option<String>>, value: Option<String>) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = value;
}

fn get(slot: &Mutex<Option<String>>) -> Option<String> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Readiness {
    pub fn commit_failed(&self, error: &dyn std::fmt::Display) {
        set(&self.ledger, Some(error.to_string()));
        let since = *locked(&self.failing_since).get_or_insert_with(Instant::now);
        if let Some(after) = *locked(&self.shed_after)
            && since.elapsed() >= after
            && !*self.shed.borrow()
        {
            self.shed.send_replace(true);
            tracing::error!(
                failing_for_s = since.elapsed().as_secs(),
                "ledger commits have failed for shed_streams_after: ending every agent stream and refusing Hellos until a commit succeeds"
            );
        }
    }

    pub fn commit_succeeded(&self) {
        set(&self.ledger, None);
        *locked(&self.failing_since) = None;
        if *self.shed.borrow() {
            self.shed.send_replace(false);
            tracing::info!("a ledger commit succeeded: streams are accepted again");
        }
    }

    /// Sheds the streams once commits have failed for `after`.
    pub fn set_shed_after(&self, after: Duration) {
        *locked(&self.shed_after) = Some(after);
    }

    /// Whether commits are failing now.
    pub fn commits_failing(&self) -> bool {
        locked(&self.failing_since).is_some()
    }

    /// How long commits have failed, while the streams are shed.
    pub fn shedding(&self) -> Option<Duration> {
        if !*self.shed.borrow() {
            return None;
        }
        locked(&self.failing_since).map(|since| since.elapsed())
    }

    /// Turns `true` when the streams are to be shed, `false` again when a
    /// commit succeeds.
    pub fn shed_signal(&self) -> watch::Receiver<bool> {
        self.shed.subscribe()
    }

    pub fn reload_failed(&self, error: &dyn std::fmt::Display) {
        set(&self.tenants, Some(error.to_string()));
    }

    pub fn reload_succeeded(&self) {
        set(&self.tenants, None);
    }

    /// Why the collector is not ready, one reason a line; `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        let mut why = String::new();
        if let Some(e) = get(&self.ledger) {
            why.push_str(&format!("ledger commits are failing: {e}\n"));
        }
        if let Some(d) = self.shedding() {
            why.push_str(&format!(
                "streams shed: the ledger has been unreachable for {}s\n",
                d.as_secs()
            ));
        }
        if let Some(e) = get(&self.tenants) {
            why.push_str(&format!(
                "tenant file reload failed (previous tenants kept): {e}\n"
            ));
        }
        (!why.is_empty()).then_some(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_clears_on_its_next_success() {
        let r = Readiness::default();
        assert_eq!(r.not_ready(), None);
        r.commit_failed(&"disk I/O error");
        r.reload_failed(&"missing field `contracted_kw`");
        let why = r.not_ready().unwrap();
        assert!(why.contains("ledger commits are failing: disk I/O error"));
        assert!(why.contains("tenant file reload failed"));
        r.commit_succeeded();
        assert!(!r.not_ready().unwrap().contains("ledger"));
        r.reload_succeeded();
        assert_eq!(r.not_ready(), None);
    }

    /// Streams are shed once commits have failed for `shed_after`, not
    /// before, and taken again at the first commit that succeeds.
    #[test]
    fn streams_are_shed_after_commits_failed_that_long_until_one_succeeds() {
        let r = Readiness::default();
        r.set_shed_after(Duration::from_millis(50));
        let signal = r.shed_signal();
        r.commit_failed(&"connection refused");
        assert!(r.commits_failing());
        assert_eq!(r.shedding(), None, "not yet");
        std::thread::sleep(Duration::from_millis(60));
        r.commit_failed(&"connection refused");
        assert!(r.shedding().unwrap() >= Duration::from_millis(50));
        assert!(*signal.borrow());
        assert!(r.not_ready().unwrap().contains("streams shed"));
        r.commit_succeeded();
        assert_eq!(r.shedding(), None);
        assert!(!*signal.borrow());
        assert!(!r.commits_failing());
        assert_eq!(r.not_ready(), None);
    }
}
