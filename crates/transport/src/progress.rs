//! A response *makes progress* while its body moves: a frame passes from the hop that sends it to
//! the reader that takes it. A streaming response that makes none for the progress timeout is cut
//! off, whichever end stopped: a sender that sends nothing more (its frame never comes) and a reader
//! that takes nothing more (it is never asked for one) both hold a connection or stream on each hop
//! for as long as they like otherwise.
//!
//! The rules:
//! - ALWAYS count a frame handed to the reader as progress; NEVER count time spent waiting for
//!   either end.
//! - ALWAYS cut a response off after between one and one and a quarter timeouts without progress: a
//!   sweep every quarter timeout counts the quarters each watched response spent without a frame.
//! - ALWAYS cut off by ending the request's serving task ([`crate::serving_task`]), never by waiting
//!   for its body to be polled, since a reader that takes nothing never has it polled.
//! - NEVER watch a body that has already ended, one of a task that is not a serving task, or a
//!   tunnel (an upgrade is no response body; its owner decides about idle tunnels).
//!
//! A watched response costs an allocation and a short lock when it begins and when it ends, and a
//! relaxed atomic store per frame.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use slab::Slab;
use tokio::time::MissedTickBehavior;

use crate::serving_task::ServingTask;

/// The sweeps a response may spend without progress; the timeout is this many sweep periods.
const QUARTERS: u32 = 4;

/// Which end of a stalled response stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stalled {
    /// The hop that sends the body sent nothing: the reader was waiting for it.
    Sender,
    /// The reader took nothing: the body was not asked for its next frame.
    Reader,
}

/// The progress timeout of one hop's responses: watches bodies and cuts off those that stall.
pub struct Progress {
    shared: Arc<Shared>,
}

struct Shared {
    timeout: Duration,
    /// The responses under way; each is removed by its body when it ends or is dropped.
    watched: Mutex<Slab<Arc<Watch>>>,
    /// Told of each response cut off (the owner logs and counts it).
    on_stall: Box<dyn Fn(Stalled) + Send + Sync>,
}

/// One watched response, shared by its body and the sweep.
#[derive(Debug)]
struct Watch {
    /// A frame went to the reader since the last sweep.
    progressed: AtomicBool,
    /// The body's last poll found no frame ready: the reader is waiting for the sender.
    waiting: AtomicBool,
    /// Sweeps in a row without progress (the sweep's own count).
    idle: AtomicU32,
    /// Cut off for making no progress.
    stalled: AtomicBool,
    task: ServingTask,
}

impl Progress {
    /// Watches responses for `timeout` without progress and calls `on_stall` for each one it cuts
    /// off. The sweep is a task that ends when this is dropped.
    pub fn new(timeout: Duration, on_stall: impl Fn(Stalled) + Send + Sync + 'static) -> Self {
        let shared = Arc::new(Shared {
            timeout,
            watched: Mutex::new(Slab::new()),
            on_stall: Box::new(on_stall),
        });
        let weak = Arc::downgrade(&shared);
        let every = (timeout / QUARTERS).max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(shared) => shared.sweep(),
                    None => return,
                }
            }
        });
        Progress { shared }
    }

    /// The timeout without progress.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// `body`, watched when it has yet to end and runs in a serving task.
    pub fn watch<B: Body>(&self, body: B) -> Watched<B> {
        let watch = if body.is_end_stream() {
            None
        } else {
            ServingTask::current().map(|task| {
                let watch = Arc::new(Watch {
                    // The response head goes out now: that is progress.
                    progressed: AtomicBool::new(true),
                    waiting: AtomicBool::new(false),
                    idle: AtomicU32::new(0),
                    stalled: AtomicBool::new(false),
                    task,
                });
                let key = self.shared.watched.lock().insert(watch.clone());
                Registered {
                    watch,
                    key,
                    shared: self.shared.clone(),
                }
            })
        };
        Watched { inner: body, watch }
    }

    /// Responses watched now.
    pub fn watched(&self) -> usize {
        self.shared.watched.lock().len()
    }
}

impl Shared {
    /// Counts a quarter without progress against every watched response and cuts off those at the
    /// timeout (each once: its body leaves the list as its task ends).
    fn sweep(&self) {
        let mut stalled = Vec::new();
        for (_, watch) in self.watched.lock().iter() {
            if watch.stalled.load(Ordering::Relaxed) {
                continue;
            }
            if watch.progressed.swap(false, Ordering::Relaxed) {
                watch.idle.store(0, Ordering::Relaxed);
                continue;
            }
            let idle = watch.idle.fetch_add(1, Ordering::Relaxed) + 1;
            if idle < QUARTERS {
                continue;
            }
            watch.stalled.store(true, Ordering::Relaxed);
            watch.task.abort();
            stalled.push(if watch.waiting.load(Ordering::Relaxed) {
                Stalled::Sender
            } else {
                Stalled::Reader
            });
        }
        for end in stalled {
            (self.on_stall)(end);
        }
    }
}

/// A response body under a progress timeout (or not watched at all).
#[derive(Debug)]
pub struct Watched<B> {
    inner: B,
    watch: Option<Registered>,
}

/// A watch in its hop's list, leaving it when dropped.
struct Registered {
    watch: Arc<Watch>,
    key: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.watch.fmt(f)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.watched.lock().try_remove(self.key);
    }
}

impl<B> Watched<B> {
    /// `body`, not watched.
    pub fn unwatched(body: B) -> Self {
        Watched {
            inner: body,
            watch: None,
        }
    }

    /// Whether the response was cut off for making no progress.
    pub fn stalled(&self) -> bool {
        self.watch
            .as_ref()
            .is_some_and(|w| w.watch.stalled.load(Ordering::Relaxed))
    }
}

impl<B: Body + Unpin> Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(Registered { watch, .. }) = &self.watch {
            match &polled {
                Poll::Pending => watch.waiting.store(true, Ordering::Relaxed),
                Poll::Ready(Some(Ok(_))) => {
                    watch.waiting.store(false, Ordering::Relaxed);
                    watch.progressed.store(true, Ordering::Relaxed);
                }
                // Ended, either way: nothing left to watch.
                Poll::Ready(_) => self.watch = None,
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    use super::*;
    use crate::serving_task::spawn_serving;

    /// A channel-fed body.
    struct Fed(mpsc::UnboundedReceiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    /// A progress timeout of 4 s counting its stalls, and a channel-fed body.
    fn setup() -> (Progress, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let senders = Arc::new(AtomicUsize::new(0));
        let readers = Arc::new(AtomicUsize::new(0));
        let (s, r) = (senders.clone(), readers.clone());
        let progress = Progress::new(Duration::from_secs(4), move |end| {
            let count = match end {
                Stalled::Sender => &s,
                Stalled::Reader => &r,
            };
            count.fetch_add(1, Ordering::SeqCst);
        });
        (progress, senders, readers)
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_that_stops_is_cut_off_after_the_timeout_and_not_before() {
        let (progress, senders, readers) = setup();
        let progress = Arc::new(progress);
        let (tx, rx) = mpsc::unbounded_channel();
        let watching = progress.clone();
        let reader = spawn_serving(async move {
            let mut body = watching.watch(Fed(rx));
            let mut got = 0;
            while let Some(Ok(frame)) = body.frame().await {
                got += frame.into_data().map_or(0, |d| d.len());
            }
            got
        });
        // A frame every 3 s keeps it alive well past the 4 s timeout.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            tx.send(Bytes::from_static(b"xx")).unwrap();
        }
        assert!(!reader.is_finished(), "cut off while making progress");
        // Then nothing: cut off within 4 to 5 s.
        tokio::time::sleep(Duration::from_millis(3900)).await;
        assert!(!reader.is_finished(), "cut off before the timeout");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let ended = reader.await;
        assert!(matches!(ended, Err(ref e) if e.is_cancelled()), "{ended:?}");
        assert_eq!(senders.load(Ordering::SeqCst), 1);
        assert_eq!(readers.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(progress.watched(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_taking_frames_is_cut_off() {
        let (progress, senders, readers) = setup();
        let progress = Arc::new(progress);
        let (tx, rx) = mpsc::unbounded_channel();
        for _ in 0..10 {
            tx.send(Bytes::from_static(b"plenty")).unwrap();
        }
        let watching = progress.clone();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
        let reader = spawn_serving(async move {
            let mut body = watching.watch(Fed(rx));
            // Takes one frame, then holds the body without asking for more.
            let _ = body.frame().await;
            let _ = held_rx.await;
            drop(body);
        });
        tokio::time::sleep(Duration::from_millis(5100)).await;
        let ended = reader.await;
        assert!(matches!(ended, Err(ref e) if e.is_cancelled()), "{ended:?}");
        assert_eq!(readers.load(Ordering::SeqCst), 1);
        assert_eq!(senders.load(Ordering::SeqCst), 0);
        drop(held_tx);
        // The body went with the task: the sender side sees its reader gone.
        assert!(tx.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ends_is_forgotten_and_never_cut_off() {
        let (progress, senders, readers) = setup();
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Bytes::from_static(b"all")).unwrap();
        drop(tx);
        let progress = Arc::new(progress);
        let watching = progress.clone();
        let reader = spawn_serving(async move {
            let mut body = watching.watch(Fed(rx));
            while body.frame().await.is_some() {}
            assert!(!body.stalled());
            // Held long after its end: it was forgotten, so it is not cut off.
            tokio::time::sleep(Duration::from_secs(30)).await;
            body.stalled()
        });
        let stalled = reader.await.unwrap();
        assert!(!stalled);
        assert_eq!(
            senders.load(Ordering::SeqCst) + readers.load(Ordering::SeqCst),
            0
        );
        assert_eq!(progress.watched(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn only_bodies_in_a_serving_task_are_watched() {
        let (progress, _, _) = setup();
        let (_tx, rx) = mpsc::unbounded_channel();
        let body = progress.watch(Fed(rx));
        assert_eq!(progress.watched(), 0);
        drop(body);
        let progress = Arc::new(progress);
        let watching = progress.clone();
        let ended = spawn_serving(async move {
            let body = watching.watch(http_body_util::Empty::<Bytes>::new());
            body.stalled()
        })
        .await;
        assert!(matches!(ended, Ok(false)));
        assert_eq!(progress.watched(), 0, "an ended body was watched");
    }
}
