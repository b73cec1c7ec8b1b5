//! How many credentials one identity may hold at once. Every active grant's credentials live in
//! its identity's one credentials Secret (what the agent's pods mount), and a Secret holds at most
//! 1 MiB: about 300 grants' worth. Past that the apiserver refuses the write and a grant would hang
//! Pending; a cap turns that into a clear, early rejection.
//!
//! The count is the grants that hold (or are being given) a credential as the cache shows them,
//! plus those this operator has begun issuing that the cache does not show yet — concurrent
//! reconciles of one identity's grants must not all see room for themselves.

use std::collections::BTreeSet;

/// The default cap: a third of what fits in one Secret, so a larger CA bundle or longer names
/// still fit.
pub const DEFAULT_MAX_ACTIVE_GRANTS: usize = 100;

/// The largest cap accepted: about what fits in one Secret with a small CA.
pub const MAX_ACTIVE_GRANTS_LIMIT: usize = 250;

/// One identity's grants as the cache shows them (by uid).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holdings {
    /// Grants Active, not being deleted.
    pub holding: BTreeSet<String>,
    /// Grants not over, not being deleted, not Active yet.
    pub waiting: BTreeSet<String>,
}

/// Whether grant `uid` may start issuing under `limit`; on success it is counted in `reserved`
/// until the cache shows its issuance. `reserved` is this operator's own record for the identity:
/// entries the cache no longer shows as waiting (issued, over, or gone) are dropped first. A grant
/// already holding or reserved is always let through (it is resuming). Err: how many the identity
/// holds.
pub fn reserve(uid: &str, seen: &Holdings, reserved: &mut BTreeSet<String>, limit: usize) -> Result<(), usize> {
    reserved.retain(|u| seen.waiting.contains(u));
    if seen.holding.contains(uid) || reserved.contains(uid) {
        return Ok(());
    }
    let count = seen.holding.len() + reserved.len();
    if count >= limit {
        return Err(count);
    }
    reserved.insert(uid.to_string());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(uids: &[&str]) -> BTreeSet<String> {
        uids.iter().map(|u| u.to_string()).collect()
    }

    #[test]
    fn concurrent_issuances_count_before_the_cache_shows_them() {
        // Five grants arrive at once, none issued in the cache yet: only three fit.
        let seen = Holdings { holding: set(&[]), waiting: set(&["a", "b", "c", "d", "e"]) };
        let mut reserved = BTreeSet::new();
        let outcomes: Vec<_> = ["a", "b", "c", "d", "e"].iter().map(|u| reserve(u, &seen, &mut reserved, 3)).collect();
        assert_eq!(outcomes, vec![Ok(()), Ok(()), Ok(()), Err(3), Err(3)]);
        // A resumed reconcile of an admitted grant is let through again.
        assert_eq!(reserve("b", &seen, &mut reserved, 3), Ok(()));
    }

    #[test]
    fn reservations_end_when_the_cache_shows_the_issuance_or_the_grant_is_gone() {
        let mut reserved = set(&["a", "b"]);
        // a is now issued (counted as holding), b was deleted: room for one more under 2.
        let seen = Holdings { holding: set(&["a"]), waiting: set(&["c", "d"]) };
        assert_eq!(reserve("c", &seen, &mut reserved, 2), Ok(()));
        assert_eq!(reserved, set(&["c"]));
        assert_eq!(reserve("d", &seen, &mut reserved, 2), Err(2));
        // A grant already holding resumes whatever the count.
        assert_eq!(reserve("a", &seen, &mut reserved, 1), Ok(()));
    }
}
