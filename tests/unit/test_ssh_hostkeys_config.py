"""Host keys (the gateway's own, the upstream check) and the ssh target's configuration."""

import base64
import hashlib
import hmac
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys

from gatekeep.config import ConfigError, read_config
from gatekeep.plugin import protocol_plugins
from gatekeep.protocols.ssh._hostkeys import (HostKeyMismatch, HostKeyPolicy, fingerprint_sha256, gateway_host_key,
                                              parse_known_hosts)
from gatekeep.secrets import Secret


def _key():
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def _line(host, key):
    return f"{host} ssh-ed25519 {base64.b64encode(key.public().blob()).decode()}\n"


def test_generated_host_key_is_kept(tmp_path):
    """Without host_key the gateway generates an Ed25519 key once (mode 0600) and reads it back after."""
    first = gateway_host_key(None, tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "ssh_host_ed25519_key").st_mode) == 0o600
    assert (tmp_path / "ssh_host_ed25519_key.pub").read_text().startswith("ssh-ed25519 ")
    assert gateway_host_key(None, tmp_path).public().blob() == first.public().blob()


def test_configured_host_key_is_used(tmp_path):
    """A host_key secret is the key, and nothing is written to the state folder."""
    key = _key()
    got = gateway_host_key(Secret("file:k", key.toString("openssh")), tmp_path)
    assert got.public().blob() == key.public().blob() and not os.listdir(tmp_path)


def test_known_hosts_port_hashed_and_mismatch():
    """[host]:port entries and hashed entries match; another key for the host is a mismatch."""
    server, other = _key(), _key()
    assert HostKeyPolicy("10.0.0.5", 2222, _line("[10.0.0.5]:2222", server).encode()).check(server.public().blob()) is None
    salt = os.urandom(20)
    digest = hmac.new(salt, b"db.example", hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    HostKeyPolicy("db.example", 22, _line(hashed, server).encode()).check(server.public().blob())
    with pytest.raises(HostKeyMismatch, match="mismatch"):
        HostKeyPolicy("10.0.0.5", 2222, _line("[10.0.0.5]:2222", server).encode()).check(other.public().blob())
    with pytest.raises(HostKeyMismatch, match="not in"):
        HostKeyPolicy("10.0.0.6", 22, _line("10.0.0.5", server).encode()).check(server.public().blob())


def test_revoked_key_is_refused():
    """A key marked @revoked is refused even if also listed."""
    server = _key()
    text = ("@revoked " + _line("h", server) + _line("h", server)).encode()
    with pytest.raises(HostKeyMismatch, match="revoked"):
        HostKeyPolicy("h", 22, text).check(server.public().blob())


def test_fingerprint():
    """A SHA256 fingerprint (as ssh-keygen -l prints it) accepts that key only."""
    server, other = _key(), _key()
    fp = fingerprint_sha256(server.public().blob())
    HostKeyPolicy("h", 22, fingerprint=fp).check(server.public().blob())
    with pytest.raises(HostKeyMismatch):
        HostKeyPolicy("h", 22, fingerprint=fp).check(other.public().blob())


def test_trust_on_first_use(tmp_path):
    """With trust_on_first_use the first key is kept and required afterwards; no other way refuses."""
    server, other = _key(), _key()
    policy = HostKeyPolicy("h", 2200, trust_on_first_use=True, state_dir=tmp_path)
    policy.check(server.public().blob())
    policy.check(server.public().blob())
    with pytest.raises(HostKeyMismatch):
        policy.check(other.public().blob())
    with pytest.raises(HostKeyMismatch):
        HostKeyPolicy("h", 22).check(server.public().blob())


def test_known_hosts_errors():
    """A known_hosts line that does not parse is an error naming the line."""
    with pytest.raises(ValueError, match="line 2"):
        parse_known_hosts(b"# comment\nhost ssh-ed25519 !!!notbase64\n")


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "k"
    path.write_bytes(_key().toString("openssh"))
    return path


def _target(tmp_path, **fields):
    target = {"name": "box", "protocol": "ssh", "listen": "tcp:0:interface=127.0.0.1"}
    target.update(fields)
    return read_config({"targets": [target]}, tmp_path, protocol_plugins()).targets[0]


def test_defaults(tmp_path, keyfile):
    """An ssh target's defaults: port 22, LANG and LC_* passed on, shells judged, no client-side masking."""
    t = _target(tmp_path, upstream={"host": "h", "user": "u", "private_key": f"file:{keyfile}",
                                    "host_key_fingerprint": "SHA256:" + "a" * 43})
    o = t.options
    assert (o.upstream.port, o.env_allow, o.judge_shell_commands, o.mask_client_output) == (22, ("LANG", "LC_*"),
                                                                                           True, False)
    assert "PRIVATE" not in repr(o)


@pytest.mark.parametrize("upstream, path, message", [
    ({"host": "h", "user": "u", "host_key_fingerprint": "SHA256:" + "a" * 43}, "targets[0].upstream",
     "private_key, password"),
    ({"host": "h", "user": "u", "password": "hunter2", "trust_on_first_use": True}, "targets[0].upstream.password",
     "literal secrets"),
    ({"host": "h", "user": "u", "password": "env:HOME"}, "targets[0].upstream", "known_hosts or host_key_fingerprint"),
    ({"host": "h", "user": "u", "password": "env:HOME", "host_key_fingerprint": "abc"},
     "targets[0].upstream.host_key_fingerprint", "SHA256"),
    ({"host": "h", "user": "u", "password": "env:HOME", "trust_on_first_use": True, "prot": 22},
     "targets[0].upstream.prot", "unknown key"),
])
def test_config_errors_name_the_key(tmp_path, upstream, path, message):
    """Bad upstream settings are refused with their key path and never echo a secret."""
    with pytest.raises(ConfigError) as e:
        _target(tmp_path, upstream=upstream)
    assert e.value.path == path and message in str(e.value)
    assert "hunter2" not in str(e.value)


def test_bad_private_key_file(tmp_path):
    """A private key file that is not a key is refused at load time."""
    bad = tmp_path / "bad"
    bad.write_text("not a key")
    with pytest.raises(ConfigError) as e:
        _target(tmp_path, upstream={"host": "h", "user": "u", "private_key": f"file:{bad}",
                                    "trust_on_first_use": True})
    assert e.value.path == "targets[0].upstream.private_key"
