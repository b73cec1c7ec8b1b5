//! The webhook's TLS material: a CA and a serving certificate signed by it, made at start-up.
//! The apiserver trusts the CA through the caBundle agentid writes into its webhook
//! configurations. Nothing here is written to disk, logs or status.

use std::net::IpAddr;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};

/// PEM-encoded serving certificate, its key, and the CA that signed it.
pub struct ServingCert {
    /// The serving certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// The CA certificate for the caBundle (PEM).
    pub ca_pem: String,
}

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
#[error("making the webhook certificate: {0}")]
pub struct Error(#[from] rcgen::Error);

/// Makes a CA and a serving certificate valid for `hosts` (IP addresses or DNS names).
pub fn generate(hosts: &[String]) -> Result<ServingCert, Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "agentid webhook CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, hosts.first().map(String::as_str).unwrap_or("agentid"));
    params.subject_alt_names = hosts
        .iter()
        .map(|h| match h.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => h.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(ServingCert { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ca_pem: ca.pem() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_pem_for_ips_and_names() {
        let made = generate(&["127.0.0.1".into(), "agentid.agentid-system.svc".into()]).expect("certificates");
        assert!(made.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(made.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(made.key_pem.contains("PRIVATE KEY"));
        assert_ne!(made.cert_pem, made.ca_pem);
    }
}
