//! The installation's scope (invariant I7): the namespaces where identities may live (agent
//! namespaces) and where grants may act (target namespaces), as the installer chose them. The
//! operator's RBAC is confined to those namespaces; these checks make an identity that reaches
//! outside them fail early and clearly instead of failing on a Forbidden halfway through issuing.

/// Where this installation of agentid works. An empty list means every namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installation {
    /// Namespaces whose AgentIdentities agentid serves.
    pub agent_namespaces: Vec<String>,
    /// Namespaces grants may act in.
    pub target_namespaces: Vec<String>,
}

impl Installation {
    /// Every namespace, for both.
    pub const ANYWHERE: Installation = Installation { agent_namespaces: Vec::new(), target_namespaces: Vec::new() };

    /// Whether both lists are unrestricted.
    pub fn is_cluster_wide(&self) -> bool {
        self.agent_namespaces.is_empty() && self.target_namespaces.is_empty()
    }

    /// Why an identity in `home` allowing `allowed` is outside this installation, if it is.
    pub fn check_identity(&self, home: &str, allowed: &[String]) -> Result<(), String> {
        if !self.agent_namespaces.is_empty() && !self.agent_namespaces.iter().any(|n| n == home) {
            return Err(format!(
                "this installation of agentid serves AgentIdentities in namespaces {:?} only, not in {home:?}",
                self.agent_namespaces
            ));
        }
        if self.target_namespaces.is_empty() {
            return Ok(());
        }
        let outside: Vec<&String> = allowed.iter().filter(|n| !self.target_namespaces.contains(n)).collect();
        if outside.is_empty() {
            return Ok(());
        }
        Err(format!(
            "allowedNamespaces {outside:?} are outside this installation's target namespaces {:?}: agentid has no rights there",
            self.target_namespaces
        ))
    }

    /// Every namespace agentid has rights in; None: all of them.
    pub fn namespaces(&self) -> Option<Vec<String>> {
        if self.agent_namespaces.is_empty() || self.target_namespaces.is_empty() {
            return None;
        }
        let mut all: Vec<String> = self.agent_namespaces.iter().chain(&self.target_namespaces).cloned().collect();
        all.sort();
        all.dedup();
        Some(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confined() -> Installation {
        Installation { agent_namespaces: vec!["agents".into()], target_namespaces: vec!["staging".into(), "ci".into()] }
    }

    #[test]
    fn anywhere_allows_everything() {
        assert!(Installation::ANYWHERE.check_identity("x", &["kube-system".into()]).is_ok());
        assert!(Installation::ANYWHERE.is_cluster_wide());
        assert_eq!(Installation::ANYWHERE.namespaces(), None);
    }

    #[test]
    fn identities_live_in_agent_namespaces_and_reach_only_targets() {
        let i = confined();
        assert!(i.check_identity("agents", &["staging".into(), "ci".into()]).is_ok());
        let err = i.check_identity("elsewhere", &["staging".into()]).unwrap_err();
        assert!(err.contains("not in \"elsewhere\""), "{err}");
        let err = i.check_identity("agents", &["staging".into(), "production".into()]).unwrap_err();
        assert!(err.starts_with("allowedNamespaces [\"production\"] are outside"), "{err}");
        assert_eq!(i.namespaces(), Some(vec!["agents".into(), "ci".into(), "staging".into()]));
    }
}
