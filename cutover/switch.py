"""Changes that alter writes: the dataset's write fence held exclusively, and the authority switch.

Every write holds its dataset's fence shared, from before it reads its plan until its outcome
(``bascule/state/journal/writes.py``). A change that alters writes (``source <-> dualwrite``,
``shadow <-> live``, ``rampdown <-> target``) is committed while this module holds the fence
exclusively: writes in flight finish first, new ones wait behind it (bounded: past ``hold`` they get
503), and every write after it reads the new stage. The authority switch (``shadow <-> live``,
either way) is a barrier, as Vitess's SwitchTraffic:

1. wait until the backlog toward the new authority is small (and nothing is in doubt or dead);
2. take the fence exclusively: new writes wait, writes in flight finish;
3. wait for the replayers to drain that backlog to zero; move the new authority's id
   allocation past every id the other side holds (``[datasets.X.ids]``);
4. commit the new stage (compare-and-set, audit, write epoch), release the fence;
5. wait until every live replica runs it, or its lease has run out.

Any step that does not finish in time gives up: the fence is released, nothing is committed,
and the refusal says which step and what was left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bascule.config import Config, IdAllocation, SwitchSettings
from bascule.errors import Refused, StoreError
from bascule.sealing import fence_id
from bascule.stages import Stage, alters_writes, authority, switches_authority
from bascule.state import replicas
from bascule.state.journal import queries
from bascule.state.postgres import reaching_postgres
from bascule.state.stage_store import StageRow

log = logging.getLogger("bascule.switch")


@dataclass
class Outcome:
    """What a fenced change did: the steps, in order, for the CLI and the audit."""

    steps: list[str] = field(default_factory=list)
    lagging: list[str] = field(default_factory=list)
    """Replicas that had not confirmed when the wait ended (leases still alive)."""
    announced: bool = False


@dataclass
class Switcher:
    pool: asyncpg.Pool
    settings: SwitchSettings = field(default_factory=SwitchSettings)
    ids: dict[str, IdAllocation] = field(default_factory=dict)
    """Per dataset: how to move the new authority's id allocation past the other side's ids."""
    databases: dict[str, str | None] = field(default_factory=dict)
    """Per side (``source``/``target``): the backend database's DSN (``[backends.X] database``)."""

    async def change(
        self,
        dataset: str,
        before: StageRow,
        wanted: Stage,
        commit: Callable[[], Awaitable[StageRow]],
        announce: Callable[[StageRow], Awaitable[bool]] | None = None,
    ) -> tuple[StageRow, Outcome]:
        """Run ``commit`` (the compare-and-set of the stage) as the change requires: under the
        exclusive fence when it alters writes, after the barrier for an authority switch.
        ``announce`` tells the replicas, once the fence is released, before their
        confirmations are awaited."""
        done = Outcome()
        if not alters_writes(before.stage, wanted):
            after = await commit()
            done.announced = await announce(after) if announce else False
            return after, done
        switch = switches_authority(before.stage, wanted)
        new_authority = authority(wanted).value
        await self._no_orphans(dataset)
        if switch:
            await self._small_backlog(dataset, done)
        async with reaching_postgres(), self.pool.acquire() as conn:
            try:
                await self._fence(conn, dataset, done)
                if switch:
                    await self._drained(dataset, done)
                    await self._advance_ids(dataset, new_authority, done)
                after = await commit()
                done.steps.append(f"committed {wanted.value} (version {after.version})")
            finally:
                # On any failure, end the session: its locks go with it, whatever state the
                # connection is in (a cancelled statement, a broken socket).
                try:
                    await conn.execute("SELECT pg_advisory_unlock_all()", timeout=5.0)
                except BaseException:
                    conn.terminate()
                    raise
        done.steps.append("released the write fence: writes resume under the new stage")
        # Committed: from here on nothing may say "nothing was changed".
        try:
            done.announced = await announce(after) if announce else False
            done.lagging = await replicas.confirmed(
                self.pool, dataset, after.version, timeout=self.settings.confirm_wait
            )
        except StoreError as exc:
            done.steps.append(
                f"committed, but the replicas' confirmations could not be read: {exc}"
            )
            done.lagging = ["(unknown: the state Postgres did not answer)"]
            return after, done
        if done.lagging:
            log.warning(
                "%s: replicas %s have not confirmed version %d yet",
                dataset,
                ", ".join(done.lagging),
                after.version,
            )
            done.steps.append(f"replicas still to confirm: {', '.join(done.lagging)}")
        else:
            done.steps.append("every live replica confirmed it")
        return after, done

    async def _no_orphans(self, dataset: str) -> None:
        """A write whose replica died before recording its outcome holds its record back until
        the resolver settles it (after its deadline and ``orphan_grace``): under the fence it
        could neither drain nor be waited for."""
        orphans = await queries.orphan_count(self.pool, dataset)
        if orphans:
            raise Refused(
                f"{dataset}: {orphans} write(s) left by a replica that died before recording "
                "their outcome; the resolver settles them once their deadline and orphan_grace "
                "have passed: try again then; nothing was changed"
            )

    async def _small_backlog(self, dataset: str, done: Outcome) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.backlog_wait
        while True:
            counts = (await queries.backlog(self.pool)).get(dataset, queries.EMPTY_BACKLOG)
            if counts["in_doubt"] or counts["dead"]:
                raise Refused(
                    f"{dataset}: {counts['in_doubt']} in doubt and {counts['dead']} dead journal "
                    "entries would never reach the new authority: settle them first "
                    "(bascule journal list --state in-doubt|dead); nothing was changed"
                )
            if counts["backlog"] < self.settings.small_backlog:
                done.steps.append(f"backlog toward the new authority small ({counts['backlog']})")
                return
            if loop.time() >= deadline:
                raise Refused(
                    f"{dataset}: the backlog toward the new authority is {counts['backlog']} "
                    f"entries, not under {self.settings.small_backlog} after "
                    f"{self.settings.backlog_wait:g} s; nothing was changed"
                )
            await asyncio.sleep(0.2)

    async def _fence(self, conn: Any, dataset: str, done: Outcome) -> None:
        hold = self.settings.hold
        await conn.execute(f"SET lock_timeout = '{max(1, int(hold * 1000))}ms'")
        # Should this process freeze or lose its network while holding the fence, Postgres
        # ends the session, and the fence with it, instead of leaving every write blocked.
        idle = int((2 * hold + 30.0) * 1000)
        await conn.execute(f"SET idle_session_timeout = '{idle}ms'")
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", fence_id(dataset), timeout=hold + 5.0)
        except asyncpg.LockNotAvailableError:
            holders = await _fence_holders(self.pool, dataset)
            raise Refused(
                f"{dataset}: writes in flight did not finish within {hold:g} s (held by "
                f"{holders or 'sessions that are gone now'}); nothing was changed (try again; a "
                "replica that stays frozen keeps its writes' sessions and their fence: stop it)"
            ) from None
        finally:
            await conn.execute("SET lock_timeout = 0")
        done.steps.append("took the write fence: new writes wait, writes in flight finished")
        # Reset when the pool hands the connection back (RESET ALL).

    async def _drained(self, dataset: str, done: Outcome) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.hold
        while True:
            counts = (await queries.backlog(self.pool)).get(dataset, queries.EMPTY_BACKLOG)
            if counts["backlog"] == 0 and not counts["in_doubt"] and not counts["dead"]:
                done.steps.append("backlog toward the new authority drained to zero")
                return
            if loop.time() >= deadline:
                raise Refused(
                    f"{dataset}: the backlog toward the new authority did not drain within "
                    f"{self.settings.hold:g} s ({counts['backlog']} left, {counts['in_doubt']} "
                    f"in doubt, {counts['dead']} dead); nothing was changed"
                )
            await asyncio.sleep(0.05)

    async def _advance_ids(self, dataset: str, new_authority: str, done: Outcome) -> None:
        spec = self.ids.get(dataset)
        if spec is None:
            done.steps.append(
                "no id allocation configured ([datasets.X] ids): ids not moved — if the backends "
                "assign ids, the new authority's may collide with the other side's"
            )
            log.warning("%s: authority switch with no id allocation configured", dataset)
            return
        other = "source" if new_authority == "target" else "target"
        new_db, other_db = self.databases.get(new_authority), self.databases.get(other)
        if not new_db or not other_db:
            raise Refused(
                f"{dataset}: moving ids needs both backends' `database` DSNs; nothing was changed"
            )
        timeout = self.settings.hold
        highest = await _highest_id(other_db, spec, timeout)
        value = await _advance(new_db, spec, highest, timeout)
        done.steps.append(f"{new_authority}'s id allocation moved past the {other}'s ids")
        log.info("%s: %s sequence now at %s", dataset, new_authority, value)


async def _fence_holders(pool: asyncpg.Pool, dataset: str) -> str:
    """Who holds the dataset's fence, by session name: ``bascule writer HOST:PID (N)``."""
    key = fence_id(dataset) & 0xFFFFFFFFFFFFFFFF  # pg_locks shows a bigint key as two oids
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT coalesce(nullif(a.application_name, ''), 'pid ' || l.pid) AS who,"
            " count(*) AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid"
            " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5",
            key >> 32,
            key & 0xFFFFFFFF,
        )
    return ", ".join(f"{r['who']} ({r['n']})" for r in rows)


def switcher_for(config: Config, pool: asyncpg.Pool) -> Switcher:
    """The switcher a CLI or a replica's admin API uses, from the configuration."""
    return Switcher(
        pool,
        config.switch,
        ids={name: d.ids for name, d in config.datasets.items() if d.ids is not None},
        databases={
            "source": config.source_backend.database,
            "target": config.target_backend.database,
        },
    )


async def _highest_id(dsn: str, spec: IdAllocation, timeout: float) -> int:
    """The highest id the other side has given out: its rows', and its sequence's (an id
    handed out then deleted must never be handed out again)."""
    conn = await asyncpg.connect(dsn, timeout=timeout, command_timeout=timeout)
    try:
        await conn.execute(f"SET lock_timeout = '{max(1, int(timeout * 1000))}ms'")
        value = await conn.fetchval(
            f"SELECT greatest((SELECT coalesce(max({_ident(spec.column)}), 0)"
            f" FROM {_ident(spec.table)}), (SELECT last_value FROM {_ident(spec.sequence)}))"
        )
        return int(value)
    finally:
        await conn.close()


async def _advance(dsn: str, spec: IdAllocation, past: int, timeout: float) -> int:
    """Move ``spec.sequence`` to at least ``past`` (never back): its next value is higher."""
    conn = await asyncpg.connect(dsn, timeout=timeout, command_timeout=timeout)
    try:
        await conn.execute(f"SET lock_timeout = '{max(1, int(timeout * 1000))}ms'")
        value: int = await conn.fetchval(
            "SELECT setval($1::regclass, greatest($2::bigint,"
            f" (SELECT last_value FROM {_ident(spec.sequence)})))",
            spec.sequence,
            past,
        )
        return value
    finally:
        await conn.close()


def _ident(name: str) -> str:
    """A configured SQL name (checked by the configuration), quoted part by part."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))
