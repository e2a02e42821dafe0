"""Verification and repair of a million rows per side while researchers keep writing through
the proxy: exactly the records changed behind bascule's back are reported (writes in flight
are not), ``--repair`` makes them equal, and a second verification is clean."""

from __future__ import annotations

import asyncio
import time

import pytest

from bascule.stages import Stage
from tests.conftest import Ground
from tests.cutover import datajobs
from tests.cutover.datajobs import execute, run_cli_async, token
from tests.cutover.flowing import writing
from tests.world import build_world, table_digest

ROWS = 1_000_000
MISSING = [400_001 + 7919 * i for i in range(7)]
EXTRA = [ROWS + 500_000 + 13 * i for i in range(7)]
CHANGED = [600_003 + 50_021 * i for i in range(7)]
TOUCHED = 3000
"""Researchers write to ids 1..3000 (and create new ones): never to the injected records."""


@pytest.mark.timeout(300)
async def test_a_million_rows_verified_and_repaired_while_researchers_write(
    ground: Ground,
) -> None:
    started = time.monotonic()
    async with build_world(ground, rows=0, stages=(Stage.DUALWRITE,), ids=True) as world:
        await asyncio.gather(
            datajobs.dcir(world.source_db, ROWS), datajobs.dcir(world.target_db, ROWS)
        )
        await execute(
            world.target_db, "DELETE FROM dcir WHERE id = ANY($1::bigint[])", args=[MISSING]
        )
        await execute(
            world.target_db,
            "INSERT INTO dcir (id, patient_id, act_code, act_date, amount, department)"
            " SELECT g, 'P00000000000000ff', 'G', date '2024-01-01', 1.00, '75'"
            " FROM unnest($1::bigint[]) g",
            args=[EXTRA],
        )
        await execute(
            world.target_db,
            "UPDATE dcir SET amount = amount + 1 WHERE id = ANY($1::bigint[])",
            args=[CHANGED],
        )
        seeded = time.monotonic()
        config = world.config_path
        async with writing(world, TOUCHED) as statuses:
            await asyncio.sleep(0.5)  # writes in flight, replays pending, when the sweep reads
            code, out, err = await run_cli_async(config, "verify", "dcir", "--json")
            assert code == 4, err
            found = datajobs.report_text(out, err)
            assert found["tables"][0]["rows"]["source"] >= ROWS
            for kind, keys in (("missing", MISSING), ("extra", EXTRA), ("changed", CHANGED)):
                assert found[kind] == {"count": 7, "tokens": sorted(token(k) for k in keys)}, kind
            assert found["unsettled"]["count"] == 0
            verified = time.monotonic()

            code, out, err = await run_cli_async(
                config, "verify", "dcir", "--repair", "--reason", "acceptance", "--json"
            )
            assert code == 0, err
            repaired = datajobs.report_text(out, err)["repair"]
            assert (repaired["upserted"], repaired["deleted"]) == (14, 7), repaired
            assert repaired["still_differing"] == repaired["unsettled"] == 0

            code, out, err = await run_cli_async(config, "verify", "dcir", "--json")
            assert code == 0, err
            clean = datajobs.report_text(out, err)
            assert clean["status"] == "clean" and clean["gap"]["closed"] is True
            finished = time.monotonic()
        assert len(statuses) > 100 and all(s < 500 for s in statuses)
        counts = await world.drained()
        assert not counts.get("dead") and not counts.get("in_doubt")
        assert await table_digest(world.source_db) == await table_digest(world.target_db)
    print(
        f"seeding {seeded - started:.1f} s, verify {verified - seeded:.1f} s, "
        f"repair and verify {finished - verified:.1f} s, {len(statuses)} researcher writes"
    )
