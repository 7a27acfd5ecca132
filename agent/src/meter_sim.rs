//! A simulated Modbus TCP revenue meter: a real Modbus TCP server
//! (tokio-modbus) on a thread and runtime of its own, whose cumulative
//! energy register its owner sets and advances (wrapping at a rollover it
//! chooses), and which can hang (accept requests and never answer),
//! answer every read with an exception or too few words, or answer a
//! wrong value for some reads (a gateway answering 0 while its meter is
//! down). The demo's site meter (`capwatch-sim-meter`) and the tests'
//! stand-in meters; stopped when
//! dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_modbus::server::tcp::Server;

/// How the meter answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The register's value.
    Normal,
    /// Nothing, ever (the connection stays open).
    Hang,
    /// A `ServerDeviceFailure` exception.
    Exception,
    /// The register's words less the last one (a short answer).
    Short,
}

/// Where the register is and how it is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The first word's address.
    pub register: u16,
    /// Input registers (function 4) instead of holding ones (3).
    pub input: bool,
    /// 2 (u32) or 4 (u64) words.
    pub words: u16,
    /// Least significant word first.
    pub little: bool,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            register: 0,
            input: false,
            words: 2,
            little: false,
        }
    }
}

#[derive(Debug)]
struct Register {
    count: u64,
    /// Counts at which the register wraps to 0.
    rollover: u128,
    mode: Mode,
    /// (value answered instead of the count, reads left).
    wrong: Option<(u64, u64)>,
}

#[derive(Debug)]
struct Shared {
    layout: Layout,
    register: Mutex<Register>,
    requests: AtomicU64,
}

/// A running stand-in meter.
pub struct ModbusMeter {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ModbusMeter {
    /// Starts a meter on a free loopback port, its register at 0.
    pub fn start(layout: Layout) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("an address"), layout)
    }

    /// Starts a meter listening on `addr`, its register at 0.
    pub fn start_on(addr: SocketAddr, layout: Layout) -> std::io::Result<Self> {
        if layout.words != 2 && layout.words != 4 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a meter register is 2 words (u32) or 4 (u64)",
            ));
        }
        let shared = Arc::new(Shared {
            layout,
            register: Mutex::new(Register {
                count: 0,
                rollover: 1u128 << (16 * u32::from(layout.words)),
                mode: Mode::Normal,
                wrong: None,
            }),
            requests: AtomicU64::new(0),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Bound here (so the address is known at once) and handed to the
        // meter's runtime; works from inside another runtime too.
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name("modbus-meter".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let server = Server::new(listener);
                    let on_connected = |stream, _addr| {
                        let service = Service(serving.clone());
                        async move { Ok(Some((service, stream))) }
                    };
                    let _ = server
                        .serve_until(&on_connected, |_err| {}, async {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })?;
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where the meter listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the register's count (taken modulo the rollover).
    pub fn set_count(&self, count: u64) {
        let mut r = self
            .shared
            .register
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        r.count = (u128::from(count) % r.rollover) as u64;
    }

    /// Runs the register on by `counts`, wrapping at the rollover.
    pub fn advance(&self, counts: u64) {
        let mut r = self
            .shared
            .register
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        r.count = ((u128::from(r.count) + u128::from(counts)) % r.rollover) as u64;
    }

    /// The register's count now.
    pub fn count(&self) -> u64 {
        self.shared
            .register
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count
    }

    /// Sets the count at which the register wraps to 0.
    pub fn set_rollover(&self, rollover: u128) {
        let mut r = self
            .shared
            .register
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        r.rollover = rollover;
        r.count = (u128::from(r.count) % rollover) as u64;
    }

    /// Answers `value` instead of the count for the next `reads` reads
    /// (the count itself runs on as set).
    pub fn answer_wrong_for(&self, value: u64, reads: u64) {
        self.shared
            .register
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wrong = (reads > 0).then_some((value, reads));
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared
            .register
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mode = mode;
    }

    /// Read requests received, answered or not.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

impl Drop for ModbusMeter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Service(Arc<Shared>);

type Answer = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

impl tokio_modbus::server::Service for Service {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Answer;

    fn call(&self, req: Self::Request) -> Self::Future {
        let s = &self.0;
        s.requests.fetch_add(1, Ordering::SeqCst);
        let (count, mode) = {
            let mut r = s.register.lock().unwrap_or_else(|e| e.into_inner());
            let normal = r.mode == Mode::Normal;
            let count = match &mut r.wrong {
                Some((value, left)) if normal => {
                    let value = *value;
                    *left -= 1;
                    if *left == 0 {
                        r.wrong = None;
                    }
                    value
                }
                _ => r.count,
            };
            (count, r.mode)
        };
        let layout = s.layout;
        let answer = match mode {
            Mode::Hang => return Box::pin(std::future::pending()),
            Mode::Exception => Err(ExceptionCode::ServerDeviceFailure),
            Mode::Normal | Mode::Short => match req.request {
                Request::ReadHoldingRegisters(addr, qty) if !layout.input => {
                    words(layout, count, addr, qty)
                        .map(|w| short(w, mode))
                        .map(Response::ReadHoldingRegisters)
                }
                Request::ReadInputRegisters(addr, qty) if layout.input => {
                    words(layout, count, addr, qty)
                        .map(|w| short(w, mode))
                        .map(Response::ReadInputRegisters)
                }
                _ => Err(ExceptionCode::IllegalFunction),
            },
        };
        Box::pin(std::future::ready(answer))
    }
}

/// `w` less its last word in `Mode::Short`.
fn short(mut w: Vec<u16>, mode: Mode) -> Vec<u16> {
    if mode == Mode::Short {
        w.pop();
    }
    w
}

/// Registers `addr..addr+qty` of a bank holding only the energy register.
fn words(layout: Layout, count: u64, addr: u16, qty: u16) -> Result<Vec<u16>, ExceptionCode> {
    if addr != layout.register || qty != layout.words {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    let mut w: Vec<u16> = (0..layout.words)
        .rev()
        .map(|i| (count >> (16 * i)) as u16)
        .collect();
    if layout.little {
        w.reverse();
    }
    Ok(w)
}
