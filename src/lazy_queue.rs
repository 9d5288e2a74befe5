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
