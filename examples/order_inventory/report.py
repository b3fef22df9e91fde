"""What the demo reads back from the three databases: the summary and the invariant checks."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from examples.order_inventory.flow import order_flow
from examples.order_inventory.inventory import Deduction, Rejection, Stock
from examples.order_inventory.orders import TERMINAL, Order, OrderStatus, OrderTransition
from examples.order_inventory.payment import Payment, PaymentStatus
from txflow import DeadLetterInfo, FlowStatus, Store, metadata

# The orders service's flow instances, read in one query per snapshot (TxFlow.list_flows pages).
flows = metadata.tables["txflow_flows"]


@dataclass(slots=True)
class Snapshot:
    """The state of all three services once the flows ended."""

    orders: list[sa.Row[tuple[str, str, int, str, str | None, datetime, datetime]]]
    transitions: list[sa.Row[tuple[str, str, bool]]]
    stock: dict[str, int]
    deductions: list[sa.Row[tuple[str, str, int, bool]]]
    rejections: list[sa.Row[tuple[str, str]]]
    payments: list[sa.Row[tuple[str, str]]]
    # (order id, flow status, compensated steps) as the orders service's flow tracker has them.
    flows: list[sa.Row[tuple[str, str, list[str]]]] = field(default_factory=list)
    # Messages per dead-letter queue; the dead letters themselves when the run expected some.
    dead_letters: dict[str, int] = field(default_factory=dict)
    dead_letter_details: dict[str, list[DeadLetterInfo]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ExpectedDeadLetter:
    """A message that must end in the dead-letter queue `queue`, refused with `exception_type`.

    It is recognised by its message id, or by its correlation id when it was sent without a
    message id; `reason_contains` must appear in the reason recorded with it.
    """

    queue: str
    exception_type: str
    message_id: str | None = None
    correlation_id: str | None = None
    reason_contains: str = ""

    def matches(self, info: DeadLetterInfo) -> bool:
        return (self.message_id is None or info.message_id == self.message_id) and (
            self.correlation_id is None or info.correlation_id == self.correlation_id
        )

    def label(self) -> str:
        return f"{self.queue}:{self.message_id or self.correlation_id}"


# The key of `count_by_status` counting order flows still running or compensating.
OPEN_FLOWS = "open flows"


async def count_by_status(store: Store) -> Counter[str]:
    """Orders per status, and open flow instances (cheap enough to poll every second)."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(sa.select(Order.status, sa.func.count()).group_by(Order.status))
        counts = Counter({status: count for status, count in rows})
        counts[OPEN_FLOWS] = (
            await conn.execute(
                sa.select(sa.func.count()).where(
                    flows.c.flow == order_flow.name,
                    flows.c.status.in_([str(FlowStatus.RUNNING), str(FlowStatus.COMPENSATING)]),
                )
            )
        ).scalar_one()
        return counts


async def take_snapshot(orders: Store, inventory: Store, payment: Store) -> Snapshot:
    async with orders.engine.connect() as conn:
        order_rows = list(
            await conn.execute(
                sa.select(
                    Order.order_id,
                    Order.sku,
                    Order.quantity,
                    Order.status,
                    Order.reason,
                    Order.created_at,
                    Order.updated_at,
                )
            )
        )
        transitions = list(
            await conn.execute(
                sa.select(
                    OrderTransition.order_id, OrderTransition.message_id, OrderTransition.applied
                )
            )
        )
        flow_rows = list(
            await conn.execute(
                sa.select(flows.c.flow_id, flows.c.status, flows.c.compensated).where(
                    flows.c.flow == order_flow.name
                )
            )
        )
    async with inventory.engine.connect() as conn:
        stock = {sku: n for sku, n in await conn.execute(sa.select(Stock.sku, Stock.available))}
        deductions = list(
            await conn.execute(
                sa.select(
                    Deduction.order_id, Deduction.sku, Deduction.quantity, Deduction.restocked
                )
            )
        )
        rejections = list(await conn.execute(sa.select(Rejection.order_id, Rejection.reason)))
    async with payment.engine.connect() as conn:
        payments = list(await conn.execute(sa.select(Payment.order_id, Payment.status)))
    return Snapshot(order_rows, transitions, stock, deductions, rejections, payments, flow_rows)  # type: ignore[arg-type]


def _aware(value: datetime) -> datetime:
    # SQLite hands datetimes back without their zone; they were written in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _sample(ids: set[str], limit: int = 3) -> str:
    if not ids:
        return "none"
    shown = ", ".join(sorted(ids)[:limit])
    return f"{len(ids)} ({shown}{', ...' if len(ids) > limit else ''})"


def summary(snap: Snapshot, initial: Mapping[str, int]) -> str:
    """The outcome table, the stock table and flow latencies, as printable text."""
    lines = [f"{'status':<10} {'reason':<28} {'orders':>7}"]
    outcomes = Counter((row.status, row.reason or "") for row in snap.orders)
    for (status, reason), count in sorted(outcomes.items()):
        lines.append(f"{status:<10} {reason:<28} {count:>7}")
    lines.append(f"{'total':<39} {len(snap.orders):>7}")
    lines.append("")
    confirmed = _confirmed_quantities(snap)
    lines.append(f"{'sku':<14} {'initial':>8} {'remaining':>10} {'confirmed qty':>14}")
    for sku in sorted(initial):
        remaining = snap.stock.get(sku, 0)
        lines.append(f"{sku:<14} {initial[sku]:>8} {remaining:>10} {confirmed[sku]:>14}")
    latencies = sorted(
        (_aware(row.updated_at) - _aware(row.created_at)).total_seconds()
        for row in snap.orders
        if row.status in TERMINAL
    )
    if latencies:

        def pct(p: float) -> float:
            return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

        lines.append("")
        lines.append(
            f"order placed -> terminal: p50 {pct(0.5):.0f} ms, p95 {pct(0.95):.0f} ms, "
            f"max {latencies[-1] * 1000:.0f} ms"
        )
    return "\n".join(lines)


def _confirmed_quantities(snap: Snapshot) -> Counter[str]:
    confirmed = Counter[str]()
    for row in snap.orders:
        if row.status == OrderStatus.CONFIRMED:
            confirmed[row.sku] += row.quantity
    return confirmed


def check_invariants(
    snap: Snapshot,
    initial: Mapping[str, int],
    placed: Sequence[str],
    expected_dead_letters: Sequence[ExpectedDeadLetter] | None = None,
) -> list[Check]:
    """The example's invariants, each PASS or FAIL with what was found.

    With `expected_dead_letters` (garbage a test injected) the dead-letter queues must hold
    exactly those, each with its reason; without, they must be empty.
    """
    placed_ids = set(placed)
    status = {row.order_id: row.status for row in snap.orders}
    reason = {row.order_id: row.reason or "" for row in snap.orders}

    def orders_where(wanted: str, prefix: str = "") -> set[str]:
        return {o for o, s in status.items() if s == wanted and reason[o].startswith(prefix)}

    checks: list[Check] = []

    not_terminal = {o for o, s in status.items() if s not in TERMINAL}
    missing = placed_ids - status.keys()
    checks.append(
        Check(
            "every order ends CONFIRMED or FAILED",
            not not_terminal and not missing and len(status) == len(placed_ids),
            f"{len(status)} orders; not terminal {_sample(not_terminal)}; "
            f"missing {_sample(missing)}",
        )
    )

    negative = {sku: n for sku, n in snap.stock.items() if n < 0}
    checks.append(
        Check(
            "stock never negative",
            not negative,
            f"lowest {min(snap.stock.values(), default=0)}; negative: {negative or 'none'}",
        )
    )

    confirmed = _confirmed_quantities(snap)
    unbalanced = {
        sku: (initial[sku], snap.stock.get(sku), confirmed[sku])
        for sku in initial
        if initial[sku] != snap.stock.get(sku, 0) + confirmed[sku]
    }
    checks.append(
        Check(
            "initial stock = remaining + confirmed quantities (per SKU)",
            not unbalanced and set(snap.stock) == set(initial),
            f"{len(initial)} SKUs; (initial, remaining, confirmed) off: {unbalanced or 'none'}",
        )
    )

    deducted = Counter(row.order_id for row in snap.deductions)
    twice = {o for o, n in deducted.items() if n > 1}
    rejected = {row.order_id for row in snap.rejections}
    both = deducted.keys() & rejected
    unhandled = placed_ids - deducted.keys() - rejected
    checks.append(
        Check(
            "no order deducted twice (one inventory decision per order)",
            not twice and not both and not unhandled,
            f"{len(deducted)} deducted, {len(rejected)} refused; deducted twice "
            f"{_sample(twice)}; deducted and refused {_sample(both)}; "
            f"no decision {_sample(unhandled)}",
        )
    )

    restocked = {row.order_id for row in snap.deductions if row.restocked}
    kept = {row.order_id for row in snap.deductions if not row.restocked}
    declined = {row.order_id for row in snap.payments if row.status == PaymentStatus.DECLINED}
    paid = {row.order_id for row in snap.payments if row.status == PaymentStatus.SUCCEEDED}
    failed_by_payment = orders_where(OrderStatus.FAILED, "charge:")
    checks.append(
        Check(
            "restock compensation ran once per declined payment",
            restocked == declined == failed_by_payment,
            f"{len(declined)} declined, {len(restocked)} restocked, "
            f"{len(failed_by_payment)} orders failed by payment; "
            f"declined not restocked {_sample(declined - restocked)}; "
            f"restocked not declined {_sample(restocked - declined)}",
        )
    )

    failed_by_inventory = orders_where(OrderStatus.FAILED, "reserve_stock:")
    checks.append(
        Check(
            "SubInventoryFail compensation ran once per refusal",
            failed_by_inventory == rejected,
            f"{len(rejected)} refused, {len(failed_by_inventory)} orders failed by inventory; "
            f"difference {_sample(failed_by_inventory ^ rejected)}",
        )
    )

    confirmed_ids = orders_where(OrderStatus.CONFIRMED)
    checks.append(
        Check(
            "confirmed orders = paid orders = kept deductions",
            confirmed_ids == paid == kept,
            f"{len(confirmed_ids)} confirmed, {len(paid)} paid, {len(kept)} kept deductions",
        )
    )

    finishers: defaultdict[str, int] = defaultdict(int)
    for row in snap.transitions:
        if row.applied:
            finishers[row.order_id] += 1
    wrong = {o for o in status if finishers[o] != 1}
    repeated = {m for m, n in Counter(row.message_id for row in snap.transitions).items() if n > 1}
    checks.append(
        Check(
            "each order finished by exactly one message, none handled twice",
            not wrong and not repeated,
            f"{len(snap.transitions)} transitions; orders not finished exactly once "
            f"{_sample(wrong)}; messages handled twice {_sample(repeated)}",
        )
    )

    # The flow tracker's record agrees with the orders: completed = CONFIRMED, failed = FAILED,
    # and exactly the steps before the failing one were compensated, each once.
    expected = {
        OrderStatus.CONFIRMED: ("completed", []),
        "charge:": ("failed", ["reserve_stock", "place_order"]),
        "reserve_stock:": ("failed", ["place_order"]),
    }
    flow_of = {row.flow_id: (row.status, list(row.compensated)) for row in snap.flows}
    disagree = set()
    for order_id, order_status in status.items():
        key = order_status if order_status == OrderStatus.CONFIRMED else reason[order_id]
        want = next((v for k, v in expected.items() if key.startswith(k)), None)
        if flow_of.get(order_id) != want:
            disagree.add(order_id)
    checks.append(
        Check(
            "flow state matches every order; compensations ran once, newest first",
            not disagree and len(flow_of) == len(status),
            f"{len(flow_of)} flow instances "
            f"({dict(Counter(s for s, _ in flow_of.values()))}); disagreeing {_sample(disagree)}",
        )
    )

    if expected_dead_letters is None:
        stuck = {q: n for q, n in snap.dead_letters.items() if n}
        checks.append(
            Check(
                "no dead letters",
                not stuck,
                f"{len(snap.dead_letters)} dead-letter queues; non-empty: {stuck or 'none'}",
            )
        )
    else:
        checks.append(
            check_dead_letters(snap.dead_letters, snap.dead_letter_details, expected_dead_letters)
        )
    return checks


def check_dead_letters(
    depths: Mapping[str, int],
    found: Mapping[str, Sequence[DeadLetterInfo]],
    expected: Sequence[ExpectedDeadLetter],
) -> Check:
    """The dead-letter queues hold exactly `expected`, each with its exception and reason."""
    wanted = Counter(e.queue for e in expected)
    counts_off = {
        q: (wanted[q], depths.get(q, 0))
        for q in sorted(wanted.keys() | depths.keys())
        if wanted[q] != depths.get(q, 0)
    }
    missing: set[str] = set()
    twice: set[str] = set()
    wrong: set[str] = set()
    claimed: set[int] = set()
    for want in expected:
        hits = [info for info in found.get(want.queue, ()) if want.matches(info)]
        claimed.update(id(info) for info in hits)
        if not hits:
            missing.add(want.label())
        elif len(hits) > 1:
            twice.add(want.label())
        elif not (
            hits[0].exception_type == want.exception_type
            and hits[0].reason
            and want.reason_contains in hits[0].reason
        ):
            wrong.add(f"{want.label()} ({hits[0].exception_type}: {hits[0].reason})")
    unexpected = {
        f"{q}:{info.message_id}"
        for q, infos in found.items()
        for info in infos
        if id(info) not in claimed
    }
    kinds = Counter(e.exception_type.rsplit(".", 1)[-1] for e in expected)
    return Check(
        "dead letters are exactly the injected garbage, each with its reason",
        not (counts_off or missing or twice or wrong or unexpected),
        f"{len(expected)} expected in {len(wanted)} queues ({dict(kinds)}), "
        f"{sum(depths.values())} found; (expected, found) off: {counts_off or 'none'}; "
        f"missing {_sample(missing)}; found twice {_sample(twice)}; wrong exception or "
        f"reason {_sample(wrong)}; unexpected {_sample(unexpected)}",
    )


def format_checks(checks: Sequence[Check]) -> str:
    return "\n".join(f"{'PASS' if c.ok else 'FAIL'}  {c.name}\n      {c.detail}" for c in checks)
