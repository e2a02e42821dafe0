"""The two-replica fleet of `bascule proxy` processes the dual-write and flip tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack

import pytest

from bascule.stages import Stage
from tests.conftest import Ground
from tests.world import MakeWorld, World, build_world


@pytest.fixture
async def fleet(ground: Ground) -> AsyncIterator[MakeWorld]:
    """``await fleet(failpoints, stages, ids=False)``: a `bascule proxy` process per failpoint
    (``BASCULE_FAILPOINT``, None for none) over reference APIs on 30 identical rows, the
    source ignoring idempotency keys (a re-sent write would apply twice there); dcir walked
    through ``stages`` and seen there by every process."""
    async with AsyncExitStack() as stack:

        async def make(
            failpoints: Sequence[str | None],
            stages: Sequence[Stage] = (Stage.DUALWRITE,),
            *,
            ids: bool = False,
        ) -> World:
            return await stack.enter_async_context(
                build_world(
                    ground,
                    replicas=len(failpoints),
                    processes=True,
                    failpoints=failpoints,
                    stages=stages,
                    rows=30,
                    seed=11,
                    source_idem=False,
                    read_timeout=2.0,
                    ids=ids,
                )
            )

        yield make
