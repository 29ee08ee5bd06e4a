//! What a unit test needs to run one subscription on the engine's loop ([`super::run::run`]) without
//! an [`super::Engine`]: the state the loop shares, planned for a domain's handlers. A child of
//! `engine`, because the running generation is private to it.

#![cfg(test)]

use std::sync::{Arc, Mutex};

use super::{batch::Subscription, generation::Generation, progress::Progress, Shared};
use crate::{config::Config, plugin::Handlers, store::Store};

impl Shared {
    /// The state of an engine running `handlers` over `store` (not in test mode, no broker), and
    /// the subscriptions planned for them.
    pub(crate) fn for_tests(
        handlers: Arc<dyn Handlers>,
        store: Arc<dyn Store>,
        config: Config,
    ) -> (Arc<Self>, Vec<Arc<Subscription>>) {
        let generation = Arc::new(Generation::plan(1, handlers, &config).expect("a valid plan"));
        let subscriptions = generation.subscriptions.clone();
        let shared = Self {
            progress: Progress::new(0, generation.names()),
            metrics: crate::ops::metrics::Metrics::new(&subscriptions),
            generation: Mutex::new(generation),
            store,
            config,
            test_mode: false,
            clock: crate::clock::Clock::system(),
            scheduler_alarm: super::scheduler::Alarm::default(),
            deadlines: super::deadlines::Deadlines::default(),
            turns: super::turns::Turns::default(),
            timings: super::timings::Timings::default(),
        };
        (Arc::new(shared), subscriptions)
    }
}
