"""Tests for gatekeep.config: errors that name the key path, secrets, durations, stores, TLS and a good config."""

from __future__ import annotations

import copy
import traceback
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gatekeep.config import ConfigError, load, parse_duration, parse_size, read_config
from gatekeep.identity.tokens import token_entry
from gatekeep.protocols.postgres.plugin import PostgresTarget
from gatekeep.secrets import Secret, SecretError, resolve
from tests.support.tlsfiles import make_ca

TOKEN = "gk_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
PG_PASSWORD = "pg-service-password-value"
ENV = "GK_TEST_PG_PASSWORD"


@pytest.fixture(autouse=True)
def pg_password(monkeypatch):
    monkeypatch.setenv(ENV, PG_PASSWORD)
    monkeypatch.delenv("GK_TEST_NOT_SET", raising=False)


def good() -> dict:
    """A complete, valid configuration as YAML would load it."""
    return {
        "node": "gk-test",
        "store": "sqlite:///var/lib/gatekeep/gatekeep.db",
        "identities": [token_entry("alice", TOKEN, ["dba", "oncall"]), {"name": "bob"}],
        "targets": [{
            "name": "db",
            "protocol": "postgres",
            "listen": "tcp:15432:interface=127.0.0.1",
            "default_action": "deny",
            "upstream": {
                "host": "db.internal", "port": 5433, "database": "app", "user": "svc",
                "password": f"env:{ENV}", "connect_timeout": "500ms",
            },
        }],
    }


def error_of(data: dict, base: Path = Path("/etc/gatekeep")) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        read_config(data, base)
    return info.value


def with_change(path: str, value, data: dict | None = None) -> dict:
    """A copy of the good config with one key (dotted path, [i] for list items) set, or removed for ...."""
    data = copy.deepcopy(data if data is not None else good())
    node = data
    parts = path.replace("[", ".").replace("]", "").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is ...:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return data


# -- a good configuration --------------------------------------------------------------


def test_good_config_loads():
    """A valid configuration becomes attrs values with the plugin's options, secrets resolved."""
    config = read_config(good(), Path("/etc/gatekeep"))
    assert config.node == "gk-test"
    assert config.store.path == Path("/var/lib/gatekeep/gatekeep.db")
    alice, bob = config.identities
    assert (alice.name, alice.groups, bob.name, bob.groups) == ("alice", {"dba", "oncall"}, "bob", frozenset())
    assert alice.token.sha256 is not None and alice.token.scram is not None and bob.token.sha256 is None
    (target,) = config.targets
    assert (target.name, target.protocol, target.listen, target.default_action, target.tls) == (
        "db", "postgres", "tcp:15432:interface=127.0.0.1", "deny", None)
    assert isinstance(target.options, PostgresTarget)
    up = target.options.upstream
    assert (up.host, up.port, up.database, up.user, up.connect_timeout) == ("db.internal", 5433, "app", "svc", 0.5)
    assert up.password.reveal() == PG_PASSWORD.encode()
    assert up.tls.mode == "disable"


def test_defaults_apply():
    """Left out, the port is 5432, default_action allow, node gatekeep, connect_timeout 10s, no password."""
    data = with_change("targets[0].upstream.port", ...)
    for key in ("targets[0].default_action", "node", "targets[0].upstream.connect_timeout",
                "targets[0].upstream.password", "store"):
        data = with_change(key, ..., data)
    config = read_config(data, Path("/srv/gk"))
    up = config.targets[0].options.upstream
    assert (up.port, up.connect_timeout, up.password) == (5432, 10.0, None)
    assert (config.targets[0].default_action, config.node) == ("allow", "gatekeep")
    assert config.store.path == Path("/srv/gk/gatekeep.db")


def test_empty_document_is_an_empty_config():
    """An empty YAML document (None) is a configuration with nothing in it."""
    config = read_config(None, Path("/srv"))
    assert (config.identities, config.targets) == ((), ())


# -- errors name the key path ----------------------------------------------------------


@pytest.mark.parametrize("path, value, message", [
    ("targets[0].upstream.port", "abc", 'targets[0].upstream.port: expected an integer, got "abc"'),
    ("targets[0].upstream.port", True, "targets[0].upstream.port: expected an integer, got true"),
    ("targets[0].upstream.port", 70000, "targets[0].upstream.port: expected an integer from 1 to 65535, got 70000"),
    ("targets[0].upstream.host", ..., "targets[0].upstream.host: is required"),
    ("targets[0].upstream.host", "", 'targets[0].upstream.host: expected a string, got ""'),
    ("targets[0].upstream", "db:5432", 'targets[0].upstream: expected a mapping, got "db:5432"'),
    ("targets[0].default_action", "maybe", 'targets[0].default_action: expected one of allow, deny, got "maybe"'),
    ("targets[0].name", "no spaces", 'targets[0].name: expected a name of letters, digits and _.@- (at most 63),'
                                     ' got "no spaces"'),
    ("targets[0].upstream.tls", {"mode": "sometimes"},
     'targets[0].upstream.tls.mode: expected one of disable, require, verify-ca, verify-full, got "sometimes"'),
    ("targets[0].upstream.tls", {"mode": "verify-ca"}, "targets[0].upstream.tls.ca: is required with mode verify-ca"),
    ("targets", {"db": {}}, "targets: expected a list, got a mapping"),
    ("identities", ["alice"], 'identities[0]: expected a mapping, got "alice"'),
    ("identities[0].groups", [1, 2], "identities[0].groups: expected a list of strings, got a list"),
    ("identities[0].token.sha256", "abc",
     "identities[0].token.sha256: expected 64 hexadecimal digits (sha256 of the token)"),
    ("targets[0].max_buffer", 10, "targets[0].max_buffer: expected an integer from 16384 to 67108864, got 10"),
    ("node", 5, "node: expected a string, got 5"),
])
def test_errors_name_the_key_path_and_the_expectation(path, value, message):
    """Each bad value is reported as 'key.path: expected ..., got ...'."""
    e = error_of(with_change(path, value))
    assert str(e) == message
    assert e.path == message.split(": ", 1)[0]


def test_unknown_protocol_lists_the_known_ones():
    """A protocol no plugin serves is refused, naming the protocols that exist."""
    e = error_of(with_change("targets[0].protocol", "mysql"))
    assert e.path == "targets[0].protocol"
    assert "postgres" in e.message and e.message.endswith('got "mysql"')


def test_bad_scram_verifier_is_explained():
    """A malformed SCRAM verifier names the expected format."""
    e = error_of(with_change("identities[0].token.scram", "SCRAM-SHA-256$x"))
    assert e.path == "identities[0].token.scram"
    assert "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>" in e.message


def test_bad_listen_endpoint_is_refused():
    """A listen string Twisted cannot parse is refused with an example of a good one."""
    e = error_of(with_change("targets[0].listen", "tcp:notaport"))
    assert e.path == "targets[0].listen" and "tcp:15432:interface=127.0.0.1" in e.message


@pytest.mark.parametrize("path, key, near", [
    ("", "colour", None),
    ("targets[0]", "colour", None),
    ("targets[0].upstream", "passwrd", "password"),
    ("identities[0]", "group", "groups"),
    ("identities[0].token", "sha265", "sha256"),
])
def test_unknown_keys_are_refused(path, key, near):
    """A key nobody reads is refused with its full path; a typo of a key that would be read is named."""
    e = error_of(with_change(f"{path}.{key}" if path else key, "x"))
    expected = (f"{path}.{key}" if path else key) + ": unknown key"
    assert str(e) == (expected + f' (did you mean "{near}"?)' if near else expected)


def test_a_typo_in_a_rules_match_names_the_key_it_meant():
    """A match key no protocol reads is refused, naming the nearest key some protocol reads."""
    data = good()
    data["policies"] = [{"name": "r", "match": {"statments": ["select"]}, "action": "deny"}]
    e = error_of(data)
    assert str(e) == 'policies[0].match.statments: unknown key (did you mean "statements"?)'


def test_duplicate_identity_names_are_refused():
    """Two identities with one name are refused at the second."""
    data = good()
    data["identities"].append(token_entry("alice", "gk_other"))
    assert str(error_of(data)) == 'identities[2].name: duplicate identity "alice"'


def test_duplicate_target_names_are_refused():
    """Two targets with one name are refused at the second."""
    data = good()
    data["targets"].append(copy.deepcopy(data["targets"][0]))
    assert str(error_of(data)) == 'targets[1].name: duplicate target "db"'


# -- secrets ---------------------------------------------------------------------------


def test_file_secret_resolves_relative_to_the_config(tmp_path):
    """file: references are read relative to the configuration's directory, one trailing newline dropped."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pg").write_text(PG_PASSWORD + "\n")
    config = read_config(with_change("targets[0].upstream.password", "file:secrets/pg"), tmp_path)
    password = config.targets[0].options.upstream.password
    assert password.reveal() == PG_PASSWORD.encode()
    assert password.reference == "file:secrets/pg"


def test_missing_env_variable_is_named():
    """An env: reference to an unset variable names the key path and the variable."""
    e = error_of(with_change("targets[0].upstream.password", "env:GK_TEST_NOT_SET"))
    assert str(e) == "targets[0].upstream.password: environment variable GK_TEST_NOT_SET is not set"


def test_missing_secret_file_is_named(tmp_path):
    """A file: reference to a missing file names the file."""
    e = error_of(with_change("targets[0].upstream.password", "file:nope.txt"), tmp_path)
    assert e.path == "targets[0].upstream.password"
    assert str(tmp_path / "nope.txt") in e.message


@pytest.mark.parametrize("literal", ["hunter2-literal-password", 73219846, "envy-secret", "file-secret"])
def test_literal_password_is_refused_without_echoing_it(literal):
    """A literal secret is refused, and neither the message nor the traceback contains its value."""
    e = error_of(with_change("targets[0].upstream.password", literal))
    assert e.path == "targets[0].upstream.password"
    assert "env:NAME or file:PATH" in e.message
    shown = str(e) + repr(e) + "".join(traceback.format_exception(e))
    assert str(literal) not in shown


def test_secret_repr_never_shows_the_value():
    """repr and str of a Secret, and of values holding one, show the reference only."""
    secret = resolve(f"env:{ENV}")
    assert repr(secret) == str(secret) == f"<Secret env:{ENV}>"
    assert f"{secret}" == f"<Secret env:{ENV}>"
    config = read_config(good(), Path("/etc/gatekeep"))
    assert PG_PASSWORD not in repr(config)
    assert secret.reveal_text() == PG_PASSWORD


def test_secrets_compare_by_reference_only():
    """Two Secrets with one reference are equal whatever their values (eq never reveals by timing the value)."""
    assert Secret("env:X", b"a") == Secret("env:X", b"b")
    assert Secret("env:X", b"a") != Secret("env:Y", b"a")


@pytest.mark.parametrize("reference", ["env:", "file:", "vault:x", "plain"])
def test_bad_references_raise_secret_error(reference):
    """References without a name, or of an unknown kind, raise SecretError."""
    with pytest.raises(SecretError):
        resolve(reference)


def test_file_secret_strip_keeps_inner_newlines(tmp_path):
    """strip drops one trailing CRLF or LF only; strip=False keeps the file as it is."""
    (tmp_path / "s").write_bytes(b"line1\nline2\r\n")
    assert resolve("file:s", tmp_path).reveal() == b"line1\nline2"
    assert resolve("file:s", tmp_path, strip=False).reveal() == b"line1\nline2\r\n"


# -- durations -------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("30s", 30.0), ("10m", 600.0), ("2h", 7200.0), ("1d", 86400.0),
    ("1.5s", 1.5), (" 3 ", 3.0), ("7", 7.0), (5, 5.0), (0.25, 0.25), (0, 0.0),
])
def test_durations_parse(text, seconds):
    """Durations are numbers of seconds or a number with ms, s, m, h or d."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5 weeks", "", "-1s", -1, True, "1e3s", "s"])
def test_bad_durations_are_refused(text):
    """Anything else is a ValueError."""
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text, size", [
    ("64MiB", 64 << 20), ("512KiB", 512 << 10), ("1GiB", 1 << 30), ("2MB", 2_000_000), ("10kb", 10_000),
    (" 3 mib ", 3 << 20), ("100", 100), (4096, 4096), ("100b", 100), ("1.5MiB", 3 << 19),
])
def test_sizes_parse(text, size):
    """Sizes are numbers of bytes or a number with B, kB/MB/GB or KiB/MiB/GiB, in any case."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["big", "5 MiBs", "", "-1MiB", -1, True, "1e3", "MiB", "3TiB"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_recording_backlog_bound_is_read_and_checked():
    """recording.max_backlog takes a size; less than 1MiB is refused with the key path."""
    assert read_config(with_change("recording", {"max_backlog": "8MiB"}), Path("/etc")).recording.max_backlog == 8 << 20
    e = error_of(with_change("recording", {"max_backlog": "100KiB"}))
    assert str(e) == "recording.max_backlog: expected at least 1MiB, got 102400 bytes"
    e = error_of(with_change("recording", {"max_backlog": "lots"}))
    assert str(e) == 'recording.max_backlog: expected a size such as 64MiB, got "lots"'


def test_bad_duration_in_config_names_the_key():
    """A bad duration in the configuration names the key path and gives examples."""
    e = error_of(with_change("targets[0].upstream.connect_timeout", "soon"))
    assert str(e) == 'targets[0].upstream.connect_timeout: expected a duration such as 30s or 10m, got "soon"'


# -- YAML ------------------------------------------------------------------------------


def test_bad_yaml_reports_line_and_column(tmp_path):
    """A YAML syntax error names the file, line and column."""
    path = tmp_path / "gatekeep.yaml"
    path.write_text("targets:\n  - name: db\n   protocol: postgres\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(path) in str(info.value)
    assert "line 3, column 4" in str(info.value)


@pytest.mark.parametrize("text, path, lines", [
    ("targets:\n  - name: db\n    protocol: postgres\n    listen: tcp:15432\n    default_action: deny\n"
     "    upstream: {host: h, database: d, user: u, password: 'file:pg'}\n    default_action: allow\n",
     "targets[0].default_action", (5, 7)),
    ("policies:\n  - name: no-drops\n    match: {statements: [ddl], statements: [select]}\n    action: deny\n",
     "policies[0].match.statements", (3, 3)),
    ("identities:\n  - name: agent-7\n    groups: [readonly]\n    groups: [dba]\n", "identities[0].groups", (3, 4)),
])
def test_a_key_given_twice_in_one_mapping_is_refused_with_its_path(tmp_path, text, path, lines):
    """YAML keeps the last of two equal keys silently (an edited 'default_action: allow' below a 'deny' won)."""
    (tmp_path / "pg").write_text(PG_PASSWORD)
    conf = tmp_path / "gatekeep.yaml"
    conf.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(conf)
    assert str(info.value) == f"{path}: appears twice in one mapping (lines {lines[0]} and {lines[1]}): keep one"


def test_anchors_and_merge_keys_still_load(tmp_path):
    """A merge key and aliases are not duplicates: the mapping they build is checked as written."""
    (tmp_path / "pg").write_text(PG_PASSWORD)
    conf = tmp_path / "gatekeep.yaml"
    conf.write_text("targets:\n  - name: a\n    protocol: postgres\n    listen: tcp:15432\n"
                    "    upstream: &up {host: h, database: d, user: u, password: 'file:pg'}\n"
                    "  - name: b\n    protocol: postgres\n    listen: tcp:15433\n"
                    "    upstream: {<<: *up, database: other}\n")
    config = load(conf)
    assert [t.options.upstream.database for t in config.targets] == ["d", "other"]


def test_unreadable_file_is_reported(tmp_path):
    """A configuration file that cannot be read is reported with its path."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.yaml")
    assert str(tmp_path / "missing.yaml") in str(info.value)


def test_load_reads_yaml_relative_to_its_directory(tmp_path):
    """load() reads YAML and resolves relative paths against the file's directory."""
    (tmp_path / "pg").write_text(PG_PASSWORD)
    path = tmp_path / "gatekeep.yaml"
    path.write_text(
        "store: sqlite://data/gk.db\n"
        "targets:\n"
        "  - name: db\n    protocol: postgres\n    listen: tcp:15432\n"
        "    upstream: {host: h, database: d, user: u, password: 'file:pg'}\n"
    )
    config = load(path)
    assert config.store.path == tmp_path.resolve() / "data" / "gk.db"
    assert config.targets[0].options.upstream.password.reveal() == PG_PASSWORD.encode()
    assert config.source == path


# -- stores ----------------------------------------------------------------------------


@pytest.mark.parametrize("url, path", [
    ("sqlite:///var/lib/gk/gk.db", Path("/var/lib/gk/gk.db")),
    ("sqlite://gk.db", Path("/etc/gatekeep/gk.db")),
    ("sqlite://data/gk.db", Path("/etc/gatekeep/data/gk.db")),
    (..., Path("/etc/gatekeep/gatekeep.db")),
])
def test_store_urls(url, path):
    """sqlite:///absolute and sqlite://relative (to the config's directory) give the database file."""
    config = read_config(with_change("store", url), Path("/etc/gatekeep"))
    assert config.store.path == path


@pytest.mark.parametrize("url, message", [
    ("postgresql://gk:hunter2@db/gk", "a password in the store URL is not accepted: give it as store.password "
                                      "(env:NAME or file:PATH)"),
    ("postgres://gk@db/", "expected a database name: postgresql://USER@HOST:PORT/DATABASE"),
    ("sqlite://", "expected a path after sqlite://"),
    ("mysql://db/gk", 'expected sqlite:///PATH or postgresql://USER@HOST/DATABASE, got "mysql://db/gk"'),
    (42, "expected a store URL such as sqlite:///var/lib/gatekeep/gatekeep.db, got 42"),
])
def test_bad_store_urls(url, message):
    """Other store URLs are refused with a message that says what to use."""
    assert str(error_of(with_change("store", url))) == f"store: {message}"


# -- TLS -------------------------------------------------------------------------------


def _pem_pair(directory: Path, stem: str) -> tuple[str, str]:
    cert, key = make_ca(f"gatekeep config test {stem}")
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return f"file:{stem}.pem", f"file:{stem}.key"


@pytest.fixture(scope="module")
def pems(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pems")
    _pem_pair(directory, "one")
    _pem_pair(directory, "two")
    (directory / "junk.pem").write_text("not a certificate\n")
    return directory


def test_matching_cert_and_key_load(pems):
    """A certificate with its own key is accepted and kept as secrets."""
    config = read_config(with_change("targets[0].tls", {"cert": "file:one.pem", "key": "file:one.key",
                                                         "require": True}), pems)
    tls = config.targets[0].tls
    assert (tls.cert.reference, tls.key.reference, tls.require) == ("file:one.pem", "file:one.key", True)
    assert tls.key.reveal().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_cert_and_key_mismatch_is_refused(pems):
    """A key that does not belong to the certificate is refused under the tls key, naming both files."""
    e = error_of(with_change("targets[0].tls", {"cert": "file:one.pem", "key": "file:two.key"}), pems)
    assert e.path == "targets[0].tls"
    assert "file:one.pem" in e.message and "file:two.key" in e.message
    assert "do not match" in e.message or "does not match" in e.message


def test_key_that_is_not_a_key_is_refused(pems):
    """A key file without a PEM private key is refused, naming the file."""
    e = error_of(with_change("targets[0].tls", {"cert": "file:one.pem", "key": "file:one.pem"}), pems)
    assert str(e) == "targets[0].tls: file:one.pem does not hold a PEM private key"


def test_cert_that_is_not_a_cert_is_refused(pems):
    """A certificate file without a PEM certificate is refused under the tls key."""
    e = error_of(with_change("targets[0].tls", {"cert": "file:junk.pem", "key": "file:one.key"}), pems)
    assert e.path == "targets[0].tls" and "certificate" in e.message


def test_tls_needs_both_files(pems):
    """tls without a key is refused at targets[0].tls.key."""
    assert str(error_of(with_change("targets[0].tls", {"cert": "file:one.pem"}), pems)) == (
        "targets[0].tls.key: is required")


def test_admin_tls_with_a_client_ca_is_refused(pems):
    """The admin API authenticates by token and never asks for a client certificate: a client_ca there would be
    a check the operator believes in that never runs, so it is refused by its path."""
    data = good()
    data["admin"] = {"listen": "tcp:9090:interface=127.0.0.1", "roles": {"admin": ["ops"]},
                     "tls": {"cert": "file:one.pem", "key": "file:one.key", "client_ca": "file:two.pem"}}
    e = error_of(data, pems)
    assert e.path == "admin.tls.client_ca" and "bearer token" in e.message
    del data["admin"]["tls"]["client_ca"]
    assert read_config(data, pems).admin.tls.cert.reference == "file:one.pem"


def test_an_ssh_target_with_tls_is_refused(pems):
    """SSH has its own encryption: a tls mapping on an SSH target would be read and ignored, so it is refused."""
    data = good()
    data["targets"].append({"name": "web-1", "protocol": "ssh", "listen": "tcp:2222:interface=127.0.0.1",
                            "tls": {"cert": "file:one.pem", "key": "file:one.key"},
                            "upstream": {"host": "127.0.0.1", "port": 22, "user": "deploy", "password": "env:X"}})
    e = error_of(data, pems)
    assert e.path == "targets[1].tls" and "SSH targets take no tls" in e.message
