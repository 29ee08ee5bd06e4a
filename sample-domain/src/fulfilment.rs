//! The fulfilment domain: orders, reservations, payments, and the process that ships a paid order.

use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

/// An order, rebuilt from its events.
#[derive(Debug, Default, Aggregate)]
#[aggregate(category = "order", applies(OrderPlaced, OrderShipped))]
pub struct Order {
    /// `placed`, then `shipped`.
    pub status: String,
    /// What it costs.
    pub total: f64,
}

impl Apply<OrderPlaced> for Order {
    fn apply(&mut self, placed: OrderPlaced) {
        self.status = "placed".into();
        self.total = placed.total;
    }
}

impl Apply<OrderShipped> for Order {
    fn apply(&mut self, _: OrderShipped) {
        self.status = "shipped".into();
    }
}

/// A stock reservation for one order.
#[derive(Debug, Default, Aggregate)]
pub struct Reservation;

/// The payment of one order.
#[derive(Debug, Default, Aggregate)]
#[aggregate(applies(PaymentProcessed))]
pub struct Payment {
    /// Whether the payment went through.
    pub paid: bool,
}

impl Apply<PaymentProcessed> for Payment {
    fn apply(&mut self, _: PaymentProcessed) {
        self.paid = true;
    }
}

/// `Fulfilment.PlaceOrder.v1`: a customer orders `quantity` of `sku`.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Command)]
#[command(aggregate = Order, target = order_id)]
pub struct PlaceOrder {
    pub order_id: String,
    pub customer: String,
    pub sku: String,
    pub quantity: u32,
    pub total: f64,
}

/// `Fulfilment.ShipOrder.v1`: the process ships a paid order.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Command)]
#[command(aggregate = Order, target = order_id)]
pub struct ShipOrder {
    pub order_id: String,
}

/// `Fulfilment.ProcessPayment.v1`: billing charges an order.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Command)]
#[command(aggregate = Payment, target = order_id)]
pub struct ProcessPayment {
    pub order_id: String,
    pub amount: f64,
}

/// `Fulfilment.OrderPlaced.v1`.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer: String,
    pub sku: String,
    pub quantity: u32,
    pub total: f64,
}

/// `Fulfilment.OrderShipped.v1`.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
pub struct OrderShipped {
    pub order_id: String,
}

/// `Fulfilment.StockReserved.v1`, in the reservation's stream (id = the order's).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(aggregate = Reservation)]
pub struct StockReserved {
    pub order_id: String,
    pub sku: String,
    pub quantity: u32,
}

/// `Fulfilment.PaymentProcessed.v1`, in the payment's stream (id = the order's).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(aggregate = Payment)]
pub struct PaymentProcessed {
    pub order_id: String,
    pub amount: f64,
}

/// A reservation of stock for an order (read model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Document)]
#[document(collection = "reservations")]
pub struct ReservationDoc {
    /// `res-{order_id}`.
    pub id: String,
    /// The order it reserves for.
    pub order_id: String,
    /// What is reserved.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Which warehouse holds it (the one the domain was built for).
    #[serde(default)]
    pub warehouse: String,
}

/// Where an order stands (read model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Document)]
#[document(collection = "order_summaries", id = order_id)]
pub struct OrderSummary {
    /// The order.
    pub order_id: String,
    /// `placed`, `reserved`, `paid`, `shipped`.
    pub status: String,
}

fn place_order(command: PlaceOrder, ctx: &mut Context) -> HandlerResult {
    if command.quantity == 0 {
        return Err(HandlerError::reject(format!(
            "order {} has no items",
            command.order_id
        )));
    }
    if ctx.load::<Order>(&command.order_id)?.is_some() {
        log::info!(
            "order {} was already placed; ignoring the repeat",
            command.order_id
        );
        return Ok(());
    }
    let PlaceOrder {
        order_id,
        customer,
        sku,
        quantity,
        total,
    } = command;
    ctx.raise(
        &order_id.clone(),
        &OrderPlaced {
            order_id,
            customer,
            sku,
            quantity,
            total,
        },
    )
}

fn ship_order(command: ShipOrder, ctx: &mut Context) -> HandlerResult {
    let Some(order) = ctx.load::<Order>(&command.order_id)? else {
        return Err(HandlerError::reject(format!(
            "cannot ship unknown order {}",
            command.order_id
        )));
    };
    if order.status == "shipped" {
        return Ok(());
    }
    ctx.raise(
        &command.order_id.clone(),
        &OrderShipped {
            order_id: command.order_id,
        },
    )
}

fn process_payment(command: ProcessPayment, ctx: &mut Context) -> HandlerResult {
    if ctx
        .load::<Payment>(&command.order_id)?
        .is_some_and(|p| p.paid)
    {
        return Ok(());
    }
    let ProcessPayment { order_id, amount } = command;
    ctx.raise(&order_id.clone(), &PaymentProcessed { order_id, amount })
}

/// A handler made from configuration: it reserves stock in `warehouse`.
fn reserve_stock_in(
    warehouse: &'static str,
) -> impl Fn(OrderPlaced, &mut Context) -> HandlerResult + Send + Sync + 'static {
    move |event, ctx| reserve_stock(warehouse, event, ctx)
}

fn reserve_stock(warehouse: &str, event: OrderPlaced, ctx: &mut Context) -> HandlerResult {
    let reservation = ReservationDoc {
        id: format!("res-{}", event.order_id),
        order_id: event.order_id.clone(),
        sku: event.sku.clone(),
        quantity: event.quantity,
        warehouse: warehouse.into(),
    };
    ctx.put(&reservation)?;
    let OrderPlaced {
        order_id,
        sku,
        quantity,
        ..
    } = event;
    ctx.raise(
        &order_id.clone(),
        &StockReserved {
            order_id,
            sku,
            quantity,
        },
    )
}

fn charge(event: StockReserved, ctx: &mut Context) -> HandlerResult {
    let reserved = ctx.find::<ReservationDoc>("order_id", &event.order_id)?;
    if reserved.is_empty() {
        return Err(HandlerError::retry(format!(
            "no reservation found for order {}",
            event.order_id
        )));
    }
    let Some(order) = ctx.load::<Order>(&event.order_id)? else {
        return Err(HandlerError::reject(format!(
            "stock reserved for unknown order {}",
            event.order_id
        )));
    };
    ctx.send(&ProcessPayment {
        order_id: event.order_id,
        amount: order.total,
    })
}

/// The state of one fulfilment process.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Fulfilment {
    /// Whether stock is reserved.
    pub reserved: bool,
    /// Whether the payment went through.
    pub paid: bool,
}

// Steps and handlers take only what they use: these two need no context.
fn fulfilment_started(state: &mut Fulfilment, event: OrderPlaced) {
    log::debug!("fulfilment of order {} started", event.order_id);
    *state = Fulfilment::default();
}

fn fulfilment_reserved(state: &mut Fulfilment, _: StockReserved) {
    state.reserved = true;
}

fn fulfilment_paid(
    state: &mut Fulfilment,
    event: PaymentProcessed,
    ctx: &mut Context,
) -> HandlerResult {
    state.paid = true;
    ctx.send(&ShipOrder {
        order_id: event.order_id,
    })
}

fn fulfilment_done(_: &mut Fulfilment, event: OrderShipped) {
    log::info!("order {} shipped", event.order_id);
}

/// The order's statuses, in the order they happen.
const STATUSES: [&str; 4] = ["placed", "reserved", "paid", "shipped"];

/// Move the summary forward, never back. The projector reads each category in its own subscription, so
/// `OrderShipped` (order category) may be projected before `PaymentProcessed` (payment category):
/// a projection fed by several categories must not depend on their relative order.
fn summarise(ctx: &mut Context, order_id: String, status: &str) -> HandlerResult {
    let rank = |s: &str| STATUSES.iter().position(|known| *known == s);
    if let Some(current) = ctx.get::<OrderSummary>(&order_id)? {
        if rank(&current.status) >= rank(status) {
            return Ok(());
        }
    }
    ctx.put(&OrderSummary {
        order_id,
        status: status.into(),
    })
}

fn summary_placed(event: OrderPlaced, ctx: &mut Context) -> HandlerResult {
    summarise(ctx, event.order_id, "placed")
}

fn summary_reserved(event: StockReserved, ctx: &mut Context) -> HandlerResult {
    summarise(ctx, event.order_id, "reserved")
}

fn summary_paid(event: PaymentProcessed, ctx: &mut Context) -> HandlerResult {
    summarise(ctx, event.order_id, "paid")
}

fn summary_shipped(event: OrderShipped, ctx: &mut Context) -> HandlerResult {
    summarise(ctx, event.order_id, "shipped")
}

/// The fulfilment domain, reserving stock in the `main` warehouse.
pub fn domain() -> Domain {
    in_warehouse("main")
}

/// The fulfilment domain, reserving stock in `warehouse`.
pub fn in_warehouse(warehouse: &'static str) -> Domain {
    Domain::new("Fulfilment")
        .command_handler(
            CommandHandler::<Order>::new("orders")
                .on(place_order)
                .on(ship_order),
        )
        .command_handler(CommandHandler::<Payment>::new("payments").on(process_payment))
        .event_handler(EventHandler::new("inventory").on(reserve_stock_in(warehouse)))
        .event_handler(EventHandler::new("billing").on(charge))
        .process_manager(
            ProcessManager::<Fulfilment>::new("fulfilment", "order_id")
                .start(fulfilment_started)
                .on(fulfilment_reserved)
                .on(fulfilment_paid)
                .end(fulfilment_done),
        )
        .projector(
            Projector::new("order_summary")
                .on(summary_placed)
                .on(summary_reserved)
                .on(summary_paid)
                .on(summary_shipped),
        )
}

#[cfg(test)]
mod tests {
    use protean_plugin_api::testing::TestHost;

    use super::*;

    fn placed(id: &str) -> OrderPlaced {
        OrderPlaced {
            order_id: id.into(),
            customer: "ada".into(),
            sku: "book".into(),
            quantity: 2,
            total: 30.0,
        }
    }

    #[test]
    fn placing_an_order_raises_order_placed_once() {
        let host = TestHost::new(domain());
        let place = PlaceOrder {
            order_id: "o1".into(),
            customer: "ada".into(),
            sku: "book".into(),
            quantity: 2,
            total: 30.0,
        };
        host.handle_command("orders", &place).unwrap();
        host.handle_command("orders", &place).unwrap();
        let events = host.events::<Order>("o1");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].message_type, "Fulfilment.OrderPlaced.v1");
        assert_eq!(events[0].stream, "fulfilment::order-o1");
    }

    #[test]
    fn an_empty_order_is_rejected_for_good() {
        let host = TestHost::new(domain());
        let place = PlaceOrder {
            order_id: "o1".into(),
            customer: "ada".into(),
            sku: "book".into(),
            quantity: 0,
            total: 0.0,
        };
        let error = host.handle_command("orders", &place).unwrap_err();
        assert!(!error.is_retryable());
        assert!(host.events::<Order>("o1").is_empty());
    }

    #[test]
    fn an_order_reserves_stock() {
        let host = TestHost::new(domain());
        host.handle_event("inventory", "o1", &placed("o1")).unwrap();
        let reservation = host.document::<ReservationDoc>("res-o1").unwrap();
        assert_eq!(reservation.order_id, "o1");
        assert_eq!(
            host.events::<Reservation>("o1")[0].message_type,
            "Fulfilment.StockReserved.v1"
        );
    }

    #[test]
    fn billing_charges_the_order_total() {
        let host = TestHost::new(domain());
        host.given("o1", &placed("o1"));
        host.handle_event("inventory", "o1", &placed("o1")).unwrap();
        let reserved = StockReserved {
            order_id: "o1".into(),
            sku: "book".into(),
            quantity: 2,
        };
        host.handle_event("billing", "o1", &reserved).unwrap();
        let commands = host.commands();
        assert_eq!(commands[0].stream, "fulfilment::payment:command-o1");
        assert_eq!(commands[0].data["amount"], 30.0);
    }

    #[test]
    fn the_summary_never_moves_back() {
        let host = TestHost::new(domain());
        host.handle_event(
            "order_summary",
            "o1",
            &OrderShipped {
                order_id: "o1".into(),
            },
        )
        .unwrap();
        let paid = PaymentProcessed {
            order_id: "o1".into(),
            amount: 30.0,
        };
        host.handle_event("order_summary", "o1", &paid).unwrap();
        assert_eq!(
            host.document::<OrderSummary>("o1").unwrap().status,
            "shipped"
        );
    }

    #[test]
    fn the_process_ships_a_paid_order_and_then_ends() {
        let host = TestHost::new(domain());
        let paid = PaymentProcessed {
            order_id: "o1".into(),
            amount: 30.0,
        };
        host.handle_event("fulfilment", "o1", &paid).unwrap();
        assert!(
            host.commands().is_empty(),
            "a process that has not started ignores events"
        );
        host.handle_event("fulfilment", "o1", &placed("o1"))
            .unwrap();
        host.handle_event("fulfilment", "o1", &paid).unwrap();
        assert_eq!(host.commands()[0].message_type, "Fulfilment.ShipOrder.v1");
        host.handle_event(
            "fulfilment",
            "o1",
            &OrderShipped {
                order_id: "o1".into(),
            },
        )
        .unwrap();
        host.handle_event("fulfilment", "o1", &paid).unwrap();
        assert_eq!(host.commands().len(), 1, "an ended process ignores events");
    }
}
