//! Checks on the sample flow's effects in a store.

use protean_host::store::Store;

/// How many messages of `message_type` the store holds in `category`.
pub fn count_of(store: &dyn Store, category: &str, message_type: &str) -> usize {
    let messages = store
        .read_categories(&[category.into()], 0, usize::MAX)
        .unwrap();
    messages
        .iter()
        .filter(|m| m.message_type == message_type)
        .count()
}

/// Every order went through the whole flow exactly once: each effect appears once per order.
#[track_caller]
pub fn each_order_exactly_once(store: &dyn Store, orders: usize) {
    for (category, message_type) in [
        ("fulfilment::order", "Fulfilment.OrderPlaced.v1"),
        ("fulfilment::order", "Fulfilment.OrderShipped.v1"),
        ("fulfilment::reservation", "Fulfilment.StockReserved.v1"),
        ("fulfilment::payment", "Fulfilment.PaymentProcessed.v1"),
        (
            "fulfilment::payment:command",
            "Fulfilment.ProcessPayment.v1",
        ),
        ("fulfilment::order:command", "Fulfilment.ShipOrder.v1"),
    ] {
        assert_eq!(
            count_of(store, category, message_type),
            orders,
            "{message_type} exactly once per order"
        );
    }
    assert!(store.dead_letters(None).unwrap().is_empty());
}
