"""A real OpenID Provider on loopback for the tests: ``oidc-provider`` on Node.js.

``tests/support/oidc/provider.js`` configures it from a JSON file; this module
writes that file, runs ``node``, waits for its "ready" line, and drives it the
way clients do::

    op = OidcProvider(workdir, accounts={"alice": {"groups": ["idp-dev"]}},
                      clients=[client_credentials_client("agent-alice", "secret")],
                      client_accounts={"agent-alice": "alice"})
    op.start()
    token = op.client_credentials("agent-alice", "secret")    # a JWT access token
    op.approve_device(verification_uri_complete, "alice")     # the person's side of RFC 8628
    op.restart(keys=[signing_key("k2")])                      # key rotation
    op.stop()

Install its packages once with ``npm ci`` in tests/support/oidc (.ci/run does).
Everything stays on 127.0.0.1 and every wait has a deadline.
"""

import base64
import http.cookiejar
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from .ports import free_port

OIDC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "oidc")
RESOURCE = "urn:gatekeep"
OTHER_RESOURCE = "urn:other"
DEVICE_CLIENT = "gatekeep-cli"


class OidcProviderError(RuntimeError):
    pass


def signing_key(kid):
    """A fresh RSA private JWK (RS256) with key id ``kid``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key))
    jwk.update(kid=kid, alg="RS256", use="sig")
    return jwk


def client_credentials_client(client_id, secret):
    return {"client_id": client_id, "client_secret": secret, "grant_types": ["client_credentials"],
            "response_types": [], "redirect_uris": [], "token_endpoint_auth_method": "client_secret_post"}


def device_client(client_id=DEVICE_CLIENT):
    """A public client for the device authorization grant, with refresh tokens."""
    return {"client_id": client_id, "token_endpoint_auth_method": "none", "response_types": [],
            "redirect_uris": [],
            "grant_types": ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"]}


def _no_proxy_opener(*handlers):
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)


class OidcProvider:
    def __init__(self, workdir, *, accounts=None, clients=(), client_accounts=None, resources=None,
                 client_ttl=None, keys=None, port=None, issuer=None):
        self.workdir = workdir
        self.port = port or free_port()
        self.issuer = issuer or "http://127.0.0.1:%d" % self.port
        self.keys = list(keys) if keys else [signing_key("k1")]
        self.config = {
            "port": self.port,
            "issuer": self.issuer,
            "accounts": accounts or {},
            "clients": list(clients),
            "client_accounts": client_accounts or {},
            "resources": resources or {RESOURCE: {"scope": "gatekeep", "ttl": 300},
                                       OTHER_RESOURCE: {"scope": "other", "ttl": 300}},
            "client_ttl": client_ttl or {},
        }
        self.process = None
        self.log_path = os.path.join(workdir, "oidc-provider-%d.log" % self.port)

    # -- process ---------------------------------------------------------------

    def start(self, timeout=20.0):
        os.makedirs(self.workdir, exist_ok=True)
        if not os.path.isdir(os.path.join(OIDC_DIR, "node_modules", "oidc-provider")):
            raise OidcProviderError("oidc-provider is not installed: run `npm ci` in %s" % OIDC_DIR)
        path = os.path.join(self.workdir, "oidc-provider-%d.json" % self.port)
        with open(path, "w") as f:
            json.dump(dict(self.config, jwks={"keys": self.keys}), f)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(["node", os.path.join(OIDC_DIR, "provider.js"), path], cwd=OIDC_DIR,
                                        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        os.set_blocking(self.process.stdout.fileno(), False)
        buf = b""
        while b"\n" not in buf:
            if self.process.poll() is not None:
                raise OidcProviderError("oidc-provider exited with %s:\n%s" % (self.process.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                self.stop()
                raise OidcProviderError("oidc-provider did not start within %.0fs:\n%s" % (timeout, self.log_tail()))
            chunk = self.process.stdout.read(4096)
            if chunk:
                buf += chunk
            else:
                time.sleep(0.05)
        if not buf.startswith(b"ready "):
            self.stop()
            raise OidcProviderError("unexpected output from oidc-provider: %r" % buf)
        return self

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process is not None:
            self.process.stdout.close()
        self.process = None

    def restart(self, keys=None):
        """Stop and start again on the same port (new signing keys when given)."""
        self.stop()
        if keys is not None:
            self.keys = list(keys)
        return self.start()

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # -- as a client --------------------------------------------------------------

    def discovery(self):
        with _no_proxy_opener().open(self.issuer + "/.well-known/openid-configuration", timeout=10) as r:
            return json.load(r)

    def post_form(self, url, fields):
        data = urllib.parse.urlencode(fields).encode()
        try:
            with _no_proxy_opener().open(urllib.request.Request(url, data=data), timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def client_credentials(self, client_id, secret, resource=None):
        """A JWT access token for a client_credentials client (for ``resource``, or the default one)."""
        fields = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
        if resource:
            fields["resource"] = resource
        status, body = self.post_form(self.discovery()["token_endpoint"], fields)
        if status != 200:
            raise OidcProviderError("token endpoint answered %d: %r" % (status, body))
        return body["access_token"]

    def approve_device(self, verification_uri_complete, login):
        """Play the person: open the verification page, confirm the code, sign in as ``login``."""
        jar = http.cookiejar.CookieJar()
        opener = _no_proxy_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(verification_uri_complete, timeout=10) as r:
            page, where = r.read().decode(), r.geturl()
        for _ in range(8):
            if "Sign-in Success" in page:
                return page
            action, fields = _form(page)
            if "login" in fields:
                fields["login"] = login
            fields.pop("abort", None)
            url = urllib.parse.urljoin(where, action)
            request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode())
            with opener.open(request, timeout=10) as r:
                page, where = r.read().decode(), r.geturl()
        raise OidcProviderError("device approval did not succeed: %s" % page[:500])


def _form(page):
    """(action, {name: value}) of the page's first form (its inputs with their values)."""
    m = re.search(r"<form[^>]*>(.*?)</form>", page, re.S)
    if m is None:
        raise OidcProviderError("no form in page: %s" % page[:500])
    action = re.search(r'action="([^"]*)"', m.group(0)).group(1)
    fields = {}
    for tag in re.findall(r"<input[^>]*>", m.group(1)):
        name = re.search(r'name="([^"]*)"', tag)
        value = re.search(r'value="([^"]*)"', tag)
        if name:
            fields[name.group(1)] = value.group(1) if value else ""
    return action, fields


def jwt_claims(token):
    """The claims of a JWT, unverified (for assertions in tests)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
