//! A queue drained by a task of its own, started with the first item sent rather than when
//! the queue is made: whoever makes it need not be on a runtime, and a queue outlives a
//! runtime that shuts down (its next item starts the task again on the sender's runtime).

use std::future::Future;
use std::sync::{Mutex, PoisonError};

use tokio::sync::mpsc;

pub struct LazyQueue<T> {
    sender: Mutex<Option<mpsc::UnboundedSender<T>>>,
}

impl<T: Send + 'static> LazyQueue<T> {
    pub fn new() -> Self {
        Self {
            sender: Mutex::new(None),
        }
    }

    /// Sends `item`, first starting `drain` on the queue's items if no task drains it. Gives
    /// the item back if the task stopped with it (its runtime shut down).
    pub fn send<F, D>(&self, item: T, drain: F) -> Result<(), T>
    where
        F: FnOnce(mpsc::UnboundedReceiver<T>) -> D,
        D: Future<Output = ()> + Send + 'static,
    {
        let (sender, waiting) = {
            let mut sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(running) = sender.as_ref().filter(|running| !running.is_closed()) {
                return running.send(item).map_err(|refused| refused.0);
            }
            let (running, waiting) = mpsc::unbounded_channel();
            *sender = Some(running.clone());
            (running, waiting)
        };
        // Outside the lock: if this panics (no runtime), the receiver goes with it, and the
        // next item finds the queue closed and starts it again.
        tokio::spawn(drain(waiting));
        sender.send(item).map_err(|refused| refused.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Forwards each item to `out`, counting the tasks started.
    fn forward(
        started: &Arc<AtomicUsize>,
        out: &mpsc::UnboundedSender<u32>,
    ) -> impl FnOnce(mpsc::UnboundedReceiver<u32>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
    {
        let (started, out) = (started.clone(), out.clone());
        move |mut items| {
            started.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                while let Some(item) = items.recv().await {
                    let _ = out.send(item);
                }
            })
        }
    }

    #[tokio::test]
    async fn one_task_drains_the_items_in_the_order_they_were_sent() {
        let queue = LazyQueue::new();
        let started = Arc::new(AtomicUsize::new(0));
        let (out, mut drained) = mpsc::unbounded_channel();
        for item in 1..=3 {
            queue.send(item, forward(&started, &out)).unwrap();
        }
        for expected in 1..=3 {
            assert_eq!(drained.recv().await, Some(expected));
        }
        assert_eq!(started.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_queue_whose_runtime_shut_down_starts_again_on_the_next() {
        let queue = LazyQueue::new();
        let started = Arc::new(AtomicUsize::new(0));
        let (out, mut drained) = mpsc::unbounded_channel();
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let first = runtime();
        first.block_on(async {
            queue.send(1, forward(&started, &out)).unwrap();
            assert_eq!(drained.recv().await, Some(1));
        });
        // Its task, and the receiver with it, go with the runtime.
        drop(first);
        runtime().block_on(async {
            queue.send(2, forward(&started, &out)).unwrap();
            assert_eq!(drained.recv().await, Some(2));
        });
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }
}
