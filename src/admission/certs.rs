//! The webhook's TLS material: a CA and a serving certificate signed by it. The apiserver trusts
//! the CA through the caBundle agentid writes into its webhook configurations. The material is
//! kept in a Secret (when one is named) so that restarts and replicas share it, and renewed a
//! month before it expires. Nothing here is written to disk, logs or status.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use jiff::Timestamp;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};

/// How long a certificate is valid.
pub const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Renew when less than this is left.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// PEM-encoded serving certificate, its key, and the CA that signed it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingCert {
    /// The serving certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// The CA certificate for the caBundle (PEM).
    pub ca_pem: String,
    /// The hosts the certificate is valid for.
    pub hosts: Vec<String>,
    /// When the certificate (and its CA) expire.
    pub not_after: Timestamp,
}

impl std::fmt::Debug for ServingCert {
    // The key must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("hosts", &self.hosts)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Whether the certificate should be replaced at `now` (or does not fit `hosts`).
    pub fn needs_renewal(&self, hosts: &[String], now: Timestamp) -> bool {
        let renew_at =
            self.not_after.checked_sub(jiff::SignedDuration::try_from(RENEW_BEFORE).unwrap_or_default()).unwrap_or(now);
        self.hosts != hosts || now >= renew_at
    }

    /// The Secret data that stores it.
    pub fn to_secret_data(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("ca.crt".to_string(), self.ca_pem.clone()),
            ("tls.crt".to_string(), self.cert_pem.clone()),
            ("tls.key".to_string(), self.key_pem.clone()),
            ("hosts".to_string(), self.hosts.join(",")),
            ("not-after".to_string(), self.not_after.to_string()),
        ])
    }

    /// Reads what [`ServingCert::to_secret_data`] stored; None if anything is missing.
    pub fn from_secret_data(data: &BTreeMap<String, k8s_openapi::ByteString>) -> Option<Self> {
        let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok());
        Some(Self {
            ca_pem: text("ca.crt")?,
            cert_pem: text("tls.crt")?,
            key_pem: text("tls.key")?,
            hosts: text("hosts")?.split(',').filter(|h| !h.is_empty()).map(str::to_string).collect(),
            not_after: text("not-after")?.parse().ok()?,
        })
    }
}

fn offset(t: Timestamp) -> Result<time::OffsetDateTime, Error> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second()).map_err(|_| Error(rcgen::Error::CouldNotParseCertificate))
}

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
#[error("making the webhook certificate: {0}")]
pub struct Error(#[from] rcgen::Error);

/// Makes a CA and a serving certificate valid for `hosts` (IP addresses or DNS names) from
/// `now` for [`VALIDITY`].
pub fn generate(hosts: &[String], now: Timestamp) -> Result<ServingCert, Error> {
    let not_before = offset(now.checked_sub(jiff::SignedDuration::from_secs(3600)).unwrap_or(now))?;
    let not_after_ts = now.checked_add(jiff::SignedDuration::try_from(VALIDITY).unwrap_or_default()).unwrap_or(now);
    let not_after = offset(not_after_ts)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    ca_params.distinguished_name.push(DnType::CommonName, "agentid webhook CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.distinguished_name.push(DnType::CommonName, hosts.first().map(String::as_str).unwrap_or("agentid"));
    params.subject_alt_names = hosts
        .iter()
        .map(|h| match h.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => h.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(ServingCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_pem: ca.pem(),
        hosts: hosts.to_vec(),
        not_after: Timestamp::from_second(not_after_ts.as_second()).unwrap_or(not_after_ts),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_pem_for_ips_and_names() {
        let hosts = vec!["127.0.0.1".to_string(), "agentid.agentid-system.svc".to_string()];
        let now: Timestamp = "2026-11-25T12:00:00Z".parse().expect("time");
        let made = generate(&hosts, now).expect("certificates");
        assert!(made.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(made.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(made.key_pem.contains("PRIVATE KEY"));
        assert_ne!(made.cert_pem, made.ca_pem);
        assert_eq!(made.not_after, "2027-11-25T12:00:00Z".parse().expect("time"));
        assert!(!format!("{made:?}").contains("PRIVATE"), "Debug must not show the key");
    }

    #[test]
    fn renewal_a_month_before_expiry_or_when_hosts_change() {
        let hosts = vec!["127.0.0.1".to_string()];
        let now: Timestamp = "2026-11-25T12:00:00Z".parse().expect("time");
        let made = generate(&hosts, now).expect("certificates");
        assert!(!made.needs_renewal(&hosts, now));
        assert!(!made.needs_renewal(&hosts, "2027-10-26T11:00:00Z".parse().expect("time")));
        assert!(made.needs_renewal(&hosts, "2027-10-26T12:00:00Z".parse().expect("time")));
        assert!(made.needs_renewal(&["::1".to_string()], now));
    }

    #[test]
    fn secret_data_round_trips() {
        let made = generate(&["127.0.0.1".to_string()], Timestamp::now()).expect("certificates");
        let data =
            made.to_secret_data().into_iter().map(|(k, v)| (k, k8s_openapi::ByteString(v.into_bytes()))).collect();
        assert_eq!(ServingCert::from_secret_data(&data), Some(made));
    }
}
