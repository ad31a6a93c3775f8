"""Client certificates with curl and kubectl, and sessions that end with their access (SIGHUP) over HTTP and SSH.

One gateway with an HTTPS and a Kubernetes target that ask for client
certificates (module scope); the SIGHUP tests start their own gateway.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import threading

import pytest
from cryptography import x509

from tests.integration.pg_gateway_helpers import poll, sessions_json, show_session
from tests.support.fake_kube import FakeKubeAPI
from tests.support.gatekeep_process import tcp_listen
from tests.support.httpserver import HttpServer
from tests.support.identities import make_identity
from tests.support.ports import free_port
from tests.support.sshserver import SshServer
from tests.support.tlsfiles import _load, make_client_certificates, make_crl

SERVICE_TOKEN = "upstream-service-token"
REMOVED = "the identity was removed from the configuration"


@pytest.fixture(scope="module")
def gw(gatekeep_module, tls_files, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("identity-http"))
    upstream = kube = None
    try:
        upstream = HttpServer().start()
        kube = FakeKubeAPI(SERVICE_TOKEN).start()
        certs = make_client_certificates(tls_files, os.path.join(workdir, "certs"), {
            "carol": {"common_name": "carol"},
            "carol-foreign": {"common_name": "carol", "ca": "other"},
            "nobody": {"common_name": "nobody"},
            "carol-revoked": {"common_name": "carol"},
            "carol-live": {"common_name": "carol"},  # revoked while its connection is open
        })
        crl_path = os.path.join(workdir, "certs", "clients.crl")
        write_crl(tls_files, crl_path, [certs["carol-revoked"][0]])
        tokens = {}
        tokens["carol"], carol = make_identity("carol", ["ops"])
        tokens["dave"], dave = make_identity("dave", ["ops"])
        tls = {"cert": "file:" + tls_files.gateway_cert, "key": "file:" + tls_files.gateway_key,
               "client_ca": "file:" + tls_files.ca_cert, "client_identity": "subject_cn", "client_crl": "file:" + crl_path}
        config = {
            "identities": [carol, dave],
            "targets": [
                {"name": "api", "protocol": "http", "listen": tcp_listen(free_port()), "tls": tls,
                 "upstream": {"url": "http://127.0.0.1:%d" % upstream.port},
                 "credentials": {"bearer": "env:SERVICE_TOKEN"}},
                {"name": "cluster", "protocol": "kubernetes", "listen": tcp_listen(free_port()), "tls": tls,
                 "upstream": {"url": "http://127.0.0.1:%d" % kube.port},
                 "credentials": {"bearer": "env:SERVICE_TOKEN"}},
            ],
        }
        gk = gatekeep_module(config, env={"SERVICE_TOKEN": SERVICE_TOKEN})
        yield type("Gw", (), dict(gk=gk, http=upstream, kube=kube, certs=certs, tokens=tokens, tls=tls_files,
                                  workdir=workdir, crl_path=crl_path))
    finally:
        for server in (kube, upstream):
            if server is not None:
                server.stop()


def curl(gw, cert=None, bearer=None, path="/echo/cert"):
    args = ["curl", "-sS", "--max-time", "20", "--cacert", gw.tls.ca_cert, "-o", "-", "-w", "\n%{http_code}"]
    if cert is not None:
        args += ["--cert", gw.certs[cert][0], "--key", gw.certs[cert][1]]
    if bearer is not None:
        args += ["-H", "Authorization: Bearer " + bearer]
    out = subprocess.run(args + ["https://localhost:%d%s" % (gw.gk.ports["api"], path)], capture_output=True,
                         text=True, timeout=30)
    body, _, status = out.stdout.rpartition("\n")
    return status, body


def live_sessions(gw, target):
    return [(r["identity"], r["auth_method"]) for r in sessions_json(gw.gk, "--target", target)
            if r["ended_at"] is None]


def test_curl_with_a_client_certificate_needs_no_token(gw):
    """A certificate from the client CA naming carol is her login: 200, the upstream gets the service token."""
    status, body = curl(gw, cert="carol")
    assert status == "200", body
    assert json.loads(body)["headers"]["Authorization"] == "Bearer " + SERVICE_TOKEN
    poll("carol's certificate session", lambda: ("carol", "certificate") in
         [(r["identity"], r["auth_method"]) for r in sessions_json(gw.gk, "--target", "api")])


@pytest.mark.parametrize("stem,why", [
    ("carol-foreign", "does not verify against the client CA"),
    ("nobody", "which is not a configured identity"),
    ("carol-revoked", "the client certificate is revoked"),
])
def test_curl_with_a_refused_client_certificate_is_401_naming_why(gw, stem, why):
    """A certificate from another CA, or naming no identity, gets 401 JSON naming why; nothing goes upstream."""
    before = len(gw.http.requests)
    status, body = curl(gw, cert=stem, bearer=gw.tokens["carol"])
    assert status == "401", body
    assert why in json.loads(body)["message"]
    assert len(gw.http.requests) == before


def write_crl(tls_files, path, revoked_cert_paths):
    """The test CA's revocation list, revoking the certificates in those files; replaced atomically."""
    ca_cert, ca_key = _load(tls_files.ca_cert, tls_files.ca_key)
    revoked = [x509.load_pem_x509_certificate(open(p, "rb").read()) for p in revoked_cert_paths]
    with open(path + ".new", "wb") as f:
        f.write(make_crl(ca_cert, ca_key, revoked))
    os.replace(path + ".new", path)


def test_a_revocation_published_while_running_refuses_the_next_login(gw):
    """The CA revokes carol's certificate and the list file is replaced: her next request is 401, no restart."""
    assert curl(gw, cert="carol")[0] == "200"
    write_crl(gw.tls, gw.crl_path, [gw.certs["carol-revoked"][0], gw.certs["carol"][0]])
    try:
        status, body = curl(gw, cert="carol")
        assert status == "401" and "revoked" in json.loads(body)["message"], body
    finally:
        write_crl(gw.tls, gw.crl_path, [gw.certs["carol-revoked"][0]])
    assert curl(gw, cert="carol")[0] == "200"


def test_a_keep_alive_connection_ends_when_its_certificate_is_revoked(gw):
    """An open HTTPS connection logged in with a certificate is closed once a new list revokes the certificate;
    the session's end is recorded with the reason; carol's other certificate still logs in."""
    import ssl

    context = ssl.create_default_context(cafile=gw.tls.ca_cert)
    context.load_cert_chain(*gw.certs["carol-live"])
    conn = http.client.HTTPSConnection("localhost", gw.gk.ports["api"], context=context, timeout=20)
    try:
        conn.request("GET", "/echo/cert", headers={"User-Agent": "live-revocation"})
        response = conn.getresponse()
        assert response.status == 200 and response.read()
        (session_id,) = poll("the live session", lambda: [
            r["id"] for r in sessions_json(gw.gk, "--target", "api")
            if r["ended_at"] is None and r["attributes"].get("user_agent") == "live-revocation"])
        write_crl(gw.tls, gw.crl_path, [gw.certs["carol-revoked"][0], gw.certs["carol-live"][0]])
        ended = poll("the session to end", lambda: [
            r for r in sessions_json(gw.gk, "--target", "api") if r["id"] == session_id and r["ended_at"]],
            timeout=20)  # the watch looks every 2 s; a client that does not answer TLS's close is cut after 5 s
        assert ended[0]["end_reason"] == "access ended: the client certificate is revoked (tls.client_crl)"
        with pytest.raises((http.client.HTTPException, OSError)):  # the gateway closed the connection
            conn.request("GET", "/echo/cert")
            conn.getresponse()
    finally:
        conn.close()
    assert curl(gw, cert="carol")[0] == "200"


def test_a_bearer_token_must_name_the_certificate_s_identity(gw):
    """carol's certificate with dave's token is refused (401); with carol's own token it is fine."""
    status, body = curl(gw, cert="carol", bearer=gw.tokens["dave"])
    assert status == "401" and "different identities" in json.loads(body)["message"], body
    assert curl(gw, cert="carol", bearer=gw.tokens["carol"])[0] == "200"


def test_curl_without_a_certificate_still_logs_in_with_a_token(gw):
    """client_ca asks for a certificate without requiring one: a bearer token alone works."""
    assert curl(gw, bearer=gw.tokens["dave"])[0] == "200"


def test_kubectl_with_a_client_certificate(gw, tmp_path):
    """kubectl with client-certificate/client-key in its kubeconfig (no token) lists pods as carol."""
    kubeconfig = tmp_path / "carol.kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "gk",
        "clusters": [{"name": "gk", "cluster": {"server": "https://localhost:%d" % gw.gk.ports["cluster"],
                                                "certificate-authority": gw.tls.ca_cert}}],
        "users": [{"name": "carol", "user": {"client-certificate": gw.certs["carol"][0],
                                             "client-key": gw.certs["carol"][1]}}],
        "contexts": [{"name": "gk", "context": {"cluster": "gk", "user": "carol", "namespace": "default"}}],
    }))
    run = subprocess.run(["/usr/bin/kubectl", "--request-timeout=20s", "get", "pods", "-o", "name"],
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
                              "KUBECONFIG": str(kubeconfig)}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "pod/web-0" in run.stdout.split()
    poll("carol's certificate session", lambda: ("carol", "certificate") in
         [(r["identity"], r["auth_method"]) for r in sessions_json(gw.gk, "--target", "cluster")])


# -- sessions end with their access -----------------------------------------------------------


class OnceThenSilent:
    """A loopback HTTP upstream that answers the first request of a connection and then never again."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.second = threading.Event()
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(conn)
        conn.settimeout(30)
        data = b""
        try:
            while data.count(b"\r\n\r\n") < 1:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
            while data.count(b"\r\n\r\n") < 2:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.second.set()
        except OSError:
            return

    def close(self):
        for c in [self.sock, *self.conns]:
            c.close()


def test_http_keep_alive_session_cut_on_sighup_removal_gets_401(gatekeep):
    """eve's keep-alive connection: removed from the configuration + SIGHUP, her request in flight gets 401."""
    upstream = OnceThenSilent()
    try:
        token, eve = make_identity("eve", ["ops"])
        _, other = make_identity("zed", ["ops"])
        gk = gatekeep({"identities": [eve, other], "targets": [
            {"name": "api", "protocol": "http", "listen": tcp_listen(free_port()),
             "upstream": {"url": "http://127.0.0.1:%d" % upstream.port}, "credentials": {"bearer": "env:SVC"}}]},
            env={"SVC": SERVICE_TOKEN})
        conn = http.client.HTTPConnection("127.0.0.1", gk.ports["api"], timeout=20)
        headers = {"Authorization": "Bearer " + token}
        conn.request("GET", "/first", headers=headers)
        first = conn.getresponse()
        assert first.status == 200 and first.read() == b"ok"
        conn.request("GET", "/second", headers=headers)
        assert upstream.second.wait(10), "the second request did not reach the upstream"
        gk.config["identities"] = [other]
        gk.write_config()
        gk.send_signal(signal.SIGHUP)
        answer = conn.getresponse()
        body = json.loads(answer.read())
        assert answer.status == 401 and REMOVED in body["message"], body
        assert answer.getheader("Connection") == "close"
        conn.close()
        row = poll("eve's session to be recorded as ended",
                   lambda: next((r for r in sessions_json(gk) if r["identity"] == "eve" and r["ended_at"]), None))
        assert show_session(gk, row["id"])["end_reason"] == "access ended: " + REMOVED
    finally:
        upstream.close()


def test_ssh_session_ended_on_sighup_removal_shows_the_reason(gatekeep, tmp_path):
    """frank's ssh session (token as password) is disconnected on SIGHUP removal; ssh prints gatekeep's reason."""
    sshd = SshServer()
    sshd.start()
    proc = None
    try:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(sshd.known_hosts_line() + "\n")
        token, frank = make_identity("frank", ["ops"])
        _, other = make_identity("zed", ["ops"])
        gk = gatekeep({"identities": [frank, other], "targets": [
            {"name": "box", "protocol": "ssh", "listen": tcp_listen(free_port()),
             "upstream": {"host": "127.0.0.1", "port": sshd.port, "user": sshd.user,
                          "private_key": "file:" + sshd.client_key, "known_hosts": "file:" + str(known_hosts)}}]})
        askpass = tmp_path / "askpass"
        askpass.write_text("#!/bin/sh\nprintf '%%s\\n' '%s'\n" % token)
        askpass.chmod(0o755)
        env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        proc = subprocess.Popen(
            ["ssh", "-p", str(gk.ports["box"]), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=INFO", "-o", "ConnectTimeout=10", "-o", "PreferredAuthentications=password",
             "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1", "frank@127.0.0.1",
             "echo started; sleep 60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True,
            start_new_session=True)
        assert proc.stdout.readline() == "started\n"
        gk.config["identities"] = [other]
        gk.write_config()
        gk.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode != 0
        assert "gatekeep: access ended: " + REMOVED + "\n" in err, err  # on the command's stderr first
        assert "gatekeep: " + REMOVED in err.split("gatekeep: access ended: ", 1)[1], err  # then the disconnect
        row = poll("frank's session to be recorded as ended",
                   lambda: next((r for r in sessions_json(gk) if r["identity"] == "frank" and r["ended_at"]), None))
        assert show_session(gk, row["id"])["end_reason"] == "access ended: " + REMOVED
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        sshd.cleanup()
