"""`bascule journal resolve` and the audited `journal retry`, through the CLI on the stores and
through a proxy's admin API (issue 16, item 2), on the entries of ``test_journal_cli``."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from refapi.lab import OPERATOR_TOKEN
from tests.cutover.test_admin_and_cli import OP, Admin, admin, arun, call
from tests.cutover.test_journal_cli import entries
from tests.harness import cli_env

__all__ = ["admin", "entries"]  # fixtures, shared


@pytest.fixture
def env(tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    return cli_env(tmp_path, pg_url, redis_url, redis_prefix)


@pytest.mark.parametrize("via", ["stores", "admin API"])
async def test_resolve_and_retry_are_audited(
    entries: dict[str, int], env: dict[str, str], admin: Admin, via: str
) -> None:
    if via == "admin API":
        env = {**env, "BASCULE_ADMIN_URL": admin.url, "BASCULE_ADMIN_TOKEN": OPERATOR_TOKEN}
    doubt, dead = str(entries["in_doubt"]), str(entries["dead"])
    # Retry is for dead entries; asked for one in doubt it says what to do.
    refused = await arun(env, "journal", "retry", doubt)
    assert refused.returncode == 3 and "journal resolve" in refused.stderr, refused.stderr
    done = await arun(env, "journal", "retry", dead, "--reason", "fixed the target", "--by", "bob")
    assert done.returncode == 0, done.stderr
    # A write naming its record is read back by the resolver: `applied` has nothing to add.
    named = await arun(env, "journal", "resolve", doubt, "applied", "--reason", "x")
    assert named.returncode == 3 and "names its record" in named.stderr, named.stderr
    assert (await arun(env, "journal", "resolve", doubt, "not-applied")).returncode == 2
    done = await arun(
        env, "journal", "resolve", doubt, "not-applied", "--reason", "absent", "--by", "bob"
    )
    assert done.returncode == 0, done.stderr
    assert "resolved as not-applied" in done.stdout, done.stdout
    again = await arun(env, "journal", "resolve", doubt, "not-applied", "--reason", "again")
    assert again.returncode == 3 and "not in doubt" in again.stderr, again.stderr
    history = orjson.loads((await arun(env, "history", "dcir", "--json")).stdout)["history"]
    retried, resolved = history[-2], history[-1]
    assert (retried["action"], retried["reason"], retried["details"]["seqs"]) == (
        "journal-retry",
        "fixed the target",
        [entries["dead"]],
    )
    assert (resolved["action"], resolved["details"]["as"]) == ("journal-resolve", "not-applied")
    who = "bob" if via == "stores" else "operator"  # through the API: the token's name
    assert retried["actor"] == resolved["actor"] == who


async def test_the_admin_api_refuses_bad_resolutions_with_400(admin: Admin) -> None:
    for seq, body in (
        ("²", {"as": "not-applied", "reason": "x"}),
        ("99999999999999999999", {"as": "not-applied", "reason": "x"}),
        ("7", {"as": "maybe", "reason": "x"}),
        ("7", {"as": "not-applied"}),
        ("7", {"as": "not-applied", "reason": "x", "force": True}),
    ):
        status, answer = await call("POST", f"{admin.url}/v1/journal/{seq}/resolve", OP, body)
        assert status == 400, (seq, body, answer)
    status, answer = await call(
        "POST", f"{admin.url}/v1/journal/7/resolve", OP, {"as": "not-applied", "reason": "x"}
    )
    assert status == 409 and "does not exist" in answer["error"]["message"], answer
