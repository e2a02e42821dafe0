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
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bascule.config import Config, IdAllocation, SwitchSettings
from bascule.errors import Refused, StaleVersion, StoreError
from bascule.sealing import fence_id
from bascule.stages import Stage, alters_writes, authority, opens_gaps, switches_authority
from bascule.state import replicas
from bascule.state.journal import queries
from bascule.state.postgres import DEAD_SESSION_AFTER, reaching_postgres
from bascule.state.stage_store import StageRow

log = logging.getLogger("bascule.switch")


class Do(enum.Enum):
    """What one step of a change does (:func:`planned_steps`)."""

    NO_ORPHANS = "no orphans"
    SMALL_BACKLOG = "small backlog"
    FENCE = "fence"
    DRAIN = "drain"
    ADVANCE_IDS = "advance ids"
    COMMIT = "commit"
    RELEASE = "release"
    ANNOUNCE = "announce"
    CONFIRM = "confirm"
    UNAFFECTED = "unaffected"


@dataclass(frozen=True, slots=True)
class Step:
    do: Do
    text: str
    """What a real move does, in words for an SRE."""


def planned_steps(rows: StageRow | Sequence[StageRow], wanted: Stage) -> tuple[Step, ...]:
    """The steps of moving ``rows`` (one dataset, or a group's, all at one stage) to
    ``wanted``, in order (docs/architecture.md, *A flip*). Pure.

    A real move runs exactly these (:meth:`Switcher.change`), and so does its dry run, with
    every side effect turned off: the two cannot drift apart."""
    members = (rows,) if isinstance(rows, StageRow) else tuple(rows)
    d, current = " and ".join(r.dataset for r in members), members[0].stage
    versions = ", ".join(
        (f"{r.dataset} " if len(members) > 1 else "") + f"{r.version} -> {r.version + 1}"
        for r in members
    )
    epochs = ", ".join(
        (f"{r.dataset} " if len(members) > 1 else "") + f"{r.write_epoch} -> {r.write_epoch + 1}"
        for r in members
    )
    steps: list[Step] = []
    alters = alters_writes(current, wanted)
    switch = switches_authority(current, wanted)
    new, old = authority(wanted).value, authority(current).value
    whose = f"{d}'s" if len(members) == 1 else f"each of {d}'s"
    if alters:
        steps.append(
            Step(
                Do.NO_ORPHANS,
                f"make sure no write of {d} was left by a replica that died before recording "
                "its outcome (no one could settle it while writes are held)",
            )
        )
    if switch:
        steps.append(
            Step(
                Do.SMALL_BACKLOG,
                f"wait until the backlog of {d}'s writes toward the {new} is small, with "
                "nothing in doubt or dead",
            )
        )
    if alters:
        steps.append(
            Step(
                Do.FENCE,
                f"take {whose} write fence exclusively: new writes to {d} wait (bounded; past "
                "it 503) and writes in flight finish",
            )
        )
    if switch:
        steps.append(Step(Do.DRAIN, f"drain the backlog toward the {new} to zero"))
        steps.append(
            Step(Do.ADVANCE_IDS, f"advance the {new}'s id sequence past every id the {old} holds")
        )
    commit = f"compare-and-set the stage {current.value} -> {wanted.value} (version {versions})"
    if alters:
        commit += f", bump the write epoch ({epochs})"
    for side in sorted(opens_gaps(current, wanted)):
        missing = [r.dataset for r in members if side not in r.gaps]
        if missing:
            of = "" if len(members) == 1 else f" of {', '.join(missing)}"
            commit += f", open the {side.value}'s gap marker{of} (writes stop reaching it)"
    audit = "with its audit row" if len(members) == 1 else "with an audit row each"
    steps.append(Step(Do.COMMIT, f"{commit}, {audit}, in one transaction"))
    if alters:
        steps.append(Step(Do.RELEASE, "release the write fence: writes resume under the new stage"))
    steps.append(Step(Do.ANNOUNCE, "announce the change on Redis (replicas also poll Postgres)"))
    if alters:
        confirmed = ", ".join(
            (f"{r.dataset} " if len(members) > 1 else "") + f"version {r.version + 1}"
            for r in members
        )
        steps.append(
            Step(
                Do.CONFIRM,
                f"wait until every live replica has confirmed {confirmed} (or its lease has "
                f"expired); {d}'s writes resume under the new stage",
            )
        )
    else:
        steps.append(
            Step(Do.UNAFFECTED, "writes are unaffected: same authority, same sides written")
        )
    return tuple(steps)


@dataclass
class Outcome:
    """What a fenced change did (or, in a dry run, found): the steps, in order, for the CLI and
    the audit."""

    steps: list[str] = field(default_factory=list)
    lagging: list[str] = field(default_factory=list)
    """Replicas seen within ``[switch] seen_within`` that had not confirmed when the wait
    ended: live ones slow to confirm, and those whose lease ran out (cut off, frozen)."""
    unconfirmed: list[dict[str, Any]] = field(default_factory=list)
    """Each of them: its name, the version it runs, its last report, whether its lease is
    alive, and when its stages go stale (:meth:`bascule.state.replicas.Unconfirmed.as_json`)."""
    announced: bool = False


Commit = Callable[[], Awaitable[list[StageRow]]]
"""The compare-and-set of every member's stage, with their audit rows, in one transaction."""


@dataclass
class Switcher:
    pool: asyncpg.Pool
    settings: SwitchSettings = field(default_factory=SwitchSettings)
    ids: dict[str, IdAllocation] = field(default_factory=dict)
    """Per dataset: how to move the new authority's id allocation past the other side's ids."""
    databases: dict[str, str | None] = field(default_factory=dict)
    """Per side (``source``/``target``): the backend database's DSN (``[backends.X] database``)."""
    dead_session_after: float = DEAD_SESSION_AFTER
    """``[state] dead_session_after``: how long a writer cut off from the state Postgres may
    keep holding the fence (named in a refusal)."""
    stale_after: float = 30.0
    """``[state] stale_after``: when a replica that stopped reading the stages reports not
    ready (said of each replica that has not confirmed a change)."""

    async def change(
        self,
        dataset: str,
        before: StageRow,
        wanted: Stage,
        commit: Callable[[], Awaitable[StageRow]],
        announce: Callable[[StageRow], Awaitable[bool]] | None = None,
    ) -> tuple[StageRow, Outcome]:
        """Run the steps of the change (:func:`planned_steps`): ``commit`` (the
        compare-and-set of the stage) under the exclusive fence when it alters writes, after
        the barrier for an authority switch. ``announce`` tells the replicas, once the fence is
        released, before their confirmations are awaited. A step that cannot be taken raises
        :class:`Refused` and nothing is committed."""

        async def one() -> list[StageRow]:
            return [await commit()]

        after, done = await self.change_group([before], wanted, one, announce)
        return after[0], done

    async def change_group(
        self,
        befores: Sequence[StageRow],
        wanted: Stage,
        commit: Commit,
        announce: Callable[[StageRow], Awaitable[bool]] | None = None,
    ) -> tuple[list[StageRow], Outcome]:
        """:meth:`change` for several datasets that move together (a group): every check for
        each, every fence in one session (in name order: no deadlock), one commit."""
        run = _Run(self, befores, wanted, commit, announce, dry_run=False)
        await run.all()
        assert run.after is not None
        return run.after, run.done

    async def rehearse(
        self, dataset: str, before: StageRow | Sequence[StageRow], wanted: Stage
    ) -> tuple[Outcome, Refused | None]:
        """The same steps as :meth:`change` (or :meth:`change_group`, given several rows),
        every side effect off: each check is made as the real move would make it now, without
        waiting, taking the fence, moving ids, committing or announcing. Returns what the checks
        found, in order, and the refusal a real move would meet now (None: it would go
        ahead)."""
        befores = [before] if isinstance(before, StageRow) else list(before)
        run = _Run(self, befores, wanted, None, None, dry_run=True)
        try:
            await run.all()
        except Refused as exc:
            return run.done, exc
        return run.done, None


class _Run:
    """One change, real or rehearsed: the steps of :func:`planned_steps`, in order, for each
    dataset that moves."""

    def __init__(
        self,
        switcher: Switcher,
        befores: Sequence[StageRow],
        wanted: Stage,
        commit: Commit | None,
        announce: Callable[[StageRow], Awaitable[bool]] | None,
        *,
        dry_run: bool,
    ) -> None:
        self.s = switcher
        self.pool = switcher.pool
        self.settings = switcher.settings
        self.befores = sorted(befores, key=lambda r: r.dataset)
        self.datasets = [r.dataset for r in self.befores]
        self.wanted = wanted
        self.commit, self.announce = commit, announce
        self.dry_run = dry_run
        self.done = Outcome()
        self.after: list[StageRow] | None = None
        self.new_authority = authority(wanted).value

    async def all(self) -> None:
        steps = planned_steps(self.befores, self.wanted)
        async with contextlib.AsyncExitStack() as held:
            self.held = held
            for step in steps:
                await self.take(step)

    async def take(self, step: Step) -> None:
        actions: dict[Do, Callable[[], Awaitable[None]]] = {
            Do.NO_ORPHANS: self._no_orphans,
            Do.SMALL_BACKLOG: self._small_backlog,
            Do.FENCE: self._fence,
            Do.DRAIN: self._drained,
            Do.ADVANCE_IDS: self._advance_ids,
            Do.COMMIT: self._commit,
            Do.RELEASE: self._release,
            Do.ANNOUNCE: self._announce,
            Do.CONFIRM: self._confirm,
            Do.UNAFFECTED: self._unaffected,
        }
        await actions[step.do]()

    async def _release(self) -> None:
        await self.held.aclose()  # the fence's session is released, or ended
        self._note("released the write fence: writes resume under the new stage")

    async def _unaffected(self) -> None:
        """Nothing to do: same authority, same sides written."""

    def _note(self, text: str, rehearsed: str | None = None) -> None:
        """Record what a real step did, or (a dry run) what its check found."""
        found = rehearsed if self.dry_run else text
        if found:
            self.done.steps.append(found)

    def _of(self, dataset: str) -> str:
        """``dcir``'s prefix in a finding, only when a group moves."""
        return f"{dataset}: " if len(self.datasets) > 1 else ""

    async def _no_orphans(self) -> None:
        """A write whose replica died before recording its outcome holds its record back until
        the resolver settles it (after its deadline and ``orphan_grace``): under the fence it
        could neither drain nor be waited for."""
        for dataset in self.datasets:
            orphans = await queries.orphan_count(self.pool, dataset)
            if orphans:
                raise Refused(
                    f"{dataset}: {orphans} write(s) left by a replica that died before "
                    "recording their outcome; the resolver settles them once their deadline and "
                    "orphan_grace have passed: try again then; nothing was changed"
                )
        self._note("", "no write left by a dead replica")

    async def _backlog(self) -> dict[str, dict[str, Any]]:
        counts = await queries.backlog(self.pool)
        found: dict[str, dict[str, Any]] = {}
        for dataset in self.datasets:
            of = found[dataset] = counts.get(dataset, queries.EMPTY_BACKLOG)
            if of["in_doubt"] or of["dead"]:
                raise Refused(
                    f"{dataset}: {of['in_doubt']} in doubt and {of['dead']} dead journal "
                    "entries would never reach the new authority: settle them first "
                    "(bascule journal list --state in-doubt|dead); nothing was changed"
                )
        return found

    async def _small_backlog(self) -> None:
        small, wait = self.settings.small_backlog, self.settings.backlog_wait
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            counts = await self._backlog()
            large = {d: c["backlog"] for d, c in counts.items() if c["backlog"] >= small}
            if not large:
                for dataset, c in counts.items():
                    of = self._of(dataset)
                    self._note(
                        f"{of}backlog toward the new authority small ({c['backlog']})",
                        f"{of}backlog toward the new authority small now ({c['backlog']} < "
                        f"{small}), nothing in doubt or dead",
                    )
                return
            dataset, backlog = next(iter(large.items()))
            if self.dry_run:
                raise Refused(
                    f"{dataset}: the backlog toward the new authority is {backlog} entries now, "
                    f"not under {small}: a real move would wait up to {wait:g} s for it and give "
                    "up if it stays; nothing was changed"
                )
            if loop.time() >= deadline:
                raise Refused(
                    f"{dataset}: the backlog toward the new authority is {backlog} entries, not "
                    f"under {small} after {wait:g} s; nothing was changed"
                )
            await asyncio.sleep(0.2)

    async def _fence(self) -> None:
        hold = self.settings.hold
        if self.dry_run:
            for dataset in self.datasets:
                stuck = await _stuck_writers(self.pool, dataset, hold)
                if stuck:
                    raise Refused(
                        f"{dataset}: writes in flight have held the fence for longer than "
                        f"{hold:g} s ({stuck}): a real move would wait {hold:g} s for them and "
                        "give up; nothing was changed (a replica that stays frozen keeps its "
                        "writes' sessions and their fence: stop it)"
                    )
                holders = await _fence_holders(self.pool, dataset)
                self.done.steps.append(
                    f"{self._of(dataset)}writes in flight now: {holders or 'none'} (a real move "
                    f"waits up to {hold:g} s for them)"
                )
            return
        conn = await self.held.enter_async_context(_fence_session(self.pool))
        await conn.execute(f"SET lock_timeout = '{max(1, int(hold * 1000))}ms'")
        # Should this process freeze or lose its network while holding the fence, Postgres
        # ends the session, and the fence with it, instead of leaving every write blocked.
        idle = int((2 * hold + 30.0) * 1000)
        await conn.execute(f"SET idle_session_timeout = '{idle}ms'")
        try:
            for dataset in self.datasets:  # in name order: two group moves cannot deadlock
                try:
                    await conn.execute(
                        "SELECT pg_advisory_lock($1)", fence_id(dataset), timeout=hold + 5.0
                    )
                except asyncpg.LockNotAvailableError:
                    holders = await _fence_holders(self.pool, dataset)
                    raise Refused(
                        f"{dataset}: writes in flight did not finish within {hold:g} s (held by "
                        f"{holders or 'sessions that are gone now'}); nothing was changed (try "
                        "again: a replica cut off from the state Postgres loses its sessions, "
                        f"and this fence, within {self.s.dead_session_after:g} s of its last "
                        "answer (state.dead_session_after); one that stays frozen keeps them: "
                        "stop it)"
                    ) from None
        finally:
            await conn.execute("SET lock_timeout = 0")
        self.done.steps.append("took the write fence: new writes wait, writes in flight finished")
        # Reset when the pool hands the connection back (RESET ALL).

    async def _drained(self) -> None:
        hold = self.settings.hold
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold
        while True:
            counts = await self._backlog()
            left = {d: c for d, c in counts.items() if c["backlog"]}
            if not left or self.dry_run:
                now = ", ".join(f"{self._of(d)}{c['backlog']}" for d, c in counts.items())
                self._note(
                    "backlog toward the new authority drained to zero",
                    f"backlog toward the new authority now {now}: a real move drains it to "
                    f"zero under the fence (within {hold:g} s)",
                )
                return
            if loop.time() >= deadline:
                dataset, c = next(iter(left.items()))
                raise Refused(
                    f"{dataset}: the backlog toward the new authority did not drain within "
                    f"{hold:g} s ({c['backlog']} left, {c['in_doubt']} in doubt, "
                    f"{c['dead']} dead); nothing was changed"
                )
            await asyncio.sleep(0.05)

    async def _advance_ids(self) -> None:
        for dataset in self.datasets:
            await self._advance_ids_of(dataset)

    async def _advance_ids_of(self, dataset: str) -> None:
        new_authority = self.new_authority
        spec = self.s.ids.get(dataset)
        if spec is None:
            self.done.steps.append(
                f"{self._of(dataset)}no id allocation configured ([datasets.X] ids): ids not "
                "moved — if the backends assign ids, the new authority's may collide with the "
                "other side's"
            )
            if not self.dry_run:
                log.warning("%s: authority switch with no id allocation configured", dataset)
            return
        other = "source" if new_authority == "target" else "target"
        new_db, other_db = self.s.databases.get(new_authority), self.s.databases.get(other)
        if not new_db or not other_db:
            raise Refused(
                f"{dataset}: moving ids needs both backends' `database` DSNs; nothing was changed"
            )
        timeout = self.settings.hold
        try:
            highest = await _highest_id(other_db, spec, timeout)
            if self.dry_run:
                current = await _sequence_value(new_db, spec, timeout)
                self.done.steps.append(
                    f"{self._of(dataset)}the {other} holds ids up to {highest}; the "
                    f"{new_authority}'s sequence is at {current}: a real move advances it to at "
                    f"least {highest}"
                )
                return
            value = await _advance(new_db, spec, highest, timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise Refused(
                f"{dataset}: cannot move the {new_authority}'s ids: a backend database did not "
                f"answer ({type(exc).__name__}); nothing was changed"
            ) from exc
        self.done.steps.append(
            f"{self._of(dataset)}{new_authority}'s id allocation moved past the {other}'s ids"
        )
        log.info("%s: %s sequence now at %s", dataset, new_authority, value)

    async def _commit(self) -> None:
        if self.dry_run:
            async with reaching_postgres():
                rows = await self.pool.fetch(
                    "SELECT dataset, version FROM bascule_stage WHERE dataset = ANY($1::text[])",
                    self.datasets,
                )
            now = {r["dataset"]: r["version"] for r in rows}
            for before in self.befores:
                if now.get(before.dataset) != before.version:
                    raise StaleVersion(before.dataset, before.version, now.get(before.dataset))
            return
        assert self.commit is not None
        self.after = await self.commit()
        if alters_writes(self.befores[0].stage, self.wanted):
            versions = ", ".join(f"{self._of(r.dataset)}version {r.version}" for r in self.after)
            self._note(f"committed {self.wanted.value} ({versions})")

    async def _announce(self) -> None:
        if self.dry_run or self.after is None:
            return
        # Committed: from here on nothing may say "nothing was changed".
        announced = True
        for after in self.after:
            announced &= await self.announce(after) if self.announce else False
        self.done.announced = announced

    async def _confirm(self) -> None:
        if self.dry_run:
            live = [r.name for r in await replicas.listing(self.pool) if r.alive]
            self.done.steps.append(f"live replicas that would confirm: {', '.join(live) or 'none'}")
            lapsed = sorted(
                {
                    one.name
                    for r in self.befores
                    for one in await replicas.unconfirmed(
                        self.pool, r.dataset, r.version + 1, within=self.settings.seen_within
                    )
                    if not one.alive
                }
            )
            if lapsed:
                self.done.steps.append(
                    "replicas whose lease ran out (cut off or frozen: they would not confirm, "
                    f"and serve reads on their last known stages): {', '.join(lapsed)}"
                )
            return
        assert self.after is not None
        stale_after, within = self.s.stale_after, self.settings.seen_within
        behind: dict[str, replicas.Unconfirmed] = {}
        try:
            for after in self.after:
                await replicas.confirmed(
                    self.pool, after.dataset, after.version, timeout=self.settings.confirm_wait
                )
            # Not only the live ones: a replica whose lease ran out (cut off, frozen) still
            # serves reads on the stages it last read.
            for after in self.after:
                for one in await replicas.unconfirmed(
                    self.pool, after.dataset, after.version, within=within
                ):
                    behind.setdefault(one.name, one)
        except StoreError as exc:
            self.done.steps.append(
                f"committed, but the replicas' confirmations could not be read: {exc}"
            )
            self.done.lagging = ["(unknown: the state Postgres did not answer)"]
            return
        self.done.lagging = sorted(behind)
        self.done.unconfirmed = [behind[n].as_json(stale_after) for n in self.done.lagging]
        if self.done.lagging:
            log.warning(
                "%s: replicas %s have not confirmed the new versions",
                ", ".join(self.datasets),
                ", ".join(self.done.lagging),
            )
            named = ", ".join(
                r["name"] + ("" if r["lease_alive"] else " (its lease ran out)")
                for r in self.done.unconfirmed
            )
            self.done.steps.append(
                f"replicas seen in the last {within:g} s that have not confirmed it: {named}"
            )
        else:
            self.done.steps.append("every live replica confirmed it")


@contextlib.asynccontextmanager
async def _fence_session(pool: asyncpg.Pool) -> AsyncIterator[Any]:
    """A session of the pool for holding the fence; on leaving, its locks are released or, on
    any failure, the session is ended: its locks go with it, whatever state the connection is
    in (a cancelled statement, a broken socket)."""
    async with reaching_postgres(), pool.acquire() as conn:
        try:
            yield conn
        finally:
            try:
                await conn.execute("SELECT pg_advisory_unlock_all()", timeout=5.0)
            except BaseException:
                conn.terminate()
                raise


async def _stuck_writers(pool: asyncpg.Pool, dataset: str, hold: float) -> str:
    """Sessions holding the dataset's fence that have been idle longer than ``hold``: a writer
    frozen mid-write (a real change would wait ``hold`` for it in vain)."""
    return await _fence_holders(pool, dataset, idle_longer_than=hold)


async def _fence_holders(
    pool: asyncpg.Pool, dataset: str, *, idle_longer_than: float | None = None
) -> str:
    """Who holds the dataset's fence, by session name: ``bascule writer HOST:PID (N)``;
    ``idle_longer_than``: only sessions idle for longer than that many seconds."""
    key = fence_id(dataset) & 0xFFFFFFFFFFFFFFFF  # pg_locks shows a bigint key as two oids
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT coalesce(nullif(a.application_name, ''), 'pid ' || l.pid) AS who,"
            " count(*) AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid"
            " AND ($3::float8 IS NULL OR (a.state <> 'active'"
            "   AND a.state_change < now() - make_interval(secs => $3)))"
            " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5",
            key >> 32,
            key & 0xFFFFFFFF,
            idle_longer_than,
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
        dead_session_after=config.state.dead_session_after,
        stale_after=config.state.stale_after,
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


async def _sequence_value(dsn: str, spec: IdAllocation, timeout: float) -> int:
    """Where ``spec.sequence`` stands (read only: a dry run's look)."""
    conn = await asyncpg.connect(dsn, timeout=timeout, command_timeout=timeout)
    try:
        value = await conn.fetchval(f"SELECT last_value FROM {_ident(spec.sequence)}")
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
