//! Commands on one organization take turns within a process.
//!
//! Concurrent commands on one organization all decide on the same version and race for its
//! next sequence: one wins, every other reloads and decides again, and a burst of a hundred
//! ran out of retries (`409 conflict`) although none of its commands conflicted. Taking
//! turns, each decides on the state the one before it left. Other processes still race this
//! one, and the store's sequence check settles those races, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

/// One queue per organization with a command in flight; an organization leaves the map when
/// its last turn ends.
#[derive(Default)]
pub struct Turns {
    queues: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

impl Turns {
    /// Waits for the organization's turn; it lasts until the returned value is dropped.
    pub async fn take(&self, organization_id: Uuid) -> Turn<'_> {
        let queue = self
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(organization_id)
            .or_default()
            .clone();
        // Built before the wait, so a caller that stops waiting still leaves the map clean.
        let mut turn = Turn {
            turns: self,
            organization_id,
            queue: queue.clone(),
            held: None,
        };
        turn.held = Some(queue.lock_owned().await);
        turn
    }

    #[cfg(test)]
    fn organizations(&self) -> usize {
        self.queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// An organization's turn (or the wait for it).
pub struct Turn<'a> {
    turns: &'a Turns,
    organization_id: Uuid,
    queue: Arc<tokio::sync::Mutex<()>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.held.take();
        let mut queues = self
            .turns
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Every waiter took its clone under this lock: the map's and this one's alone mean
        // nobody waits.
        if Arc::strong_count(&self.queue) == 2 {
            queues.remove(&self.organization_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_organization_takes_turns_and_others_do_not_wait() {
        let turns = Arc::new(Turns::default());
        let (acme, globex) = (Uuid::now_v7(), Uuid::now_v7());
        let first = turns.take(acme).await;
        let second = {
            let turns = turns.clone();
            tokio::spawn(async move {
                let _turn = turns.take(acme).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "the second command waits for the first"
        );
        tokio::time::timeout(Duration::from_secs(1), turns.take(globex))
            .await
            .expect("another organization does not wait");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("the second command runs once the first is done")
            .unwrap();
        assert_eq!(turns.organizations(), 0, "no organization is left behind");
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_leaves_nothing_behind() {
        let turns = Turns::default();
        let acme = Uuid::now_v7();
        let first = turns.take(acme).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(20), turns.take(acme)).await;
        assert!(gave_up.is_err());
        drop(first);
        assert_eq!(turns.organizations(), 0);
    }
}
