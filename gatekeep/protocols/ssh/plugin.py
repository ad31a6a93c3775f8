"""The ``ssh`` protocol plugin: target configuration, policy facts and the relay's factory."""

from __future__ import annotations

import re
from typing import Any

import attrs
from zope.interface import implementer

from gatekeep.config import ConfigError, Node
from gatekeep.interfaces import IProtocolPlugin

_FINGERPRINT = re.compile(r"^(SHA256:[A-Za-z0-9+/]{43}=?|MD5:(?:[0-9a-f]{2}:){15}[0-9a-f]{2})$")


@attrs.frozen
class Upstream:
    host: str
    port: int
    user: str
    private_key: Any = None  # Secret | None
    password: Any = None  # Secret | None
    #: OpenSSH known_hosts text (a Secret read from file:) with the server's key
    known_hosts: Any = None
    #: "SHA256:..." (as ssh-keygen -l prints it) or "MD5:aa:bb:..."
    host_key_fingerprint: str | None = None
    #: accept and keep the key seen first when neither of the above is given
    trust_on_first_use: bool = False
    connect_timeout: float = 10.0


@attrs.frozen
class SshTarget:
    upstream: Upstream
    #: the gateway's host key (a Secret), or None to generate one into the state folder
    host_key: Any = None
    #: environment variables a client may pass on (globs)
    env_allow: tuple[str, ...] = ("LANG", "LC_*")
    #: mask configured detectors in what interactive clients see, not only in the recording
    mask_client_output: bool = False
    #: judge lines typed into interactive shells (best effort; see docs/ssh.md)
    judge_shell_commands: bool = True
    #: record what the client types (asciicast "i" events)
    record_input: bool = True
    #: stop recording a channel's terminal stream after this many bytes
    max_recorded_bytes: int = 16 * 1024 * 1024
    #: the flow-control window of each relayed channel, per direction
    window: int = 2 * 1024 * 1024
    #: a client must finish logging in (and gatekeep upstream) within this time
    login_timeout: float = 60.0
    #: how long to wait for the echo of a typed line before judging it
    echo_wait: float = 1.0


def read_upstream(up: Node) -> Upstream:
    from twisted.conch.ssh import keys

    private_key = up.secret("private_key", None, strip=False)
    if private_key is not None:
        try:
            keys.Key.fromString(private_key.reveal())
        except Exception as e:
            raise ConfigError(up.sub("private_key"),
                              f"expected an unencrypted OpenSSH or PEM private key ({type(e).__name__})") from None
    password = up.secret("password", None)
    if private_key is None and password is None:
        raise ConfigError(up.path, "expected private_key, password or both (file:/env: references)")
    known_hosts = up.secret("known_hosts", None, strip=False)
    fingerprint = up.str("host_key_fingerprint", None)
    if fingerprint is not None and not _FINGERPRINT.match(fingerprint):
        raise ConfigError(up.sub("host_key_fingerprint"),
                          "expected SHA256:<43 base64 characters> (as ssh-keygen -l prints it) or MD5:xx:xx:...")
    tofu = up.bool("trust_on_first_use", False)
    if known_hosts is None and fingerprint is None and not tofu:
        raise ConfigError(up.path, "expected known_hosts or host_key_fingerprint to verify the server's host key "
                                   "(or trust_on_first_use: true)")
    if known_hosts is not None:
        from gatekeep.protocols.ssh._hostkeys import parse_known_hosts

        try:
            parse_known_hosts(known_hosts.reveal())
        except ValueError as e:
            raise ConfigError(up.sub("known_hosts"), str(e)) from None
    upstream = Upstream(up.str("host"), up.int("port", 22, low=1, high=65535), up.str("user"), private_key, password,
                        known_hosts, fingerprint, tofu, up.duration("connect_timeout", 10.0))
    up.finish()
    return upstream


@implementer(IProtocolPlugin)
class SshPlugin:
    name = "ssh"
    matchKeys = ("kinds", "commands", "args", "wrappers", "subsystems", "sftp", "forwards")

    def parseMatch(self, node: Node):
        from gatekeep.protocols.ssh.policy import read_match

        return read_match(node)

    def facts(self, operation, target):
        """What an exec, typed command, SFTP request or forward does (see gatekeep.protocols.ssh.policy)."""
        from gatekeep.protocols.ssh.policy import facts_for

        return facts_for(operation)

    def parseTarget(self, node: Node) -> SshTarget:
        if node.has("tls"):
            # read_target takes every target's tls; SSH has its own encryption, and a tls here would be ignored
            raise ConfigError(node.sub("tls"), "SSH targets take no tls: SSH encrypts the connection itself "
                                               "(gatekeep's host key is host_key)")
        upstream = read_upstream(node.child("upstream"))
        host_key = node.secret("host_key", None, strip=False)
        if host_key is not None:
            from twisted.conch.ssh import keys

            try:
                key = keys.Key.fromString(host_key.reveal())
                if key.isPublic():
                    raise ValueError("a public key")
            except Exception as e:
                raise ConfigError(node.sub("host_key"),
                                  f"expected an unencrypted private key ({type(e).__name__})") from None
        return SshTarget(
            upstream=upstream,
            host_key=host_key,
            env_allow=node.strings("env_allow", ("LANG", "LC_*")),
            mask_client_output=node.bool("mask_client_output", False),
            judge_shell_commands=node.bool("judge_shell_commands", True),
            record_input=node.bool("record_input", True),
            max_recorded_bytes=node.int("max_recorded_bytes", 16 * 1024 * 1024, low=0),
            window=node.int("window", 2 * 1024 * 1024, low=64 * 1024, high=64 * 1024 * 1024),
            login_timeout=node.duration("login_timeout", 60.0),
            echo_wait=node.duration("echo_wait", 1.0),
        )

    def makeFactory(self, target, gateway):
        from gatekeep.protocols.ssh.relay import SshRelayFactory

        return SshRelayFactory(target, gateway)
