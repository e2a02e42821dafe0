"""Pytest plugin: a test fails when a background task dies or the event loop reports an error.

Without it, a background task that dies is only logged (``bascule.tasks.spawn`` logs
``"task %s failed"`` at ERROR on the ``bascule.tasks`` logger) and an exception the event loop
reports ("Task exception was never retrieved", an exception in a callback) is only logged too,
so the test that caused it passes. With it, the phase (setup, call or teardown) during which
either happens fails, with the task and the exception in the message.

Enable with ``pytest_plugins = ["tests.surfacing"]`` in the root conftest, or ``-p
tests.surfacing``. A test that kills a background task on purpose opts out with
``@pytest.mark.background_failures_expected``; the failures are still logged.

How it sees each kind:

- the log records through a handler on the ``bascule.tasks`` logger;
- the event loop's reports through an exception handler installed on every loop a fixture
  provides (pytest-asyncio's runner fixtures provide an ``asyncio.Runner``; a legacy or
  custom fixture may provide a loop). It records, then chains to the handler that was there
  before (or the loop's default), so the usual log line still appears;
- a task whose exception is only reported when it is garbage-collected: after an asyncio
  test's teardown (its loop is closed by then) the plugin runs ``gc.collect()`` and checks
  again. Sync tests skip that collection, so they are not slowed down; and what exists when
  the tests start (imports, collection) is frozen out of collections (``gc.freeze()``) for
  the session, so each collection only walks objects made since.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import re
import threading
import traceback
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import pytest

MARKER = "background_failures_expected"
TASK_LOGGER = "bascule.tasks"

_PLUGIN_NAME = "bascule-surfacing"


@dataclass(frozen=True)
class BackgroundFailure:
    """One background failure: a one-line summary and the full text with its traceback."""

    headline: str
    detail: str


def _exception_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()


def _from_log_record(record: logging.LogRecord) -> BackgroundFailure:
    headline = f"{record.name}: {record.getMessage()}"
    detail = headline
    if record.exc_info is not None and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        headline += f": {_exception_line(exc)}"
        detail = f"{headline}\n{''.join(traceback.format_exception(exc)).rstrip()}"
    return BackgroundFailure(headline, detail)


def _from_loop_context(context: dict[str, Any]) -> BackgroundFailure:
    message = context.get("message") or "unhandled exception in the event loop"
    subject = context.get("task") or context.get("future")
    handle = context.get("handle")
    if isinstance(subject, asyncio.Task):
        coro = subject.get_coro()
        coro_name = getattr(coro, "__qualname__", repr(coro))
        where = f" in task {subject.get_name()!r} ({coro_name})"
    elif subject is not None:
        where = f" in {subject!r}"
    elif handle is not None:
        where = f" in callback {handle!r}"
    else:
        where = ""
    headline = f"event loop: {message}{where}"
    detail = headline
    exc = context.get("exception")
    if isinstance(exc, BaseException):
        headline += f": {_exception_line(exc)}"
        detail = f"{headline}\n{''.join(traceback.format_exception(exc)).rstrip()}"
    return BackgroundFailure(headline, detail)


# Innermost last. A pytester session run in-process inside a test shares the loggers with the
# session running that test; only the innermost one records, so the inner session's deliberate
# failures do not fail the outer test.
_sessions: list[_Surfacing] = []


class _TaskLogHandler(logging.Handler):
    def __init__(self, surfacing: _Surfacing) -> None:
        super().__init__(logging.ERROR)
        self._surfacing = surfacing

    def emit(self, record: logging.LogRecord) -> None:
        self._surfacing.record(_from_log_record(record))


class _LoopHandler:
    """A loop exception handler that records the report, then hands it on."""

    def __init__(self, surfacing: _Surfacing, previous: Any) -> None:
        self.surfacing = surfacing
        self.previous = previous

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.surfacing.record(_from_loop_context(context))
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


def _loop_of(value: object) -> asyncio.AbstractEventLoop | None:
    if isinstance(value, asyncio.AbstractEventLoop):
        return value
    if isinstance(value, asyncio.Runner):
        try:
            return value.get_loop()
        except RuntimeError:  # a closed runner
            return None
    return None


def _is_async(item: pytest.Item) -> bool:
    return item.get_closest_marker("asyncio") is not None or inspect.iscoroutinefunction(
        getattr(item, "obj", None)
    )


class _Surfacing:
    """The plugin's state for one pytest session (one per xdist worker)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # loggers may be called from other threads
        self._failures: list[BackgroundFailure] = []
        self._loop_seen = False
        self._log_handler = _TaskLogHandler(self)
        logging.getLogger(TASK_LOGGER).addHandler(self._log_handler)
        _sessions.append(self)

    def record(self, failure: BackgroundFailure) -> None:
        if _sessions and _sessions[-1] is not self:
            return
        with self._lock:
            self._failures.append(failure)

    def _take(self) -> list[BackgroundFailure]:
        with self._lock:
            failures, self._failures = self._failures, []
        return failures

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop_seen = True
        current = loop.get_exception_handler()
        if isinstance(current, _LoopHandler) and current.surfacing is self:
            return
        loop.set_exception_handler(_LoopHandler(self, current))

    def _check(self, item: pytest.Item, when: str, raised: BaseException | None) -> None:
        failures = self._take()
        marker = item.get_closest_marker(MARKER)
        if marker is not None:
            # match=REGEX: only the failures whose first line it finds are expected.
            pattern = marker.kwargs.get("match")
            if pattern is None:
                return
            failures = [f for f in failures if not re.search(pattern, f.headline)]
        if not failures:
            return
        if raised is not None and not isinstance(raised, Exception):
            # A skip, an exit or an interrupt: report them with the next phase, if any.
            with self._lock:
                self._failures[:0] = failures
            return
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        what = (
            f"{len(failures)} background failures" if len(failures) > 1 else "A background failure"
        )
        text = "\n".join(
            [
                failures[0].headline + more,
                "",
                f"{what} during {when} of {item.nodeid}: a background task died or the event"
                " loop reported an unhandled exception. If the test causes it on purpose, mark"
                f" it @pytest.mark.{MARKER}.",
                "",
                *(failure.detail + "\n" for failure in failures),
            ]
        )
        if raised is None:
            pytest.fail(text, pytrace=False)
        # The phase failed already; the background failure is likely its cause.
        raised.add_note(text)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> Generator[None, object, object]:
        value = yield
        loop = _loop_of(value)
        if loop is not None:
            self._watch(loop)
        return value

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        # Anything recorded since the last test's teardown surfaces here rather than nowhere.
        self._loop_seen = False
        try:
            yield
        except BaseException as exc:
            self._check(item, "setup", exc)
            raise
        self._check(item, "setup", None)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        try:
            yield
        except BaseException as exc:
            self._check(item, "call", exc)
            raise
        self._check(item, "call", None)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, None, None]:
        try:
            yield
        except BaseException as exc:
            self._collect(item)
            self._check(item, "teardown", exc)
            raise
        self._collect(item)
        self._check(item, "teardown", None)

    def _collect(self, item: pytest.Item) -> None:
        # A task that failed unobserved is reported only when it is collected; one caught in a
        # reference cycle would otherwise be reported during some later test, or never.
        if self._loop_seen or _is_async(item):
            gc.collect()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Generator[None, object, object]:
        # What imports and collection made lives all session: frozen, it is out of the full
        # collection each asyncio test's teardown runs, which then costs well under a
        # millisecond instead of tens. A nested pytester session leaves the freeze to its host.
        freezing = gc.get_freeze_count() == 0
        if freezing:
            gc.collect()
            gc.freeze()
        try:
            return (yield)
        finally:
            if freezing:
                gc.unfreeze()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        logging.getLogger(TASK_LOGGER).removeHandler(self._log_handler)
        if self in _sessions:
            _sessions.remove(self)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: the test kills a background task (or lets the event loop report an"
        " exception) on purpose; do not fail it for that.",
    )
    if not config.pluginmanager.has_plugin(_PLUGIN_NAME):
        config.pluginmanager.register(_Surfacing(), _PLUGIN_NAME)
