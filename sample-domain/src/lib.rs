//! Order fulfilment, the reference domain of protean-host.
//!
//! `PlaceOrder` → `OrderPlaced` → stock reserved (a `Reservation` document, found by order id) →
//! payment processed → `ShipOrder` → `OrderShipped`, with an order-summary read model whose status ends
//! `"shipped"`. A second instance, `reporting`, keeps totals of the same events.

pub mod fulfilment;
pub mod reporting;

protean_plugin_api::export_domains! {
    "domain" => fulfilment::domain,
    "reporting" => reporting::domain,
}
