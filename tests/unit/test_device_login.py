"""gatekeep login: the device authorization grant against a scripted issuer, and the token file."""

from __future__ import annotations

import os
import stat

import pytest

from gatekeep.identity.device import LoginError, TokenFile, current_token, device_login

ISSUER = "https://login.example.test"


class Issuer:
    """A scripted issuer: ``answers`` is the list of token endpoint answers, in order."""

    def __init__(self, answers, device=None):
        self.answers = list(answers)
        self.calls = []
        self.device = device or {"device_code": "dc", "user_code": "ABCD-EFGH", "verification_uri": ISSUER + "/device",
                                 "verification_uri_complete": ISSUER + "/device?user_code=ABCD-EFGH",
                                 "expires_in": 600, "interval": 2}

    def __call__(self, method, url, form=None):
        self.calls.append((method, url, form))
        if url.endswith("/.well-known/openid-configuration"):
            return 200, {"issuer": ISSUER, "device_authorization_endpoint": ISSUER + "/device/auth",
                         "token_endpoint": ISSUER + "/token"}
        if url == ISSUER + "/device/auth":
            return 200, self.device
        assert url == ISSUER + "/token"
        return self.answers.pop(0)


class Clock:
    def __init__(self):
        self.t = 1000.0
        self.slept = []

    def now(self):
        return self.t

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.t += seconds


def login(issuer, clock, lines=None):
    return device_login(ISSUER, "gatekeep-cli", http=issuer, sleep=clock.sleep, now=clock.now,
                        tell=(lines if lines is not None else []).append)


def test_device_flow_polls_until_approved_and_honours_slow_down():
    """Pending answers are polled at the interval; slow_down adds 5 s; the tokens are returned with their expiry."""
    issuer = Issuer([(400, {"error": "authorization_pending"}), (400, {"error": "slow_down"}),
                     (200, {"access_token": "at", "refresh_token": "rt", "id_token": "it", "expires_in": 300,
                            "token_type": "Bearer"})])
    clock, lines = Clock(), []
    record = login(issuer, clock, lines)
    assert clock.slept == [2, 2, 7]
    assert lines[0] == f"To sign in, open {ISSUER}/device and enter the code ABCD-EFGH"
    assert record["access_token"] == "at" and record["refresh_token"] == "rt" and record["expires_at"] == 1000 + 11 + 300
    (_, _, form), = [c for c in issuer.calls if c[1].endswith("/device/auth")]
    assert form == {"client_id": "gatekeep-cli", "scope": "openid offline_access"}
    polls = [c[2] for c in issuer.calls if c[1].endswith("/token")]
    assert all(p == {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": "dc",
                     "client_id": "gatekeep-cli"} for p in polls)


@pytest.mark.parametrize("answer, message", [
    ((400, {"error": "access_denied"}), "denied"),
    ((400, {"error": "expired_token"}), "expired"),
    ((401, {"error": "invalid_client", "error_description": "no such client"}), "invalid_client: no such client"),
])
def test_device_flow_failures_are_explained(answer, message):
    """Denied, expired and other errors end the login with a readable message."""
    with pytest.raises(LoginError) as e:
        login(Issuer([answer]), Clock())
    assert message in str(e.value)


def test_the_code_expiring_while_pending_ends_the_login():
    """Polling stops at the code's expiry."""
    issuer = Issuer([(400, {"error": "authorization_pending"})] * 10,
                    device={"device_code": "dc", "user_code": "X", "verification_uri": ISSUER + "/d", "expires_in": 12,
                            "interval": 5})
    with pytest.raises(LoginError, match="expired"):
        login(issuer, Clock())


def test_an_http_issuer_off_loopback_is_refused():
    """The device flow, like the gateway, talks plain http to loopback issuers only."""
    with pytest.raises(LoginError, match="https"):
        device_login("http://login.example.test", "c", http=Issuer([]))


def test_token_file_is_private_and_refreshes_expired_tokens(tmp_path):
    """tokens.json is 0600 in a 0700 folder; an expired access token is refreshed and stored again."""
    tokens = TokenFile(tmp_path / "gatekeep" / "tokens.json")
    clock = Clock()
    tokens.save({"issuer": ISSUER, "client_id": "gatekeep-cli", "token_endpoint": ISSUER + "/token",
                 "access_token": "old", "refresh_token": "rt", "expires_at": clock.t + 100})
    assert stat.S_IMODE(os.stat(tokens.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tokens.path.parent).st_mode) == 0o700
    issuer = Issuer([(200, {"access_token": "new", "expires_in": 300})])
    assert current_token(tokens, http=issuer, now=clock.now) == "old"
    clock.t += 80  # within the margin of its expiry
    assert current_token(tokens, http=issuer, now=clock.now) == "new"
    assert issuer.calls[-1][2] == {"grant_type": "refresh_token", "refresh_token": "rt", "client_id": "gatekeep-cli"}
    stored = tokens.get()
    assert stored["access_token"] == "new" and stored["refresh_token"] == "rt"


def test_no_token_or_no_refresh_token_says_run_login(tmp_path):
    """Without a stored token, or with an expired one and no refresh token, the message says to log in."""
    tokens = TokenFile(tmp_path / "tokens.json")
    with pytest.raises(LoginError, match="gatekeep login"):
        current_token(tokens)
    tokens.save({"issuer": ISSUER, "client_id": "c", "token_endpoint": ISSUER + "/token", "access_token": "a",
                 "expires_at": 0})
    with pytest.raises(LoginError, match="no refresh token"):
        current_token(tokens)
