//! systemd's notify protocol (`sd_notify`), over a Unix datagram socket
//! from the standard library: `READY=1` once the agent samples,
//! `WATCHDOG=1` while the sampler's loop turns, `STOPPING=1` on shutdown.
//! Without `NOTIFY_SOCKET` (not under systemd, or `Type=simple`) it does
//! nothing.
//!
//! The watchdog is fed by a task on the agent's one runtime thread, not by
//! `/healthz`: nothing on that thread waits on the hardware or the
//! collector, so a missed ping means the agent itself is stuck and a
//! restart helps; a collector outage or a hung driver is no reason to
//! restart (and lose the spool).

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::{debug, warn};

pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// Half of `WATCHDOG_USEC`, when systemd asks for pings.
    ping_every: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID`, if set.
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let addr = match address(&path.to_string_lossy()) {
            Ok(addr) => addr,
            Err(e) => {
                warn!(socket = %path.to_string_lossy(), error = %e, "NOTIFY_SOCKET unusable; not notifying systemd");
                return None;
            }
        };
        let socket = match UnixDatagram::unbound() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot open a socket to notify systemd");
                return None;
            }
        };
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let ping_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(|u| Duration::from_micros(u) / 2);
        Some(Self {
            socket,
            addr,
            ping_every,
        })
    }

    fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            debug!(error = %e, state, "notifying systemd failed");
        }
    }

    pub fn ready(&self) {
        self.send("READY=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// How often to ping the watchdog (half its period), if systemd asks.
    pub fn ping_every(&self) -> Option<Duration> {
        self.ping_every
    }

    pub fn ping(&self) {
        self.send("WATCHDOG=1");
    }
}

/// A socket path, or `@name` for Linux's abstract namespace.
fn address(path: &str) -> std::io::Result<SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            return SocketAddr::from_abstract_name(name.as_bytes());
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(std::io::Error::other("abstract sockets are Linux-only"));
        }
    }
    SocketAddr::from_pathname(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let n = Notifier {
            socket: UnixDatagram::unbound().unwrap(),
            addr: address(path.to_str().unwrap()).unwrap(),
            ping_every: Some(Duration::from_secs(3600)),
        };
        n.ready();
        n.ping();
        n.stopping();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(len) = server.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert_eq!(got, ["READY=1", "WATCHDOG=1", "STOPPING=1"]);
    }
}
