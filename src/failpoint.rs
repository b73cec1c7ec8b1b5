//! Crash points for the crash-safety tests. With `AGENTID_FAILPOINT=<name>` in its environment
//! the operator aborts — no cleanup, no flushing, like SIGKILL — when it reaches `<name>`.
//! Unset (always, outside those tests) each check is a comparison against `None`.

use std::sync::OnceLock;

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED.get_or_init(|| std::env::var("AGENTID_FAILPOINT").ok()).as_deref()
}

/// Aborts the process if the failpoint `name` is armed.
pub fn hit(name: &str) {
    if armed() == Some(name) {
        eprintln!("agentid: failpoint {name} reached, aborting");
        std::process::abort();
    }
}
