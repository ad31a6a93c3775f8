"""
The SSH side of policy: what an operation does (its facts) and the rule keys
that match them.

    match: {kinds: [exec, shell-command], commands: [rm, "*/rm"], args: ["-rf", "/etc/*"],
            wrappers: [sudo], subsystems: [sftp],
            sftp: {operations: [write, remove], paths: ["/etc/**"]},
            forwards: ["db.internal:5432", "127.0.0.1:*"]}

Operation kinds: ``exec`` (a command sent with ``ssh host CMD``), ``shell`` (an
interactive shell is opened), ``shell-command`` (a line typed into an
interactive shell), ``subsystem`` (``sftp``, ...), ``sftp`` (one SFTP request)
and ``forward`` (a ``direct-tcpip`` channel, ``ssh -L``).

A command line is judged one simple command at a time (see
:mod:`gatekeep.protocols.ssh._unwrap`): the relay asks the chain about each,
and the line runs only if every one of them is allowed. ``commands`` matches
the unwrapped program (its base name or full path), ``args`` matches when one
argument, or all of them joined with spaces, fits a glob, and ``wrappers``
when the command was run through one of them (``sudo``, ``env``, ``sh -c``).

Every key of a rule must fit; a key about something the operation does not
have (``commands`` for an SFTP request) does not fit. A deny or review rule's
``sftp.paths`` fits when any path of the request does, an allow rule's only
when every path does (both paths of a rename, link or symlink). An SFTP path
still relative (the starting folder unknown) makes the request unjudgeable.
A forward's host is judged in its canonical spelling (:func:`canonical_host`).

Pure: no I/O, no reactor.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import socket
from fnmatch import fnmatchcase
from typing import Any

import attrs

from gatekeep.config import ConfigError, Node
from gatekeep.model import Operation
from gatekeep.protocols.ssh._unwrap import Command, CommandLine, parse

MATCH_KEYS = ("kinds", "commands", "args", "wrappers", "subsystems", "sftp", "forwards")
KINDS = ("exec", "shell", "shell-command", "subsystem", "sftp", "forward")
SFTP_OPERATIONS = ("read", "write", "remove", "rename", "mkdir", "rmdir", "setstat", "symlink", "link", "list")
#: the ``op`` of an SFTP extended request gatekeep does not know (its ``path``: the extension's name): unjudgeable
UNKNOWN_EXTENSION = "extension"


@attrs.frozen
class SftpRequest:
    """One judged SFTP request: ``op`` is one of :data:`SFTP_OPERATIONS`."""

    op: str
    path: str
    #: the second path of rename, symlink and link
    path2: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,) if self.path2 is None else (self.path, self.path2)

    def text(self) -> str:
        return f"{self.op} {self.path}" + (f" -> {self.path2}" if self.path2 is not None else "")


@attrs.frozen
class SshRequest:
    """``Operation.detail`` of an SSH operation."""

    kind: str
    line: CommandLine | None = None
    #: which command of ``line`` is being judged (None: the whole line)
    part: int | None = None
    sftp: SftpRequest | None = None
    forward: tuple[str, int] | None = None
    subsystem: str | None = None
    #: why gatekeep cannot judge what the request will run (a shell with no terminal reads its commands from the
    #: channel unechoed, as ``bash < script`` does), or None
    unjudgeable: str | None = None


@attrs.frozen
class SshFacts:
    kind: str
    #: the commands judged (one when the relay asks about one part)
    commands: tuple[Command, ...] = ()
    sftp: SftpRequest | None = None
    forward: tuple[str, int] | None = None
    subsystem: str | None = None
    unjudgeable: str | None = None
    cache_key: Any = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.commands:
            out["commands"] = [{"program": c.program, "args": list(c.args), **({"wrappers": list(c.wrappers)}
                                                                              if c.wrappers else {})}
                               for c in self.commands]
        if self.sftp is not None:
            out["sftp"] = {"op": self.sftp.op, "paths": list(self.sftp.paths)}
        if self.forward is not None:
            out["forward"] = f"{self.forward[0]}:{self.forward[1]}"
        if self.subsystem is not None:
            out["subsystem"] = self.subsystem
        return out


def request_of(operation: Operation) -> SshRequest:
    detail = operation.detail
    if isinstance(detail, SshRequest):
        return detail
    if operation.kind in ("exec", "shell-command"):
        return SshRequest(operation.kind, parse(operation.text, interactive=operation.kind == "shell-command"))
    if operation.kind == "subsystem":
        return SshRequest("subsystem", subsystem=operation.text)
    return SshRequest(operation.kind)


def facts_for(operation: Operation) -> SshFacts:
    req = request_of(operation)
    if req.line is not None:
        line = req.line
        if line.unjudgeable:
            return SshFacts(req.kind, unjudgeable=line.unjudgeable)
        commands = line.commands if req.part is None else (line.commands[req.part],)
        if req.kind == "exec":
            for c in commands:
                if c.reads_commands:  # a typed line is judged as typed; an exec's shell runs what it reads
                    return SshFacts(req.kind, commands, unjudgeable=(
                        f"{c.name} runs commands from its input or a file, which gatekeep does not see"))
        key = (req.kind, tuple((c.argv, c.wrappers) for c in commands))
        return SshFacts(req.kind, commands, cache_key=key)
    if req.sftp is not None:
        if req.sftp.op == UNKNOWN_EXTENSION:  # a server may act on paths in it that gatekeep cannot find
            return SshFacts("sftp", sftp=req.sftp, unjudgeable=(
                f"the SFTP extension {req.sftp.path!r} is not one gatekeep knows"))
        relative = next((p for p in req.sftp.paths if not p.startswith("/")), None)
        if relative is not None:  # the server would resolve it against a folder gatekeep does not know
            return SshFacts("sftp", sftp=req.sftp, unjudgeable=(
                f"the SFTP path {relative!r} is relative and the session's starting folder is unknown"))
        return SshFacts("sftp", sftp=req.sftp, cache_key=("sftp", req.sftp))
    if req.forward is not None:
        forward = (canonical_host(req.forward[0]), req.forward[1])
        return SshFacts("forward", forward=forward, cache_key=("forward", forward))
    if req.unjudgeable is not None:
        return SshFacts(req.kind, unjudgeable=req.unjudgeable)
    return SshFacts(req.kind, subsystem=req.subsystem, cache_key=(req.kind, req.subsystem))


def parts(operation: Operation) -> list[Operation]:
    """The operations to judge for ``operation``: one per simple command of a command line, else itself."""
    req = request_of(operation)
    if req.line is None or req.line.unjudgeable or len(req.line.commands) <= 1:
        if req.line is not None and len(req.line.commands) == 1 and req.part is None:
            return [attrs.evolve(operation, detail=attrs.evolve(req, part=0))]
        return [attrs.evolve(operation, detail=req)]
    return [attrs.evolve(operation, detail=attrs.evolve(req, part=i)) for i in range(len(req.line.commands))]


# -- matching -------------------------------------------------------------------------


def _glob(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(value, p) for p in patterns)


def _path_glob(path: str, patterns: tuple[str, ...]) -> bool:
    """``*`` stays within one path segment, ``**`` crosses segments; a pattern ending in ``/**`` also
    matches the folder itself."""
    for p in patterns:
        if _compile_path_glob(p).fullmatch(path):
            return True
    return False


_GLOB_CACHE: dict[str, re.Pattern[str]] = {}


def _compile_path_glob(pattern: str) -> re.Pattern[str]:
    found = _GLOB_CACHE.get(pattern)
    if found is not None:
        return found
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("(?:/.*)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    compiled = re.compile("".join(out), re.S)
    _GLOB_CACHE[pattern] = compiled
    return compiled


@attrs.frozen
class SshMatch:
    kinds: tuple[str, ...] | None = None
    commands: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    wrappers: tuple[str, ...] | None = None
    subsystems: tuple[str, ...] | None = None
    sftp_operations: tuple[str, ...] | None = None
    sftp_paths: tuple[str, ...] | None = None
    forwards: tuple[str, ...] | None = None

    def matches(self, facts: SshFacts | None, operation: Any) -> bool:
        """For deny and review rules: fits when any command, any path of the operation does."""
        return self._matches(facts, any)

    def matches_all(self, facts: SshFacts | None, operation: Any) -> bool:
        """For allow rules: fits only when every command and every path of the operation does (both paths of
        a rename, link or symlink)."""
        return self._matches(facts, all)

    def _matches(self, facts: SshFacts | None, each: Any) -> bool:
        if not isinstance(facts, SshFacts):
            return False
        if self.kinds is not None and not _glob(facts.kind, self.kinds):
            return False
        if self.commands is not None or self.args is not None or self.wrappers is not None:
            if not facts.commands or not each(self._command(c) for c in facts.commands):
                return False
        if self.subsystems is not None and (facts.subsystem is None or not _glob(facts.subsystem, self.subsystems)):
            return False
        if self.sftp_operations is not None or self.sftp_paths is not None:
            s = facts.sftp
            if s is None:
                return False
            if self.sftp_operations is not None and s.op not in self.sftp_operations:
                return False
            if self.sftp_paths is not None and not each(_path_glob(p, self.sftp_paths) for p in s.paths):
                return False
        if self.forwards is not None:
            if facts.forward is None:
                return False
            host, port = facts.forward  # canonical already (facts_for)
            if not _glob(f"{host}:{port}", self.forwards):
                return False
        return True

    def _command(self, c: Command) -> bool:
        if self.commands is not None and not (_glob(c.name, self.commands) or _glob(c.program, self.commands)):
            return False
        if self.args is not None and not (any(_glob(a, self.args) for a in c.args)
                                          or _glob(" ".join(c.args), self.args)):
            return False
        if self.wrappers is not None and not any(_glob(w.split()[0], self.wrappers) or _glob(w, self.wrappers)
                                                 for w in c.wrappers):
            return False
        return True


def read_match(node: Node) -> SshMatch:
    kinds = node.strings("kinds", None)
    for i, k in enumerate(kinds or ()):
        if k not in KINDS:
            raise ConfigError(f"{node.sub('kinds')}[{i}]", f"expected one of {', '.join(KINDS)}, got \"{k}\"")
    ops = paths = None
    sftp = node.child("sftp", None)
    if sftp is not None:
        ops = sftp.strings("operations", None)
        for i, op in enumerate(ops or ()):
            if op not in SFTP_OPERATIONS:
                raise ConfigError(f"{sftp.sub('operations')}[{i}]",
                                  f"expected one of {', '.join(SFTP_OPERATIONS)}, got \"{op}\"")
        paths = sftp.strings("paths", None)
        if ops is None and paths is None:
            raise ConfigError(sftp.path, "expected operations, paths or both")
        sftp.finish()
    forwards = node.strings("forwards", None)
    for i, f in enumerate(forwards or ()):
        if ":" not in f:
            raise ConfigError(f"{node.sub('forwards')}[{i}]", f"expected HOST:PORT (globs allowed), got \"{f}\"")
    return SshMatch(kinds, node.strings("commands", None), node.strings("args", None), node.strings("wrappers", None),
                    node.strings("subsystems", None), ops, paths,
                    tuple(f.lower() for f in forwards) if forwards is not None else None)


def normalize_path(path: str, home: str | None) -> str:
    """An SFTP path as policy sees it: absolute (against the login folder when known), ``.``/``..`` resolved."""
    if not path.startswith("/") and home:
        path = posixpath.join(home, path)
    if path.startswith("/"):
        path = posixpath.normpath(path)
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
    return path


def canonical_host(host: str) -> str:
    """
    A forward's host as policy judges it and as gatekeep asks the server to connect to: one spelling per
    address. Numeric IPv4 forms that the server's resolver (glibc ``getaddrinfo``, ``inet_aton``) accepts
    (``2852039166``, ``0xa9fea9fe``, ``169.254.43518``, ``0251.0376.0251.0376``) become the dotted quad,
    IPv6 addresses their compressed form, an IPv4-mapped IPv6 address (``::ffff:169.254.169.254``) the IPv4
    address; names are lower-cased and lose their trailing dots (``metadata.internal.``).
    """
    text = host.strip().lower()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None and ":" not in text and text and text[0].isdigit():
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(text))
        except (OSError, ValueError):
            address = None
    if address is None:
        return text.rstrip(".") or text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
