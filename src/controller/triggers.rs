//! Which AccessGrant changes are worth a reconcile. Under a flood of grants most changes are the
//! operator's own status writes; each used to cost a grant reconcile (three live reads) and an
//! identity reconcile (a status write and an exposure analysis).

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use kube::ResourceExt;

use kube::runtime::watcher::Event;

use crate::api::{AccessGrant, AgentIdentity, GrantPhase};

/// Grant status writes this operator made (uid → the resourceVersions written, oldest first).
/// The watch event each one causes shows the grant as the reconcile that wrote it left it, and
/// that reconcile has already scheduled what comes next, so it is not a reason to reconcile
/// again. Any other change (a version this operator did not write) is.
///
/// Every version written is remembered, not only the last: a reconcile can write twice (an
/// interrupted issuance's record, then its revocation), and when the first write's event arrived
/// after the reconcile had finished, a second reconcile ran on that stale copy (when issuance
/// still wrote an intent first, it issued again: a second `issued` audit line, and status
/// re-written from the stale copy, undoing any change made in between).
#[derive(Default)]
pub(crate) struct OwnWrites(Mutex<HashMap<String, Vec<String>>>);

/// Versions remembered per grant (a reconcile writes at most two; a few reconciles' worth).
const OWN_WRITES_KEPT: usize = 8;

impl OwnWrites {
    /// Records that this operator wrote `uid` at `resource_version`.
    pub(crate) fn record(&self, uid: String, resource_version: String) {
        let mut writes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let versions = writes.entry(uid).or_default();
        versions.push(resource_version);
        if versions.len() > OWN_WRITES_KEPT {
            versions.remove(0);
        }
    }

    /// Forgets `uid` (its grant is going away; a record whose event came first would stay).
    pub(crate) fn forget(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }

    /// Whether this operator wrote `uid` at a version the watch has not shown yet: a copy from
    /// the cache may be older than that write. (A version the watch skipped, as a re-list can,
    /// stays here until a later one of ours is seen: a hint to read the grant live, no more.)
    pub(crate) fn unseen(&self, uid: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).contains_key(uid)
    }

    /// Whether `grant`, as the watch shows it, is a version this operator wrote. That version
    /// and every one written before it are used up: their events are past.
    pub(crate) fn is_own(&self, grant: &AccessGrant) -> bool {
        let (Some(uid), Some(rv)) = (grant.uid(), grant.resource_version()) else { return false };
        let mut writes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(versions) = writes.get_mut(&uid) else { return false };
        let Some(at) = versions.iter().position(|v| *v == rv) else { return false };
        versions.drain(..=at);
        if versions.is_empty() {
            writes.remove(&uid);
        }
        true
    }
}

/// Whether a grant holds a credential: Active and not being deleted.
pub(crate) fn holds_credential(grant: &AccessGrant) -> bool {
    grant.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active)
        && grant.metadata.deletion_timestamp.is_none()
}

/// The grants holding a credential (see [`holds_credential`]), as last seen: an identity's
/// status and exposure change only when one of its grants starts or stops holding one.
#[derive(Default)]
pub(crate) struct Holding(Mutex<HashSet<String>>);

impl Holding {
    /// Whether `grant` started or stopped holding since it was last seen.
    pub(crate) fn changed(&self, grant: &AccessGrant) -> bool {
        let holds = holds_credential(grant);
        let uid = grant.uid().unwrap_or_default();
        let mut holding = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if holds { holding.insert(uid) } else { holding.remove(&uid) }
    }
}

/// Which identity watch events are worth re-checking the identity's grants: a grant depends on
/// its identity's spec (ceiling, kill switch, retirement) and on its deletion, never on its
/// status, which changes with every grant (re-checking every grant each time made issuing n
/// grants cost n² reconciles). The first listing only records what is there: every grant is
/// reconciled when the operator starts anyway, and passing it on reconciled each one twice.
/// A later re-listing (the watch fell behind) passes on what changed meanwhile.
#[derive(Default)]
pub(crate) struct IdentityChanges {
    /// uid → generation and whether it is being deleted, as last seen.
    seen: HashMap<String, (Option<i64>, bool)>,
    listed: bool,
}

impl IdentityChanges {
    /// The identity to pass on for `event`, if any.
    pub(crate) fn pass(&mut self, event: Event<AgentIdentity>) -> Option<AgentIdentity> {
        match event {
            Event::Init => None,
            Event::InitDone => {
                self.listed = true;
                None
            }
            Event::Delete(identity) => {
                self.seen.remove(&identity.uid().unwrap_or_default());
                None
            }
            Event::Apply(identity) | Event::InitApply(identity) => {
                let now = (identity.metadata.generation, identity.metadata.deletion_timestamp.is_some());
                let before = self.seen.insert(identity.uid().unwrap_or_default(), now);
                (self.listed && before != Some(now)).then_some(identity)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn grant(rv: &str, phase: Option<GrantPhase>) -> AccessGrant {
        let mut g = crate::policy::testing::grant("g", "bot", "1h", vec![]);
        g.metadata.resource_version = Some(rv.into());
        g.status = Some(crate::api::AccessGrantStatus { phase, ..Default::default() });
        g
    }

    #[test]
    fn only_the_exact_version_written_is_skipped_and_only_once() {
        let own = OwnWrites::default();
        own.record("uid-g".into(), "5".into());
        assert!(!own.is_own(&grant("4", None)), "an earlier version is someone else's change");
        assert!(own.unseen("uid-g"), "written, its event not seen yet");
        assert!(!own.unseen("uid-other"));
        assert!(own.is_own(&grant("5", None)));
        assert!(!own.unseen("uid-g"), "seen");
        assert!(!own.is_own(&grant("5", None)), "seen again (a re-list): reconcile");
        own.record("uid-g".into(), "7".into());
        assert!(!own.is_own(&grant("8", None)), "changed by someone after our write");
        let mut no_uid = grant("7", None);
        no_uid.metadata.uid = None;
        assert!(!own.is_own(&no_uid), "no uid: never skipped");
        own.record("uid-g".into(), "9".into());
        own.forget("uid-g");
        assert!(!own.is_own(&grant("9", None)), "forgotten");
        assert!(own.0.lock().unwrap().is_empty(), "nothing kept once used up or forgotten");
    }

    #[test]
    fn an_earlier_write_whose_event_comes_late_is_still_ours() {
        // A revocation of an interrupted issuance writes its record (10), then the end (11); 10's
        // event may come after both.
        let own = OwnWrites::default();
        own.record("uid-g".into(), "10".into());
        own.record("uid-g".into(), "11".into());
        assert!(own.is_own(&grant("10", Some(GrantPhase::Expired))), "the stale copy is not reconciled");
        assert!(own.is_own(&grant("11", Some(GrantPhase::Expired))));
        assert!(!own.is_own(&grant("12", Some(GrantPhase::Expired))), "someone else's change");
        // Seeing 11 first (the cache already had it) uses up 10 as well.
        own.record("uid-g".into(), "20".into());
        own.record("uid-g".into(), "21".into());
        assert!(own.is_own(&grant("21", None)));
        assert!(!own.is_own(&grant("20", None)), "older than a version already seen");
        assert!(own.0.lock().unwrap().is_empty());
    }

    #[test]
    fn grants_hear_of_an_identity_only_when_its_spec_or_deletion_changes_after_the_first_listing() {
        let identity = |uid: &str, generation: i64, deleting: bool| {
            let mut id = AgentIdentity::new(
                uid,
                serde_json::from_value(serde_json::json!({
                    "owner": "o", "purpose": "p", "allowedNamespaces": ["t"]
                }))
                .unwrap(),
            );
            id.metadata.uid = Some(uid.into());
            id.metadata.generation = Some(generation);
            id.metadata.deletion_timestamp = deleting.then(|| Time(jiff::Timestamp::now()));
            id
        };
        let mut changes = IdentityChanges::default();
        let passed = |c: &mut IdentityChanges, e| c.pass(e).map(|i| i.uid().unwrap_or_default());
        assert_eq!(passed(&mut changes, Event::Init), None);
        assert_eq!(passed(&mut changes, Event::InitApply(identity("a", 1, false))), None, "first listing");
        assert_eq!(passed(&mut changes, Event::InitApply(identity("b", 1, false))), None, "first listing");
        assert_eq!(passed(&mut changes, Event::InitDone), None);
        assert_eq!(passed(&mut changes, Event::Apply(identity("a", 1, false))), None, "a status change");
        assert_eq!(passed(&mut changes, Event::Apply(identity("a", 2, false))).as_deref(), Some("a"), "spec");
        assert_eq!(passed(&mut changes, Event::Apply(identity("a", 2, true))).as_deref(), Some("a"), "deleting");
        assert_eq!(passed(&mut changes, Event::Apply(identity("c", 1, false))).as_deref(), Some("c"), "new");
        // The watch fell behind and lists again: what changed meanwhile is passed on.
        assert_eq!(passed(&mut changes, Event::Init), None);
        assert_eq!(passed(&mut changes, Event::InitApply(identity("b", 1, false))), None, "unchanged");
        assert_eq!(passed(&mut changes, Event::InitApply(identity("c", 3, false))).as_deref(), Some("c"));
        assert_eq!(passed(&mut changes, Event::InitDone), None);
        assert_eq!(passed(&mut changes, Event::Delete(identity("c", 3, false))), None);
        assert!(!changes.seen.contains_key("c"), "nothing kept for a deleted identity");
    }

    #[test]
    fn an_identity_hears_when_a_grant_starts_and_stops_holding() {
        let holding = Holding::default();
        assert!(!holding.changed(&grant("1", None)), "a new grant holds nothing");
        assert!(!holding.changed(&grant("2", Some(GrantPhase::Pending))));
        assert!(holding.changed(&grant("3", Some(GrantPhase::Active))));
        assert!(!holding.changed(&grant("4", Some(GrantPhase::Active))), "still Active");
        let mut deleting = grant("5", Some(GrantPhase::Active));
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        assert!(holding.changed(&deleting));
        assert!(!holding.changed(&grant("6", Some(GrantPhase::Expired))));
        assert!(holding.0.lock().unwrap().is_empty(), "nothing kept for grants that hold nothing");
    }
}
