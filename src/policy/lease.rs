//! Leader election over a `coordination.k8s.io` Lease: who may hold it now. Pure; the I/O is in
//! `crate::leader`.

use jiff::{SignedDuration, Timestamp};

/// What a candidate should do with the Lease as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It is free or expired: take it (a write guarded by its resourceVersion).
    Take,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds it until this instant.
    WaitUntil(Timestamp),
}

/// The Lease as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// `spec.holderIdentity` (empty: released).
    pub holder: Option<String>,
    /// `spec.renewTime`.
    pub renewed: Option<Timestamp>,
    /// `spec.leaseDurationSeconds`.
    pub duration_seconds: Option<i32>,
}

/// Decides for candidate `me` at `now`.
pub fn decide(lease: &Observed, me: &str, now: Timestamp) -> Step {
    let holder = lease.holder.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Step::Take;
    }
    if holder == me {
        return Step::Renew;
    }
    // A holder that never renewed, or wrote no duration, holds nothing.
    let (Some(renewed), Some(seconds)) = (lease.renewed, lease.duration_seconds) else {
        return Step::Take;
    };
    let until = renewed.saturating_add(SignedDuration::from_secs(i64::from(seconds.max(0)))).unwrap_or(renewed);
    if until <= now { Step::Take } else { Step::WaitUntil(until) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("in range")
    }

    fn held(by: &str, renewed: i64) -> Observed {
        Observed { holder: Some(by.into()), renewed: Some(at(renewed)), duration_seconds: Some(15) }
    }

    #[test]
    fn a_free_or_released_lease_is_taken() {
        assert_eq!(decide(&Observed::default(), "a", at(0)), Step::Take);
        assert_eq!(decide(&Observed { holder: Some(String::new()), ..held("x", 0) }, "a", at(0)), Step::Take);
    }

    #[test]
    fn our_own_lease_is_renewed_even_when_expired() {
        assert_eq!(decide(&held("a", 0), "a", at(100)), Step::Renew);
    }

    #[test]
    fn another_holder_is_respected_until_its_lease_runs_out() {
        assert_eq!(decide(&held("b", 0), "a", at(14)), Step::WaitUntil(at(15)));
        assert_eq!(decide(&held("b", 0), "a", at(15)), Step::Take);
        assert_eq!(decide(&Observed { renewed: None, ..held("b", 0) }, "a", at(1)), Step::Take);
    }
}
