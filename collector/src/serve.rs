//! The HTTP server's connection layer: accepts connections for the router
//! of [`crate::http`] under limits no client can get around.
//!
//! *Boundary:* an HTTP client may open connections and never finish a
//! request, or request a large body and never read it. Each connection
//! holds a permit of `http_max_connections` (more are refused at accept
//! and closed at once), has `http_header_read_timeout` for each request
//! head (also the idle keep-alive limit) and is cut off when it takes no
//! response bytes for `http_write_timeout`. Refusals and cut-offs are
//! counted; refusals are logged once per burst. The cap is kept to a
//! quarter of the descriptor limit, which is raised to its hard limit at
//! start, so HTTP can never take the descriptors agent streams need.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::state::State;

/// Why a connection was refused at accept; the label on
/// `capwatch_collector_http_connections_refused_total`.
pub const HTTP_REFUSALS: [&str; 2] = [
    // `http_max_connections` were open.
    "limit",
    // Accepting failed (descriptors or kernel memory exhausted).
    "accept_error",
];
pub const REFUSED_LIMIT: usize = 0;
pub const REFUSED_ACCEPT: usize = 1;

/// Why the collector closed a connection; the label on
/// `capwatch_collector_http_connections_closed_total`.
pub const HTTP_CLOSES: [&str; 3] = [
    // Nothing of a request within `http_header_read_timeout` of the
    // connection opening or its previous response.
    "idle",
    // A request head begun and not finished within the timeout.
    "header_timeout",
    // No response bytes taken for `http_write_timeout`.
    "write_timeout",
];
pub const CLOSED_IDLE: usize = 0;
pub const CLOSED_HEADER_TIMEOUT: usize = 1;
pub const CLOSED_WRITE_TIMEOUT: usize = 2;

// The counters (`events::Counters`) hold one slot per label.
const _: () = assert!(HTTP_REFUSALS.len() == crate::events::HTTP_REFUSAL_KINDS);
const _: () = assert!(HTTP_CLOSES.len() == crate::events::HTTP_CLOSE_KINDS);

/// At most one log line per reason in this long, with the count since the
/// previous one: a burst of refusals is logged once.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A pause after a failed accept, so a listener out of descriptors does
/// not spin; connections that close meanwhile free some.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Of the descriptor limit, at most this share goes to HTTP connections.
const HTTP_SHARE_OF_DESCRIPTORS: u64 = 4;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
}

/// Raises the soft descriptor limit to the hard one and returns the limit
/// now in force (`None`: unlimited).
pub fn raise_descriptor_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current.is_some() && now.current != now.maximum {
        let raised = Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!(error = %e, soft = now.current, hard = now.maximum, "could not raise the descriptor limit to its hard limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// The HTTP connection cap under a descriptor limit of `nofile`: the
/// configured one, or a quarter of the limit if that is less.
pub fn connection_cap(configured: usize, nofile: Option<u64>) -> usize {
    match nofile {
        Some(n) => {
            let share = usize::try_from(n / HTTP_SHARE_OF_DESCRIPTORS).unwrap_or(usize::MAX);
            configured.min(share.max(1))
        }
        None => configured,
    }
}

/// Serves `router` on `listener` until `shutdown` flips, then waits for
/// open connections to finish their responses.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    state: Arc<State>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let mut logged = [Quiet::default(), Quiet::default()];
    let stop = capwatch_common::wait_for_shutdown(shutdown.clone());
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => break,
        };
        let counters = &state.counters;
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // The peer gave up before we took it: nothing to count.
            Err(e) if is_peer_gone(&e) => continue,
            Err(e) => {
                counters.http_refused[REFUSED_ACCEPT].fetch_add(1, Ordering::Relaxed);
                if let Some(n) = logged[REFUSED_ACCEPT].note() {
                    warn!(error = %e, refused = n, "HTTP connections refused: accepting failed (out of descriptors?); agent streams keep their own");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            counters.http_refused[REFUSED_LIMIT].fetch_add(1, Ordering::Relaxed);
            if let Some(n) = logged[REFUSED_LIMIT].note() {
                warn!(
                    limit = limits.max_connections,
                    refused = n,
                    "HTTP connections refused: http_max_connections are open"
                );
            }
            // A short answer if the socket takes it at once; then closed.
            let _ = stream.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            );
            continue;
        };
        let flags = Arc::new(Flags::default());
        let io = TokioIo::new(Guarded {
            io: stream,
            write_timeout: limits.write_timeout,
            stalled: None,
            flags: flags.clone(),
        });
        let conn = http.serve_connection(io, TowerToHyperService::new(router.clone()));
        let (state, shutdown) = (state.clone(), shutdown.clone());
        state.counters.http_open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            tokio::pin!(conn);
            let stop = capwatch_common::wait_for_shutdown(shutdown);
            tokio::pin!(stop);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = &mut stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            let c = &state.counters;
            if let Err(e) = result {
                let why = if flags.write_timed_out.load(Ordering::Relaxed) {
                    Some(CLOSED_WRITE_TIMEOUT)
                } else if e.is_timeout() && flags.read_since_write.load(Ordering::Relaxed) {
                    Some(CLOSED_HEADER_TIMEOUT)
                } else if e.is_timeout() {
                    Some(CLOSED_IDLE)
                } else {
                    None
                };
                if let Some(why) = why {
                    c.http_closed[why].fetch_add(1, Ordering::Relaxed);
                }
                debug!(error = %e, "HTTP connection closed");
            }
            c.http_open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    // Every permit back: every connection has closed (the write timeout
    // bounds how long a client that does not read can hold one).
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    info!("HTTP server stopped");
    Ok(())
}

/// Accept errors that concern one connection only (the peer reset it
/// before it was taken), not the listener.
fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Rate limit for one kind of log line.
#[derive(Default)]
struct Quiet {
    last: Option<Instant>,
    unlogged: u64,
}

impl Quiet {
    /// Notes one event; returns how many to report if a line is due.
    fn note(&mut self) -> Option<u64> {
        self.unlogged += 1;
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// What a connection's I/O saw, read after it closed.
#[derive(Default)]
struct Flags {
    /// The write timeout cut the connection.
    write_timed_out: AtomicBool,
    /// Request bytes arrived since the last response bytes went out.
    read_since_write: AtomicBool,
}

/// A TCP stream whose writes fail with `TimedOut` once the peer has taken
/// no bytes for `write_timeout`.
struct Guarded {
    io: TcpStream,
    write_timeout: Duration,
    /// Armed while a write waits for the peer.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    flags: Arc<Flags>,
}

impl Guarded {
    fn progress<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let t = self.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
        if stalled.as_mut().poll(cx).is_ready() {
            self.flags.write_timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no response bytes for http_write_timeout",
            )));
        }
        Poll::Pending
    }

    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.flags.read_since_write.store(false, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.flags.read_since_write.store(true, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(&r);
        this.progress(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        this.progress(cx, r)
    }

    // Vectored writes let hyper send a shared body without copying it.
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.progress(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.progress(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_well_below_the_descriptor_limit() {
        assert_eq!(connection_cap(256, Some(1 << 20)), 256);
        assert_eq!(connection_cap(256, Some(256)), 64);
        assert_eq!(connection_cap(256, Some(2)), 1);
        assert_eq!(connection_cap(256, None), 256);
    }

    #[test]
    fn a_burst_is_logged_once_with_its_count() {
        let mut q = Quiet::default();
        assert_eq!(q.note(), Some(1));
        for _ in 0..99 {
            assert_eq!(q.note(), None);
        }
        q.last = Instant::now().checked_sub(LOG_EVERY);
        assert_eq!(q.note(), Some(100));
    }
}
