//! `/metrics` bodies shared between scrapes (single flight): a scrape that
//! arrives while a render is in progress waits for it and gets the same
//! bytes (`Bytes`, not a copy), so a hundred scrapes at once cost one
//! render and one body.
//!
//! At most [`BODIES_HELD`] distinct bodies are alive at once (held by
//! responses still being written): the next render waits until a client
//! has taken its body or been cut off by `http_write_timeout`. Memory for
//! `/metrics` is thus bounded by that many bodies, however many clients
//! request it and never read.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::sync::lock;

/// Most distinct rendered bodies alive at once.
pub const BODIES_HELD: usize = 4;

/// A render of `/metrics` failed (it panicked).
#[derive(Debug, thiserror::Error)]
#[error("rendering /metrics failed")]
pub struct RenderFailed;

type Rendered = Option<Result<Bytes, ()>>;

pub struct Renders {
    /// The render in progress, if any: its result, once published.
    in_flight: Mutex<Option<watch::Receiver<Rendered>>>,
    /// One permit per body alive.
    bodies: Arc<Semaphore>,
}

impl Default for Renders {
    fn default() -> Self {
        Self {
            in_flight: Mutex::new(None),
            bodies: Arc::new(Semaphore::new(BODIES_HELD)),
        }
    }
}

/// A body and the permit it holds until its last clone is dropped.
struct Held {
    body: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl Renders {
    /// The body of a render that finished after this call began: the one
    /// in progress, or a new one made by `render` (on a blocking thread).
    pub async fn get<F>(self: &Arc<Self>, render: F) -> Result<Bytes, RenderFailed>
    where
        F: FnOnce() -> String + Send + 'static,
    {
        let mut rx = {
            let mut slot = lock(&self.in_flight);
            match &*slot {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *slot = Some(rx.clone());
                    // The render runs in a task of its own: it is not
                    // cancelled with the scrape that started it, whose
                    // client may be gone while others wait for it.
                    tokio::spawn(self.clone().render(render, tx));
                    rx
                }
            }
        };
        let done = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| RenderFailed)?;
        match &*done {
            Some(Ok(body)) => Ok(body.clone()),
            _ => Err(RenderFailed),
        }
    }

    async fn render<F>(self: Arc<Self>, render: F, tx: watch::Sender<Rendered>)
    where
        F: FnOnce() -> String + Send + 'static,
    {
        let result = match self.bodies.clone().acquire_owned().await {
            Ok(permit) => tokio::task::spawn_blocking(render)
                .await
                .map(|text| {
                    // Held for as long as the slowest client: no slack.
                    let mut body = text.into_bytes();
                    body.shrink_to_fit();
                    Bytes::from_owner(Held {
                        body,
                        _permit: permit,
                    })
                })
                .map_err(|_| ()),
            Err(_) => Err(()),
        };
        // Scrapes from now on start a new render; those waiting get this.
        *lock(&self.in_flight) = None;
        tx.send_replace(Some(result));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapes_during_a_render_share_its_bytes() {
        let renders = Arc::new(Renders::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Arc::new(Mutex::new(go_rx));
        // A scrape whose render, if it makes one, waits until the test
        // lets it finish.
        let scrape = |renders: &Arc<Renders>| {
            let (renders, calls, go_rx) = (renders.clone(), calls.clone(), go_rx.clone());
            async move {
                renders
                    .get(move || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        lock(&go_rx).recv().unwrap();
                        "x".repeat(1 << 20)
                    })
                    .await
            }
        };
        let first = tokio::spawn(scrape(&renders));
        // The render is in progress once it has been called.
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Each of the others has joined the render in progress once it
        // has been polled (and is waiting): only then may it finish.
        // (Spawned tasks might not have run before the render ended, and
        // would then start renders of their own.)
        let mut others: Vec<_> = (0..10).map(|_| Box::pin(scrape(&renders))).collect();
        for o in &mut others {
            assert!(futures::poll!(o.as_mut()).is_pending());
        }
        go_tx.send(()).unwrap();
        let a = first.await.unwrap().unwrap();
        for o in others {
            let b = o.await.unwrap();
            assert_eq!(b.as_ptr(), a.as_ptr(), "the same bytes, not a copy");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one render for all");

        // A scrape after the render finished gets a new one.
        go_tx.send(()).unwrap();
        let c = scrape(&renders).await.unwrap();
        assert_ne!(c.as_ptr(), a.as_ptr());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_a_few_bodies_are_alive() {
        let renders = Arc::new(Renders::default());
        let mut held = Vec::new();
        for _ in 0..BODIES_HELD {
            held.push(renders.get(|| "body".to_string()).await.unwrap());
        }
        // Every permit is held by a body still alive: the next render waits.
        let next = tokio::spawn({
            let renders = renders.clone();
            async move { renders.get(|| "next".to_string()).await }
        });
        tokio::task::yield_now().await;
        assert!(!next.is_finished());
        assert_eq!(renders.bodies.available_permits(), 0);
        // A clone of a body keeps it alive; the last one frees it.
        let clone = held[0].clone();
        drop(held.remove(0));
        assert_eq!(renders.bodies.available_permits(), 0);
        drop(clone);
        assert_eq!(&next.await.unwrap().unwrap()[..], b"next");
    }

    #[tokio::test]
    async fn a_render_that_panics_fails_its_scrapes_not_the_next() {
        let renders = Arc::new(Renders::default());
        let failed = renders.get(|| -> String { panic!("render failed") }).await;
        assert!(failed.is_err());
        assert_eq!(&renders.get(|| "ok".to_string()).await.unwrap()[..], b"ok");
    }
}
