"""Pure logic: envelopes, registry, retry decisions, handler registration, URLs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support import Ping, Pong
from txflow import (
    ConfigurationError,
    Context,
    DeadLetter,
    Event,
    EventRegistry,
    EventValidationError,
    MalformedMessageError,
    Retry,
    RetryPolicy,
    TxFlow,
    UnknownEventTypeError,
    UnsupportedURLError,
    open_store,
)
from txflow._config import open_transport
from txflow._messages import decode, encode
from txflow._names import CAUSATION_HEADER
from txflow.errors import mask_url
from txflow.hop._retry import Outcome
from txflow.store._postgres_sql import (
    MAX_PREPARED_ROWS,
    MAX_ROWS_PER_INSERT,
    OUTBOX_COLUMNS,
    begin_with_inbox,
    commit_statements,
)


class Renamed(Event):
    event_type = "orders.Renamed"
    x: int


def test_event_type_defaults_to_class_name_and_can_be_overridden() -> None:
    assert Ping.event_type == "Ping"
    assert Renamed.event_type == "orders.Renamed"


def test_encode_decode_round_trip_keeps_metadata() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    message = encode(
        Ping(n=3), message_id="m1", correlation_id="c1", causation_id="p0", occurred_at=now,
        headers={"tenant": "acme"},
    )  # fmt: skip
    assert message.body == b'{"n":3}'
    assert message.headers[CAUSATION_HEADER] == "p0"
    envelope = decode(message, EventRegistry([Ping]))
    assert envelope.event == Ping(n=3)
    assert (envelope.message_id, envelope.correlation_id, envelope.causation_id) == (
        "m1",
        "c1",
        "p0",
    )
    assert envelope.occurred_at == now
    assert envelope.attempt == 1
    assert envelope.headers["tenant"] == "acme"


def test_decode_errors_are_distinct() -> None:
    registry = EventRegistry([Ping])
    good = encode(Ping(n=1), message_id="m", correlation_id="c", causation_id=None,
                  occurred_at=datetime.now(UTC))  # fmt: skip
    with pytest.raises(UnknownEventTypeError, match="'Pong' is not handled here"):
        decode(encode(Pong(n=1), message_id="m", correlation_id="c", causation_id=None,
                      occurred_at=datetime.now(UTC)), registry)  # fmt: skip
    from dataclasses import replace

    with pytest.raises(EventValidationError, match="Ping failed validation"):
        decode(replace(good, body=b'{"n": []}'), registry)
    with pytest.raises(MalformedMessageError, match="not valid JSON"):
        decode(replace(good, body=b"\xff\xfe"), registry)


def test_registry_refuses_two_classes_with_one_name() -> None:
    class Ping(Event):  # a different class with the same wire name
        n: int

    from tests.support import Ping as Original

    registry = EventRegistry([Original])
    with pytest.raises(ConfigurationError, match="used by both"):
        registry.add(Ping)


def test_retry_policy_decisions() -> None:
    policy = RetryPolicy(max_attempts=3, delays=(1.0, 5.0), fatal=(KeyError,))
    assert policy.decide(ValueError(), 1) == policy.decide(ValueError(), 1)
    assert policy.decide(ValueError(), 1).outcome is Outcome.RETRY
    assert policy.decide(ValueError(), 1).delay == 1.0
    assert policy.decide(ValueError(), 2).delay == 5.0
    assert policy.decide(ValueError(), 3).outcome is Outcome.DEAD_LETTER
    assert policy.decide(KeyError(), 1).outcome is Outcome.DEAD_LETTER
    assert policy.decide(DeadLetter("no"), 1).outcome is Outcome.DEAD_LETTER
    requested = policy.decide(Retry(delay=4.0), 1)
    assert (requested.delay, requested.tier) == (4.0, 5.0)  # exact delay, served by the 5 s tier
    assert policy.decide(Retry(delay=60.0), 1).delay == 10.0  # at most twice the largest tier
    assert policy.tiers() == (1.0, 5.0)
    with pytest.raises(ConfigurationError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigurationError):
        RetryPolicy(jitter=1.5)


def test_retry_policy_shapes() -> None:
    assert RetryPolicy.exponential(5, base=1, factor=2, cap=5).delays == (1, 2, 4, 5)
    assert RetryPolicy.exponential(5, base=1, immediate=2).delays == (0, 0, 1, 2)
    ladder = RetryPolicy.ladder(1, 5, 30, 120, 600)
    assert ladder.max_attempts == 6
    assert [ladder.delay_before(a) for a in range(2, 7)] == [1, 5, 30, 120, 600]
    fixed = RetryPolicy.fixed(2.0, 5, immediate=1)
    assert [fixed.decide(ValueError(), a).delay for a in range(1, 5)] == [0.0, 2.0, 2.0, 2.0]
    assert fixed.tiers() == (2.0,)
    assert RetryPolicy.immediate(4).decide(ValueError(), 3).delay == 0.0


def test_jitter_stays_within_its_fraction() -> None:
    policy = RetryPolicy.fixed(10.0, 3)
    jittered = RetryPolicy(3, (10.0,), jitter=0.2)
    delays = {jittered.decide(ValueError(), 1).delay for _ in range(200)}
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert len(delays) > 50  # it does vary
    assert {policy.decide(ValueError(), 1).delay for _ in range(20)} == {10.0}
    assert jittered.decide(ValueError(), 1).tier == 10.0


def test_handler_events_come_from_annotations() -> None:
    app = TxFlow("units")

    @app.handler()
    async def both(event: Ping | Pong, ctx: Context) -> None: ...

    @app.handler()
    async def no_context(event: Ping) -> None: ...

    assert app.handlers["both"].event_types == (Ping, Pong)
    assert app.handlers["both"].takes_context
    assert not app.handlers["no_context"].takes_context
    assert app.handlers["both"].queue == "units.both"
    topology = app.topology()
    assert topology.queues[0].routing_keys == ("Ping", "Pong")
    assert topology.queues[0].dead_letter_queue == "units.both.dlq"


def test_handler_registration_errors_name_the_fix() -> None:
    app = TxFlow("units")
    with pytest.raises(ConfigurationError, match="annotate its first parameter"):

        @app.handler()
        async def unannotated(event, ctx) -> None:  # type: ignore[no-untyped-def]
            ...

    with pytest.raises(ConfigurationError, match="must be `async def`"):

        @app.handler(Ping)  # type: ignore[type-var]
        def sync(event: Ping) -> None: ...

    @app.handler(Ping)
    async def dup(event: Ping) -> None: ...

    with pytest.raises(ConfigurationError, match="already has a handler named 'dup'"):

        @app.handler(Ping, name="dup")
        async def other(event: Ping) -> None: ...

    with pytest.raises(ConfigurationError, match="may only use"):
        TxFlow("bad name")


def test_urls_are_checked_and_masked() -> None:
    assert mask_url("amqp://guest:secret@host:5672/v") == "amqp://guest:***@host:5672/v"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(UnsupportedURLError, match="unsupported broker URL 'redis://h'"):
        open_transport("redis://h")
    with pytest.raises(UnsupportedURLError, match="mysql"):
        open_store("mysql://u:pw@h/db")
    assert type(open_store("postgresql://u@h/db")).__name__ == "PostgresStore"
    assert type(open_store("sqlite:///x.db")).__name__ == "SQLiteStore"
    assert type(open_transport("amqp://h/")).__name__ == "RabbitTransport"
    assert type(open_transport("memory://x")).__name__ == "InMemoryTransport"


def test_empty_tables_print_headers_only(capsys: pytest.CaptureFixture[str]) -> None:
    from txflow.cli._common import print_table

    print_table([], ["queue", "messages"])
    assert capsys.readouterr().out.split() == ["QUEUE", "MESSAGES"]


def test_broker_dead_letters_show_the_brokers_reason() -> None:
    from txflow import DeadLetterInfo, Message

    info = DeadLetterInfo.from_message(
        Message(body=b"{}", routing_key="q", message_id="m", headers={
            "x-first-death-reason": "delivery_limit", "x-first-death-queue": "app.h",
            "x-delivery-count": 50,
        })
    )  # fmt: skip
    assert info.exception_type == "broker:delivery_limit"
    assert info.reason is not None and "delivery_limit" in info.reason and "app.h" in info.reason
    assert info.attempts == 50


def test_graph_draws_events_between_handlers() -> None:
    from txflow._graph import mermaid

    a, b = TxFlow("a"), TxFlow("b")

    @a.handler()
    async def ping_to_pong(event: Ping) -> Pong:
        return Pong(n=event.n)

    @b.handler(emits=[Renamed])
    async def on_pong(event: Pong, ctx: Context) -> list[Ping] | None:
        return None

    text = mermaid([a, b])
    assert text.startswith("flowchart LR")
    assert '    e0(["Ping"])' in text and '    e1(["Pong"])' in text
    assert "e0 --> a__ping_to_pong" in text and "a__ping_to_pong --> e1" in text
    assert "e1 --> b__on_pong" in text
    assert "b__on_pong --> e2" in text and "b__on_pong --> e0" in text  # declared + annotated
    assert text.index("subgraph a") > text.index('(["orders.Renamed"])')


def test_dead_letter_body_preview_is_text_and_bounded() -> None:
    from txflow import Message
    from txflow._dead_letters import MAX_BODY_PREVIEW, DeadLetterInfo

    def info(body: bytes) -> DeadLetterInfo:
        return DeadLetterInfo.from_message(Message(body=body, routing_key="q"))

    assert info(b'{"n": 1}').body == '{"n": 1}'
    assert info(b"\xff\xfeok").body == "\ufffd\ufffdok"
    big = info(b"x" * 10_000_000).body
    assert big.startswith("x" * MAX_BODY_PREVIEW) and big.endswith("… (10000000 bytes)")
    assert len(big) < MAX_BODY_PREVIEW + 30


async def test_running_counters_are_logged_every_stats_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.support import Ping
    from txflow.testing import InMemoryBroker, InMemoryTransport, wait_until

    app = TxFlow(
        "counting",
        transport=InMemoryTransport(InMemoryBroker()),
        database_url=f"sqlite:///{tmp_path}/c.db",
        stats_interval=0.05,
    )
    seen: list[int] = []

    @app.handler(Ping)
    async def count(event: Ping) -> None:
        seen.append(event.n)

    caplog.set_level("INFO", logger="txflow")
    async with app:
        await app.publish(Ping(n=1), Ping(n=2))
        await wait_until(lambda: len(seen) == 2)

        def running_lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if "stats (running)" in r.getMessage()]

        await wait_until(lambda: any("handled=2 " in m for m in running_lines()))
    final = [r.getMessage() for r in caplog.records if r.getMessage().startswith("counting stats:")]
    assert len(final) == 1 and "handled=2 duplicates=0 " in final[0]


def _outbox_row(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "message_id": "m'1",
        "event_type": "Ping",
        "correlation_id": "c",
        "causation_id": None,
        "headers": {"x-note": "it's"},
        "body": b'{"n": 1}',
        "created_at": datetime(2026, 11, 22, tzinfo=UTC),
        "lease_until": 1.5,
        "leased_by": "relay",
        "publish_attempts": 1,
    }
    row.update(overrides)
    return row


def test_outbox_rows_go_with_the_commit_as_literals_when_they_can() -> None:
    [(sql, params)] = commit_statements([(7, _outbox_row())], "COMMIT", literals=True)
    assert params == ()
    assert sql.startswith("INSERT INTO txflow_outbox (seq, message_id,")
    assert sql.endswith("; COMMIT")
    assert "(7, 'm''1', 'Ping', 'c', NULL, '{\"x-note\": \"it''s\"}'::json" in sql
    assert "'\\x7b226e223a20317d'::bytea" in sql
    assert "'2026-11-22T00:00:00+00:00'::timestamptz, 1.5, 'relay', 1)" in sql


@pytest.mark.parametrize(
    ("staged", "literals"),
    [
        ([(1, _outbox_row())], False),  # standard_conforming_strings off
        ([(1, _outbox_row(correlation_id="nul\x00"))], True),
        ([(1, _outbox_row(body=b"x" * 40_000))], True),  # over the literal limit as hex
    ],
    ids=["quoting-unsafe", "nul-character", "large"],
)
def test_outbox_rows_that_cannot_be_literals_are_bound(
    staged: list[tuple[int, dict[str, object]]], literals: bool
) -> None:
    statements = commit_statements(staged, "NOTIFY txflow_outbox; COMMIT", literals=literals)
    assert [sql for sql, _ in statements][-1] == "NOTIFY txflow_outbox; COMMIT"
    [(sql, params)] = statements[:-1]
    assert "$1" in sql and "'" not in sql
    assert len(params) == len(OUTBOX_COLUMNS) + 1
    assert params[0] == 1


def test_many_bound_outbox_rows_go_in_chunks_in_seq_order() -> None:
    staged = [(seq, _outbox_row()) for seq in range(1, 2 * MAX_ROWS_PER_INSERT + 2)]
    statements = commit_statements(staged, "COMMIT", literals=False)
    assert len(statements) == 4  # three inserts, then the COMMIT
    width = len(staged[0][1]) + 1
    seqs = [params[i] for _, params in statements[:-1] for i in range(0, len(params), width)]
    assert seqs == [seq for seq, _ in staged]


def test_the_hot_path_recorders_record_what_prometheus_clients_own_calls_do() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from txflow._metrics import LATENCY_BUCKETS, counting, observing

    registry = CollectorRegistry()
    counters = Counter("c", "", ["way"], registry=registry)
    histograms = Histogram("h", "", ["way"], buckets=LATENCY_BUCKETS, registry=registry)
    fast_count = counting(counters.labels("fast"))
    fast_observe = observing(histograms.labels("fast"))
    own = counters.labels("own"), histograms.labels("own")
    # Below, on and between the bounds, past the last one, and zero.
    amounts = [0.0, 0.0005, 0.001, 0.0011, 0.0999, 0.1, 3.0, 3599.0, 3600.0, 7200.0, 1e9]
    for amount in amounts:
        fast_count(1)
        fast_observe(amount)
        own[0].inc()
        own[1].observe(amount)

    def by_way(way: str) -> dict[tuple[str, str], float]:
        return {
            (sample.name, sample.labels.get("le", "")): sample.value
            for metric in registry.collect()
            for sample in metric.samples
            if sample.labels.get("way") == way and not sample.name.endswith("_created")
        }

    fast, slow = by_way("fast"), by_way("own")
    assert fast == slow
    assert fast[("c_total", "")] == len(amounts)
    assert fast[("h_bucket", "0.001")] == 3  # 0, 0.0005 and the bound itself
    assert fast[("h_bucket", "+Inf")] == len(amounts)
    assert fast[("h_sum", "")] == pytest.approx(sum(amounts))


def test_prepared_outbox_rows_are_one_execute_each_with_the_same_literals() -> None:
    staged = [(7, _outbox_row()), (8, _outbox_row(message_id="m2"))]
    [(sql, params)] = commit_statements(staged, "COMMIT", literals=True, prepared=True)
    assert params == ()
    [first, second, tail] = sql.split("; ")
    assert first.startswith("EXECUTE txflow_outbox_insert(7, 'm''1', 'Ping', 'c', NULL, ")
    assert second.startswith("EXECUTE txflow_outbox_insert(8, 'm2', ")
    assert "'2026-11-22T00:00:00+00:00'::timestamptz, 1.5, 'relay', 1)" in first
    assert tail == "COMMIT"


def test_many_or_unquotable_rows_are_never_executes() -> None:
    many = [(seq, _outbox_row()) for seq in range(MAX_PREPARED_ROWS + 1)]
    [(sql, _)] = commit_statements(many, "COMMIT", literals=True, prepared=True)
    assert sql.startswith("INSERT INTO txflow_outbox") and "EXECUTE" not in sql
    nul = [(1, _outbox_row(correlation_id="nul\x00"))]
    statements = commit_statements(nul, "COMMIT", literals=True, prepared=True)
    assert all("EXECUTE" not in sql for sql, _ in statements)
    assert "$1" in statements[0][0]


def test_the_inbox_row_is_an_execute_only_on_a_prepared_connection() -> None:
    prepared = begin_with_inbox("q", "it's", prepared=True)
    assert prepared == "BEGIN; EXECUTE txflow_inbox_insert('q', 'it''s')"
    plain = begin_with_inbox("q", "it's")
    assert plain is not None and plain.startswith("BEGIN; INSERT INTO txflow_inbox")
    assert begin_with_inbox("q", "nul\x00", prepared=True) is None


def test_behind_a_transaction_pooler_nothing_is_prepared() -> None:
    pooled = open_store("postgresql://u@pooler:6432/shop?pool_mode=transaction")
    assert getattr(pooled, "prepared", "missing") is None
    direct = open_store("postgresql://u@db:5432/shop")
    assert getattr(direct, "prepared", None) is not None


def test_the_relays_publish_delays_are_read_on_the_clock_it_is_given() -> None:
    from prometheus_client import REGISTRY

    from txflow._metrics import PublishMeter
    from txflow.transport import Message

    created = datetime(2026, 12, 2, tzinfo=UTC)
    meter = PublishMeter("clocked-relay", now=lambda: created.timestamp() + 30.0)
    with meter.publish(Message(b"{}", "Ping", timestamp=created), attempts=1):
        pass
    for name in ("commit_to_publish", "commit_to_confirm"):
        labels = {"app": "clocked-relay"}
        total = REGISTRY.get_sample_value(f"txflow_outbox_{name}_seconds_sum", labels)
        assert total == pytest.approx(30.0), name  # the given clock's 30 s, not the wall's
