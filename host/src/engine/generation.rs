//! A generation: one loaded build of the domain with the subscriptions planned for it. Hot reload
//! replaces the running generation with the next; what changed between them is worked out here.

use std::sync::Arc;

use serde::Serialize;

use super::{batch::Subscription, retry::RetryPolicy, subscription_type, EngineError};
use crate::{config::Config, ordering::Ordering, plugin::Handlers, subscription};

/// One build of the domain, ready to run.
#[derive(Debug)]
pub(crate) struct Generation {
    /// 1 for the library the engine started with, then one more per reload.
    pub(crate) number: u64,
    pub(crate) plugin: Arc<dyn Handlers>,
    pub(crate) subscriptions: Vec<Arc<Subscription>>,
}

impl Generation {
    /// Plan the subscriptions of `plugin`'s registrations under `config`.
    pub(crate) fn plan(
        number: u64,
        plugin: Arc<dyn Handlers>,
        config: &Config,
    ) -> Result<Self, EngineError> {
        let plans = subscription::plan(plugin.registrations())?;
        let subscriptions = plans
            .into_iter()
            .map(|plan| {
                let handler = plan.routes.values().next().cloned().unwrap_or_default();
                let settings = config.settings(&handler, &plan.options);
                tracing::debug!(subscription = %plan.name, categories = ?plan.categories, handlers = ?plan.routes, ?settings, "subscription registered");
                let commands = plan.kind == crate::plugin::Kind::CommandHandler;
                let kind = subscription_type(config, &handler, plan.kind)?;
                let ordering = Ordering::of(&plan);
                Ok(Arc::new(Subscription { retry: RetryPolicy::new(&settings), plan, settings, commands, kind, ordering }))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Self {
            number,
            plugin,
            subscriptions,
        })
    }

    /// The names of its subscriptions.
    pub(crate) fn names(&self) -> Vec<String> {
        self.subscriptions
            .iter()
            .map(|s| s.plan.name.clone())
            .collect()
    }

    fn find(&self, name: &str) -> Option<&Subscription> {
        self.subscriptions
            .iter()
            .find(|s| s.plan.name == name)
            .map(AsRef::as_ref)
    }
}

/// What a reload changes, by subscription name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    /// Subscriptions of the new build only: they start.
    pub added: Vec<String>,
    /// Subscriptions of the old build only: they stop.
    pub removed: Vec<String>,
    /// Subscriptions whose categories, handlers, settings or type changed: they restart.
    pub changed: Vec<String>,
}

impl Changes {
    pub(crate) fn between(old: &Generation, new: &Generation) -> Self {
        let mut changes = Self::default();
        for sub in &new.subscriptions {
            match old.find(&sub.plan.name) {
                None => changes.added.push(sub.plan.name.clone()),
                Some(before) if differs(before, sub) => changes.changed.push(sub.plan.name.clone()),
                Some(_) => {}
            }
        }
        changes.removed = old
            .names()
            .into_iter()
            .filter(|name| new.find(name).is_none())
            .collect();
        changes
    }
}

fn differs(a: &Subscription, b: &Subscription) -> bool {
    a.plan != b.plan || a.settings != b.settings || a.kind != b.kind
}
