"""Sharing one execution among concurrent callers (``registry/flight.py``)."""

from __future__ import annotations

import asyncio

import pytest

from mirror.registry.flight import SharedTasks


def test_a_caller_that_stops_waiting_leaves_the_shared_task_to_the_others() -> None:
    """A revalidation's time-out (``asyncio.wait_for``) ends one caller's wait, not the listing the
    others share: they get its result, and it ran once; an exception reaches each of them."""
    runs: list[str] = []

    async def work(key: str) -> list[str]:
        runs.append(key)
        await asyncio.sleep(0.2)
        if key == "broken":
            raise RuntimeError("upstream said no")
        return [key, "v2"]

    async def scenario() -> None:
        shared: SharedTasks[str, list[str]] = SharedTasks()
        impatient = asyncio.ensure_future(asyncio.wait_for(shared.run(work, "app"), 0.05))
        patient = [asyncio.ensure_future(shared.run(work, "app")) for _ in range(3)]
        with pytest.raises(TimeoutError):
            await impatient
        assert await asyncio.gather(*patient) == [["app", "v2"]] * 3
        assert runs == ["app"]
        assert await shared.run(work, "app") == ["app", "v2"] and runs == ["app", "app"]  # done: asked anew
        results = await asyncio.gather(shared.run(work, "broken"), shared.run(work, "broken"), return_exceptions=True)
        assert [str(r) for r in results] == ["upstream said no"] * 2 and runs.count("broken") == 1

    asyncio.run(scenario())
