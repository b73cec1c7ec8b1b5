//! Leader election over a `coordination.k8s.io/v1` Lease, for two or more replicas: every replica
//! serves the webhook; only the holder of the Lease reconciles and writes.
//!
//! Timing (as client-go's defaults): a Lease lasts 15 s, the holder renews every 2 s, and a holder
//! that could not renew for 10 s stops (the process exits) — 5 s before anyone else may take the
//! Lease, so two leaders never write at once unless a clock or a pause exceeds that margin. On
//! shutdown the holder releases the Lease so a successor takes over at once.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tracing::{info, warn};

use crate::policy::lease::{self, Observed, Step};

/// How long a Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and candidates retry).
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// A holder that could not renew for this long gives up.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// One candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    me: String,
}

fn observed(lease: &Lease) -> Observed {
    let spec = lease.spec.clone().unwrap_or_default();
    Observed {
        holder: spec.holder_identity,
        renewed: spec.renew_time.map(|t| t.0),
        duration_seconds: spec.lease_duration_seconds,
    }
}

impl Elector {
    /// A candidate `me` for Lease `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str, me: &str) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.into(), me: me.into() }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.me
    }

    /// One attempt to take or renew the Lease; Ok(true) when this candidate holds it afterwards.
    async fn try_once(&self) -> kube::Result<bool> {
        let now = Timestamp::now();
        let Some(mut current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec(now, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        match lease::decide(&observed(&current), &self.me, now) {
            Step::WaitUntil(_) => Ok(false),
            step => {
                let previous = current.spec.clone();
                let mut spec = self.spec(now, previous.as_ref());
                if step == Step::Renew {
                    spec.acquire_time = previous.and_then(|p| p.acquire_time).or(spec.acquire_time);
                }
                current.spec = Some(spec);
                // The resourceVersion read above guards the write: of two candidates, one wins.
                match self.api.replace(&self.name, &PostParams::default(), &current).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    fn spec(&self, now: Timestamp, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let taken_over = previous.and_then(|p| p.holder_identity.as_deref()) != Some(self.me.as_str());
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if taken_over && previous.is_some() { transitions + 1 } else { transitions }),
            ..Default::default()
        }
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&self) {
        let mut waiting_logged = false;
        loop {
            match self.try_once().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.me, "became the leader");
                    return;
                }
                Ok(false) if !waiting_logged => {
                    info!(lease = %self.name, identity = %self.me, "another replica leads; waiting");
                    waiting_logged = true;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "could not read or take the leader Lease; will retry"),
            }
            tokio::time::sleep(RETRY_PERIOD).await;
        }
    }

    /// Renews the Lease until renewal has failed for [`RENEW_DEADLINE`]; then returns: leadership
    /// is lost and the caller must stop writing.
    pub async fn hold(&self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(RETRY_PERIOD).await;
            // The renewal counts from before it was sent (renewTime is taken then), and a request
            // that hangs must not outlast the deadline.
            let started = Instant::now();
            let left = RENEW_DEADLINE.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, self.try_once()).await {
                Ok(Ok(true)) => renewed = started,
                Ok(Ok(false)) => {
                    warn!(lease = %self.name, "another replica took the leader Lease");
                    return;
                }
                Ok(Err(e)) => warn!(error = %e, "could not renew the leader Lease; will retry"),
                Err(_) => warn!("renewing the leader Lease timed out"),
            }
            if renewed.elapsed() >= RENEW_DEADLINE {
                return;
            }
        }
    }

    /// Gives the Lease up (on shutdown), so a successor need not wait for it to expire.
    pub async fn release(&self) {
        let Ok(Some(mut current)) = self.api.get_opt(&self.name).await else { return };
        if current.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(self.me.as_str()) {
            return;
        }
        let now = Timestamp::now();
        if let Some(spec) = current.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(now));
        }
        match self.api.replace(&current.name_any(), &PostParams::default(), &current).await {
            Ok(_) => info!(lease = %self.name, "released the leader Lease"),
            Err(e) => warn!(error = %e, "could not release the leader Lease; it expires on its own"),
        }
    }
}
