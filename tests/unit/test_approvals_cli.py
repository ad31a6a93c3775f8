"""`gatekeep approvals ...` against a canned admin API on loopback: tokens, output, errors."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gatekeep.cli import approvals_cmd
from gatekeep.cli.main import main

TOKEN = "gk_secret-token-of-the-approver"
REQUEST = {"id": "7k3m9x2q4d", "status": "pending", "identity": "agent-7", "groups": ["agents"], "target": "db",
           "protocol": "postgres", "client": "127.0.0.1:5000", "session_id": "s1", "seq": 3, "rule": "deletes",
           "kind": "query", "text": "DELETE FROM t\nWHERE id = 1", "parameters": [], "digest": "ab" * 32,
           "facts": {"kinds": ["delete"]}, "approvals_needed": 2, "approvals": 1, "approver_groups": ["dba"],
           "reason_required": False, "grant": "once", "window": None, "created_at": 0.0, "expires_at": 600.0,
           "decisions": [{"approver": "bob", "verdict": "approve", "reason": "ok", "at": 1.0, "groups": ["dba"]}],
           "resolved_at": None, "resolution": "", "grant_until": None}


@pytest.fixture
def api():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            seen.append(("GET", self.path, self.headers.get("authorization"), None))
            if self.path.startswith("/v1/approvals?"):
                self._answer(200, {"approvals": [REQUEST]})
            elif self.path == "/v1/approvals/7k3m9x2q4d":
                self._answer(200, {"approval": REQUEST})
            else:
                self._answer(404, {"error": "not-found", "message": "no approval request nope", "status": 404})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append(("POST", self.path, self.headers.get("authorization"), body))
            self._answer(403, {"error": "forbidden", "status": 403,
                               "message": "alice cannot approve request 7k3m9x2q4d: nobody approves their own request"})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_list_uses_the_env_token_and_never_prints_it(api, monkeypatch, capsys):
    """The token comes from GATEKEEP_TOKEN, is sent as a bearer token, and appears nowhere in the output."""
    url, seen = api
    monkeypatch.setenv("GATEKEEP_TOKEN", TOKEN)
    assert main(["approvals", "list", "--admin", url]) == 0
    out = capsys.readouterr()
    assert seen == [("GET", "/v1/approvals?limit=50&status=pending", "Bearer " + TOKEN, None)]
    assert "7k3m9x2q4d" in out.out and "1/2" in out.out and "DELETE FROM t WHERE id = 1" in out.out
    assert TOKEN not in out.out + out.err


def test_show_prints_what_is_held_and_the_decisions(api, monkeypatch, capsys):
    """show prints the held text line by line, the digest and each decision."""
    url, _ = api
    monkeypatch.setenv("GATEKEEP_ADMIN_URL", url)
    monkeypatch.setenv("GATEKEEP_TOKEN", TOKEN)
    assert main(["approvals", "show", "7k3m9x2q4d"]) == 0
    out = capsys.readouterr().out
    assert "           DELETE FROM t\n           WHERE id = 1\n" in out
    assert "sha256:" + "ab" * 32 in out and "approve    bob" in out and ": ok" in out


def test_refusal_is_reported_with_its_status_and_exit_1(api, tmp_path, capsys):
    """A 403 from the API prints its message and exits 1; the reason was sent in the body."""
    url, seen = api
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert main(["approvals", "approve", "7k3m9x2q4d", "--reason", "mine", "--admin", url,
                 "--token-file", str(token_file)]) == 1
    err = capsys.readouterr().err
    assert err == "gatekeep: 403 alice cannot approve request 7k3m9x2q4d: nobody approves their own request\n"
    assert seen[-1] == ("POST", "/v1/approvals/7k3m9x2q4d/approve", "Bearer " + TOKEN, {"reason": "mine"})


def test_no_token_and_unreachable_api(monkeypatch, capsys):
    """Without a token the CLI exits 2; an API nobody listens on is reported with exit 1."""
    monkeypatch.delenv("GATEKEEP_TOKEN", raising=False)
    assert main(["approvals", "list", "--admin", "http://127.0.0.1:9"]) == 2
    assert "no token" in capsys.readouterr().err
    assert main(["approvals", "list", "--admin", "http://127.0.0.1:9", "--token", TOKEN, "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the admin API at http://127.0.0.1:9" in err and TOKEN not in err


def test_deny_requires_a_reason(capsys):
    """deny without --reason is a usage error."""
    with pytest.raises(SystemExit) as e:
        main(["approvals", "deny", "7k3m9x2q4d"])
    assert e.value.code == 2 and "--reason" in capsys.readouterr().err


# -- what the agent wrote reaches the approver spelled out ----------------------------------------

#: the held statement drops a table; ESC sequences, a carriage return and a bidi override try to make it look harmless
HOSTILE = {"text": "DROP TABLE users; -- \x1b[2K\rSELECT 1 /*\x1b[1A\x1b[2K*/ \u202e",
           "identity": "agent-7\x1b[8m", "client": "127.0.0.1:5000\x9b2J",
           "decisions": [{"approver": "bob\u2066", "verdict": "approve", "reason": "ok\x1b]52;c;aGk=\x07",
                          "at": 1.0, "groups": ["dba"]}]}
UNSAFE = "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"


@pytest.fixture
def hostile(api, monkeypatch):
    for key, value in HOSTILE.items():
        monkeypatch.setitem(REQUEST, key, value)
    monkeypatch.setenv("GATEKEEP_ADMIN_URL", api[0])
    monkeypatch.setenv("GATEKEEP_TOKEN", TOKEN)
    return api


def test_list_spells_out_what_would_hide_the_held_statement(hostile, capsys):
    """In the list the held text's ESC sequences and carriage return are shown as escapes, so DROP TABLE shows."""
    assert main(["approvals", "list"]) == 0
    out = capsys.readouterr().out
    assert not re.search(UNSAFE, out), repr(out)
    assert "DROP TABLE users; -- \\x1b[2K\\rSELECT 1 /*\\x1b[1A\\x1b[2K*/ \\…" in out  # cut at 60
    assert "agent-7\\x1b[8m" in out


def test_show_spells_out_the_request_and_the_decisions(hostile, capsys):
    """show prints the held text, the identity, the client and each decision spelled out."""
    assert main(["approvals", "show", "7k3m9x2q4d"]) == 0
    out = capsys.readouterr().out
    assert not re.search(UNSAFE, out), repr(out)
    assert "           DROP TABLE users; -- \\x1b[2K\\rSELECT 1 /*\\x1b[1A\\x1b[2K*/ \\u202e\n" in out
    assert "identity   agent-7\\x1b[8m (groups: agents) from 127.0.0.1:5000\\x9b2J" in out
    assert "approve    bob\\u2066 at " in out and ": ok\\x1b]52;c;aGk=\\x07" in out


def test_json_carries_the_exact_text_with_no_raw_control(hostile, capsys):
    """--json keeps non-ASCII text readable but writes C0, C1 and bidi controls as JSON escapes."""
    assert main(["approvals", "show", "7k3m9x2q4d", "--json"]) == 0
    out = capsys.readouterr().out
    assert not re.search(UNSAFE, out), repr(out)
    assert json.loads(out)["text"] == HOSTILE["text"] and json.loads(out)["decisions"] == HOSTILE["decisions"]


def test_an_error_message_from_the_api_is_spelled_out(monkeypatch, capsys):
    """A refusal's message is the API's text (it may quote a name or a reason): printed with controls spelled out."""
    def refuse(*args, **kwargs):
        raise approvals_cmd.CliError("403 agent\x1b[2K\r cannot approve: ok\u202e")

    monkeypatch.setattr(approvals_cmd, "call", refuse)
    assert main(["approvals", "approve", "7k3m9x2q4d", "--token", TOKEN]) == 1
    assert capsys.readouterr().err == "gatekeep: 403 agent\\x1b[2K\\r cannot approve: ok\\u202e\n"
