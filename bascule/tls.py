"""TLS contexts from the configuration: to a backend (its CA, its host name, bascule's client
certificate) and on bascule's own ports. Key material comes from the files the configuration
names, or from the environment variables it names (PEM text), never from the file itself
(``bascule/config.py`` refuses inline PEM). A missing or unreadable one is a
:class:`ConfigError` naming the key, at start, before anything listens or is sent.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path

from bascule.config import BackendTLS, ListenerTLS
from bascule.errors import ConfigError

WHERE = "configuration"


def _pem(key: str, tls: BackendTLS | ListenerTLS, part: str, env: Mapping[str, str]) -> str | None:
    """The PEM text of ``part`` (``ca``, ``cert``, ``key``, ``client_ca``); None: not set."""
    file: str | None = getattr(tls, f"{part}_file")
    name: str | None = getattr(tls, f"{part}_env")
    if file is not None:
        try:
            text = Path(file).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not PEM text"
            raise ConfigError(WHERE, f"{key}.{part}_file", f"cannot read {file}: {why}") from None
        where = f"{key}.{part}_file"
    elif name is not None:
        text = env.get(name, "")
        if not text.strip():
            raise ConfigError(
                "environment", name, f"not set, and {key}.{part}_env names it (PEM text)"
            )
        where = f"{name} (named by {key}.{part}_env)"
    else:
        return None
    if "-----BEGIN" not in text:
        raise ConfigError(WHERE, where, "expected PEM text (-----BEGIN ...)")
    return text


def _load_chain(context: ssl.SSLContext, key: str, cert: str, private: str) -> None:
    """A certificate and key from PEM text: ``ssl`` reads them from files only, so they go
    through a directory only this process can read, removed at once."""
    with tempfile.TemporaryDirectory(prefix="bascule-tls-") as folder:
        os.chmod(folder, 0o700)
        cert_path, key_path = Path(folder, "cert.pem"), Path(folder, "key.pem")
        for path, text in ((cert_path, cert), (key_path, private)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(text)
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise ConfigError(
                WHERE,
                key,
                f"the certificate and key cannot be used together ({exc.reason or exc})",
            ) from None


def _load_cas(context: ssl.SSLContext, key: str, cas: str) -> None:
    try:
        context.load_verify_locations(cadata=cas)
    except ssl.SSLError as exc:
        raise ConfigError(WHERE, key, f"not a usable CA bundle ({exc.reason or exc})") from None


def client_context(
    key: str, tls: BackendTLS | None, env: Mapping[str, str] | None = None
) -> ssl.SSLContext:
    """The context for an ``https://`` backend (``key``: ``backends.NAME.tls``, for errors):
    certificate and host name checked, against the configured CAs or the system's, with
    bascule's client certificate where one is configured."""
    env = os.environ if env is None else env
    context = ssl.create_default_context()  # CERT_REQUIRED, check_hostname, TLS 1.2+
    if tls is None:
        return context
    cas = _pem(key, tls, "ca", env)
    if cas is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # only these CAs, not the system's
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_cas(context, f"{key}.ca", cas)
    cert, private = _pem(key, tls, "cert", env), _pem(key, tls, "key", env)
    if cert is not None and private is not None:
        _load_chain(context, key, cert, private)
    return context


def server_context(
    key: str, tls: ListenerTLS | None, env: Mapping[str, str] | None = None
) -> ssl.SSLContext | None:
    """The context of one of bascule's ports (``key``: ``proxy.tls``...); None: plain HTTP."""
    if tls is None:
        return None
    env = os.environ if env is None else env
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, private = _pem(key, tls, "cert", env), _pem(key, tls, "key", env)
    assert cert is not None and private is not None  # the configuration checked it
    _load_chain(context, key, cert, private)
    cas = _pem(key, tls, "client_ca", env)
    if cas is not None:
        _load_cas(context, f"{key}.client_ca", cas)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
