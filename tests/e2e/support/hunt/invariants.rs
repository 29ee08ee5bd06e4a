//! What must hold at the end of a hunt, read from the stores themselves: every message a subscription
//! routes has its processed marker (nothing skipped, whatever a position says), every effect exists once
//! per order, each read model equals a replay of the events in the store, and nothing is left pending,
//! held back or dead-lettered.

use std::collections::{BTreeMap, HashMap, HashSet};

use protean_host::store::{Store, StoredMessage};
use serde_json::Value;

use super::writers::Order;
use crate::support::RedisServer;

/// The findings, and how many messages the store holds.
#[derive(Debug, Default)]
pub struct Checked {
    pub messages: usize,
    pub violations: Vec<String>,
}

/// Every effect of one order, by category and type.
const FLOW: [(&str, &str); 6] = [
    ("fulfilment::order:command", "Fulfilment.PlaceOrder.v1"),
    ("fulfilment::order", "Fulfilment.OrderPlaced.v1"),
    ("fulfilment::reservation", "Fulfilment.StockReserved.v1"),
    (
        "fulfilment::payment:command",
        "Fulfilment.ProcessPayment.v1",
    ),
    ("fulfilment::payment", "Fulfilment.PaymentProcessed.v1"),
    ("fulfilment::order", "Fulfilment.OrderShipped.v1"),
];

/// The summary statuses in the order they happen, and the event that moves the summary to each.
const STATUSES: [(&str, &str); 4] = [
    ("placed", "Fulfilment.OrderPlaced.v1"),
    ("reserved", "Fulfilment.StockReserved.v1"),
    ("paid", "Fulfilment.PaymentProcessed.v1"),
    ("shipped", "Fulfilment.OrderShipped.v1"),
];

/// A subscription as `inspect --json` plans it.
#[derive(Debug)]
pub struct Planned {
    pub name: String,
    pub categories: Vec<String>,
    pub routes: HashSet<String>,
}

impl Planned {
    /// The subscriptions of `inspect --json`'s selected instance.
    pub fn from_inspect(inspect: &Value) -> Vec<Self> {
        inspect["instances"][0]["subscriptions"]
            .as_array()
            .expect("inspect lists subscriptions")
            .iter()
            .map(|s| Self {
                name: s["name"].as_str().unwrap().to_owned(),
                categories: strings(&s["categories"]),
                routes: s["routes"].as_object().unwrap().keys().cloned().collect(),
            })
            .collect()
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

pub fn check(
    store: &dyn Store,
    redis: Option<&RedisServer>,
    subscriptions: &[Planned],
    orders: &[Order],
) -> Checked {
    let stored = Stored::read(store);
    let mut violations = Vec::new();
    for sub in subscriptions {
        violations.extend(unhandled(store, &stored, sub));
    }
    let effects = effects(&stored);
    violations.extend(once_per_order(&effects, orders));
    violations.extend(summaries_match_a_replay(store, &effects, orders));
    violations.extend(totals_match_a_replay(store, &effects));
    violations.extend(nothing_left(store, redis));
    Checked {
        messages: stored.by_category.values().map(Vec::len).sum(),
        violations,
    }
}

/// Every message of the flow's categories, read once.
struct Stored {
    by_category: HashMap<String, Vec<StoredMessage>>,
}

impl Stored {
    fn read(store: &dyn Store) -> Self {
        let mut by_category = HashMap::new();
        for (category, _) in FLOW {
            by_category.entry(category.to_owned()).or_insert_with(|| {
                store
                    .read_categories(&[category.to_owned()], 0, usize::MAX)
                    .unwrap()
            });
        }
        Self { by_category }
    }

    fn of(&self, category: &str) -> &[StoredMessage] {
        self.by_category.get(category).map_or(&[], Vec::as_slice)
    }
}

/// Messages `sub` routes that have no processed marker of it: skipped, or never reached.
fn unhandled(store: &dyn Store, stored: &Stored, sub: &Planned) -> Option<String> {
    let routed: Vec<&StoredMessage> = sub
        .categories
        .iter()
        .flat_map(|c| stored.of(c))
        .filter(|m| sub.routes.contains(&m.message_type))
        .collect();
    let mut handled = HashSet::new();
    // Markers name a message's identity (its stream and position), not its headers.id.
    for chunk in routed.chunks(500) {
        let identities: Vec<String> = chunk.iter().map(|m| m.identity()).collect();
        let ids: Vec<&str> = identities.iter().map(String::as_str).collect();
        handled.extend(store.processed(&sub.name, &ids).unwrap());
    }
    let mut missing: Vec<u64> = routed
        .iter()
        .filter(|m| !handled.contains(&m.identity()))
        .map(|m| m.global_position)
        .collect();
    if missing.is_empty() {
        return None;
    }
    missing.sort_unstable();
    let position = store.position(&sub.name).unwrap();
    let passed = position.map_or(0, |p| missing.iter().filter(|g| **g <= p).count());
    Some(format!(
        "{}: {} of {} messages never handled ({passed} of them below its position {position:?}), first at global positions {:?}",
        sub.name,
        missing.len(),
        routed.len(),
        &missing[..missing.len().min(8)]
    ))
}

/// How many of each flow message the store holds per order: (order id, type) -> count.
fn effects(stored: &Stored) -> HashMap<(String, String), usize> {
    let mut counts = HashMap::new();
    for (category, message_type) in FLOW {
        for m in stored
            .of(category)
            .iter()
            .filter(|m| m.message_type == message_type)
        {
            let data: Value = serde_json::from_str(&m.data).unwrap();
            let order = data["order_id"].as_str().unwrap_or("?").to_owned();
            *counts.entry((order, message_type.to_owned())).or_insert(0) += 1;
        }
    }
    counts
}

fn once_per_order(effects: &HashMap<(String, String), usize>, orders: &[Order]) -> Vec<String> {
    let mut wrong: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (_, message_type) in FLOW {
        for order in orders {
            let n = effects
                .get(&(order.id.clone(), message_type.to_owned()))
                .copied()
                .unwrap_or(0);
            let wanted = usize::from(order.commanded || message_type != "Fulfilment.PlaceOrder.v1");
            if n != wanted {
                wrong
                    .entry(message_type)
                    .or_default()
                    .push(format!("{} x{n}", order.id));
            }
        }
    }
    let known: HashSet<&String> = orders.iter().map(|o| &o.id).collect();
    let strangers = effects.keys().filter(|(o, _)| !known.contains(o)).count();
    let mut violations: Vec<String> = wrong
        .into_iter()
        .map(|(t, w)| {
            format!(
                "{t}: {} orders not exactly once, e.g. {:?}",
                w.len(),
                &w[..w.len().min(5)]
            )
        })
        .collect();
    if strangers > 0 {
        violations.push(format!("{strangers} effects of orders nobody sent"));
    }
    violations
}

/// The order summary a single-threaded replay produces: the furthest status its events reach.
fn replayed_status(
    effects: &HashMap<(String, String), usize>,
    order: &str,
) -> Option<&'static str> {
    STATUSES
        .iter()
        .rev()
        .find(|(_, event)| effects.contains_key(&(order.to_owned(), (*event).to_owned())))
        .map(|(status, _)| *status)
}

fn summaries_match_a_replay(
    store: &dyn Store,
    effects: &HashMap<(String, String), usize>,
    orders: &[Order],
) -> Option<String> {
    let wrong: Vec<String> = orders
        .iter()
        .map(|order| &order.id)
        .filter_map(|order| {
            let document = store.document("order_summaries", order).unwrap();
            let status = document.map(|d| {
                serde_json::from_str::<Value>(&d).unwrap()["status"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned()
            });
            let replayed = replayed_status(effects, order);
            (status.as_deref() != replayed)
                .then(|| format!("{order}: {status:?}, replay {replayed:?}"))
        })
        .collect();
    (!wrong.is_empty()).then(|| {
        format!(
            "order_summaries: {} of {} differ from a replay, e.g. {:?}",
            wrong.len(),
            orders.len(),
            &wrong[..wrong.len().min(5)]
        )
    })
}

/// The reporting instance's totals: one document every order updates twice.
fn totals_match_a_replay(
    store: &dyn Store,
    effects: &HashMap<(String, String), usize>,
) -> Option<String> {
    let count = |t: &str| {
        effects
            .iter()
            .filter(|((_, ty), _)| ty == t)
            .map(|(_, n)| n)
            .sum::<usize>() as u64
    };
    let (placed, shipped) = (
        count("Fulfilment.OrderPlaced.v1"),
        count("Fulfilment.OrderShipped.v1"),
    );
    let totals: Value = store
        .document("totals", "all")
        .unwrap()
        .map_or(Value::Null, |d| serde_json::from_str(&d).unwrap());
    let kept = (totals["placed"].as_u64(), totals["shipped"].as_u64());
    (kept != (Some(placed), Some(shipped))).then(|| {
        format!("totals: placed/shipped {kept:?}, replay ({placed}, {shipped}): updates lost or doubled")
    })
}

fn nothing_left(store: &dyn Store, redis: Option<&RedisServer>) -> Vec<String> {
    let mut left = Vec::new();
    let dead = store.dead_letters(None).unwrap();
    if !dead.is_empty() {
        left.push(format!(
            "{} dead letters, e.g. {}",
            dead.len(),
            dead[0].error
        ));
    }
    if let Some(redis) = redis {
        let counts = store
            .outbox()
            .expect("a store with a broker keeps an outbox")
            .counts(3)
            .unwrap();
        if counts.pending > 0 {
            left.push(format!(
                "outbox: {counts:?} (committed messages never published)"
            ));
        }
        let pending = redis.pending();
        if pending > 0 {
            left.push(format!(
                "{pending} broker entries delivered and never acknowledged"
            ));
        }
    }
    left
}
