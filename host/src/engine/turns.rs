//! Calls that may take the process down run alone.
//!
//! In process, a handler that aborts or segfaults ends every call in flight, not only its own: the
//! other subscriptions' and workers' calls die with it, and their messages count a failed attempt
//! too (their call records, their reader's busy mark). That first charge cannot be avoided, since
//! nothing says in advance which message will kill the process. But a message that failed before
//! (a suspect) runs while no other unit of work of this process is between its call records and its
//! commit, so if it kills the process again, it is the only one charged; otherwise an innocent message in a sibling worker, charged at
//! every death of the culprit, would run out of retries beside it. Calls that are not suspects run
//! side by side as before. Isolated mode needs none of this: a worker process's death costs only its
//! own call.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Who may call a handler now.
#[derive(Debug, Default)]
pub(crate) struct Turns(RwLock<()>);

/// A turn to run a unit of work: from its call records, through its calls, to its commit.
pub(crate) enum Turn<'a> {
    Beside(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
}

impl Turns {
    /// Wait for a turn: `alone` waits until no other call is in flight and keeps others out until it
    /// is dropped; otherwise it only waits for a call running alone.
    pub(crate) fn take(&self, alone: bool) -> Turn<'_> {
        // A panic is caught inside the plugin call; a poisoned lock guards no data.
        if alone {
            Turn::Alone(self.0.write().unwrap_or_else(PoisonError::into_inner))
        } else {
            Turn::Beside(self.0.read().unwrap_or_else(PoisonError::into_inner))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{mpsc, Arc},
        time::Duration,
    };

    use super::*;

    #[test]
    fn a_suspect_waits_for_the_calls_in_flight_and_keeps_the_others_out() {
        let turns = Arc::new(Turns::default());
        let beside = turns.take(false);
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let turns = turns.clone();
            std::thread::spawn(move || {
                let _alone = turns.take(true);
                tx.send("alone").unwrap();
                tx.send("alone done").unwrap();
            })
        };
        // What must not happen cannot be awaited: give it a moment to go wrong.
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "the suspect waits for the call in flight"
        );
        drop(beside);
        assert_eq!(rx.recv().unwrap(), "alone");
        let _next = turns.take(false);
        assert_eq!(
            rx.try_recv().unwrap(),
            "alone done",
            "a plain call gets its turn only after the suspect's call ended"
        );
        waiter.join().unwrap();
        let _other = turns.take(false);
    }
}
