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
}

fn wait_while(flag: &AtomicBool) {
    while flag.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
    }
}

/// Copies `from` to `to` until either end closes, holding what it read
/// while `stall` is set; then closes `to`.
fn pipe(mut from: TcpStream, mut to: TcpStream, stall: Arc<AtomicBool>) {
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
                );
                pipe(server, client, stall.clone());
            }
        });
        Self {
            addr,
            conns,
            stalled,
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

    /// Ends a [`Proxy::stall`]: what was held back is delivered, and
    /// connections made meanwhile go through.
    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }
}
