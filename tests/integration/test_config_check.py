"""`gatekeep config check` and `twistd gatekeep` on good and bad configuration files."""

import os

import pytest
import yaml

from tests.integration.pg_gateway_helpers import gk_cli, pg_target
from tests.support.gatekeep_process import GatekeepProcessError
from tests.support.identities import make_identity
from tests.support.ports import free_port

BAD_PORT_MESSAGE = 'targets[0].upstream.port: expected an integer, got "abc"'


def _config(port=5432, password="env:GK_TEST_PW_APP_RW"):
    _, alice = make_identity("alice", ["dev"])
    target = pg_target("db", 5432, "app_rw", listen_port=free_port())
    target["upstream"]["port"] = port
    target["upstream"]["password"] = password
    return {"identities": [alice], "targets": [target]}


def _write(workdir, name, config):
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


@pytest.fixture
def upstream_password_env(monkeypatch):
    monkeypatch.setenv("GK_TEST_PW_APP_RW", "config-check-secret-value-3f9a")
    return "config-check-secret-value-3f9a"


def test_config_check_accepts_good_file(tmp_workdir, upstream_password_env):
    """`gatekeep config check` on a valid file exits 0 and summarises identities and targets."""
    path = _write(tmp_workdir, "good.yaml", _config())
    proc = gk_cli("config", "check", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"{path}: ok (1 identities, 1 targets)"
    assert "db: postgres on tcp:" in proc.stdout
    assert upstream_password_env not in proc.stdout + proc.stderr


def test_config_check_rejects_non_integer_port(tmp_workdir, upstream_password_env):
    """`gatekeep config check` names the bad key and value and exits 1."""
    path = _write(tmp_workdir, "bad.yaml", _config(port="abc"))
    proc = gk_cli("config", "check", path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{path}: {BAD_PORT_MESSAGE}"
    assert proc.stdout == ""


def test_config_check_does_not_echo_literal_secret(tmp_workdir, upstream_password_env):
    """A literal password in the file is refused without being repeated in the error."""
    literal = "literal-hunter2-" + os.urandom(4).hex()
    path = _write(tmp_workdir, "literal.yaml", _config(password=literal))
    proc = gk_cli("config", "check", path)
    assert proc.returncode == 1
    assert "targets[0].upstream.password" in proc.stderr
    assert literal not in proc.stderr + proc.stdout


def test_twistd_refuses_to_start_with_bad_config(gatekeep, upstream_password_env):
    """`twistd -n gatekeep --config bad.yaml` exits non-zero with the same message and never listens."""
    config = _config(port="abc")
    with pytest.raises(GatekeepProcessError) as e:
        gatekeep(config, timeout=20)
    message = str(e.value)
    assert "exited with code 1" in message
    assert f"configuration refused: {BAD_PORT_MESSAGE}" in message
