//! A Redfish rack PDU's `Metrics` (`PowerWatts`, `EnergykWh`), read with
//! the shared blocking client on a blocking thread. At most one read is in
//! flight: a poll that finds the previous one still running counts a
//! timeout instead of starting another, so a hung PDU holds one thread.

use capwatch_common::redfish::{self, Options, Reading};
use tokio::task::JoinHandle;

use super::ReadError;
use super::spec::RedfishPduSpec;

pub struct Client {
    client: redfish::Client,
    in_flight: Option<JoinHandle<Result<Reading, ReadError>>>,
}

impl Client {
    /// A client for the PDU: its credentials and CA read now, so a
    /// missing file refuses the start.
    pub fn new(spec: &RedfishPduSpec, timeout: std::time::Duration) -> Result<Self, String> {
        let opts = Options {
            url: spec.url.clone(),
            credentials_file: spec.credentials_file.clone(),
            ca_file: spec.ca_file.clone(),
            insecure: spec.insecure,
            timeout,
            max_body_bytes: redfish::DEFAULT_MAX_BODY_BYTES,
        };
        let client = redfish::Client::new(&opts).map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            in_flight: None,
        })
    }

    /// Whether the PDU is reached over plain HTTP.
    pub fn is_plaintext(&self) -> bool {
        self.client.is_plaintext()
    }

    /// The PDU's power and cumulative energy. Cancel-safe: a read the
    /// caller's deadline abandons goes on on its thread (the client's own
    /// timeout ends it); the next call waits for it instead of starting
    /// another (so a hung PDU holds one thread), drops its answer as stale
    /// (its time unknown) and answers `Timeout`; the one after reads anew.
    pub async fn read(&mut self) -> Result<Reading, ReadError> {
        if let Some(h) = &mut self.in_flight {
            // Waited for (within the caller's deadline) and dropped: it
            // answers an earlier poll.
            let _ = h.await;
            self.in_flight = None;
            return Err(ReadError::Timeout);
        }
        let client = self.client.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let body = client.get_json("Metrics").map_err(|e| match e {
                redfish::FetchError::Timeout { .. } => ReadError::Timeout,
                redfish::FetchError::Status { .. } | redfish::FetchError::Unauthorized { .. } => {
                    ReadError::Exception(e.to_string())
                }
                redfish::FetchError::NotJson { .. } | redfish::FetchError::TooLarge { .. } => {
                    ReadError::Invalid(e.to_string())
                }
                _ => ReadError::Transport(e.to_string()),
            })?;
            redfish::parse_pdu_metrics(&body).map_err(|e| ReadError::Invalid(e.to_string()))
        });
        let handle = self.in_flight.insert(handle);
        let result = handle.await;
        self.in_flight = None;
        result.unwrap_or_else(|e| Err(ReadError::Transport(format!("reading thread: {e}"))))
    }
}
