"""TLS both ways: https to each backend (its CA, its host name, bascule's client certificate)
and https on bascule's researcher port, with certificates made in the test (trustme).

The reference APIs serve https and require a client certificate signed by the test's CA
(``refapi.app.tls_context``, as ``bascule api --tls-cert --tls-key --tls-client-ca``).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from bascule.app.admin import create_admin_app
from bascule.app.replica import _start
from bascule.config import Backend, BackendTLS, ListenerTLS
from bascule.errors import ConfigError, UpstreamUnreachable
from bascule.stages import Stage
from bascule.state.servers import free_port
from bascule.tls import client_context, server_context
from bascule.upstream import Upstream
from refapi.app import tls_context
from refapi.lab import AUTH
from refapi.seed import seed_database
from tests.conftest import Ground
from tests.harness import RestartableRefapi, dcir_record
from tests.world import World, build_world, researchers, table_digest


@dataclass(frozen=True)
class Pki:
    """The test's certificates, as files."""

    ca: Path
    """The CA that signed the backends' and bascule's certificates."""
    other_ca: Path
    """A CA that signed nothing here."""
    server: Path
    """The backends' certificate and key (one PEM), for ``localhost`` only."""
    client_cert: Path
    client_key: Path
    """bascule's client certificate and key."""
    ca_object: trustme.CA

    def backend_tls(self, **override: str | None) -> str:
        """The inline table of ``[backends.X] tls``: the CA and bascule's client certificate."""
        fields: dict[str, str | None] = {
            "ca_file": str(self.ca),
            "cert_file": str(self.client_cert),
            "key_file": str(self.client_key),
            **override,
        }
        return "tls = { " + ", ".join(f'{k} = "{v}"' for k, v in fields.items() if v) + " }"

    def serving(self) -> ssl.SSLContext:
        """What a reference API serves with: this certificate, client certificates required."""
        return tls_context(str(self.server), str(self.server), client_ca=str(self.ca))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    folder = tmp_path / "pki"
    folder.mkdir()
    paths = {n: folder / f"{n}.pem" for n in ("ca", "other", "server", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    other.cert_pem.write_to_path(str(paths["other"]))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(paths["server"]))
    client = ca.issue_cert("bascule-replica")
    client.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    client.private_key_pem.write_to_path(str(paths["key"]))
    return Pki(
        paths["ca"], paths["other"], paths["server"], paths["cert"], paths["key"], ca_object=ca
    )


@asynccontextmanager
async def mtls_world(
    ground: Ground, pki: Pki, *, host: str = "localhost", **tls: str | None
) -> AsyncIterator[tuple[World, str, str]]:
    """Two reference APIs over seeded databases serving https with client certificates
    required; one replica whose backends are configured with ``pki.backend_tls(**tls)``, at
    ``host`` (the certificate names ``localhost``); dcir at ``dualwrite``. The world and the
    two databases."""
    databases = (await ground.make_database("src"), await ground.make_database("tgt"))
    for db in databases:
        await seed_database(db, 20, seed=7)
    async with AsyncExitStack() as stack:
        apis = [
            await stack.enter_async_context(
                RestartableRefapi(name, db, ssl_context=pki.serving(), host=host)
            )
            for name, db in zip(("azure", "scaleway"), databases, strict=True)
        ]
        world = await stack.enter_async_context(
            build_world(
                ground,
                backends=(apis[0].url, apis[1].url),
                backend_extra=pki.backend_tls(**tls),
                stages=(Stage.DUALWRITE,),
            )
        )
        yield world, databases[0], databases[1]


async def test_a_dual_write_over_mtls_leaves_identical_databases(ground: Ground, pki: Pki) -> None:
    """Researchers' creates, PUTs, PATCHes and DELETEs through bascule to two backends that
    require bascule's client certificate: every write answered, replayed over mTLS too, and
    the two databases end identical."""
    async with mtls_world(ground, pki) as (world, source_db, target_db):
        statuses = await researchers([world.proxy], writers=4, ops=10, records=10)
        assert all(s < 500 for s in statuses), statuses
        counts = await world.drained()
        assert set(counts) <= {"applied", "rejected"}, counts
        assert counts.get("applied"), counts
        assert await table_digest(source_db) == await table_digest(target_db)


REFUSALS: dict[str, tuple[dict[str, str | None], str, str]] = {
    # what is wrong: (config override, world host, the text the researcher and the log get)
    "wrong CA": ({"ca_file": "other"}, "localhost", "its TLS certificate was refused"),
    "wrong host name": ({}, "127.0.0.1", "certificate is not valid for '127.0.0.1'"),
    "no client certificate": (
        {"cert_file": None, "key_file": None},
        "localhost",
        "refused bascule's client certificate",
    ),
}


@pytest.mark.parametrize("wrong", list(REFUSALS))
async def test_a_tls_misconfiguration_fails_clearly_and_journals_nothing_applied(
    ground: Ground, pki: Pki, caplog: pytest.LogCaptureFixture, wrong: str
) -> None:
    """A wrong CA, a wrong host name, a missing client certificate: the researcher's write
    gets a 502 saying what TLS refused, the log says it too, and the journal holds nothing
    applied (not sent: refused; sent over a session the backend then closed: in doubt)."""
    override, host, said = REFUSALS[wrong]
    tls = {k: (str(pki.other_ca) if v == "other" else v) for k, v in override.items()}
    caplog.set_level(logging.WARNING)
    async with mtls_world(ground, pki, host=host, **tls) as (world, source_db, target_db):
        before = await table_digest(source_db), await table_digest(target_db)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            base = f"{world.proxy}/v1/datasets/dcir/records"
            async with session.put(f"{base}/3", json={"id": 3, **dcir_record(3, 7)}) as resp:
                answer = await resp.json()
                assert resp.status == 502, answer
            assert answer["error"]["code"] == "backend_unreachable", answer
            assert said in answer["error"]["message"], answer
            async with session.get(f"{base}/3") as resp:  # reads fail the same way
                assert resp.status == 502
                assert said in (await resp.json())["error"]["message"]
        rows = await world.sql(world.state_db, "SELECT state FROM bascule_journal")
        assert rows and {r["state"] for r in rows} <= {"rejected", "in_doubt"}, rows
        assert (await table_digest(source_db), await table_digest(target_db)) == before
    logged = [r.getMessage() for r in caplog.records if said in r.getMessage()]
    assert logged, [r.getMessage() for r in caplog.records]


async def test_bascules_ports_serve_https(ground: Ground, pki: Pki) -> None:
    """``[proxy.tls]``: the researcher port speaks TLS with the configured certificate; a
    client trusting its CA reads through it, and a plain-HTTP client gets no answer.
    ``[proxy.admin_tls]`` with ``client_ca_file``: an SRE's client with a certificate signed
    by that CA is answered, one without is refused."""
    listener = ListenerTLS(cert_file=str(pki.server), key_file=str(pki.server))
    async with build_world(ground) as world:
        server = world.replica.server()
        port = await server.start("127.0.0.1", 0, tls=server_context("proxy.tls", listener))
        try:
            trusted = ssl.create_default_context(cafile=str(pki.ca))
            connector = aiohttp.TCPConnector(ssl=trusted)
            async with aiohttp.ClientSession(headers=AUTH, connector=connector) as session:
                async with session.get(f"https://localhost:{port}/v1/datasets/dcir/records") as r:
                    assert r.status == 200
                    assert (await r.json())["records"]
            async with aiohttp.ClientSession(headers=AUTH) as session:
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/v1/datasets") as r:
                        await r.read()
        finally:
            await server.close(grace=0.1)

        # The admin port, requiring a client certificate signed by the CA (`client_ca_file`).
        admin_tls = ListenerTLS(
            cert_file=str(pki.server), key_file=str(pki.server), client_ca_file=str(pki.ca)
        )
        admin_port = free_port()
        runner = await _start(
            create_admin_app(world.replica.admin_deps()),
            f"127.0.0.1:{admin_port}",
            "admin",
            server_context("proxy.admin_tls", admin_tls),
        )
        try:
            health = f"https://localhost:{admin_port}/healthz"
            sre = ssl.create_default_context(cafile=str(pki.ca))
            sre.load_cert_chain(str(pki.client_cert), str(pki.client_key))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=sre)) as session:
                async with session.get(health) as r:
                    assert r.status == 200
            anonymous = ssl.create_default_context(cafile=str(pki.ca))
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=anonymous)
            ) as session:
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(health) as r:
                        await r.read()
        finally:
            await runner.cleanup()


def test_key_material_comes_from_the_environment_as_well(pki: Pki) -> None:
    """``*_env`` names a variable holding PEM text (a Kubernetes Secret as environment): the
    context is the same as from files; a variable not set is named in the error."""
    env = {
        "BACKEND_CA": pki.ca.read_text(),
        "CLIENT_CERT": pki.client_cert.read_text(),
        "CLIENT_KEY": pki.client_key.read_text(),
    }
    tls = BackendTLS(ca_env="BACKEND_CA", cert_env="CLIENT_CERT", key_env="CLIENT_KEY")
    context = client_context("backends.azure.tls", tls, env)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1  # only the configured CA, not the system's
    with pytest.raises(ConfigError, match=r"CLIENT_KEY.*not set.*backends\.azure\.tls\.key_env"):
        client_context("backends.azure.tls", tls, {**env, "CLIENT_KEY": ""})
    missing = BackendTLS(ca_file=str(pki.ca.with_name("absent.pem")))
    with pytest.raises(ConfigError, match=r"backends.azure.tls.ca_file.*absent.pem"):
        client_context("backends.azure.tls", missing, {})
    swapped = BackendTLS(cert_file=str(pki.client_key), key_file=str(pki.client_cert))
    with pytest.raises(ConfigError, match="cannot be used together"):
        client_context("backends.azure.tls", swapped, {})


async def test_an_https_backend_without_tls_settings_is_checked_against_the_system_cas(
    pki: Pki,
) -> None:
    """No ``tls`` table: the system's CAs, which did not sign the test's certificate: refused,
    not sent, saying so."""
    context = pki.serving()
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    upstream = Upstream("azure", Backend(url=f"https://localhost:{port}"))
    await upstream.open()
    try:
        with pytest.raises(UpstreamUnreachable, match="its TLS certificate was refused") as raised:
            async with upstream.request("GET", "/", [], b""):
                pass
        assert raised.value.sent is False
    finally:
        await upstream.close()
        await runner.cleanup()
