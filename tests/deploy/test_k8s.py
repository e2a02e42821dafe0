"""deploy/k8s: every manifest against the Kubernetes schemas (offline, strict), the ConfigMap's
TOML with bascule's own loader, and what the manifests must agree on with each other and with
bascule (ports, probe paths, secret keys, commands)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, cast

import pytest
from pytest_aiohttp.plugin import AiohttpClient

from bascule.app.admin import AdminDeps, create_admin_app
from bascule.app.operations import Operations
from bascule.config import Config, parse_config
from bascule.errors import ConfigError
from tests.deploy.validate import (
    DEPLOY,
    FIXTURES,
    K8S,
    cli_problem,
    compose_problems,
    k8s_problems,
    load_yaml_documents,
    port_of,
    secrets_needed,
)

MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def one(name: str, kind: str) -> dict[str, Any]:
    [doc] = [d for d in load_yaml_documents(K8S / name) if d["kind"] == kind]
    return doc


def configmap_config() -> Config:
    toml = one("configmap.yaml", "ConfigMap")["data"]["bascule.toml"]
    return parse_config(toml, "deploy/k8s/configmap.yaml")


def container(name: str, kind: str) -> dict[str, Any]:
    [c] = one(name, kind)["spec"]["template"]["spec"]["containers"]
    return cast(dict[str, Any], c)


def prestop_seconds() -> int:
    """The Deployment's preStop sleep: the one figure of the pre-stop window."""
    command = container("deployment.yaml", "Deployment")["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_validates_against_the_kubernetes_schemas(manifest: Path) -> None:
    assert k8s_problems(manifest) == []


def test_a_broken_manifest_fails_validation() -> None:
    problems = k8s_problems(FIXTURES / "broken-manifests.yaml")
    assert len(problems) == 3, problems
    misspelt, mistyped, unknown = problems
    assert "Deployment/bascule: spec.template.spec.containers.0" in misspelt
    assert "'readinesProbe' was unexpected" in misspelt
    assert "Service/bascule: spec.ports.0.port: 'eighty' is not of type 'integer'" in mistyped
    assert unknown.endswith("PodDisruptionBudjet/bascule: no kind PodDisruptionBudjet in policy/v1")


def test_validation_opens_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI has no network: the schemas must come from the installed packages, not a download."""

    def refuse(*args: object) -> None:
        raise AssertionError(f"validation tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert k8s_problems(K8S / "deployment.yaml") == []
    assert compose_problems(DEPLOY / "compose.yaml") == []


def test_the_configmap_toml_loads_with_bascules_loader() -> None:
    config = configmap_config()
    assert config.migration.source in config.backends
    assert config.migration.target in config.backends
    # The loader is strict, so a mistake in the ConfigMap is named before any rollout.
    toml = one("configmap.yaml", "ConfigMap")["data"]["bascule.toml"]
    with pytest.raises(ConfigError) as info:
        parse_config(toml.replace("admin_listen =", "admin_lisen =", 1), "configmap.yaml")
    assert info.value.key == "proxy.admin_lisen"


def test_the_kustomization_lists_the_fleet() -> None:
    [kustomization] = load_yaml_documents(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    # The example Secret holds placeholders, and a Job is applied on its own (it is immutable).
    expected = {p.name for p in MANIFESTS} - {"secret.example.yaml", "job-migrate.yaml"}
    assert listed == expected


def test_the_deployment_runs_a_fleet_that_stops_gracefully() -> None:
    deployment = one("deployment.yaml", "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    c = container("deployment.yaml", "Deployment")
    config = configmap_config()

    assert deployment["spec"]["replicas"] >= 3
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "http": port_of(config.proxy.listen),
        "admin": port_of(config.proxy.admin_listen),
    }
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    # preStop sleep, then bascule's own pre-stop window after SIGTERM (the same figure), then
    # the drain: all before SIGKILL.
    prestop = prestop_seconds()
    assert 0 < 2 * prestop < pod["spec"]["terminationGracePeriodSeconds"]
    configured = getattr(config.proxy, "prestop_seconds", None)  # [proxy] prestop_seconds
    if configured is not None:
        assert configured == prestop, "[proxy] prestop_seconds must match the preStop sleep"
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][bound].keys()
    [term] = pod["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_disruption_budget_and_the_services_select_the_replicas() -> None:
    labels = one("deployment.yaml", "Deployment")["spec"]["template"]["metadata"]["labels"]
    replicas = one("deployment.yaml", "Deployment")["spec"]["replicas"]
    pdb = one("pdb.yaml", "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] < replicas - 1
    for service in load_yaml_documents(K8S / "service.yaml"):
        assert service["spec"]["selector"].items() <= labels.items()
    [admin] = [
        s for s in load_yaml_documents(K8S / "service.yaml") if "admin" in s["metadata"]["name"]
    ]
    assert admin["spec"]["type"] == "ClusterIP"


def test_the_network_policy_keeps_the_admin_port_internal() -> None:
    labels = one("deployment.yaml", "Deployment")["spec"]["template"]["metadata"]["labels"]
    policy = one("networkpolicy.yaml", "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["policyTypes"]
    open_ports: set[str] = set()
    restricted_ports: set[str] = set()
    for rule in policy["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [{"port": "*"}])}
        (restricted_ports if rule.get("from") else open_ports).update(ports)
    assert open_ports == {"http"}  # and never "*": a rule without ports opens every port
    assert "admin" in restricted_ports


def test_secret_references_resolve_and_hold_no_secret() -> None:
    [example] = load_yaml_documents(K8S / "secret.example.yaml")
    keys = example["stringData"]
    for value in keys.values():
        assert "REPLACE-ME" in value, "secret.example.yaml holds placeholders only"
    referenced: dict[str, set[str]] = {}
    for name, kind in (("deployment.yaml", "Deployment"), ("job-migrate.yaml", "Job")):
        for env in container(name, kind).get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == example["metadata"]["name"]
                assert ref["key"] in keys, f"{name}: {env['name']} refers to a missing key"
                referenced.setdefault(name, set()).add(env["name"])
    # The proxy gets every secret bascule reads, and each backend's credential.
    config = configmap_config()
    needed = secrets_needed(config)
    assert needed <= referenced["deployment.yaml"]
    assert "BASCULE_POSTGRES_URL" in referenced["job-migrate.yaml"]
    # Nothing secret is set as a plain value.
    for env in container("deployment.yaml", "Deployment")["env"]:
        assert "value" not in env or env["name"].startswith("OTEL_"), env["name"]


def test_the_manifests_commands_are_bascule_commands() -> None:
    problems = [
        cli_problem(container(name, kind)["args"], name)
        for name, kind in (("deployment.yaml", "Deployment"), ("job-migrate.yaml", "Job"))
    ]
    assert problems == [None, None]
    assert container("deployment.yaml", "Deployment")["args"][0] == "proxy"
    assert container("job-migrate.yaml", "Job")["args"][0] == "migrate"
    assert cli_problem(["proxy", "--no-such-flag"], "x") is not None  # it can fail


async def test_the_probes_paths_answer_on_the_admin_port(aiohttp_client: AiohttpClient) -> None:
    """The paths the Deployment probes exist on bascule's admin app (a renamed route would
    restart every replica)."""
    deps = AdminDeps(ops=cast(Operations, None), view=None, operator_tokens={}, viewer_token=None)
    client = await aiohttp_client(create_admin_app(deps))
    c = container("deployment.yaml", "Deployment")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        path = c[probe]["httpGet"]["path"]
        assert (await client.get(path)).status == 200, (probe, path)
    assert (await client.get("/readyness")).status == 404
