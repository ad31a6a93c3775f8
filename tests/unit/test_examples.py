"""The configurations in examples/ load, and `gatekeep config check` accepts them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gatekeep.config import load
from tests.support.tlsfiles import make_tls_files

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def example_dir(tmp_path, monkeypatch):
    """A copy of examples/ with the TLS files and environment the examples reference."""
    work = tmp_path / "examples"
    shutil.copytree(EXAMPLES, work)
    tls = make_tls_files(str(tmp_path / "pki"))
    (work / "tls").mkdir(exist_ok=True)
    shutil.copy(tls.gateway_cert, work / "tls" / "gateway.pem")
    shutil.copy(tls.gateway_key, work / "tls" / "gateway.key")
    shutil.copy(tls.ca_cert, work / "tls" / "db-ca.pem")
    monkeypatch.setenv("PROD_DB_PASSWORD", "example-password")
    monkeypatch.setenv("GATEKEEP_MASKING_KEY", "example-masking-key")
    monkeypatch.setenv("APPROVALS_WEBHOOK_URL", "https://hooks.example.com/services/T0/B0/example")
    monkeypatch.setenv("BILLING_API_TOKEN", "example-api-token")
    monkeypatch.setenv("KUBE_SERVICE_ACCOUNT_TOKEN", "example-service-account-token")
    # the SSH example's upstream key and the server's host key
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = work / "keys"
    keys.mkdir(exist_ok=True)
    key = Ed25519PrivateKey.generate()
    (keys / "web-1_ed25519").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    host = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    (keys / "known_hosts").write_text(f"127.0.0.1 {host}\n")
    return work


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_loads(example_dir, name):
    """Each example configuration loads with its targets, identities, policies and masking rules."""
    config = load(example_dir / name)
    assert config.targets, "an example configures at least one target"
    assert config.identities
    assert all(t.name for t in config.targets)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_config_check(example_dir, name):
    """`gatekeep config check` accepts each example and names its targets."""
    result = subprocess.run([sys.executable, "-m", "gatekeep.cli.main", "config", "check", str(example_dir / name)],
                            capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_postgres_example_policies_in_order(example_dir):
    """The PostgreSQL example's rules keep their order and the secrets resolve without showing their values."""
    config = load(example_dir / "postgres.yaml")
    assert [r.name for r in config.policies][:3] == ["no-ddl-for-agents", "agents-read-only-on-billing",
                                                     "no-unbounded-writes"]
    upstream = config.targets[0].options.upstream
    assert upstream.password.reveal() == b"example-password"
    assert "example-password" not in repr(config)
