"""
The YAML configuration, read into attrs values.

Every error names the key path and what was expected, for example
``targets[0].upstream.port: expected an integer, got "abc"``. Secrets are
resolved here (``env:``/``file:``) into :class:`gatekeep.secrets.Secret` values
whose ``repr`` shows the reference only.

Protocol plugins read their own keys through the same :class:`Node` so their
errors look the same.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import yaml

from gatekeep.secrets import Secret, SecretError, resolve


class ConfigError(ValueError):
    """A configuration that cannot be used. ``str()`` is ready for an operator."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return '"' + (value if len(value) <= 60 else value[:57] + "...") + '"'
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


_MISSING = object()


@attrs.define
class Node:
    """
    A mapping in the configuration with its key path. Reading a key marks it
    used; :meth:`finish` refuses keys nobody read, so typos are caught.
    """

    value: dict[str, Any]
    path: str
    base: Path
    _used: set[str] = attrs.field(factory=set)

    @classmethod
    def of(cls, value: Any, path: str, base: Path) -> "Node":
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_show(value)}")
        return cls(value, path, base)

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.value

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._used.add(key)
        if key not in self.value or self.value[key] is None:
            if default is _MISSING:
                raise ConfigError(self.sub(key), "is required")
            return default
        return self.value[key]

    def str(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] | None = None) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str) or not v:
            raise ConfigError(self.sub(key), f"expected a string, got {_show(v)}")
        if choices is not None and v not in choices:
            raise ConfigError(self.sub(key), f"expected one of {', '.join(choices)}, got {_show(v)}")
        return v

    def int(self, key: str, default: Any = _MISSING, *, low: int | None = None, high: int | None = None) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(self.sub(key), f"expected an integer, got {_show(v)}")
        if (low is not None and v < low) or (high is not None and v > high):
            raise ConfigError(self.sub(key), f"expected an integer from {low} to {high}, got {v}")
        return v

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            raise ConfigError(self.sub(key), f"expected true or false, got {_show(v)}")
        return v

    def duration(self, key: str, default: Any = _MISSING) -> Any:
        """Seconds, from a number or a string like ``500ms``, ``30s``, ``10m``, ``2h``."""
        return self._parsed(key, default, parse_duration, "a duration such as 30s or 10m")

    def size(self, key: str, default: Any = _MISSING) -> Any:
        """Bytes, from an integer or a string like ``512KiB``, ``64MiB``, ``1GiB`` (or kB, MB, GB)."""
        return self._parsed(key, default, parse_size, "a size such as 64MiB")

    def _parsed(self, key: str, default: Any, parse: Any, expected: str) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        try:
            return parse(v)
        except ValueError:
            raise ConfigError(self.sub(key), f"expected {expected}, got {_show(v)}") from None

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise ConfigError(self.sub(key), f"expected a list of strings, got {_show(v)}")
        return tuple(v)

    def secret(self, key: str, default: Any = _MISSING, *, strip: bool = True) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str):
            raise ConfigError(self.sub(key), f"expected an env:NAME or file:PATH reference, got {_show(v) if not isinstance(v, (int, float)) else 'a number'}")
        try:
            return resolve(v, self.base, strip=strip)
        except SecretError as e:
            # never echo a literal value: it may be the secret itself
            if not (v.startswith("env:") or v.startswith("file:")):
                raise ConfigError(self.sub(key), "expected an env:NAME or file:PATH reference (literal secrets are not accepted)") from None
            raise ConfigError(self.sub(key), str(e)) from None

    def url(self, key: str = "url") -> Any:
        """
        An http(s) URL that may hold a secret (a token in its path or query, a
        password before the host): an ``env:``/``file:`` reference (a Secret) or a
        literal (a str). Errors never show a referenced URL.
        """
        raw = self.raw(key)
        if isinstance(raw, str) and raw.startswith(("env:", "file:")):
            value: Any = self.secret(key)
            shown = value.reveal().strip().decode("ascii", "replace")
        else:
            value = shown = self.str(key)
        if not shown.startswith(("http://", "https://")):
            where = "the URL" if value is shown else f"the URL in {raw}"
            raise ConfigError(self.sub(key), f"expected an http:// or https:// URL ({where} is not one)")
        return value

    def child(self, key: str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        return Node.of(v, self.sub(key), self.base)

    def children(self, key: str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, list):
            raise ConfigError(self.sub(key), f"expected a list, got {_show(v)}")
        return [Node.of(item, f"{self.sub(key)}[{i}]", self.base) for i, item in enumerate(v)]

    def finish(self) -> None:
        unknown = [k for k in self.value if k not in self._used]
        if unknown:
            raise unknown_key(self.sub(str(unknown[0])), str(unknown[0]), self._used)


def unknown_key(path: str, key: str, known: Iterable[str]) -> ConfigError:
    """A key nobody reads: most often a typo, so the nearest key that would be read is named."""
    near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return ConfigError(path, f'unknown key (did you mean "{near[0]}"?)' if near else "unknown key")


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(value)
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(value))
    if not m:
        raise ValueError(value)
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * scale


_SIZES = {None: 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(value)
    return int(float(m.group(1)) * _SIZES[m.group(2).lower() if m.group(2) else None])


# -- values -----------------------------------------------------------------


@attrs.frozen
class TokenHashes:
    sha256: bytes | None = None
    scram: Any = None  # gatekeep.identity.scram.ScramVerifier


@attrs.frozen
class SSHKey:
    """A public key from ``identities[].ssh_keys`` (OpenSSH authorized_keys format)."""

    type: str
    blob: bytes
    comment: str = ""


@attrs.frozen
class IdentityConfig:
    name: str
    groups: frozenset[str]
    token: TokenHashes
    ssh_keys: tuple[SSHKey, ...] = ()


@attrs.frozen
class ServerTLS:
    """TLS that gatekeep offers to clients."""

    cert: Secret
    key: Secret
    require: bool = False
    #: CA certificates (PEM) that sign client certificates; None: none are asked for
    client_ca: Secret | None = None
    #: gatekeep.tls.ClientIdentity: how a verified client certificate names an identity
    client_identity: Any = None
    #: gatekeep.tls.RevocationList: the client CA's revocation lists; None: revocation is not checked
    client_crl: Any = None


@attrs.frozen
class TargetConfig:
    name: str
    protocol: str
    listen: str
    tls: ServerTLS | None
    #: what happens to an operation no policy rule matched: allow or deny
    default_action: str
    #: the protocol plugin's own configuration
    options: Any
    #: what happens to an operation gatekeep cannot judge (unparseable SQL, dynamic SQL): deny or allow
    unjudgeable: str = "deny"


@attrs.frozen
class StoreConfig:
    #: the store as shown to operators (never with a password)
    url: str
    #: for sqlite: the database file
    path: Path | None
    #: "sqlite" or "postgresql"
    kind: str = "sqlite"
    #: postgresql: libpq parameters from the URL (no password), as sorted (key, value) pairs
    params: tuple = ()
    #: postgresql: the password (store.password), or None for libpq's own (PGPASSWORD, ~/.pgpass)
    password: Secret | None = None
    #: postgresql: connections the gateway keeps (writes take one at a time; reads and notifications share)
    pool: int = 4
    #: postgresql: a write that takes longer is cancelled and retried
    write_timeout: float = 15.0
    #: where the gateway keeps its state (the signing key, SSH host keys): the store's folder for
    #: sqlite, the configuration's folder for postgresql
    state_dir: Path | None = None

    def connect_kwargs(self) -> dict[str, str]:
        """psycopg2/libpq keyword arguments, with the password revealed: never log them."""
        kwargs = dict(self.params)
        if self.password is not None:
            kwargs["password"] = self.password.reveal_text()
        return kwargs


@attrs.frozen
class RecordingConfig:
    #: Ed25519 private key (PEM) that seals sessions; None: generated in the store's folder
    signing_key: Secret | None = None
    #: batched: events are committed in groups; strict: each operation is committed before it is forwarded
    durability: str = "batched"
    #: when the store fails: continue (queue and retry) or deny new operations until it is back
    on_failure: str = "continue"
    #: streaming sinks (gatekeep.recording.sinks)
    sinks: tuple = ()
    #: batched durability: how long the first event of a batch waits for others before the commit
    interval: float = 0.02
    #: SQLite store: who writes it: a separate process (default; the relay's core stays free) or a thread
    writer: str = "process"
    #: bytes of records kept in memory, not yet stored, before new operations wait for the store
    max_backlog: int = 64 << 20


def read_recording(node: Node | None) -> RecordingConfig:
    if node is None:
        return RecordingConfig()
    from gatekeep.recording.sinks import read_sink

    cfg = RecordingConfig(
        signing_key=node.secret("signing_key", None, strip=False),
        durability=node.str("durability", "batched", choices=("batched", "strict")),
        on_failure=node.str("on_failure", "continue", choices=("continue", "deny")),
        sinks=tuple(read_sink(n) for n in node.children("sinks", [])),
        interval=node.duration("interval", 0.02),
        writer=node.str("writer", "process", choices=("process", "thread")),
        max_backlog=node.size("max_backlog", 64 << 20),
    )
    if cfg.max_backlog < 1 << 20:
        raise ConfigError(node.sub("max_backlog"), f"expected at least 1MiB, got {cfg.max_backlog} bytes")
    node.finish()
    return cfg


@attrs.frozen
class Config:
    store: StoreConfig
    identities: tuple[IdentityConfig, ...]
    targets: tuple[TargetConfig, ...]
    node: str
    source: Path | None = None
    #: gatekeep.policy.engine.Rule values, in order
    policies: tuple = ()
    #: masking rules, in order (their shape belongs to gatekeep.masking)
    masking: tuple = ()
    recording: RecordingConfig = RecordingConfig()
    #: gatekeep.admin._config.AdminConfig, or None when there is no admin API
    admin: Any = None
    #: gatekeep.approvals._config.ApprovalsConfig (None: the defaults)
    approvals: Any = None
    #: gatekeep.identity.oidc.OidcConfig, or None without an OpenID Connect issuer
    oidc: Any = None


# -- reading ----------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")


def _name(node: Node, key: str = "name") -> str:
    v = node.str(key)
    if not _NAME.match(v):
        raise ConfigError(node.sub(key), f"expected a name of letters, digits and _.@- (at most 63), got {_show(v)}")
    return v


def read_identity(node: Node) -> IdentityConfig:
    from gatekeep.identity.scram import ScramVerifier

    name = _name(node)
    groups = frozenset(node.strings("groups", ()))
    tok = node.child("token", None)
    sha = scram = None
    if tok is not None:
        h = tok.str("sha256", None)
        if h is not None:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", h):
                raise ConfigError(tok.sub("sha256"), "expected 64 hexadecimal digits (sha256 of the token)")
            sha = bytes.fromhex(h)
        s = tok.str("scram", None)
        if s is not None:
            try:
                scram = ScramVerifier.from_string(s)
            except ValueError as e:
                raise ConfigError(tok.sub("scram"), f"expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> ({e})") from None
        tok.finish()
    keys = []
    for i, line in enumerate(node.strings("ssh_keys", ())):
        parts = line.split(None, 2)
        try:
            blob = base64.b64decode(parts[1], validate=True)
            if len(parts) < 2 or not blob:
                raise ValueError
        except (ValueError, IndexError, binascii.Error):
            raise ConfigError(f"{node.sub('ssh_keys')}[{i}]",
                              "expected an OpenSSH public key such as \"ssh-ed25519 AAAA... comment\"") from None
        keys.append(SSHKey(parts[0], blob, parts[2] if len(parts) > 2 else ""))
    node.finish()
    return IdentityConfig(name, groups, TokenHashes(sha, scram), tuple(keys))


def read_server_tls(node: Node | None) -> ServerTLS | None:
    if node is None:
        return None
    from gatekeep.tls import check_server_tls, read_client_crl, read_client_identity

    tls = ServerTLS(node.secret("cert", strip=False), node.secret("key", strip=False), node.bool("require", False),
                    node.secret("client_ca", None, strip=False), read_client_identity(node), read_client_crl(node))
    node.finish()

    try:
        check_server_tls(tls)
    except ValueError as e:
        raise ConfigError(node.path, str(e)) from None
    return tls


def read_store(value: Any, base: Path) -> StoreConfig:
    """
    ``store:`` is a URL (``sqlite:///PATH``, ``postgresql://USER@HOST:PORT/DB?sslmode=...``) or, for
    PostgreSQL with a password, a mapping ``{url: ..., password: env:NAME, pool: 4, write_timeout: 15s}``.
    """
    if value is None:
        p = base / "gatekeep.db"
        return StoreConfig("sqlite://gatekeep.db", p, state_dir=p.parent)
    node = None
    key = "store"
    if isinstance(value, dict):
        node = Node.of(value, "store", base)
        value = node.str("url")
        key = "store.url"
    if not isinstance(value, str):
        raise ConfigError("store", f"expected a store URL such as sqlite:///var/lib/gatekeep/gatekeep.db, got {_show(value)}")
    if value.startswith("sqlite://"):
        if node is not None:
            node.finish()  # a sqlite store takes no other keys
        rest = value[len("sqlite://"):]
        if not rest:
            raise ConfigError(key, "expected a path after sqlite://")
        p = Path(rest)
        p = p if p.is_absolute() else base / p
        return StoreConfig(value, p, state_dir=p.parent)
    if value.startswith("postgresql://") or value.startswith("postgres://"):
        from gatekeep.store._url import display_url, parse_postgres_url

        try:
            params = parse_postgres_url(value, base)
        except ValueError as e:
            raise ConfigError(key, str(e)) from None
        password, pool, write_timeout = None, 4, 15.0
        if node is not None:
            password = node.secret("password", None)
            pool = node.int("pool", 4, low=1, high=64)
            write_timeout = node.duration("write_timeout", 15.0)
            node.finish()
        return StoreConfig(display_url(params), None, "postgresql", tuple(sorted(params.items())), password, pool,
                           write_timeout, base)
    raise ConfigError(key, f"expected sqlite:///PATH or postgresql://USER@HOST/DATABASE, got {_show(value)}")


def _check_listen(node: Node) -> str:
    from twisted.internet.endpoints import serverFromString

    listen = node.str("listen")
    from twisted.internet import reactor

    try:
        serverFromString(reactor, listen)
    except Exception as e:  # the endpoint parser raises assorted types
        raise ConfigError(node.sub("listen"), f"expected a Twisted server endpoint such as tcp:15432:interface=127.0.0.1 ({e})") from None
    return listen


def read_target(node: Node, plugins: dict[str, Any]) -> TargetConfig:
    name = _name(node)
    protocol = node.str("protocol")
    if protocol not in plugins:
        raise ConfigError(node.sub("protocol"), f"expected one of {', '.join(sorted(plugins))}, got {_show(protocol)}")
    listen = _check_listen(node)
    tls = read_server_tls(node.child("tls", None))
    default = node.str("default_action", "allow", choices=("allow", "deny"))
    unjudgeable = node.str("unjudgeable", "deny", choices=("allow", "deny"))
    options = plugins[protocol].parseTarget(node)
    node.finish()
    return TargetConfig(name, protocol, listen, tls, default, options, unjudgeable)


def read_config(data: Any, base: Path, plugins: dict[str, Any] | None = None, source: Path | None = None) -> Config:
    if plugins is None:
        from gatekeep.plugin import protocol_plugins

        plugins = protocol_plugins()
    root = Node.of(data if data is not None else {}, "", base)
    store = read_store(root.raw("store", None), base)
    identities = tuple(read_identity(n) for n in root.children("identities", []))
    seen: set[str] = set()
    for i, ident in enumerate(identities):
        if ident.name in seen:
            raise ConfigError(f"identities[{i}].name", f"duplicate identity {_show(ident.name)}")
        seen.add(ident.name)
    targets = tuple(read_target(n, plugins) for n in root.children("targets", []))
    names: set[str] = set()
    for i, t in enumerate(targets):
        if t.name in names:
            raise ConfigError(f"targets[{i}].name", f"duplicate target {_show(t.name)}")
        names.add(t.name)
    node_name = root.str("node", "gatekeep")
    from gatekeep.masking.rules import read_masking_rule
    from gatekeep.policy.engine import read_rule

    policies = tuple(read_rule(n, plugins) for n in root.children("policies", []))
    _unique(policies, "policies")
    masking = tuple(read_masking_rule(n) for n in root.children("masking", []))
    _unique(masking, "masking")
    recording = read_recording(root.child("recording", None))
    from gatekeep.admin._config import read_admin
    from gatekeep.approvals._config import read_approvals

    admin = read_admin(root.child("admin", None))
    approvals = read_approvals(root.child("approvals", None))
    from gatekeep.identity.oidc import read_oidc

    oidc = read_oidc(root.child("oidc", None))
    root.finish()
    return Config(store, identities, targets, node_name, source, policies, masking, recording, admin, approvals,
                  oidc)


def _unique(items: tuple, key: str) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item.name in seen:
            raise ConfigError(f"{key}[{i}].name", f"duplicate name {_show(item.name)}")
        seen.add(item.name)


def _refuse_duplicate_keys(node: Any, path: str = "", seen_nodes: set[int] | None = None) -> None:
    """
    YAML keeps the last of two equal keys in one mapping without a word: a
    rule pasted twice, or an ``action: deny`` edited below into ``action: allow``,
    would load as whichever came last. Refuse it, naming the key path.
    """
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias to a node already checked (or a recursive one)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            here = f"{path}.{name}" if path else str(name)
            if name is not None and key.tag != "tag:yaml.org,2002:merge":
                if name in lines:
                    raise ConfigError(here, f"appears twice in one mapping (lines {lines[name]} and "
                                            f"{key.start_mark.line + 1}): keep one")
                lines[name] = key.start_mark.line + 1
            _refuse_duplicate_keys(value, here, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]", seen_nodes)


def load(path: str | Path, plugins: dict[str, Any] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read {p}: {e.strerror}") from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            _refuse_duplicate_keys(node)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"{p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return read_config(data, p.resolve().parent, plugins, source=p)
