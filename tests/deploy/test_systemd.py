"""deploy/systemd: the unit stops bascule with SIGTERM and waits long enough for its pre-stop
window and drain, runs it hardened and unprivileged, and its environment file names every
secret bascule reads, with placeholders only."""

from __future__ import annotations

import shlex

from bascule.config import load_config
from tests.deploy.validate import (
    DEPLOY,
    cli_problem,
    load_yaml_documents,
    parse_env_file,
    parse_unit,
    secrets_needed,
)

UNIT = DEPLOY / "systemd" / "bascule.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "bascule.env.example"


def test_the_unit_stops_bascule_gracefully() -> None:
    service = parse_unit(UNIT)["Service"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]  # SIGTERM to bascule, SIGKILL to all at the end
    # The same budget as the Kubernetes pod's, which also covers its preStop sleep.
    [deployment] = [
        d
        for d in load_yaml_documents(DEPLOY / "k8s" / "deployment.yaml")
        if d["kind"] == "Deployment"
    ]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert int(service["TimeoutStopSec"][0]) >= grace


def test_the_unit_is_hardened() -> None:
    service = parse_unit(UNIT)["Service"]
    assert service.get("DynamicUser") == ["yes"] or "User" in service
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service.get(key) == [value], key


def test_the_unit_runs_bascule_proxy() -> None:
    service = parse_unit(UNIT)["Service"]
    [exec_start] = service["ExecStart"]
    program, *argv = shlex.split(exec_start)
    assert program.endswith("/bin/bascule")
    assert argv[0] == "proxy"
    assert cli_problem(argv, "ExecStart") is None
    assert service["EnvironmentFile"] == ["/etc/bascule/bascule.env"]
    assert parse_unit(UNIT)["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_environment_file_names_every_secret_with_placeholders_only() -> None:
    env = parse_env_file(ENV_EXAMPLE)
    config = load_config(DEPLOY / "bascule.example.toml")
    needed = secrets_needed(config)
    assert needed <= env.keys()
    for name in needed:
        assert "REPLACE-ME" in env[name], f"{name}: an example holds placeholders only"
