//! `metav1.Condition` bookkeeping: set a condition without touching lastTransitionTime unless
//! its status really changed.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition every kind carries: True once the object is in its intended state.
pub const READY: &str = "Ready";
/// True while agentid is working towards the intended state.
pub const RECONCILING: &str = "Reconciling";
/// True when agentid cannot make progress without a change from a human.
pub const STALLED: &str = "Stalled";

/// A condition to set: type, status, reason, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired<'a> {
    /// The condition type.
    pub type_: &'a str,
    /// True, False or Unknown.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'a str,
    /// A sentence for humans.
    pub message: String,
}

/// Sets `desired` in `conditions`, keeping lastTransitionTime when the status did not change.
pub fn set(conditions: &mut Vec<Condition>, desired: Desired<'_>, generation: Option<i64>, now: Timestamp) {
    let status = if desired.status { "True" } else { "False" }.to_string();
    match conditions.iter_mut().find(|c| c.type_ == desired.type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = Time(now);
            }
            existing.status = status;
            existing.reason = desired.reason.to_string();
            existing.message = desired.message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: desired.type_.to_string(),
            status,
            reason: desired.reason.to_string(),
            message: desired.message,
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

/// Sets the kstatus trio in one go: Ready, and Reconciling/Stalled as their opposites allow.
pub fn set_summary(
    conditions: &mut Vec<Condition>,
    state: Summary,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) {
    let (ready, reconciling, stalled) = match state {
        Summary::Ready => (true, false, false),
        Summary::Reconciling => (false, true, false),
        Summary::Stalled => (false, false, true),
        Summary::Done => (false, false, false),
    };
    for (type_, status) in [(READY, ready), (RECONCILING, reconciling), (STALLED, stalled)] {
        let message = if status || type_ == READY { message.clone() } else { String::new() };
        let reason = if status || type_ == READY { reason } else { "AsExpected" };
        set(conditions, Desired { type_, status, reason, message }, generation, now);
    }
}

/// The overall state of an object, as kstatus-aware tools (Flux, Argo CD) read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    /// In its intended state.
    Ready,
    /// Making progress.
    Reconciling,
    /// Blocked until a human changes something.
    Stalled,
    /// Finished for good (e.g. an expired grant): not ready, but nothing in progress either.
    Done,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("valid timestamp")
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut cs = Vec::new();
        let d = |status, reason: &'static str| Desired { type_: READY, status, reason, message: "m".into() };
        set(&mut cs, d(false, "Issuing"), Some(1), at("2026-01-01T00:00:00Z"));
        set(&mut cs, d(false, "StillIssuing"), Some(2), at("2026-01-01T00:01:00Z"));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_time.0, at("2026-01-01T00:00:00Z"));
        assert_eq!(cs[0].reason, "StillIssuing");
        assert_eq!(cs[0].observed_generation, Some(2));
        set(&mut cs, d(true, "Issued"), Some(2), at("2026-01-01T00:02:00Z"));
        assert_eq!(cs[0].last_transition_time.0, at("2026-01-01T00:02:00Z"));
        assert_eq!(cs[0].status, "True");
    }

    #[test]
    fn summary_sets_ready_reconciling_stalled_together() {
        let mut cs = Vec::new();
        set_summary(&mut cs, Summary::Stalled, "NamespaceNotAllowed", "no".into(), Some(1), at("2026-01-01T00:00:00Z"));
        let get = |cs: &[Condition], t: &str| cs.iter().find(|c| c.type_ == t).map(|c| c.status.clone());
        assert_eq!(get(&cs, READY).as_deref(), Some("False"));
        assert_eq!(get(&cs, RECONCILING).as_deref(), Some("False"));
        assert_eq!(get(&cs, STALLED).as_deref(), Some("True"));
    }
}
