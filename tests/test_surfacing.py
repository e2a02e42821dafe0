"""The surfacing plugin, run on small inner test sessions: background failures fail the test."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

# The inner sessions cannot import bascule while the tree moves; spawn() is copied from
# bascule/tasks.py, logging exactly as it does.
HELPERS = '''
import asyncio
import logging

_log = logging.getLogger("bascule.tasks")
_running = set()


def spawn(coro, *, name):
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task):
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:
        _log.error("task %s failed", task.get_name(), exc_info=task.exception())


def start(coro, *, name):
    """A task nobody keeps a reference to nor awaits."""
    asyncio.get_running_loop().create_task(coro, name=name)


async def dies(message):
    await asyncio.sleep(0)
    raise RuntimeError(message)
'''


def run_inner(pytester: pytest.Pytester, source: str) -> pytest.HookRecorder:
    pytester.makeini(INI)
    pytester.makepyfile(inner_helpers=HELPERS, test_inner=source)
    # Without the plugins the inner tests do not use: hypothesis's alone costs a second a run.
    return pytester.inline_run(
        *("-p", "tests.surfacing", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"),
        *("-p", "no:xdist", "-p", "no:xdist.looponfail", "-p", "no:aiohttp"),
    )


def report(recorder: pytest.HookRecorder, test: str, when: str) -> pytest.TestReport:
    found = recorder.matchreport(test, when=when)
    assert isinstance(found, pytest.TestReport)
    return found


def test_a_background_task_that_dies_fails_the_test_naming_it(pytester: pytest.Pytester) -> None:
    recorder = run_inner(
        pytester,
        """
        import asyncio
        from inner_helpers import dies, spawn

        async def test_writer_dies():
            spawn(dies("disk on fire"), name="journal-writer")
            await asyncio.sleep(0.05)
        """,
    )
    recorder.assertoutcome(failed=1)
    call = report(recorder, "test_writer_dies", "call")
    assert call.failed
    headline = call.longreprtext.splitlines()[0]
    assert "task journal-writer failed" in headline
    assert "RuntimeError: disk on fire" in headline
    assert "Traceback" in call.longreprtext
    assert "background_failures_expected" in call.longreprtext


def test_an_unretrieved_task_exception_fails_the_test(pytester: pytest.Pytester) -> None:
    recorder = run_inner(
        pytester,
        """
        import asyncio
        from inner_helpers import dies, start

        async def test_orphan_dies():
            start(dies("nobody listens"), name="orphan")
            await asyncio.sleep(0.05)
        """,
    )
    recorder.assertoutcome(failed=1)
    headline = report(recorder, "test_orphan_dies", "call").longreprtext.splitlines()[0]
    assert "Task exception was never retrieved" in headline
    assert "task 'orphan'" in headline
    assert "RuntimeError: nobody listens" in headline


def test_an_exception_in_a_loop_callback_fails_the_test(pytester: pytest.Pytester) -> None:
    recorder = run_inner(
        pytester,
        """
        import asyncio

        def explode():
            raise ZeroDivisionError("in a callback")

        async def test_callback_raises():
            asyncio.get_running_loop().call_soon(explode)
            await asyncio.sleep(0.01)
        """,
    )
    recorder.assertoutcome(failed=1)
    headline = report(recorder, "test_callback_raises", "call").longreprtext.splitlines()[0]
    assert "Exception in callback" in headline
    assert "explode" in headline
    assert "ZeroDivisionError: in a callback" in headline


def test_a_task_only_garbage_collected_after_the_test_fails_its_teardown(
    pytester: pytest.Pytester,
) -> None:
    recorder = run_inner(
        pytester,
        """
        import asyncio
        import gc
        import pytest
        from inner_helpers import dies

        @pytest.fixture
        def no_automatic_gc():
            # Deterministic: only the plugin's own collection may find the cycle.
            gc.disable()
            yield
            gc.enable()

        async def test_cycle_keeps_a_failed_task(no_automatic_gc):
            holder = {}
            holder["task"] = asyncio.get_running_loop().create_task(dies("late"), name="cyclic")
            holder["self"] = holder
            await asyncio.sleep(0.05)
        """,
    )
    assert report(recorder, "test_cycle_keeps_a_failed_task", "call").passed
    teardown = report(recorder, "test_cycle_keeps_a_failed_task", "teardown")
    assert teardown.failed
    headline = teardown.longreprtext.splitlines()[0]
    assert "task 'cyclic'" in headline
    assert "RuntimeError: late" in headline


def test_a_failure_in_fixture_setup_fails_the_setup(pytester: pytest.Pytester) -> None:
    recorder = run_inner(
        pytester,
        """
        import asyncio
        import pytest
        from inner_helpers import dies, spawn

        @pytest.fixture
        async def worker():
            spawn(dies("at startup"), name="fixture-worker")
            await asyncio.sleep(0.05)
            yield

        async def test_uses_worker(worker):
            pass
        """,
    )
    recorder.assertoutcome(failed=1)
    setup = report(recorder, "test_uses_worker", "setup")
    assert setup.failed
    assert "task fixture-worker failed: RuntimeError: at startup" in setup.longreprtext


def test_a_test_failing_anyway_also_names_the_background_failure(
    pytester: pytest.Pytester,
) -> None:
    recorder = run_inner(
        pytester,
        """
        import asyncio
        from inner_helpers import dies, spawn

        async def test_fails_and_writer_dies():
            spawn(dies("disk on fire"), name="journal-writer")
            await asyncio.sleep(0.05)
            assert 1 == 2
        """,
    )
    recorder.assertoutcome(failed=1)
    text = report(recorder, "test_fails_and_writer_dies", "call").longreprtext
    assert "assert 1 == 2" in text
    assert "task journal-writer failed: RuntimeError: disk on fire" in text


def test_the_marker_lets_a_deliberate_failure_pass_and_still_logs_it(
    pytester: pytest.Pytester,
) -> None:
    recorder = run_inner(
        pytester,
        """
        import asyncio
        import pytest
        from inner_helpers import dies, spawn, start

        @pytest.mark.background_failures_expected
        async def test_kills_on_purpose():
            spawn(dies("killed"), name="killed-on-purpose")
            start(dies("orphaned"), name="orphaned-on-purpose")
            await asyncio.sleep(0.05)
        """,
    )
    recorder.assertoutcome(passed=1)
    call = report(recorder, "test_kills_on_purpose", "call")
    # Chained to the loop's default handler and left to logging: the log lines remain.
    assert "task killed-on-purpose failed" in call.caplog
    assert "Task exception was never retrieved" in call.caplog


def test_the_marker_with_match_expects_only_the_failures_it_names(
    pytester: pytest.Pytester,
) -> None:
    recorder = run_inner(
        pytester,
        """
        import asyncio
        import pytest
        from inner_helpers import dies, spawn

        @pytest.mark.background_failures_expected(match="killed-on-purpose")
        async def test_one_expected():
            spawn(dies("killed"), name="killed-on-purpose")
            await asyncio.sleep(0.05)

        @pytest.mark.background_failures_expected(match="killed-on-purpose")
        async def test_another_not():
            spawn(dies("killed"), name="killed-on-purpose")
            spawn(dies("by accident"), name="writer")
            await asyncio.sleep(0.05)
        """,
    )
    recorder.assertoutcome(passed=1, failed=1)
    text = report(recorder, "test_another_not", "call").longreprtext
    assert "task writer failed" in text


def test_clean_async_and_sync_tests_pass(pytester: pytest.Pytester) -> None:
    recorder = run_inner(
        pytester,
        """
        import asyncio
        import logging
        import pytest
        from inner_helpers import spawn

        async def answer():
            return 42

        @pytest.fixture
        async def ready():
            task = spawn(answer(), name="ready")
            yield await task

        async def test_clean_async(ready):
            assert ready == 42
            assert await spawn(answer(), name="fine") == 42
            # A warning on the task logger is not a failure.
            logging.getLogger("bascule.tasks").warning("task %s slow", "fine")

        def test_clean_sync():
            logging.getLogger("elsewhere").error("an error not about a background task")
        """,
    )
    recorder.assertoutcome(passed=2)


def test_a_session_nested_in_a_test_keeps_its_failures_to_itself(
    pytester: pytest.Pytester,
) -> None:
    # When conftest enables the plugin, the tests above run their inner sessions inside a
    # session that has it too, and both see the one bascule.tasks logger.
    recorder = run_inner(
        pytester,
        f"""
        import pytest

        pytest_plugins = ["pytester"]

        def test_hosts_a_session_whose_task_dies(pytester):
            pytester.makeini({INI!r})
            pytester.makepyfile(
                test_innermost='''
                import logging

                def test_task_dies():
                    logging.getLogger("bascule.tasks").error("task %s failed", "deep-writer")
                '''
            )
            pytester.inline_run(
                "-p", "tests.surfacing", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"
            ).assertoutcome(failed=1)
        """,
    )
    recorder.assertoutcome(passed=1)
