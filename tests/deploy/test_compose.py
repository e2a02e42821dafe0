"""deploy/compose.yaml: the compose specification's schema (offline), and a stack that holds
together: every service the issue names, bascule commands bascule accepts, mounted files that
exist, a configuration bascule loads, laptop secrets bascule accepts, a load balancer that
checks readiness."""

from __future__ import annotations

import re
from typing import Any

from bascule.config import Secrets, load_config
from tests.deploy.validate import (
    DEPLOY,
    FIXTURES,
    cli_problem,
    compose_problems,
    interpolate,
    load_yaml_documents,
    port_of,
)

COMPOSE = DEPLOY / "compose.yaml"


def services() -> dict[str, Any]:
    [compose] = load_yaml_documents(COMPOSE)
    return dict(compose["services"])


def bascule_services() -> dict[str, Any]:
    return {name: s for name, s in services().items() if s.get("image") == "bascule:local"}


def test_compose_validates_against_the_compose_specification() -> None:
    assert compose_problems(COMPOSE) == []


def test_a_broken_compose_file_fails_validation() -> None:
    problems = compose_problems(FIXTURES / "broken-compose.yaml")
    assert any(
        "$.services.proxy.depends_on.migrate.condition: 'service_finished' is not one of" in p
        for p in problems
    ), problems
    assert any("$.services.proxy.healthcheck: 'intervall'" in p for p in problems), problems


def test_the_stack_has_every_part() -> None:
    stack = services()
    assert {
        "source-db",
        "target-db",
        "state-db",
        "redis",
        "source-api",
        "target-api",
        "migrate",
        "proxy-1",
        "proxy-2",
        "lb",
        "otel-collector",
    } <= stack.keys()
    commands = {name: s["command"] for name, s in bascule_services().items()}
    assert [commands["source-api"][0], commands["target-api"][0]] == ["api", "api"]
    assert commands["migrate"] == ["migrate"]
    for proxy in ("proxy-1", "proxy-2"):
        assert commands[proxy] == ["proxy"]
        assert stack[proxy]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_the_stacks_commands_are_bascule_commands() -> None:
    problems = [
        cli_problem([interpolate(word, {}) for word in s["command"]], f"compose {name}")
        for name, s in bascule_services().items()
    ]
    assert problems == [None] * len(problems)


def test_mounted_files_exist() -> None:
    missing = []
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and not (DEPLOY / source).exists():
                missing.append(f"{name}: {source}")
    assert missing == []


def test_the_proxies_configuration_and_laptop_secrets_are_accepted() -> None:
    config = load_config(DEPLOY / "compose" / "bascule.toml")
    proxy = services()["proxy-1"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    env = {k: interpolate(str(v), {}) for k, v in proxy["environment"].items()}
    assert mounted[env["BASCULE_CONFIG"]] == "./compose/bascule.toml"
    secrets = Secrets.from_env(env)  # raises ConfigError naming the variable if one is wrong
    assert secrets.hmac_key and secrets.journal_key and secrets.operators()
    for backend in config.backends.values():
        assert backend.credential_env in env
    # bascule's service credential is one of the tokens the reference APIs accept.
    api_tokens = interpolate(services()["source-api"]["environment"]["BASCULE_API_TOKENS"], {})
    assert env[config.source_backend.credential_env or ""] in api_tokens.split(",")
    # The APIs listen where the backends' URLs point.
    for side, backend in (
        ("source-api", config.source_backend),
        ("target-api", config.target_backend),
    ):
        command = services()[side]["command"]
        assert backend.url == f"http://{side}:{command[command.index('--port') + 1]}"


def test_the_load_balancer_checks_readiness_on_the_admin_port() -> None:
    config = load_config(DEPLOY / "compose" / "bascule.toml")
    haproxy = (DEPLOY / "compose" / "haproxy.cfg").read_text(encoding="utf-8")
    backend = haproxy.split("backend proxies", 1)[1].split("\nfrontend", 1)[0]
    assert "option httpchk GET /readyz" in backend
    assert f"check port {port_of(config.proxy.admin_listen)}" in backend
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+)", backend, re.M)
    assert {(name, host) for name, host, _ in servers} == {
        ("proxy-1", "proxy-1"),
        ("proxy-2", "proxy-2"),
    }
    assert {int(port) for *_, port in servers} == {port_of(config.proxy.listen)}
