"""Work queues through the embedding API: real nodes, real CURVE PUSH/PULL on loopback.

This covers the mesh path of the work-queue issue so far (dispatch by credit, results,
redelivery, dead letters); durability, the CLI and MQTT shared subscriptions are not
built yet."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import make_certs
from tests.integration.test_python_api import two_nodes
from zmesh.jobs.service import JobFailed


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return make_certs(tmp_path / "certs", ["one", "two"])


async def until_serving(submitter, queue: str, worker_key: str) -> None:
    """Wait until the worker's hello (which names its queues) has reached the submitter."""
    async with asyncio.timeout(10):
        while (worker_key, queue) not in submitter.jobs.dispatcher.workers:
            await asyncio.sleep(0.02)


def worker_key(node) -> str:
    return node.transport.identity.public.decode()


def test_each_job_is_done_once_by_a_remote_worker_and_results_come_back(certs: Path) -> None:
    async def main() -> tuple[list[bytes], Counter[str]]:
        async with two_nodes(certs) as (one, two):
            seen: Counter[str] = Counter()

            async def worker() -> None:
                async for job in two.work("scan", prefetch=8):
                    seen[job.id] += 1
                    await job.ack(b"scanned " + job.payload)

            task = asyncio.create_task(worker())
            await until_serving(one, "scan", worker_key(two))
            handles = [await one.submit("scan", f"target-{i}") for i in range(300)]
            results = [await h.result(timeout=20) for h in handles]
            task.cancel()
            return results, seen

    results, seen = asyncio.run(main())
    assert results == [f"scanned target-{i}".encode() for i in range(300)]
    assert len(seen) == 300 and set(seen.values()) == {1}


def test_work_spreads_by_capacity_across_local_and_remote_workers(certs: Path) -> None:
    async def main() -> Counter[str]:
        async with two_nodes(certs) as (one, two):
            done_by: Counter[str] = Counter()

            async def worker(node, name: str, delay: float) -> None:
                async for job in node.work("scan", prefetch=2):
                    await asyncio.sleep(delay)  # the scan itself: the slow worker takes longer
                    done_by[name] += 1
                    await job.ack()

            tasks = [asyncio.create_task(worker(one, "fast", 0.001)),
                     asyncio.create_task(worker(two, "slow", 0.05))]
            await until_serving(one, "scan", worker_key(two))
            handles = [await one.submit("scan", b"x") for _ in range(200)]
            await asyncio.gather(*(h.result(timeout=30) for h in handles))
            for task in tasks:
                task.cancel()
            return done_by

    done_by = asyncio.run(main())
    assert sum(done_by.values()) == 200
    assert done_by["fast"] > 2 * done_by["slow"] > 0


def test_a_poison_job_lands_in_the_dead_letters_after_its_attempts(certs: Path) -> None:
    async def main() -> tuple[str, dict, int]:
        async with two_nodes(certs) as (one, two):
            attempts = 0

            async def worker() -> None:
                nonlocal attempts
                async for job in two.work("scan"):
                    attempts += 1
                    await job.nack("scanner crashed on this input")

            task = asyncio.create_task(worker())
            dead = one.subscribe("$jobs/dead/#")
            await until_serving(one, "scan", worker_key(two))
            handle = await one.submit("scan", b"poison")
            with pytest.raises(JobFailed) as failure:
                await handle.result(timeout=20)
            letter = await dead.get(timeout=10)
            task.cancel()
            return str(failure.value), json.loads(letter.payload), attempts

    error, letter, attempts = asyncio.run(main())
    assert "scanner crashed on this input" in error
    assert letter["reason"] == "scanner crashed on this input" and letter["queue"] == "scan"
    assert attempts == letter["attempts"] == 5  # the default max_attempts


def test_a_job_whose_lease_runs_out_is_delivered_again(certs: Path) -> None:
    async def main() -> list[int]:
        async with two_nodes(certs) as (one, two):
            one.jobs.dispatcher.lease = 0.5
            attempts: list[int] = []

            async def worker() -> None:
                async for job in two.work("scan"):
                    attempts.append(job.attempt)
                    if job.attempt == 1:
                        continue  # hold it silently: as if the scanner hung
                    await job.ack(b"ok")

            task = asyncio.create_task(worker())
            await until_serving(one, "scan", worker_key(two))
            handle = await one.submit("scan", b"x")
            assert await handle.result(timeout=10) == b"ok"
            task.cancel()
            return attempts

    assert asyncio.run(main()) == [1, 2]


def test_submit_many_gives_results_in_order_and_ids_stay_idempotency_keys(certs: Path) -> None:
    async def main() -> tuple[list[bytes], Counter[str], str, bool]:
        async with two_nodes(certs) as (one, two):
            runs: Counter[str] = Counter()

            async def worker() -> None:
                async for job in two.work("scan", prefetch=64):
                    runs[job.id] += 1
                    if job.payload == b"poison":
                        await job.nack("crashed", retry=False)
                    else:
                        await job.ack(job.payload.upper())

            task = asyncio.create_task(worker())
            await until_serving(one, "scan", worker_key(two))
            batch = await one.submit_many("scan", [f"t{i}".encode() for i in range(1000)])
            results = await batch.results(timeout=30)
            # Ids given: "b" twice in one batch, "a" already pending from a single submit.
            single = await one.submit("scan", b"x", job_id="a")
            keyed = await one.submit_many("scan", [b"x", b"y", b"z", b"poison"], ["a", "b", "b", "p"])
            with pytest.raises(JobFailed, match="crashed"):
                await keyed.results(timeout=10)
            same = keyed[0] is single and keyed[1] is keyed[2]
            task.cancel()
            return results, runs, (await keyed[1].result()).decode(), same

    results, runs, b_result, same = asyncio.run(main())
    assert results == [f"T{i}".encode() for i in range(1000)]
    assert same and b_result == "Y" and runs["a"] == runs["b"] == runs["p"] == 1
    assert len(runs) == 1003 and set(runs.values()) == {1}
