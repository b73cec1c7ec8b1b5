//! The operator's connection to the apiserver: kube's client stack (base URL, retries of 429/5xx,
//! credentials and their refresh, impersonation headers, timeouts), but speaking HTTP/2 when the apiserver
//! offers it, as client-go does. Over HTTP/1.1 every request in flight needs a connection of its
//! own, each costing a TLS handshake on both sides, and every pooled connection keeps the read
//! buffer its largest answer grew to (a heap profile after a restart at 2,000 identities found
//! 100 MB of them); over HTTP/2 the requests and watches share one connection.

use std::time::Duration;

use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use kube::{
    Client, Config,
    client::{ConfigExt, retry::RetryPolicy},
};
use tower::{BoxError, ServiceBuilder, retry::RetryLayer};

/// How often an idle HTTP/2 connection is checked with a ping, and how long the answer may take:
/// a connection that died silently (a restarted load balancer) is dropped within a minute
/// instead of holding every watch on it.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A client for `config`: HTTP/2 when `http2` and the apiserver offers it, else kube's own
/// (HTTP/1.1). Behind an HTTP proxy kube's own is used either way.
pub fn build(config: Config, http2: bool) -> anyhow::Result<Client> {
    if !http2 || config.proxy_url.is_some() {
        return Ok(Client::try_from(config)?);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // HTTP/2 writes a request's headers and body as separate frames: with Nagle's algorithm the
    // body waited for the headers' ACK (40 ms of delayed ACK on every write).
    http.set_nodelay(true);
    let mut tls =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config.rustls_client_config()?).https_or_http();
    if let Some(name) = &config.tls_server_name {
        tls = tls.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name.clone().try_into()?));
    }
    let mut connector = hyper_timeout::TimeoutConnector::new(tls.enable_all_versions().wrap_connector(http));
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let hyper: HyperClient<_, kube::client::Body> = HyperClient::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .http2_keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(connector);
    // As kube's own client: 429, 503 and 504 are retried with backoff (and Retry-After).
    let retry = config.default_retry.then(|| RetryLayer::new(RetryPolicy::server_retry()));
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(hyper);
    Ok(Client::new(service, config.default_namespace))
}
