//! The fulfilment domain: orders, reservations, payments, and the process that ships a paid order,
//! or cancels one not paid in time.
//!
//! Two settings come from the environment, read when an instance is created:
//! `FULFILMENT_PAYMENT_TIMEOUT_SECONDS` (default 900: an order not paid within 15 minutes of being
//! placed is cancelled) and `FULFILMENT_CREDIT_LIMIT` (default: none; a larger payment is declined,
//! and its order is cancelled when the timeout comes).

use std::time::Duration;

use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

/// An order, rebuilt from its events.
#[derive(Debug, Default, Aggregate)]
#[aggregate(category = "order", applies(OrderPlaced, OrderShipped, OrderCancelled))]
pub struct Order {
    /// `placed`, then `shipped` or `cancelled`.
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

impl Apply<OrderCancelled> for Order {
    fn apply(&mut self, _: OrderCancelled) {
        self.status = "cancelled".into();
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

/// `Fulfilment.CancelOrder.v1`: the process cancels an order not paid in time.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Command)]
#[command(aggregate = Order, target = order_id)]
pub struct CancelOrder {
    pub order_id: String,
    pub reason: String,
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

/// `Fulfilment.OrderCancelled.v1`.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
pub struct OrderCancelled {
    pub order_id: String,
    pub reason: String,
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

/// `Fulfilment.PaymentDeclined.v1`, in the payment's stream: over the credit limit.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(aggregate = Payment)]
pub struct PaymentDeclined {
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
    /// `placed`, `reserved`, `paid`, `shipped`, or `cancelled`.
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

fn cancel_order(command: CancelOrder, ctx: &mut Context) -> HandlerResult {
    let Some(order) = ctx.load::<Order>(&command.order_id)? else {
        return Err(HandlerError::reject(format!(
            "cannot cancel unknown order {}",
            command.order_id
        )));
    };
    // A shipped order stays shipped; a cancelled one is cancelled once.
    if order.status != "placed" {
        return Ok(());
    }
    let CancelOrder { order_id, reason } = command;
    log::info!("order {order_id} cancelled: {reason}");
    ctx.raise(&order_id.clone(), &OrderCancelled { order_id, reason })
}

/// A payment handler that declines payments over `limit`.
fn process_payment_up_to(
    limit: f64,
) -> impl Fn(ProcessPayment, &mut Context) -> HandlerResult + Send + Sync + 'static {
    move |command, ctx| process_payment(limit, command, ctx)
}

fn process_payment(limit: f64, command: ProcessPayment, ctx: &mut Context) -> HandlerResult {
    if ctx
        .load::<Payment>(&command.order_id)?
        .is_some_and(|p| p.paid)
    {
        return Ok(());
    }
    let ProcessPayment { order_id, amount } = command;
    if amount > limit {
        return ctx.raise(&order_id.clone(), &PaymentDeclined { order_id, amount });
    }
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

/// A process step made from configuration: the fulfilment starts, and the order is cancelled if it is
/// not paid within `timeout`.
fn fulfilment_started_with(
    timeout: Duration,
) -> impl Fn(&mut Fulfilment, OrderPlaced, &mut Context) -> HandlerResult + Send + Sync + 'static {
    move |state, event, ctx| fulfilment_started(timeout, state, event, ctx)
}

fn fulfilment_started(
    timeout: Duration,
    state: &mut Fulfilment,
    event: OrderPlaced,
    ctx: &mut Context,
) -> HandlerResult {
    log::debug!("fulfilment of order {} started", event.order_id);
    *state = Fulfilment::default();
    let reason = format!("not paid within {} s", timeout.as_secs());
    let cancel = CancelOrder {
        order_id: event.order_id,
        reason,
    };
    ctx.set_timeout(PAYMENT, timeout, &cancel)
}

/// The process's timeout for the payment.
const PAYMENT: &str = "payment";

// Steps and handlers take only what they use: this one needs no context.
fn fulfilment_reserved(state: &mut Fulfilment, _: StockReserved) {
    state.reserved = true;
}

fn fulfilment_paid(
    state: &mut Fulfilment,
    event: PaymentProcessed,
    ctx: &mut Context,
) -> HandlerResult {
    state.paid = true;
    ctx.cancel_timeout(PAYMENT)?;
    ctx.send(&ShipOrder {
        order_id: event.order_id,
    })
}

fn fulfilment_done(_: &mut Fulfilment, event: OrderShipped) {
    log::info!("order {} shipped", event.order_id);
}

fn fulfilment_cancelled(_: &mut Fulfilment, event: OrderCancelled) {
    log::info!("order {} cancelled", event.order_id);
}

/// The order's statuses, in the order they happen; `cancelled` ends an order that was never paid.
const STATUSES: [&str; 5] = ["placed", "reserved", "paid", "shipped", "cancelled"];

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

fn summary_cancelled(event: OrderCancelled, ctx: &mut Context) -> HandlerResult {
    summarise(ctx, event.order_id, "cancelled")
}

/// A setting from the environment: `default` when unset; an unreadable value is the constructor's
/// panic, which the host reports as the instance failing to start, naming it.
fn setting(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?} is not a number: {e}")),
        Err(_) => default,
    }
}

/// The fulfilment domain, reserving stock in the `main` warehouse.
pub fn domain() -> Domain {
    in_warehouse("main")
}

/// What an instance of the domain is told when it is created.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// An order not paid this long after it was placed is cancelled.
    pub payment_timeout: Duration,
    /// A payment over this is declined.
    pub credit_limit: f64,
}

impl Settings {
    /// `FULFILMENT_PAYMENT_TIMEOUT_SECONDS` (default 900) and `FULFILMENT_CREDIT_LIMIT` (default none).
    pub fn from_env() -> Self {
        Self {
            payment_timeout: Duration::from_secs_f64(setting(
                "FULFILMENT_PAYMENT_TIMEOUT_SECONDS",
                900.0,
            )),
            credit_limit: setting("FULFILMENT_CREDIT_LIMIT", f64::INFINITY),
        }
    }
}

/// The fulfilment domain, reserving stock in `warehouse`, with its settings from the environment.
pub fn in_warehouse(warehouse: &'static str) -> Domain {
    with_settings(warehouse, Settings::from_env())
}

/// The fulfilment domain, reserving stock in `warehouse`, with `settings`.
pub fn with_settings(warehouse: &'static str, settings: Settings) -> Domain {
    let Settings {
        payment_timeout: timeout,
        credit_limit: limit,
    } = settings;
    Domain::new("Fulfilment")
        .command_handler(
            CommandHandler::<Order>::new("orders")
                .on(place_order)
                .on(ship_order)
                .on(cancel_order),
        )
        .command_handler(
            CommandHandler::<Payment>::new("payments").on(process_payment_up_to(limit)),
        )
        .event_handler(EventHandler::new("inventory").on(reserve_stock_in(warehouse)))
        .event_handler(
            EventHandler::new("billing")
                .on(charge)
                .finds::<ReservationDoc>("order_id", "order_id")
                .reads_aggregate::<Order>("order_id"),
        )
        .process_manager(
            ProcessManager::<Fulfilment>::new("fulfilment", "order_id")
                .start(fulfilment_started_with(timeout))
                .on(fulfilment_reserved)
                .on(fulfilment_paid)
                .end(fulfilment_done)
                .end(fulfilment_cancelled),
        )
        .projector(
            Projector::new("order_summary")
                .on(summary_placed)
                .on(summary_reserved)
                .on(summary_paid)
                .on(summary_shipped)
                .on(summary_cancelled)
                .reads_document::<OrderSummary>("order_id"),
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

    #[test]
    fn an_order_not_paid_within_the_timeout_is_cancelled_by_the_process() {
        let host = TestHost::new(domain());
        host.handle_event("fulfilment", "o1", &placed("o1"))
            .unwrap();
        let [timeout] = host.scheduled().try_into().unwrap();
        assert_eq!(timeout.key, "fulfilment::pm::fulfilment::o1::payment");
        assert!(host.advance(Duration::from_secs(899)).is_empty());
        let [cancel] = host.advance(Duration::from_secs(1)).try_into().unwrap();
        assert_eq!(cancel.message_type, "Fulfilment.CancelOrder.v1");
        assert_eq!(cancel.stream, "fulfilment::order:command-o1");
        assert_eq!(cancel.data["reason"], "not paid within 900 s");
        host.given("o1", &placed("o1"));
        let cancel: CancelOrder = serde_json::from_value(cancel.data).unwrap();
        host.handle_command("orders", &cancel).unwrap();
        let events = host.events::<Order>("o1");
        assert_eq!(
            events.last().unwrap().message_type,
            "Fulfilment.OrderCancelled.v1"
        );
        let cancelled = OrderCancelled {
            order_id: "o1".into(),
            reason: cancel.reason,
        };
        host.handle_event("fulfilment", "o1", &cancelled).unwrap();
        let paid = PaymentProcessed {
            order_id: "o1".into(),
            amount: 30.0,
        };
        host.handle_event("fulfilment", "o1", &paid).unwrap();
        let sent: Vec<String> = host
            .commands()
            .into_iter()
            .map(|c| c.message_type)
            .collect();
        assert_eq!(
            sent,
            ["Fulfilment.CancelOrder.v1"],
            "a cancelled order's process ships nothing"
        );
    }

    #[test]
    fn a_paid_order_never_times_out() {
        let host = TestHost::new(domain());
        host.handle_event("fulfilment", "o1", &placed("o1"))
            .unwrap();
        let paid = PaymentProcessed {
            order_id: "o1".into(),
            amount: 30.0,
        };
        host.handle_event("fulfilment", "o1", &paid).unwrap();
        assert!(host.scheduled().is_empty());
        assert!(host.advance(Duration::from_secs(86_400)).is_empty());
    }

    #[test]
    fn a_payment_over_the_credit_limit_is_declined_and_a_shipped_order_is_not_cancelled() {
        let settings = Settings {
            payment_timeout: Duration::from_secs(60),
            credit_limit: 1_000_000.0,
        };
        let host = TestHost::new(with_settings("main", settings));
        let charge = ProcessPayment {
            order_id: "o1".into(),
            amount: 2_000_000.0,
        };
        host.handle_command("payments", &charge).unwrap();
        let events = host.events::<Payment>("o1");
        assert_eq!(events[0].message_type, "Fulfilment.PaymentDeclined.v1");
        host.given("o2", &placed("o2"));
        host.given(
            "o2",
            &OrderShipped {
                order_id: "o2".into(),
            },
        );
        let late = CancelOrder {
            order_id: "o2".into(),
            reason: "late".into(),
        };
        host.handle_command("orders", &late).unwrap();
        assert_eq!(host.events::<Order>("o2").len(), 2, "nothing raised");
    }
}
