//! Readiness, apart from liveness: `/healthz` says the process answers,
//! `/readyz` whether it is doing its job. Not ready while ledger commits
//! fail (nothing is acked, agents spool) or while the last tenant-file
//! reload failed (GPUs stay attributed by the previous file); each reason
//! clears on the next success.

use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Readiness {
    /// The last commit's error, while commits fail.
    ledger: Mutex<Option<String>>,
    /// The last reload's error, while the tenant file is invalid.
    tenants: Mutex<Option<String>>,
}

fn set(slot: &Mutex<Option<String>>, value: Option<String>) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = value;
}

fn get(slot: &Mutex<Option<String>>) -> Option<String> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Readiness {
    pub fn commit_failed(&self, error: &dyn std::fmt::Display) {
        set(&self.ledger, Some(error.to_string()));
    }

    pub fn commit_succeeded(&self) {
        set(&self.ledger, None);
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
}
