"""The harness's fault switches: each breaks things the way production does."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.support import Ping, Pong, add_effect_handler, add_sink, count_rows, effects
from tests.support import user_metadata as md
from tests.test_harness import CardCharged, book, trip, trip_apps
from txflow import ConfigurationError, FlowStatus, RetryPolicy, TxFlow
from txflow.testing import Harness


def effect_app(**kwargs: object) -> tuple[TxFlow, list[str]]:
    app = TxFlow("svc", metadata=md, **kwargs)  # type: ignore[arg-type]
    calls: list[str] = []
    add_effect_handler(app, calls, emit=False)
    return app, calls


async def test_deliver_twice_gives_every_handler_a_duplicate_the_inbox_skips() -> None:
    app, calls = effect_app()
    async with Harness(app) as h:
        h.faults.deliver_twice()
        ids = await app.publish(Ping(n=1), Ping(n=2))
        await h.settle()
        assert sorted(calls) == sorted(ids)  # the handler body ran once per message
        assert len(h.handled(handler="effect")) == 2
        assert len(h.duplicates(handler="effect")) == 2
        assert await count_rows(app, effects) == 2
        assert len(h.published(Ping)) == 2  # published once each, delivered twice


async def test_a_crash_after_commit_before_ack_is_redelivered_and_deduplicated() -> None:
    app, calls = effect_app()
    async with Harness(app) as h:
        h.faults.crash_before_ack("effect")
        await app.publish(Ping(n=1))
        await h.settle()
        assert [d.outcome for d in h.deliveries(handler="effect")] == ["handled", "duplicate"]
        assert len(calls) == 1
        assert await count_rows(app, effects) == 1
        await app.publish(Ping(n=2))  # one crash was armed: the next delivery is acked
        await h.settle()
        assert len(h.duplicates(handler="effect")) == 1


async def test_failed_publishes_are_retried_in_order_and_nothing_is_lost() -> None:
    app = TxFlow("svc")
    received = add_sink(app, Ping, concurrency=1)
    async with Harness(app) as h:
        h.faults.fail_publishes(3)
        async with app.transaction() as tx:
            for n in range(5):
                tx.emit(Ping(n=n))
        await h.settle()
        assert [e.n for e in received] == [0, 1, 2, 3, 4]  # type: ignore[attr-defined]
        assert app.relay.stats.failed >= 3  # and those under way on the dropped connection
        assert (await app.store.outbox_status()).pending == 0


async def test_a_failed_commit_rolls_the_attempt_back_and_the_retry_commits_once() -> None:
    app = TxFlow("svc", metadata=md, retry=RetryPolicy.immediate(2))
    calls: list[str] = []
    add_effect_handler(app, calls)  # Ping -> an effects row + Pong
    pongs = TxFlow("pongs")
    add_sink(pongs, Pong)
    async with Harness(app, pongs) as h:
        h.faults.fail_commit("effect")
        await app.publish(Ping(n=7))
        await h.settle()
        retried = h.retried(handler="effect").one()
        assert isinstance(retried.error, sa.exc.OperationalError)
        assert "injected" in str(retried.error)
        assert len(calls) == 2  # it ran twice; its effects and its event committed once
        assert await count_rows(app, effects) == 1
        h.published(Pong).one()
        h.handled(handler="sink").one()


async def test_a_failed_commit_of_a_tracker_transition_rolls_back_and_is_retried() -> None:
    # A transition with no hook never opens a session: it commits on sqlite3 itself, after
    # the engine's commit listeners, so the injected failure reaches it all the same.
    travel, hotels, payments = trip_apps([])
    async with Harness(travel, hotels, payments) as h:
        h.faults.fail_commit("flow.trip")
        await book(travel, "ann", 3)
        await h.settle()
        await h.advance(3600)  # past any retry delay
        retried = h.retried(handler="flow.trip").one()
        assert isinstance(retried.error, sa.exc.OperationalError)
        assert "injected" in str(retried.error)
        assert (await h.flow(trip, "ann")).status is FlowStatus.COMPLETED
        actions = [entry.action for entry in await h.flow_history(trip, "ann")]
        assert actions.count("step completed") == 3  # the failed transition left no trace
        assert actions[-1] == "completed"


async def test_a_failed_commit_with_no_retry_left_is_dead_lettered() -> None:
    app, _ = effect_app(retry=RetryPolicy(max_attempts=1))
    async with Harness(app) as h:
        h.faults.fail_commit()
        await app.publish(Ping(n=1))
        with pytest.raises(sa.exc.OperationalError, match="injected"):
            await h.settle()
        assert await count_rows(app, effects) == 0


async def test_a_reordered_tracker_queue_still_completes_the_flow() -> None:
    travel, hotels, payments = trip_apps([])
    async with Harness(travel, hotels, payments) as h:
        h.faults.reorder("flow.trip")
        await book(travel, "ann", 3)
        await h.settle()
        history = await h.flow_history(trip, "ann")
        # The tracker saw the last step's success first, and completed once all arrived.
        assert history[0].event_type == "CardCharged"
        assert history[0].action == "step completed"
        assert history[-1].action == "completed"
        assert (await h.flow(trip, "ann")).status is FlowStatus.COMPLETED
        h.published(CardCharged, trip_id="ann").one()


async def test_reorder_with_a_seed_and_switching_it_off() -> None:
    app = TxFlow("svc")
    received = add_sink(app, Ping, concurrency=8)
    async with Harness(app) as h:
        h.faults.reorder("sink", seed=3)
        async with app.transaction() as tx:
            for n in range(6):
                tx.emit(Ping(n=n))
        await h.settle()
        order = [e.n for e in received]  # type: ignore[attr-defined]
        assert sorted(order) == list(range(6))
        assert order != list(range(6))
        h.faults.reorder("sink", on=False)
        await app.publish(Ping(n=6))
        await h.settle()
        assert [e.n for e in received][-1] == 6  # type: ignore[attr-defined]


async def test_a_switch_for_an_unknown_handler_names_the_known_ones() -> None:
    app, _ = effect_app()
    async with Harness(app) as h:
        with pytest.raises(ConfigurationError, match=r"no handler named 'efect'.*'effect'"):
            h.faults.crash_before_ack("efect")
