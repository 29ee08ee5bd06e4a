//! The `reporting` instance: totals over the fulfilment events, kept by a projector of its own.

use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fulfilment::{OrderPlaced, OrderShipped};

/// Order counts (read model, one document `all`).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, Document)]
#[document(collection = "totals")]
pub struct Totals {
    /// Always `all`.
    pub id: String,
    /// Orders placed.
    pub placed: u64,
    /// Orders shipped.
    pub shipped: u64,
    /// Sum of placed order totals.
    pub revenue: f64,
}

fn totals(ctx: &Context) -> Result<Totals, HandlerError> {
    Ok(ctx.get::<Totals>("all")?.unwrap_or(Totals {
        id: "all".into(),
        ..Totals::default()
    }))
}

fn count_placed(event: OrderPlaced, ctx: &mut Context) -> HandlerResult {
    let mut t = totals(ctx)?;
    t.placed += 1;
    t.revenue += event.total;
    ctx.put(&t)
}

fn count_shipped(_: OrderShipped, ctx: &mut Context) -> HandlerResult {
    let mut t = totals(ctx)?;
    t.shipped += 1;
    ctx.put(&t)
}

/// The reporting instance (same domain name, so it reads the fulfilment streams).
pub fn domain() -> Domain {
    Domain::new("Fulfilment").projector(Projector::new("totals").on(count_placed).on(count_shipped))
}
