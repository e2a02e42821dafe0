"""Configuration: the shipped example loads, and every kind of mistake is named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from bascule.config import DEFAULT_DATASET, Secrets, load_config, parse_config
from bascule.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "deploy" / "bascule.example.toml"

MINIMAL = """
[migration]
source = "azure"
target = "scaleway"

[backends.azure]
url = "http://127.0.0.1:9001"

[backends.scaleway]
url = "http://127.0.0.1:9002"
"""

ROUTE = """
[[routes]]
path = "/v1/datasets/{dataset}/records/{id}"
methods = ["GET"]
kind = "read"
key = "id"
"""


OVH = "[backends.ovh]\nurl = 'http://x'\n"


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.toml")
    return info.value


def test_the_shipped_example_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.migration.source == "azure"
    assert config.source_backend.url == "http://127.0.0.1:9001"
    assert config.target_backend.credential_env == "BASCULE_SCALEWAY_CREDENTIAL"
    assert {"default", "dcir", "pmsi", "cepidc"} <= set(config.datasets)
    create = next(r for r in config.routes if r.create_id)
    assert create.replay_as == "PUT /v1/datasets/{dataset}/records/{id}"
    assert any(r.kind == "read" and "POST" in r.methods for r in config.routes)


def test_datasets_inherit_defaults_and_override_them() -> None:
    config = parse_config(
        MINIMAL
        + """
[defaults]
shadow_sample = 0.5
[defaults.compare]
ignore = ["/served_at"]
numeric_tolerance = 0.01
[datasets.dcir]
auto_promote = true
[datasets.dcir.compare]
ignore = ["/records/*/served_at"]
"""
    )
    dcir = config.datasets["dcir"]
    assert dcir.shadow_sample == 0.5
    assert dcir.auto_promote is True
    assert dcir.compare.ignore == ("/records/*/served_at",)
    assert dcir.compare.numeric_tolerance == 0.01  # nested defaults merge key by key
    assert config.datasets[DEFAULT_DATASET].shadow_sample == 0.5
    assert config.dataset("undeclared").name == DEFAULT_DATASET


def test_minimal_config_has_sensible_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.proxy.listen == "127.0.0.1:8080"
    assert config.state.poll_interval == 1.0
    assert config.routes == ()
    assert list(config.datasets) == [DEFAULT_DATASET]


def test_config_records_are_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(AttributeError):
        setattr(config.proxy, "listen", "0.0.0.0:80")  # noqa: B010 - frozen at run time too


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ("[proxy]\nlisten_port = 1\n", "proxy.listen_port", "unknown key"),
        (
            "[backends.azure2]\nurl = 'http://x'\ntoken = 'abc'\n",
            "backends.azure2.token",
            "unknown key",
        ),
        (
            "[[routes]]\npath = '/x/{dataset}'\nmethods = ['GET']\nkind = 'read'\nfoo = 1\n",
            "routes[0].foo",
            "unknown key",
        ),
        ("[telemetry]\nx = 1\n", "telemetry.x", "unknown key"),
        ("[tracing]\nx = 1\n", "tracing", "unknown section"),
    ],
)
def test_unknown_keys_are_errors(extra: str, key: str, problem: str) -> None:
    err = error_of(MINIMAL + extra)
    assert err.source == "test.toml"
    assert err.key == key
    assert problem in err.problem
    assert str(err).startswith(f"test.toml: {key}: ")


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ("[proxy]\nmax_body_bytes = '10MB'\n", "proxy.max_body_bytes", "expected `int`, got `str`"),
        ("[state]\npoll_interval = 'fast'\n", "state.poll_interval", "expected `float`, got `str`"),
        (
            "[datasets.dcir]\nauto_promote = 'yes'\n",
            "datasets.dcir.auto_promote",
            "expected `bool`, got `str`",
        ),
        (
            "[[routes]]\npath = '/x/{dataset}'\nmethods = 'GET'\nkind = 'read'\n",
            "routes[0].methods",
            "expected `array`, got `str`",
        ),
        (
            "[[routes]]\npath = '/x/{dataset}'\nmethods = ['GET']\nkind = 'fetch'\n",
            "routes[0].kind",
            "invalid enum value `fetch`; expected one of `read`, `write`",
        ),
        ("[switch]\nhold = 0\n", "switch.hold", "expected a positive number of seconds"),
        ("[switch]\nsmall_backlog = 0\n", "switch.small_backlog", "expected at least 1"),
        ("[switch]\nholds = 5\n", "switch.holds", "unknown key"),
        (
            "[datasets.dcir.ids]\ntable = 'dcir; drop table x'\nsequence = 's'\n",
            "datasets.dcir.ids.table",
            "expected a plain SQL name",
        ),
        ("[datasets.dcir.ids]\ntable = 'dcir'\n", "datasets.dcir.ids", "sequence"),
    ],
)
def test_wrong_types_are_errors(extra: str, key: str, problem: str) -> None:
    err = error_of(MINIMAL + extra)
    assert (err.key, err.source) == (key, "test.toml")
    assert problem in err.problem.replace("'", "`") or problem in err.problem


def test_wrong_type_in_backend_names_the_backend() -> None:
    err = error_of(MINIMAL.replace('url = "http://127.0.0.1:9002"', "url = 9002"))
    assert err.key == "backends.scaleway.url"
    assert "expected `str`, got `int`" in err.problem


def test_missing_backend_is_named() -> None:
    err = error_of(MINIMAL.replace('target = "scaleway"', 'target = "ovh"'))
    assert err.key == "migration.target"
    assert "'ovh' is not defined" in err.problem
    assert "azure, scaleway" in err.problem


def test_missing_migration_is_named() -> None:
    err = error_of('[backends.azure]\nurl = "http://x"\n')
    assert err.key == "migration"
    assert "missing" in err.problem


def test_missing_required_key_is_named() -> None:
    err = error_of(MINIMAL.replace('url = "http://127.0.0.1:9001"', "read_timeout = 3.0"))
    assert err.key == "backends.azure"
    assert "missing required key `url`" in err.problem


def test_route_with_no_dataset_is_an_error() -> None:
    err = error_of(MINIMAL + "[[routes]]\npath = '/v1/stats'\nmethods = ['GET']\nkind = 'read'\n")
    assert err.key == "routes[0]"
    assert "has no dataset" in err.problem
    assert "{dataset}" in err.problem


def test_route_with_unknown_fixed_dataset_is_an_error() -> None:
    err = error_of(
        MINIMAL
        + "[[routes]]\npath = '/v1/stats'\nmethods = ['GET']\nkind = 'read'\ndataset = 'x'\n"
    )
    assert (err.key, err.problem) == ("routes[0].dataset", "unknown dataset 'x'")


@pytest.mark.parametrize(
    ("route", "key", "problem"),
    [
        (
            "path = 'v1/{dataset}'\nmethods = ['GET']\nkind = 'read'",
            "routes[0].path",
            "starting with '/'",
        ),
        (
            "path = '/v1/{dataset}/../x'\nmethods = ['GET']\nkind = 'read'",
            "routes[0].path",
            "dot segment",
        ),
        (
            "path = '/v1/x{dataset}'\nmethods = ['GET']\nkind = 'read'",
            "routes[0].path",
            "whole segment",
        ),
        (
            "path = '/v1/{dataset}'\nmethods = ['FETCH']\nkind = 'read'",
            "routes[0].methods",
            "'FETCH'",
        ),
        (
            "path = '/v1/{dataset}'\nmethods = []\nkind = 'read'",
            "routes[0].methods",
            "at least one",
        ),
        (
            "path = '/v1/{dataset}'\nmethods = ['PUT']\nkind = 'write'\nkey = 'id'",
            "routes[0].key",
            "'id' is not a parameter",
        ),
        (
            "path = '/v1/{dataset}'\nmethods = ['POST']\nkind = 'write'\ncreate_id = '/id'",
            "routes[0]",
            "go together",
        ),
        (
            "path = '/v1/{dataset}'\nmethods = ['POST']\nkind = 'write'\ncreate_id = 'id'\n"
            "replay_as = 'PUT /v1/{dataset}/{id}'",
            "routes[0].create_id",
            "JSON pointer",
        ),
        (
            "path = '/v1/{dataset}'\nmethods = ['POST']\nkind = 'write'\ncreate_id = '/id'\n"
            "replay_as = 'PUT /v1/{dataset}'",
            "routes[0].replay_as",
            "{id}",
        ),
        (
            "path = '/v1/{dataset}'\nmethods = ['POST']\nkind = 'write'\ncreate_id = '/id'\n"
            "replay_as = '/v1/{dataset}/{id}'",
            "routes[0].replay_as",
            "METHOD /path",
        ),
        (
            "path = '/v1/{dataset}'\nmethods = ['GET']\nkind = 'read'\n"
            "[routes.compare]\nignore = ['x']",
            "routes[0].compare",
            "not a JSON pointer",
        ),
    ],
)
def test_bad_routes_are_named(route: str, key: str, problem: str) -> None:
    err = error_of(MINIMAL + "[[routes]]\n" + route + "\n")
    assert err.key == key
    assert problem in err.problem


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        (
            "[datasets.dcir]\nshadow_sample = 1.5\n",
            "datasets.dcir.shadow_sample",
            "between 0 and 1",
        ),
        (
            "[datasets.dcir.compare]\nignore = ['/']\n",
            "datasets.dcir.compare.ignore",
            "whole document",
        ),
        (
            "[datasets.dcir.compare]\nignore = ['/*']\n",
            "datasets.dcir.compare.ignore",
            "whole document",
        ),
        ("[datasets.dcir]\nnoise_sample = -0.1\n", "datasets.dcir.noise_sample", "between"),
        ("[datasets.dcir]\nnoise_pairs = 1\n", "datasets.dcir.noise_pairs", "at least 2"),
        ("[shadow]\nqueue = 0\n", "shadow.queue", "positive"),
        ("[shadow]\nconcurrency = 0\n", "shadow.concurrency", "positive"),
        ("[shadow]\nmax_body_bytes = 0\n", "shadow.max_body_bytes", "positive"),
        ("[shadow]\ndeadline = 0\n", "shadow.deadline", "positive"),
        ("[shadow]\nlag_wait = -1\n", "shadow.lag_wait", "positive"),
        ("[shadow]\nqueue = 'many'\n", "shadow.queue", "int"),
        ("[shadow]\nsample = 1\n", "shadow.sample", "unknown"),
        ("[shadow]\nworker = 'thread'\n", "shadow.worker", "'process'"),
        ("[shadow]\npriority = 'high'\n", "shadow.priority", "'idle'"),
        ("[state]\njournal_retention = 10\n", "state.journal_retention", "600"),
        ("[datasets.DCIR]\n", "datasets.DCIR", "lower-case"),
        ("[proxy]\nlisten = '8080'\n", "proxy.listen", "host:port"),
        ("[proxy]\nadmin_listen = '127.0.0.1:8080'\n", "proxy.admin_listen", "must differ"),
        ("[proxy]\ncredentials_header = 'X Token'\n", "proxy.credentials_header", "header"),
        ("[proxy]\nanonymous_writes = 0\n", "proxy.anonymous_writes", "at least 1"),
        ("[state]\ndead_session_after = 1\n", "state.dead_session_after", "2 to 3600"),
    ],
)
def test_bad_values_are_named(extra: str, key: str, problem: str) -> None:
    err = error_of(MINIMAL + extra)
    assert err.key == key
    assert problem in err.problem


def test_bad_backend_values_are_named() -> None:
    err = error_of(MINIMAL.replace('url = "http://127.0.0.1:9002"', 'url = "ftp://x"'))
    assert (err.key, "http://") == ("backends.scaleway.url", "http://")
    err = error_of(MINIMAL + "[backends.ovh]\nurl = 'http://x'\nread_timeout = 0\n")
    assert err.key == "backends.ovh.read_timeout"
    err = error_of(MINIMAL + "[backends.ovh]\nurl = 'http://x'\ncredential_env = 'my token'\n")
    assert err.key == "backends.ovh.credential_env"
    err = error_of(MINIMAL.replace('target = "scaleway"', 'target = "azure"'))
    assert "different backend" in err.problem


def test_invalid_toml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    err = error_of("[proxy\nlisten = 1")
    assert err.source == "test.toml" and "not valid TOML" in err.problem
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert str(tmp_path / "absent.toml") in str(info.value)
    assert "cannot read" in str(info.value)


def test_secrets_come_from_the_environment_and_are_checked() -> None:
    secrets = Secrets.from_env({"BASCULE_ADMIN_TOKEN": "a" * 20, "BASCULE_HMAC_KEY": "ab" * 32})
    assert secrets.admin_token == "a" * 20
    assert secrets.hmac_key == bytes.fromhex("ab" * 32)
    assert secrets.viewer_token is None
    with pytest.raises(ConfigError, match="BASCULE_VIEWER_TOKEN: not set"):
        secrets.require("viewer_token")
    with pytest.raises(ConfigError, match="BASCULE_HMAC_KEY: expected hex"):
        Secrets.from_env({"BASCULE_HMAC_KEY": "not-hex"})
    with pytest.raises(ConfigError, match="BASCULE_JOURNAL_KEY: expected at least 32 bytes, got 4"):
        Secrets.from_env({"BASCULE_JOURNAL_KEY": "00112233"})
    with pytest.raises(ConfigError, match="BASCULE_ADMIN_TOKEN: expected at least 16"):
        Secrets.from_env({"BASCULE_ADMIN_TOKEN": "short"})


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[datasets."dcir\\n"]\n', "datasets.dcir\n"),
        ('[backends."ovh\\n"]\nurl = "http://x"\n', "backends.ovh\n"),
        ('[backends.ovh]\nurl = "http://x\\n"\n', "backends.ovh.url"),
        (
            '[backends.ovh]\nurl = "http://x"\ncredential_env = "OVH\\n"\n',
            "backends.ovh.credential_env",
        ),
    ],
)
def test_a_name_with_a_trailing_newline_is_refused(extra: str, key: str) -> None:
    # `$` in a regex matches before a trailing newline: these passed the name checks.
    assert error_of(MINIMAL + extra).key == key


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("-1", "positive number of seconds, got -1.0"),
        ("0", "positive number of seconds, got 0.0"),
        ("inf", "positive number of seconds, got inf"),
        ("nan", "positive number of seconds, got nan"),
        ("'30s'", "got `str`"),
    ],
)
@pytest.mark.parametrize(
    ("table", "key"),
    [
        (f"{OVH}connect_timeout", "backends.ovh.connect_timeout"),
        (f"{OVH}read_timeout", "backends.ovh.read_timeout"),
        (f"{OVH}total_timeout", "backends.ovh.total_timeout"),
        (f"{OVH}write_timeout", "backends.ovh.write_timeout"),
        (f"{OVH}pool_timeout", "backends.ovh.pool_timeout"),
        ("[proxy]\nreceive_timeout", "proxy.receive_timeout"),
        ("[proxy]\nidle_timeout", "proxy.idle_timeout"),
        (f"{ROUTE}read_timeout", "routes[0].read_timeout"),
        (f"{ROUTE}total_timeout", "routes[0].total_timeout"),
    ],
)
def test_bad_time_limits_are_named(table: str, key: str, value: str, problem: str) -> None:
    err = error_of(MINIMAL + f"{table} = {value}\n")
    assert err.key == key
    assert problem in err.problem


def test_keepalive_zero_means_never_reuse_and_below_is_named() -> None:
    config = parse_config(MINIMAL + "[backends.ovh]\nurl = 'http://x'\nkeepalive_timeout = 0\n")
    assert config.backends["ovh"].keepalive_timeout == 0
    err = error_of(MINIMAL + "[backends.ovh]\nurl = 'http://x'\nkeepalive_timeout = -1\n")
    assert err.key == "backends.ovh.keepalive_timeout" and "0 (never reuse) or more" in err.problem


def test_a_route_sets_its_own_time_limits() -> None:
    config = parse_config(MINIMAL + ROUTE + "read_timeout = 300\ntotal_timeout = 7200.0\n")
    assert (config.routes[0].read_timeout, config.routes[0].total_timeout) == (300.0, 7200.0)
    assert (config.source_backend.read_timeout, config.source_backend.write_timeout) == (60, 120)


HTTPS = MINIMAL.replace('url = "http://127.0.0.1:9001"', 'url = "https://azure.example"')


@pytest.mark.parametrize(
    ("tls", "key", "says"),
    [
        (
            'cert_file = "-----BEGIN CERTIFICATE-----\\nMIIB\\n"',
            "backends.azure.tls.cert_file",
            "inline PEM",
        ),
        ('key_file = "/k.pem"', "backends.azure.tls", "a client certificate and its key go"),
        ('ca_file = "/a.pem"\nca_env = "CA"', "backends.azure.tls.ca_env", "not both"),
        ('key_env = "lower"\ncert_file = "/c.pem"', "backends.azure.tls.key_env", "NAME"),
        ("pem = 'x'", "backends.azure.tls.pem", "unknown key"),
    ],
)
def test_backend_tls_settings_are_checked(tls: str, key: str, says: str) -> None:
    error = error_of(f"{HTTPS}\n[backends.azure.tls]\n{tls}\n")
    assert error.key == key and says in str(error), error


def test_tls_needs_an_https_backend_and_a_listener_needs_its_certificate() -> None:
    error = error_of(f"{MINIMAL}\n[backends.azure.tls]\nca_file = '/a.pem'\n")
    assert error.key == "backends.azure.tls" and "https://" in str(error)
    error = error_of(f"[proxy.admin_tls]\ncert_file = '/c.pem'\n{MINIMAL}")
    assert error.key == "proxy.admin_tls" and "certificate and its key" in str(error)
    config = parse_config(
        f"[proxy.tls]\ncert_file = '/c.pem'\nkey_env = 'PROXY_KEY'\n{HTTPS}"
        "\n[backends.azure.tls]\nca_file = '/a.pem'\ncert_env = 'C'\nkey_env = 'K'\n"
    )
    assert config.proxy.tls is not None and config.proxy.tls.key_env == "PROXY_KEY"
    assert config.source_backend.tls is not None and config.source_backend.tls.ca_file == "/a.pem"


def test_pem_is_refused_anywhere_in_the_file() -> None:
    error = error_of(
        MINIMAL.replace("[migration]", '[proxy]\nlisten = "-----BEGIN X"\n[migration]')
    )
    assert error.key == "proxy.listen" and "inline PEM" in str(error)
