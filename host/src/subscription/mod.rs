//! Subscriptions: which handler reads what, and from where.
//!
//! The plan follows Protean (§3 of the server reference): one subscription per event handler, one per
//! category for projectors, one over all categories for a process manager (so it sees its events in store
//! order), and one `commands:{category}` per aggregate, shared by its command handlers and routed by type.

pub(crate) mod busy;
pub(crate) mod calls;
pub(crate) mod event_store;
pub(crate) mod ordered;
pub(crate) mod parking;
pub(crate) mod scripted;
pub(crate) mod standing;
pub(crate) mod stream;
pub(crate) mod workers;

use std::collections::BTreeMap;

use protean_plugin_api::HandlerOptions;
use serde::Serialize;

use crate::plugin::{Kind, Registration};

/// One subscription the engine will run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionPlan {
    /// Unique name; keys the stored position.
    pub name: String,
    /// The categories read, merged in store order.
    pub categories: Vec<String>,
    /// Message type → handler name.
    pub routes: BTreeMap<String, String>,
    /// The options declared by its (first) handler.
    #[serde(skip)]
    pub options: HandlerOptions,
    /// The kind of its handlers.
    #[serde(skip)]
    pub kind: Kind,
}

/// A registration the plan cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("command {message_type} is handled by both {first} and {second}; a command must have exactly one handler")]
    DuplicateCommand {
        message_type: String,
        first: String,
        second: String,
    },
}

/// Derive the subscriptions for `registrations`. Handlers of unknown kinds are skipped with a warning.
pub fn plan(registrations: &[Registration]) -> Result<Vec<SubscriptionPlan>, PlanError> {
    let mut plans = Vec::new();
    let mut commands: BTreeMap<String, SubscriptionPlan> = BTreeMap::new();
    for r in registrations {
        match r.kind {
            Kind::EventHandler | Kind::ProcessManager => {
                plans.push(single(&r.name, r, &r.categories))
            }
            Kind::Projector => {
                plans.extend(
                    r.categories
                        .iter()
                        .map(|c| single(&format!("{}-{c}", r.name), r, std::slice::from_ref(c))),
                );
            }
            Kind::CommandHandler => {
                for category in &r.categories {
                    let name = format!("commands:{}", category.trim_end_matches(":command"));
                    let plan = commands
                        .entry(name.clone())
                        .or_insert_with(|| SubscriptionPlan {
                            name,
                            categories: vec![category.clone()],
                            routes: BTreeMap::new(),
                            options: r.options.clone(),
                            kind: Kind::CommandHandler,
                        });
                    for message_type in &r.message_types {
                        if let Some(first) =
                            plan.routes.insert(message_type.clone(), r.name.clone())
                        {
                            return Err(PlanError::DuplicateCommand {
                                message_type: message_type.clone(),
                                first,
                                second: r.name.clone(),
                            });
                        }
                    }
                }
            }
            Kind::Unknown(kind) => {
                tracing::warn!(handler = %r.name, kind, "skipping a handler of a kind this host does not know; upgrade protean-host")
            }
        }
    }
    plans.extend(commands.into_values());
    Ok(plans)
}

fn single(name: &str, r: &Registration, categories: &[String]) -> SubscriptionPlan {
    SubscriptionPlan {
        name: name.to_owned(),
        categories: categories.to_vec(),
        routes: r
            .message_types
            .iter()
            .map(|t| (t.clone(), r.name.clone()))
            .collect(),
        options: r.options.clone(),
        kind: r.kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, kind: Kind, categories: &[&str], types: &[&str]) -> Registration {
        Registration {
            name: name.into(),
            kind,
            categories: categories.iter().map(|s| s.to_string()).collect(),
            message_types: types.iter().map(|s| s.to_string()).collect(),
            options: HandlerOptions::default(),
        }
    }

    #[test]
    fn one_subscription_per_handler_kind_rule() {
        let plans = plan(&[
            reg(
                "inventory",
                Kind::EventHandler,
                &["d::order", "d::stock"],
                &["D.A.v1", "D.B.v1"],
            ),
            reg(
                "summary",
                Kind::Projector,
                &["d::order", "d::stock"],
                &["D.A.v1"],
            ),
            reg(
                "orders",
                Kind::CommandHandler,
                &["d::order:command"],
                &["D.Place.v1"],
            ),
            reg(
                "more_orders",
                Kind::CommandHandler,
                &["d::order:command"],
                &["D.Ship.v1"],
            ),
            reg(
                "flow",
                Kind::ProcessManager,
                &["d::order", "d::stock"],
                &["D.A.v1"],
            ),
        ])
        .unwrap();
        let names: Vec<_> = plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "inventory",
                "summary-d::order",
                "summary-d::stock",
                "flow",
                "commands:d::order"
            ]
        );
        let commands = plans.last().unwrap();
        assert_eq!(commands.routes["D.Ship.v1"], "more_orders");
        assert_eq!(commands.categories, ["d::order:command"]);
    }

    #[test]
    fn a_command_with_two_handlers_is_refused() {
        let error = plan(&[
            reg(
                "a",
                Kind::CommandHandler,
                &["d::order:command"],
                &["D.Place.v1"],
            ),
            reg(
                "b",
                Kind::CommandHandler,
                &["d::order:command"],
                &["D.Place.v1"],
            ),
        ])
        .unwrap_err();
        assert!(error.to_string().contains("both a and b"));
    }
}
