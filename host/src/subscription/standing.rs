//! What a subscription's kind answers: how its source is started, and where it stands (the figures
//! status, `/readyz` and `/metrics` show, whether test mode must wait for the broker, where its dead
//! letters are). Each kind answers next to its source (`event_store`, `stream`, `ordered`); [`of`] is
//! the one place that looks at a subscription's kind, so nothing else branches on it.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{event_store::EventStoreKind, ordered::OrderedKind, stream::StreamKind};
use crate::{
    broker::{self, Broker},
    config::{Config, SubscriptionType},
    engine::{
        batch::Subscription,
        run::{self, Source},
        Shared,
    },
    ops::status::{SubscriptionStatus, Target},
    ownership::Keeper,
    subscription::SubscriptionPlan,
};

/// A kind of subscription, as the engine, status, health and test mode ask it.
#[async_trait]
pub(crate) trait Standing: std::fmt::Debug + Send + Sync {
    /// Its type, as status shows it (the configuration's `subscription_type`).
    fn label(&self) -> &'static str;

    /// Run `sub` until `stop`, as [`crate::engine`] runs every subscription task.
    async fn run(&self, task: Task) -> Result<(), String>;

    /// How many readers share it, each with a stored position.
    fn workers(&self, _config: &Config, _plan: &SubscriptionPlan) -> u32 {
        1
    }

    /// How many partitions its keys fall in, when the broker partitions it.
    fn partitions(&self, _config: &Config) -> Option<u32> {
        None
    }

    /// Whether it parks a key after a dead letter in the store.
    fn parks(&self, _plan: &SubscriptionPlan) -> bool {
        false
    }

    /// Whether the broker keeps its messages, positions and dead letters (else the store keeps them):
    /// it cannot be measured, nor its dead letters replayed, without the broker.
    fn on_broker(&self) -> bool;

    /// Fill in what the broker knows of it: its group, partitions or lease holder.
    async fn measure_broker(&self, broker: &dyn Broker, target: &Target, row: &mut Row);

    /// Why it is behind, when nobody works on it (judged from a measured row).
    fn unattended(&self, row: &Row, broker_configured: bool) -> Option<&'static str>;

    /// What the broker still holds for it, unread or unacknowledged; `None` when the broker holds
    /// none of its messages.
    async fn broker_backlog(
        &self,
        _broker: &dyn Broker,
        _plan: &SubscriptionPlan,
        _config: &Config,
    ) -> Option<broker::Result<u64>> {
        None
    }
}

/// What every subscription task starts with.
pub(crate) struct Start {
    pub(crate) shared: Arc<Shared>,
    pub(crate) broker: Option<Arc<dyn Broker>>,
    /// Who grants leases ([`crate::ownership`]): none for a store nobody shares.
    pub(crate) keeper: Option<Arc<Keeper>>,
    /// This replica, as an owner of leases.
    pub(crate) owner: String,
}

/// One subscription's task: what it starts with, the subscription, and when to stop.
pub(crate) struct Task {
    pub(crate) start: Start,
    pub(crate) sub: Arc<Subscription>,
    pub(crate) stop: CancellationToken,
}

/// A subscription's row in status, as a kind fills it in.
pub(crate) type Row = SubscriptionStatus;

/// The kind of `sub`: the only branch on where a subscription reads from.
pub(crate) fn of(sub: &Subscription) -> &'static dyn Standing {
    match (sub.kind, sub.ordering.is_some()) {
        (SubscriptionType::EventStore, _) => &EventStoreKind,
        (SubscriptionType::Stream, true) => &OrderedKind,
        (SubscriptionType::Stream, false) => &StreamKind,
    }
}

/// How a source that reads from the broker is made (`Stream::new`, `Ordered::new`).
pub(crate) type OpenOnBroker<S> =
    fn(Arc<Shared>, Arc<dyn Broker>, Arc<Subscription>) -> Result<S, String>;

impl Task {
    /// Make the source with `open`, which reads from the broker, and run it on the engine's loop.
    pub(crate) async fn on_broker<S: Source>(self, open: OpenOnBroker<S>) -> Result<(), String> {
        let Task { start, sub, stop } = self;
        let broker = start
            .broker
            .ok_or("a subscription read from streams needs a broker")?;
        let source = open(start.shared.clone(), broker, sub.clone())?;
        run::run(start.shared, sub, source, stop).await
    }
}

/// What a broker read answers; `idle` runs once the read has been out for `idle_after`
/// ([`idle_after`]). Redis ends an empty blocking read only when its event loop next wakes (up to a
/// tenth of a second at its default `hz`, five times test mode's block): a read still out after its
/// block has found nothing new, and the subscription can say it is idle while it goes on waiting.
pub(crate) async fn read_or_idle<T>(
    read: impl std::future::Future<Output = T>,
    idle_after: std::time::Duration,
    idle: impl FnOnce(),
) -> T {
    tokio::pin!(read);
    tokio::select! {
        answer = &mut read => return answer,
        _ = tokio::time::sleep(idle_after) => idle(),
    }
    read.await
}

/// How long a read may be out before its subscription says it is idle ([`read_or_idle`]): its block.
/// Test mode says so after a few milliseconds, for a read that finds entries is answered at once:
/// a run's last read then ends it that much sooner. An early word costs a look, never a message,
/// for test mode also waits until the broker itself counts nothing unread or unacknowledged.
pub(crate) fn idle_after(shared: &Shared, block: std::time::Duration) -> std::time::Duration {
    const TEST_MODE: std::time::Duration = std::time::Duration::from_millis(5);
    match shared.test_mode {
        true => block.min(TEST_MODE),
        false => block,
    }
}

/// The broker streams subscription `name` reads: its categories and its group's replay stream.
pub(crate) fn streams(name: &str, categories: &[String]) -> Vec<String> {
    let mut streams = categories.to_vec();
    streams.push(broker::replay_stream(name));
    streams
}

/// A group on the broker that is behind with no consumer left in it.
pub(crate) fn without_consumers(row: &SubscriptionStatus) -> Option<&'static str> {
    (row.consumers == Some(0)).then_some("behind, no consumers")
}

#[cfg(test)]
mod tests {
    use protean_plugin_api::AfterDeadLetter;

    use super::*;
    use crate::{config::Settings, engine::retry::RetryPolicy, ordering::Ordering, plugin::Kind};

    /// A subscription of `kind`, ordered by `ordered_by`, that parks after a dead letter.
    fn sub(kind: SubscriptionType, ordered_by: Option<&str>) -> Subscription {
        let mut plan = SubscriptionPlan {
            name: "recorder".into(),
            categories: vec!["d::sequence".into()],
            routes: Default::default(),
            options: Default::default(),
            kind: Kind::EventHandler,
        };
        plan.options.ordered_by = ordered_by.map(Into::into);
        plan.options.after_dead_letter = Some(AfterDeadLetter::Park);
        let settings = Settings::default();
        Subscription {
            retry: RetryPolicy::new(&settings),
            ordering: Ordering::of(&plan),
            plan,
            settings,
            commands: false,
            kind,
        }
    }

    fn row(standing: &'static dyn Standing) -> SubscriptionStatus {
        SubscriptionStatus::new(&Target {
            name: "recorder".into(),
            standing,
            categories: Vec::new(),
            handlers: Vec::new(),
            partitions: None,
            workers: 1,
            parks: false,
        })
    }

    #[test]
    fn each_kind_says_where_it_is_kept_and_how_it_is_shown() {
        let answers = |s: &Subscription| {
            let kind = of(s);
            (kind.label(), kind.on_broker())
        };
        let (on_store, ordered_on_store) = (
            sub(SubscriptionType::EventStore, None),
            sub(SubscriptionType::EventStore, Some("$stream")),
        );
        assert_eq!(answers(&on_store), ("event_store", false));
        assert_eq!(answers(&ordered_on_store), ("event_store", false));
        let (stream, ordered) = (
            sub(SubscriptionType::Stream, None),
            sub(SubscriptionType::Stream, Some("$stream")),
        );
        assert_eq!(answers(&stream), ("stream", true));
        assert_eq!(answers(&ordered), ("stream", true));
    }

    #[test]
    fn only_an_ordered_event_store_subscription_has_workers_and_parks_in_the_store() {
        let mut config = Config::default();
        (config.ordering.workers, config.ordering.partitions) = (3, 8);
        let answers = |s: &Subscription| {
            let kind = of(s);
            (
                kind.workers(&config, &s.plan),
                kind.partitions(&config),
                kind.parks(&s.plan),
            )
        };
        let store = |ordered_by| sub(SubscriptionType::EventStore, ordered_by);
        let stream = |ordered_by| sub(SubscriptionType::Stream, ordered_by);
        assert_eq!(answers(&store(None)), (1, None, false));
        assert_eq!(answers(&store(Some("$stream"))), (3, None, true));
        assert_eq!(answers(&stream(None)), (1, None, false));
        assert_eq!(
            answers(&stream(Some("$stream"))),
            (1, Some(8), false),
            "an ordered stream subscription parks on the broker, reported with its partitions"
        );
    }

    #[test]
    fn a_subscription_nobody_works_on_says_why() {
        let ordered = of(&sub(SubscriptionType::Stream, Some("$stream")));
        for stream in [&StreamKind as &'static dyn Standing, ordered] {
            let mut row = row(stream);
            assert_eq!(stream.unattended(&row, true), None, "consumers unknown");
            row.consumers = Some(0);
            assert_eq!(stream.unattended(&row, true), Some("behind, no consumers"));
            row.consumers = Some(1);
            assert_eq!(stream.unattended(&row, true), None);
        }
        let mut row = row(&EventStoreKind);
        let lease = Some("behind, no replica holds its lease");
        assert_eq!(EventStoreKind.unattended(&row, true), lease);
        assert_eq!(
            EventStoreKind.unattended(&row, false),
            None,
            "without a broker nobody holds a lease"
        );
        row.owner = Some("replica-1".into());
        assert_eq!(EventStoreKind.unattended(&row, true), None);
    }
}
