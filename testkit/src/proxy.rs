//! A TCP proxy on loopback that stands in for a network failure: its
//! connections can be cut (both ends see the connection close) or stalled
//! (a partition: nothing passes either way and nothing is reset, so
//! neither end learns anything until its own timeout).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a stalled pipe looks whether the stall is over.
const POLL: Duration = Duration::from_millis(10);

/// A proxy listening on `127.0.0.1:0` in front of one upstream address.
/// Its threads live as long as the test process.
pub struct Proxy {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stalled: Arc<AtomicBool>,
    trigger: Arc<Mutex<Option<Trigger>>>,
}

/// A stall armed by [`Proxy::stall_after_request`].
struct Trigger {
    pattern: Vec<u8>,
    /// The pattern went by: the next chunk from the client goes through,
    /// then the link stalls.
    seen: bool,
}

/// What a client→server pipe does to arm the stall.
#[derive(Clone)]
struct Upstream {
    stalled: Arc<AtomicBool>,
    trigger: Arc<Mutex<Option<Trigger>>>,
}

impl Upstream {
    /// After `chunk` went to the server.
    fn sent(&self, chunk: &[u8]) {
        let mut t = self.trigger.lock().unwrap();
        let Some(armed) = t.as_mut() else { return };
        if armed.seen {
            self.stalled.store(true, Ordering::SeqCst);
            *t = None;
        } else if chunk
            .windows(armed.pattern.len())
            .any(|w| w == armed.pattern.as_slice())
        {
            armed.seen = true;
        }
    }
}

fn wait_while(flag: &AtomicBool) {
    while flag.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
    }
}

/// Copies `from` to `to` until either end closes, holding what it read
/// while `stall` is set; then closes `to`. `upstream`: this is the
/// client→server direction.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    stall: Arc<AtomicBool>,
    upstream: Option<Upstream>,
) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            wait_while(&stall);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            if let Some(u) = &upstream {
                u.sent(&buf[..n]);
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stalled = Arc::new(AtomicBool::new(false));
        let trigger: Arc<Mutex<Option<Trigger>>> = Arc::default();
        let to_server = Upstream {
            stalled: stalled.clone(),
            trigger: trigger.clone(),
        };
        let (held, stall) = (conns.clone(), stalled.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                // A connection made during a stall gets no further than a
                // dropped SYN would: the kernel completed its handshake
                // for the listener, and nothing passes until the stall
                // ends.
                wait_while(&stall);
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let mut h = held.lock().unwrap();
                h.push(client.try_clone().unwrap());
                h.push(server.try_clone().unwrap());
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    stall.clone(),
                    Some(to_server.clone()),
                );
                pipe(server, client, stall.clone(), None);
            }
        });
        Self {
            addr,
            conns,
            stalled,
            trigger,
        }
    }

    /// Cuts every open connection, both ways; returns how many there were.
    pub fn cut(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        for c in conns.iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
        let n = conns.len() / 2;
        conns.clear();
        n
    }

    /// Stops passing anything, both ways, on every connection, open or
    /// new, without closing any: what a partition looks like to both ends.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Stalls the link (as [`Proxy::stall`]) once a client has sent bytes
    /// holding `pattern` and then its next request: for a PostgreSQL
    /// client, the statement of that text was prepared, then bound and
    /// run by the server, whose answer is held. A partition in the
    /// middle of a transaction, at a statement of the test's choosing.
    pub fn stall_after_request(&self, pattern: &[u8]) {
        *self.trigger.lock().unwrap() = Some(Trigger {
            pattern: pattern.to_vec(),
            seen: false,
        });
    }

    /// Whether the link is stalled now.
    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Ends a [`Proxy::stall`]: what was held back is delivered, and
    /// connections made meanwhile go through.
    pub fn resume(&self) {
        *self.trigger.lock().unwrap() = None;
        self.stalled.store(false, Ordering::SeqCst);
    }
}
