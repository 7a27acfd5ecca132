//! A Modbus TCP meter's energy register, read with tokio-modbus. The
//! connection is kept between polls and dropped after any transport error
//! or timeout (the caller's deadline), so the next poll starts clean.

use futures::FutureExt as _;
use tokio_modbus::client::{Context, Reader as _};
use tokio_modbus::prelude::Slave;

use crate::accounting::facility::register_value;

use super::ReadError;
use super::spec::{ModbusSpec, RegisterBank};

pub struct Client {
    spec: ModbusSpec,
    conn: Option<Context>,
}

impl Client {
    pub fn new(spec: ModbusSpec) -> Self {
        Self { spec, conn: None }
    }

    /// Forgets the connection.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// The register's count. Not bounded in time: the caller's deadline is.
    pub async fn read(&mut self) -> Result<u64, ReadError> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let addr = tokio::net::lookup_host(&self.spec.address)
                    .await
                    .map_err(|e| {
                        ReadError::Transport(format!("resolving {}: {e}", self.spec.address))
                    })?
                    .next()
                    .ok_or_else(|| {
                        ReadError::Transport(format!(
                            "{} resolves to no address",
                            self.spec.address
                        ))
                    })?;
                let ctx = tokio_modbus::client::tcp::connect_slave(addr, Slave(self.spec.unit))
                    .await
                    .map_err(|e| ReadError::Transport(format!("connecting to {addr}: {e}")))?;
                self.conn.insert(ctx)
            }
        };
        let words = self.spec.format.words();
        let (bank, register) = (self.spec.bank, self.spec.register);
        // tokio-modbus asserts (in debug builds) that an answer has the
        // words asked for; a meter answering too few must not end the
        // task: caught, it is an invalid answer, and the connection is
        // dropped.
        let answer = std::panic::AssertUnwindSafe(async move {
            match bank {
                RegisterBank::Holding => conn.read_holding_registers(register, words).await,
                RegisterBank::Input => conn.read_input_registers(register, words).await,
            }
        })
        .catch_unwind()
        .await;
        let Ok(answer) = answer else {
            self.conn = None;
            return Err(ReadError::Invalid(format!(
                "an answer the Modbus client refused (not {words} words)"
            )));
        };
        let words_read = match answer {
            Err(e) => {
                self.conn = None;
                return Err(ReadError::Transport(e.to_string()));
            }
            Ok(Err(code)) => return Err(ReadError::Exception(format!("{code:?}"))),
            Ok(Ok(w)) => w,
        };
        if words_read.len() != usize::from(words) {
            return Err(ReadError::Invalid(format!(
                "{} words for a register of {words}",
                words_read.len()
            )));
        }
        Ok(register_value(&words_read, self.spec.word_order))
    }
}
