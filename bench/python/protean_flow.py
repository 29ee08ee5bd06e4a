"""The peer of protean-bench: the sample order flow on Python Protean 0.18.0 with its Redis broker.

    python protean_flow.py --redis-port P --orders N [--time-limit SECONDS]

Prints ONE JSON line on stdout:

    {"orders": N, "shipped": K, "messages": M, "distinct_messages": D, "seconds": S,
     "messages_per_s": X, "orders_per_s": Y, ...}

and exits 0 when every order shipped; otherwise exits 1 with one line on stderr saying how far it got.

The domain is the Fulfilment flow of protean-host's sample domain (sample-domain/src/fulfilment.rs), written the way
Protean writes it:

    PlaceOrder ─▶ OrderCommands ─▶ OrderPlaced ─▶ Inventory: saves a Reservation, which raises StockReserved
                                                  ─▶ Billing: finds the reservation, loads the order,
                                                     sends ProcessPayment ─▶ PaymentCommands ─▶ PaymentProcessed
    Fulfilment (process manager) on order, reservation and payment events: PaymentProcessed ─▶ sends ShipOrder
    ShipOrder ─▶ OrderCommands ─▶ OrderShipped.  OrderSummaries (projector) keeps OrderSummary up to date.

Configuration: the one Protean's "Going Async" tutorial chapter gives for Redis
(https://docs.proteanhq.com/guides/getting-started/tutorial/12-going-async): `brokers.default` provider `redis`,
`event_processing = "async"`, `enable_outbox`, `server.default_subscription_type = "stream"`,
`server.messages_per_tick = 100`, `server.stream_subscription` as printed there, the event store on `memory` as
there. Two departures, both forced (the README's Benchmarks section says so too):

- `command_processing = "sync"`, not "async". In 0.18 an asynchronous command is only appended to the event store
  (domain/command_processor.py), while with `default_subscription_type = "stream"` the engine's command subscription
  reads the Redis stream `fulfilment::order:command`, which nothing ever writes: the documented configuration
  never handles a single command (tried: 0 of 20 orders in 20 s). Switching the command handlers to
  `subscription_type="event_store"` does run them, but on the memory event store that subscription reads back its
  own position and failed-position records as commands and fails on them in a growing cascade. So commands are
  handled in-process where they are sent (`domain.process`): PlaceOrder by this script, inside the timed window;
  ProcessPayment inside the Billing handler; ShipOrder inside the process manager. Every event still goes through
  the outbox, Redis Streams and the Engine's stream subscriptions, as the issue asks ("its event handlers on its
  Redis broker").
- The database is SQLite (Protean's SQLAlchemy provider, a file in a temporary directory), where the tutorial has
  PostgreSQL: Protean's default in-memory database deep-copies all its data at every unit of work, which made the
  run quadratic in the number of orders (50 orders 26 s, 100 orders 103 s). protean-host's flow also runs on
  SQLite. The memory event store, which the tutorial does use, has the same deep copy, so the rate still falls as
  the run grows (50 orders ~19 s, 100 orders ~79 s): the benchmark uses a modest number of orders, which favours
  Protean.

How it runs: Protean's own `Engine(domain).run()` (the production mode of `protean server`; not test mode, whose
fixed idle waits and 5 s cap would distort the figure) runs the outbox processor publishing to Redis and one stream
subscription per handler and category consuming from it. The clock starts just before the N PlaceOrder commands are
processed (each commits an Order and its OrderPlaced outbox row), then the engine runs; a watcher task on the
engine's loop checks every 10 ms whether the projection has seen every order shipped, stops the clock and calls
`engine.shutdown()`. Interpreter start, imports, domain and table set-up, and the shutdown are outside the clock.
"""

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time

import protean
from protean import Domain, handle
from protean.core.projector import on
from protean.fields import Float, Identifier, Integer, String
from protean.server import Engine
from protean.utils.globals import current_domain

assert protean.__version__ == "0.18.0", protean.__version__

# Handler invocations, by handler: "messages" in the output is their sum (every command or event a handler
# handled). A message consumed by three handlers counts three times, as in protean-host's own count of handled
# deliveries. `distinct_messages` counts each command and event once.
HANDLED: dict[str, int] = {}
SHIPPED: set[str] = set()


def count(name: str) -> None:
    HANDLED[name] = HANDLED.get(name, 0) + 1


def build_domain(redis_uri: str, database_uri: str) -> Domain:
    domain = Domain(
        name="Fulfilment",
        config={
            "databases": {"default": {"provider": "sqlite", "database_uri": database_uri}},
            "brokers": {"default": {"provider": "redis", "URI": redis_uri}},
            "event_processing": "async",
            "command_processing": "sync",
            "enable_outbox": True,
            "event_store": {"provider": "memory"},
            "server": {
                "default_subscription_type": "stream",
                "messages_per_tick": 100,
                # The health HTTP server is beside the point here, and its fixed port 8080 may be taken.
                "health": {"enabled": False},
                "stream_subscription": {
                    "blocking_timeout_ms": 100,
                    "max_retries": 3,
                    "retry_delay_seconds": 1,
                    "enable_dlq": True,
                },
            },
        },
    )

    # --- aggregates and their events -----------------------------------------------------------------------------

    @domain.event(part_of="Order")
    class OrderPlaced:
        order_id = Identifier()
        customer = String()
        sku = String()
        quantity = Integer()
        total = Float()

    @domain.event(part_of="Order")
    class OrderShipped:
        order_id = Identifier()

    @domain.aggregate
    class Order:
        order_id = Identifier(identifier=True)
        customer = String()
        sku = String()
        quantity = Integer()
        total = Float()
        status = String(default="placed")

    @domain.event(part_of="Reservation")
    class StockReserved:
        order_id = Identifier()
        sku = String()
        quantity = Integer()

    # The Reservation document of the Rust flow; an aggregate here because in Protean that is what a handler saves
    # (and what raises StockReserved).
    @domain.aggregate
    class Reservation:
        reservation_id = Identifier(identifier=True)
        order_id = Identifier()
        sku = String()
        quantity = Integer()
        warehouse = String(default="main")

    @domain.event(part_of="Payment")
    class PaymentProcessed:
        order_id = Identifier()
        amount = Float()

    @domain.aggregate
    class Payment:
        order_id = Identifier(identifier=True)
        amount = Float()
        paid = String(default="no")

    # --- commands and their handlers -----------------------------------------------------------------------------

    @domain.command(part_of=Order)
    class PlaceOrder:
        order_id = Identifier(identifier=True)
        customer = String()
        sku = String()
        quantity = Integer()
        total = Float()

    @domain.command(part_of=Order)
    class ShipOrder:
        order_id = Identifier(identifier=True)

    @domain.command(part_of=Payment)
    class ProcessPayment:
        order_id = Identifier(identifier=True)
        amount = Float()

    @domain.command_handler(part_of=Order)
    class OrderCommands:
        @handle(PlaceOrder)
        def place(self, command: PlaceOrder):
            count("OrderCommands")
            repo = current_domain.repository_for(Order)
            if command.quantity == 0:
                raise ValueError(f"order {command.order_id} has no items")
            order = Order(
                order_id=command.order_id,
                customer=command.customer,
                sku=command.sku,
                quantity=command.quantity,
                total=command.total,
            )
            order.raise_(
                OrderPlaced(
                    order_id=command.order_id,
                    customer=command.customer,
                    sku=command.sku,
                    quantity=command.quantity,
                    total=command.total,
                )
            )
            repo.add(order)

        @handle(ShipOrder)
        def ship(self, command: ShipOrder):
            count("OrderCommands")
            repo = current_domain.repository_for(Order)
            order = repo.get(command.order_id)
            if order.status == "shipped":
                return
            order.status = "shipped"
            order.raise_(OrderShipped(order_id=command.order_id))
            repo.add(order)

    @domain.command_handler(part_of=Payment)
    class PaymentCommands:
        @handle(ProcessPayment)
        def pay(self, command: ProcessPayment):
            count("PaymentCommands")
            payment = Payment(order_id=command.order_id, amount=command.amount, paid="yes")
            payment.raise_(PaymentProcessed(order_id=command.order_id, amount=command.amount))
            current_domain.repository_for(Payment).add(payment)

    # --- event handlers ------------------------------------------------------------------------------------------

    @domain.event_handler(part_of=Order)
    class Inventory:
        @handle(OrderPlaced)
        def reserve_stock(self, event: OrderPlaced):
            count("Inventory")
            reservation = Reservation(
                reservation_id=f"res-{event.order_id}",
                order_id=event.order_id,
                sku=event.sku,
                quantity=event.quantity,
            )
            reservation.raise_(StockReserved(order_id=event.order_id, sku=event.sku, quantity=event.quantity))
            current_domain.repository_for(Reservation).add(reservation)

    @domain.event_handler(part_of=Reservation)
    class Billing:
        @handle(StockReserved)
        def charge(self, event: StockReserved):
            count("Billing")
            # As the Rust handler: find the reservation by order id (a query on a field, through the repository's
            # DAO as Protean's custom repositories do), then load the order for its total.
            reserved = current_domain.repository_for(Reservation)._dao.query.filter(order_id=event.order_id).all()
            if not reserved.items:
                raise RuntimeError(f"no reservation found for order {event.order_id}")
            order = current_domain.repository_for(Order).get(event.order_id)
            current_domain.process(ProcessPayment(order_id=event.order_id, amount=order.total))

    # --- process manager -----------------------------------------------------------------------------------------

    @domain.process_manager(stream_categories=["fulfilment::order", "fulfilment::reservation", "fulfilment::payment"])
    class Fulfilment:
        order_id = Identifier()
        reserved = String(default="no")
        paid = String(default="no")

        @handle(OrderPlaced, start=True, correlate="order_id")
        def started(self, event: OrderPlaced):
            count("Fulfilment")
            self.order_id = event.order_id

        @handle(StockReserved, correlate="order_id")
        def stock_reserved(self, event: StockReserved):
            count("Fulfilment")
            self.reserved = "yes"

        @handle(PaymentProcessed, correlate="order_id")
        def paid_for(self, event: PaymentProcessed):
            count("Fulfilment")
            self.paid = "yes"
            current_domain.process(ShipOrder(order_id=event.order_id))

        @handle(OrderShipped, correlate="order_id")
        def done(self, event: OrderShipped):
            count("Fulfilment")
            self.mark_as_complete()

    # --- projection ----------------------------------------------------------------------------------------------

    @domain.projection
    class OrderSummary:
        order_id = Identifier(identifier=True)
        status = String()

    statuses = ["placed", "reserved", "paid", "shipped"]

    @domain.projector(projector_for=OrderSummary, aggregates=[Order, Reservation, Payment])
    class OrderSummaries:
        # Move the summary forward, never back: the categories arrive on separate subscriptions, in any order
        # relative to each other (the same rule as the Rust projector).
        def summarise(self, order_id: str, status: str) -> None:
            count("OrderSummaries")
            repo = current_domain.repository_for(OrderSummary)
            try:
                current = repo.get(order_id)
            except Exception:  # noqa: BLE001 - ObjectNotFoundError: first status of this order
                current = None
            if current is not None and statuses.index(current.status) >= statuses.index(status):
                return
            if current is None:
                repo.add(OrderSummary(order_id=order_id, status=status))
            else:
                current.status = status
                repo.add(current)
            if status == "shipped":
                SHIPPED.add(order_id)

        @on(OrderPlaced)
        def placed(self, event: OrderPlaced):
            self.summarise(event.order_id, "placed")

        @on(StockReserved)
        def reserved(self, event: StockReserved):
            self.summarise(event.order_id, "reserved")

        @on(PaymentProcessed)
        def paid(self, event: PaymentProcessed):
            self.summarise(event.order_id, "paid")

        @on(OrderShipped)
        def shipped(self, event: OrderShipped):
            self.summarise(event.order_id, "shipped")

    domain.PlaceOrder = PlaceOrder  # for main()
    return domain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--orders", type=int, default=500)
    parser.add_argument("--time-limit", type=float, default=300.0, help="give up after this many seconds")
    args = parser.parse_args()

    # Protean logs every message it handles at INFO; the benchmark wants only warnings and errors.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    workdir = tempfile.mkdtemp(prefix="protean-peer-")
    domain = build_domain(f"redis://127.0.0.1:{args.redis_port}/0", f"sqlite:///{workdir}/protean.db")
    domain.init(traverse=False)
    for name in [n for n in logging.root.manager.loggerDict if n == "protean" or n.startswith("protean.")]:
        logging.getLogger(name).setLevel(logging.WARNING)

    with domain.domain_context():
        domain.setup_database()  # tables for the aggregates, the projection and the outbox
        engine = Engine(domain)
        outcome = {}

        # Protean has no "stop when done" in production mode: a task on the engine's own loop watches the
        # projection's tally and shuts the engine down the way a SIGTERM would.
        async def watch() -> None:
            while len(SHIPPED) < args.orders and time.perf_counter() - started < args.time_limit:
                await asyncio.sleep(0.01)
            outcome["seconds"] = time.perf_counter() - started
            await engine.shutdown()

        engine.loop.create_task(watch())
        started = time.perf_counter()
        for n in range(args.orders):
            domain.process(domain.PlaceOrder(order_id=f"o{n}", customer="ada", sku="book", quantity=1, total=10.0))
        engine.run()

    shutil.rmtree(workdir, ignore_errors=True)
    seconds = outcome.get("seconds", time.perf_counter() - started)
    shipped = len(SHIPPED)
    messages = sum(HANDLED.values())
    # 3 commands and 4 events per shipped order.
    result = {
        "orders": args.orders,
        "shipped": shipped,
        "messages": messages,
        "distinct_messages": 7 * shipped,
        "seconds": round(seconds, 3),
        "messages_per_s": round(messages / seconds, 1),
        "orders_per_s": round(shipped / seconds, 1),
        "handled_by": HANDLED,
        "protean": protean.__version__,
    }
    print(json.dumps(result))
    if shipped != args.orders:
        print(
            f"only {shipped} of {args.orders} orders shipped within {args.time_limit:.0f} s "
            f"(handled: {HANDLED}, engine exit code {engine.exit_code})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
