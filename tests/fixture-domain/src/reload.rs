//! Builds for the hot-reload tests, each exporting only instance `domain`, so the host reloading the
//! sample domain's `domain` can be handed them:
//!
//! - feature `reload-test-variant`: the sample's fulfilment domain, visibly different: stock reserved
//!   in the `north` warehouse (the sample reserves in `main`), and one more handler, `audit`, whose
//!   subscription a reload starts;
//! - feature `reload-test-panic`: a constructor that panics.
//!
//! The sample's fulfilment module is compiled into this crate from its source, not linked as a
//! dependency: its library exports the same ABI symbols as this one.

use protean_plugin_api::prelude::*;

// Only `in_warehouse` and the message types are used here.
#[cfg(feature = "reload-test-variant")]
#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../../../sample-domain/src/fulfilment.rs"]
mod fulfilment;

/// The sample's fulfilment, reserving in `north`, with an `audit` handler.
#[cfg(feature = "reload-test-variant")]
pub fn domain() -> Domain {
    fulfilment::in_warehouse("north").event_handler(EventHandler::new("audit").on(audit))
}

#[cfg(feature = "reload-test-variant")]
fn audit(event: fulfilment::OrderShipped, _: &mut Context) -> HandlerResult {
    log::debug!("audited shipment of {}", event.order_id);
    Ok(())
}

/// A constructor that panics: the host must refuse this build and keep the running one.
#[cfg(not(feature = "reload-test-variant"))]
pub fn domain() -> Domain {
    panic!("this build's constructor panics on purpose (feature reload-test-panic)");
}
