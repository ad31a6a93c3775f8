"""OIDC tokens with curl, kubectl and ssh: the JWT is accepted wherever a gatekeep token is.

One gateway with an HTTP, a Kubernetes and an SSH target and the loopback
OpenID Provider of tests/support/oidc; the PostgreSQL side is in
test_oidc_postgres.py.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.integration.pg_gateway_helpers import poll
from tests.support.fake_kube import FakeKubeAPI
from tests.support.gatekeep_process import REPO_ROOT, tcp_listen
from tests.support.httpserver import HttpServer
from tests.support.oidcprovider import (
    OTHER_RESOURCE, RESOURCE, OidcProvider, client_credentials_client, jwt_claims, signing_key,
)
from tests.support.ports import free_port
from tests.support.sshserver import SshServer

GATEKEEP = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "gatekeep")
SECRET = "s3cret-for-the-loopback-test-provider"
SERVICE_TOKEN = "upstream-service-token"


@pytest.fixture(scope="module")
def gw(gatekeep_module, tls_files, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("oidc-protocols"))
    op = http_upstream = kube = sshd = None
    try:
        op = OidcProvider(workdir, accounts={"alice": {"groups": ["idp-dev"]}},
                          clients=[client_credentials_client("agent-alice", SECRET)],
                          client_accounts={"agent-alice": "alice"}, keys=[signing_key("k1")]).start()
        http_upstream = HttpServer().start()
        kube = FakeKubeAPI(SERVICE_TOKEN).start()
        sshd = SshServer()
        sshd.start()
        known_hosts = os.path.join(workdir, "upstream_known_hosts")
        with open(known_hosts, "w") as f:
            f.write(sshd.known_hosts_line() + "\n")
        gateway_tls = {"cert": "file:" + tls_files.gateway_cert, "key": "file:" + tls_files.gateway_key}
        config = {
            "oidc": {"issuer": op.issuer, "audience": RESOURCE, "group_map": {"idp-dev": "dev"}},
            "targets": [
                {"name": "api", "protocol": "http", "listen": tcp_listen(free_port()),
                 "upstream": {"url": "http://127.0.0.1:%d" % http_upstream.port},
                 "credentials": {"bearer": "env:SERVICE_TOKEN"}},
                {"name": "cluster", "protocol": "kubernetes", "listen": tcp_listen(free_port()), "tls": gateway_tls,
                 "upstream": {"url": "http://127.0.0.1:%d" % kube.port},
                 "credentials": {"bearer": "env:SERVICE_TOKEN"}},
                {"name": "box", "protocol": "ssh", "listen": tcp_listen(free_port()),
                 "upstream": {"host": "127.0.0.1", "port": sshd.port, "user": sshd.user,
                              "private_key": "file:" + sshd.client_key, "known_hosts": "file:" + known_hosts}},
            ],
        }
        gk = gatekeep_module(config, env={"SERVICE_TOKEN": SERVICE_TOKEN})
        gk.wait_for_log("OIDC signing keys of %s" % op.issuer, timeout=10)
        yield type("Gw", (), dict(gk=gk, op=op, http=http_upstream, kube=kube, sshd=sshd, workdir=workdir,
                                  tls=tls_files))
    finally:
        for server, stop in ((sshd, "cleanup"), (kube, "stop"), (http_upstream, "stop"), (op, "stop")):
            if server is not None:
                getattr(server, stop)()


def token(gw, resource=None):
    return gw.op.client_credentials("agent-alice", SECRET, resource=resource)


def cli(gw, *args):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, GATEKEEP_CONFIG=gw.gk.config_path)
    out = subprocess.run([GATEKEEP, *args], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def oidc_sessions(gw, target):
    rows = json.loads(cli(gw, "sessions", "list", "--json", "--target", target, "--config", gw.gk.config_path))
    return [(r["identity"], r["auth_method"], r["groups"]) for r in rows]


def curl(gw, bearer, path="/echo/oidc"):
    return subprocess.run(["curl", "-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}",
                           "-H", "Authorization: Bearer " + bearer, "http://127.0.0.1:%d%s" % (gw.gk.ports["api"], path)],
                          capture_output=True, text=True, timeout=30)


def test_curl_with_an_oidc_token(gw):
    """curl with a JWT reaches the upstream with the service token; the session is alice's, by OIDC."""
    jwt = token(gw)
    body, status = curl(gw, jwt).stdout.rsplit("\n", 1)
    assert status == "200"
    seen = json.loads(body)
    assert seen["headers"]["Authorization"] == "Bearer " + SERVICE_TOKEN
    assert jwt not in json.dumps(gw.http.requests)
    poll("alice's OIDC session", lambda: ("alice", "oidc", ["dev"]) in oidc_sessions(gw, "api"))


def test_curl_with_a_token_for_another_audience_is_401(gw):
    """A JWT for another resource gets 401 and nothing reaches the upstream."""
    before = len(gw.http.requests)
    assert jwt_claims(token(gw, OTHER_RESOURCE))["aud"] == OTHER_RESOURCE
    assert curl(gw, token(gw, OTHER_RESOURCE)).stdout.rsplit("\n", 1)[1] == "401"
    assert len(gw.http.requests) == before


def test_kubectl_with_an_oidc_token(gw, tmp_path):
    """kubectl with a kubeconfig holding a JWT lists pods through the gateway."""
    kubeconfig = tmp_path / "alice.kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "gk",
        "clusters": [{"name": "gk", "cluster": {"server": "https://localhost:%d" % gw.gk.ports["cluster"],
                                                "certificate-authority": gw.tls.ca_cert}}],
        "users": [{"name": "alice", "user": {"token": token(gw)}}],
        "contexts": [{"name": "gk", "context": {"cluster": "gk", "user": "alice", "namespace": "default"}}],
    }))
    run = subprocess.run(["/usr/bin/kubectl", "--request-timeout=20s", "get", "pods", "-o", "name"],
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
                              "KUBECONFIG": str(kubeconfig)}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "pod/web-0" in run.stdout.split()
    poll("alice's OIDC session", lambda: ("alice", "oidc", ["dev"]) in oidc_sessions(gw, "cluster"))


@pytest.mark.parametrize("method", ["password", "keyboard-interactive"])
def test_ssh_with_an_oidc_token(gw, method):
    """ssh with the JWT typed as the password (or keyboard-interactive answer) runs a command upstream."""
    askpass = os.path.join(gw.workdir, "askpass-%s" % method)
    with open(askpass, "w") as f:
        f.write("#!/bin/sh\nprintf '%%s\\n' '%s'\n" % token(gw))
    os.chmod(askpass, 0o755)
    env = dict(os.environ, SSH_ASKPASS=askpass, SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
    args = ["ssh", "-p", str(gw.gk.ports["box"]), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "-o", "PreferredAuthentications=%s" % method,
            "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1", "alice@127.0.0.1", "echo oidc-ok"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
                         start_new_session=True)
    assert run.returncode == 0 and run.stdout == "oidc-ok\n", run.stderr
    poll("alice's OIDC session", lambda: ("alice", "oidc", ["dev"]) in oidc_sessions(gw, "box"))


def test_kubectl_with_the_gatekeep_exec_credential_plugin(gw, tmp_path):
    """gatekeep kubeconfig --exec: kubectl runs gatekeep token show for the signed-in OIDC token and lists pods."""
    xdg = tmp_path / "xdg"
    (xdg / "gatekeep").mkdir(parents=True, mode=0o700)
    record = {"issuer": gw.op.issuer, "access_token": token(gw)}
    (xdg / "gatekeep" / "tokens.json").write_text(json.dumps(
        {"version": 1, "default": gw.op.issuer, "issuers": {gw.op.issuer: record}}))
    kubeconfig = tmp_path / "exec.kubeconfig"
    kubeconfig.write_text(cli(gw, "kubeconfig", "cluster", "--identity", "alice", "--exec", "--server",
                              "https://localhost:%d" % gw.gk.ports["cluster"], "--ca", gw.tls.ca_cert))
    env = {"PATH": os.path.dirname(GATEKEEP) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(xdg), "KUBECONFIG": str(kubeconfig),
           "PYTHONPATH": REPO_ROOT}
    run = subprocess.run(["/usr/bin/kubectl", "--request-timeout=20s", "get", "pods", "-o", "name"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "pod/web-0" in run.stdout.split()
