"""The real Python `protean` 0.18 against the store protean-host uses (PostgreSQL, MessageDB), live.

Run by tests/e2e/live.rs in the venv scripts/protean-venv makes:

    python protean_live.py write --uri URI --redis REDIS    # appends commands, raises an event
    python protean_live.py publish --uri URI --redis REDIS  # Protean's outbox processor: rows to Redis
    python protean_live.py place --uri URI --redis REDIS    # places o-5, which a shipment waited for
    python protean_live.py read --uri URI --redis REDIS     # reads and rehydrates what both wrote

`write` does what a Python service sharing the store does:
- `domain.process(PlaceOrder, asynchronous=True)` only appends the command to the store, with the order id
  as `metadata.headers.id`: for o-1 a rejected order (quantity 0) then the corrected one, which share that
  id; for o-2 an order whose total is 1e16 and whose customer is not ASCII (jsonb rewrites the number);
- `domain.process(PlaceOrder, asynchronous=False)` for o-4: Protean's own handler raises `OrderPlaced`,
  which Protean's outbox (a table in the same database) holds until `publish` runs Protean's own
  `OutboxProcessor`, which puts it on the Redis stream `fulfilment::order`, where the host's event
  handlers' groups take it from there;
- `domain.process(ShipOrder, asynchronous=True)` for o-5, an order nobody placed yet: the host rejects it
  (a dead letter) until `place` has Protean place o-5 itself (as for o-4), and the dead letter is replayed.
`read` deserializes every message in the store with Protean's own read path and its checksum verified,
and rehydrates each order from its events. Each prints one JSON object; `write` and `publish` exit 1
when a check fails, `read` lists what failed and leaves the judging to the test.
"""

import argparse
import json
import logging
import sys
import traceback

import protean
import psycopg2
from protean import Domain, apply, handle
from protean.fields import Float, Identifier, Integer, String
from protean.utils.eventing import Message
from protean.utils.globals import current_domain

assert protean.__version__.startswith("0.18."), protean.__version__

domain = Domain(name="Fulfilment", config={"event_store": {"provider": "message_db", "database_uri": None}})


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


@domain.aggregate(event_sourced=True)
class Order:
    order_id = Identifier(identifier=True)
    customer = String()
    sku = String()
    quantity = Integer()
    total = Float()
    status = String(default="new")

    @classmethod
    def place(cls, order_id, customer, sku, quantity, total):
        order = cls(order_id=order_id, customer=customer, sku=sku, quantity=quantity, total=total)
        order.raise_(OrderPlaced(order_id=order_id, customer=customer, sku=sku, quantity=quantity, total=total))
        return order

    @apply
    def placed(self, event: OrderPlaced):
        self.status = "placed"

    @apply
    def shipped(self, event: OrderShipped):
        self.status = "shipped"


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


@domain.command_handler(part_of=Order)
class OrderCommands:
    @handle(PlaceOrder)
    def place(self, command: PlaceOrder):
        order = Order.place(command.order_id, command.customer, command.sku, command.quantity, command.total)
        current_domain.repository_for(Order).add(order)

    @handle(ShipOrder)
    def ship(self, command: ShipOrder):
        order = current_domain.repository_for(Order).get(command.order_id)
        order.raise_(OrderShipped(order_id=command.order_id))
        current_domain.repository_for(Order).add(order)


def start(uri: str, redis: str) -> None:
    domain.config["event_store"]["database_uri"] = uri
    domain.config["databases"] = {"default": {"provider": "postgresql", "database_uri": uri}}
    domain.config["brokers"] = {"default": {"provider": "redis", "URI": redis}}
    # Protean's outbox (rows to Redis) comes with stream subscriptions; it runs none here.
    domain.config.setdefault("server", {})["default_subscription_type"] = "stream"
    domain.init(traverse=False)


def write(uri: str, redis: str) -> dict:
    start(uri, redis)
    with domain.domain_context():
        domain.setup_outbox()
        for order, asynchronous in [
            (PlaceOrder(order_id="o-1", customer="ada", sku="book", quantity=0, total=30.5), True),
            (PlaceOrder(order_id="o-1", customer="ada", sku="book", quantity=2, total=30.5), True),
            (PlaceOrder(order_id="o-2", customer="Zoë Ünal 📚", sku="bücher", quantity=1, total=1e16), True),
            (PlaceOrder(order_id="o-4", customer="lin", sku="pen", quantity=3, total=4.5), False),
            (ShipOrder(order_id="o-5"), True),
        ]:
            domain.process(order, asynchronous=asynchronous)
        domain.event_store.store.close()
    return {"failures": []}


def place(uri: str, redis: str) -> dict:
    start(uri, redis)
    with domain.domain_context():
        domain.process(PlaceOrder(order_id="o-5", customer="kai", sku="mug", quantity=1, total=9.0), asynchronous=False)
        domain.event_store.store.close()
    return {"failures": []}


def publish(uri: str, redis: str) -> dict:
    start(uri, redis)
    from protean.server.engine import Engine  # noqa: PLC0415 - needs the initialised domain

    with domain.domain_context():
        engine = Engine(domain, test_mode=True)
        processors = list(engine._outbox_processors.values())

        async def drain() -> int:
            batches = 0
            for processor in processors:
                await processor.initialize()
                while await processor.tick():
                    batches += 1
            return batches

        batches = engine.loop.run_until_complete(drain())
        with psycopg2.connect(uri) as conn, conn.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM outbox GROUP BY status")
            statuses = dict(cur.fetchall())
    failures = [] if processors and set(statuses) == {"published"} else [f"outbox rows: {statuses}"]
    return {"failures": failures, "processors": len(processors), "batches": batches, "outbox": statuses}


def read(uri: str, redis: str) -> dict:
    start(uri, redis)
    failures = []
    messages = []
    with psycopg2.connect(uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT DISTINCT stream_name FROM message_store.messages")
        streams = sorted(s for (s,) in cur.fetchall())
    with domain.domain_context():
        store = domain.event_store.store
        for stream in streams:
            for raw in store._read(stream):
                where = f"{stream}@{raw['position']} {raw['type']}"
                try:
                    message = Message.deserialize(raw, validate=True)
                    if not message.verify_integrity():
                        failures.append(f"{where}: checksum")
                    messages.append({"stream": stream, "type": raw["type"], "data": raw["data"]})
                except Exception as exc:  # noqa: BLE001 - reported verbatim
                    failures.append(f"{where}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        orders = {}
        for order_id in ["o-1", "o-2", "o-4", "o-5"]:
            try:
                orders[order_id] = current_domain.repository_for(Order).get(order_id).status
            except Exception as exc:  # noqa: BLE001
                failures.append(f"rehydrating {order_id}: {type(exc).__name__}: {exc}")
        store.close()
    return {"failures": failures, "messages": len(messages), "orders": orders}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["write", "publish", "place", "read"])
    parser.add_argument("--uri", required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    actions = {"write": write, "publish": publish, "place": place, "read": read}
    result = actions[args.action](args.uri, args.redis)
    print(json.dumps(result, ensure_ascii=False))
    # What Protean could not read is judged by the test (Protean fails one of its own messages).
    return 1 if result["failures"] and args.action != "read" else 0


if __name__ == "__main__":
    sys.exit(main())
