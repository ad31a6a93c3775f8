"""
Reading a ``postgresql://`` store URL into libpq connection parameters.

    postgresql://USER@HOST:PORT/DATABASE?sslmode=verify-full&sslrootcert=ca.pem

The password never travels in the URL (a URL with one is refused, without
echoing it): it comes from ``store.password`` (``env:``/``file:``), or from
libpq's own ``PGPASSWORD``/``~/.pgpass``. Only the query parameters below are
accepted, so a typo is an error rather than a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

#: libpq parameters a store URL may carry in its query string
QUERY_PARAMETERS = frozenset({
    "host", "hostaddr", "port", "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "channel_binding",
    "gssencmode", "connect_timeout", "application_name", "options", "target_session_attrs",
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
})
_PATHS = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def parse_postgres_url(url: str, base: Path) -> dict[str, str]:
    """
    libpq keyword parameters for ``url`` (no password). Relative certificate
    paths are taken relative to ``base`` (the configuration's folder).

    @raise ValueError: with a message for an operator that never contains a password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("expected postgresql://USER@HOST:PORT/DATABASE (the URL does not parse)") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("expected a postgresql:// URL")
    if parts.password is not None:
        raise ValueError("a password in the store URL is not accepted: give it as store.password "
                         "(env:NAME or file:PATH)")
    params: dict[str, str] = {}
    hostport = parts.netloc.rpartition("@")[2]
    if hostport.startswith("["):
        host = hostport[1:hostport.find("]")]
    else:
        host = hostport.rsplit(":", 1)[0] if ":" in hostport else hostport
    if host:
        # a percent-encoded path is a Unix socket directory (postgresql://gk@%2Frun%2Fpostgresql/gk)
        params["host"] = unquote(host)
    if port is not None:
        params["port"] = str(port)
    if parts.username:
        params["user"] = unquote(parts.username)
    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise ValueError("expected a database name: postgresql://USER@HOST:PORT/DATABASE")
    params["dbname"] = database
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "password":
            raise ValueError("a password in the store URL is not accepted: give it as store.password "
                             "(env:NAME or file:PATH)")
        if key not in QUERY_PARAMETERS:
            raise ValueError(f"unknown parameter {key!r} in the store URL; accepted: "
                             + ", ".join(sorted(QUERY_PARAMETERS)))
        if key == "sslmode" and value not in _SSLMODES:
            raise ValueError(f"sslmode must be one of {', '.join(_SSLMODES)}, got {value!r}")
        if key in _PATHS and value and not Path(value).is_absolute():
            value = str(base / value)
        params[key] = value
    if "host" not in params:
        raise ValueError("expected a host: postgresql://USER@HOST:PORT/DATABASE (or ?host=/socket/dir)")
    return params


def display_url(params: dict[str, str]) -> str:
    """The store as operators see it in logs: no password, ever."""
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    host = params.get("host", "")
    if host.startswith("/"):
        host = host.replace("/", "%2F")
    elif ":" in host:
        host = f"[{host}]"
    return f"postgresql://{user}{host}{port}/{params.get('dbname', '')}"
