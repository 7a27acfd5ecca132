//! The gRPC server's TLS settings from the config's PEM files.

use crate::config::Config;

use super::CollectorError;

/// The gRPC server's TLS settings, if TLS is on.
pub(super) fn server_tls(
    cfg: &Config,
) -> Result<Option<tonic::transport::ServerTlsConfig>, CollectorError> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path)
            .map_err(|e| CollectorError::Tls(format!("reading {}: {e}", path.display())))
    };
    capwatch_common::warn_if_exposed(key, "tls_key");
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
    );
    if let Some(ca) = &cfg.tls_client_ca {
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}
