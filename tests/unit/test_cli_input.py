"""The gatekeep command on bad input: one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gatekeep.cli.main import main

TOKEN = "gk_secret-token-of-the-approver"


class Canned:
    """An HTTP server on loopback that answers every request with ``answer`` (status, headers, body)."""

    def __init__(self):
        self.answer = (200, {}, b"{}")
        self.seen = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self):
                canned.seen.append((self.command, self.path, self.headers.get("authorization")))
                status, headers, body = canned.answer
                if status is None:  # not HTTP at all
                    self.wfile.write(body)
                    return
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _reply

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def canned():
    c = Canned()
    yield c
    c.close()


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- gatekeep approvals ---------------------------------------------------------------------


@pytest.mark.parametrize("answer, expected", [
    ((200, {"content-type": "text/html"}, b"<html>hello</html>"), "answered with something that is not JSON"),
    ((200, {}, b"\xff\xfe\x00"), "answered with something that is not JSON"),
    ((200, {}, b"[1, 2]"), "answered with JSON that is not an object"),
    ((200, {}, b'{"hello": 1}'), "answered in a form this command does not know"),
    ((404, {}, b"[1]"), "404 Not Found"),
    ((None, {}, b"SSH-2.0-OpenSSH_9.6\r\n"), "does not answer HTTP"),
])
def test_approvals_on_answers_that_are_not_the_admin_api(canned, capsys, answer, expected):
    """Whatever the address answers, the command ends with one line naming the problem, and exit 1."""
    canned.answer = answer
    assert main(["approvals", "list", "--admin", canned.url, "--token", TOKEN, "--timeout", "5"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("gatekeep: ") and expected in line and TOKEN not in line


def test_approvals_does_not_follow_redirects_with_the_token(canned, capsys):
    """A redirect is reported, not followed: the bearer token would go wherever it points."""
    other = Canned()
    try:
        other.answer = (200, {}, b'{"approvals": []}')
        canned.answer = (302, {"location": other.url + "/v1/approvals"}, b"")
        assert main(["approvals", "list", "--admin", canned.url, "--token", TOKEN]) == 1
        line = _one_line(capsys.readouterr().err)
        assert "redirect" in line and other.url in line and TOKEN not in line
        assert other.seen == []
    finally:
        other.close()


@pytest.mark.parametrize("token", ["two\nlines", "tab\there", "euro\u20acsign", "nul\x00"])
def test_approvals_token_that_cannot_be_sent_is_a_usage_error_that_does_not_show_it(tmp_path, capsys, token):
    """A token file with a line break inside, or characters no header takes: exit 2, the token not printed."""
    path = tmp_path / "token"
    path.write_text(token + "\n", encoding="utf-8")
    assert main(["approvals", "list", "--admin", "http://127.0.0.1:9", "--token-file", str(path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(path) in line and "token" in line
    assert all(part not in line for part in token.split() if len(part) > 3)


@pytest.mark.parametrize("url", ["http://[::1", "http://", "https://"])
def test_approvals_admin_url_that_does_not_parse(capsys, url):
    """--admin that is no usable URL is a usage error (exit 2) naming it."""
    assert main(["approvals", "list", "--admin", url, "--token", TOKEN]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("gatekeep: --admin: ") and repr(url) in line


@pytest.mark.parametrize("cacert", ["/nonexistent/ca.pem", "/etc/hostname"])
def test_approvals_cacert_that_cannot_be_used(capsys, cacert):
    """--cacert missing or without a certificate: exit 2 naming the file."""
    assert main(["approvals", "list", "--admin", "https://127.0.0.1:9", "--token", TOKEN, "--cacert", cacert]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"gatekeep: --cacert {cacert}: ")


@pytest.mark.parametrize("argv, expected", [
    (["approvals", "list", "--timeout", "-1"], "--timeout"),
    (["approvals", "list", "--timeout", "nan"], "--timeout"),
    (["approvals", "list", "--limit", "0"], "--limit"),
    (["approvals", "show", "a/b"], "not a request id"),
    (["approvals", "approve", ""], "not a request id"),
])
def test_approvals_bad_arguments_are_usage_errors(capsys, argv, expected):
    """Arguments that cannot work are refused before anything is sent (exit 2, argparse's usage line)."""
    with pytest.raises(SystemExit) as e:
        main(argv + ["--admin", "http://127.0.0.1:9", "--token", TOKEN])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err


def test_approvals_ids_are_read_in_any_case(canned, capsys):
    """Request ids are lowercase base32: one typed in capitals reaches the API lowercased."""
    canned.answer = (404, {}, b'{"error": "not-found", "message": "no approval request 7k3m9x2q4d", "status": 404}')
    assert main(["approvals", "show", "7K3M9X2Q4D", "--admin", canned.url, "--token", TOKEN]) == 1
    assert canned.seen[-1][1] == "/v1/approvals/7k3m9x2q4d"
    assert _one_line(capsys.readouterr().err) == "gatekeep: 404 no approval request 7k3m9x2q4d"


# -- gatekeep sessions / audit / store: the store ----------------------------------------------


def _store(tmp_path):
    url = f"sqlite://{tmp_path}/gk.db"
    assert main(["store", "migrate", "--store", url]) == 0
    return url


@pytest.mark.parametrize("text, expected", [
    ("store: [\n", "is not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_store_commands_on_a_config_that_does_not_load(tmp_path, capsys, text, expected):
    """sessions list with a configuration that is not YAML, not a mapping, or too deep: one line, exit 2."""
    config = tmp_path / "gatekeep.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["sessions", "list", "--config", str(config)])
    assert e.value.code == 2
    assert expected in _one_line(capsys.readouterr().err)


def test_store_commands_on_a_config_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "gatekeep.yaml"
    config.write_bytes(b"store: \xff\n")
    with pytest.raises(SystemExit) as e:
        main(["sessions", "list", "--config", str(config)])
    assert e.value.code == 2
    assert "not UTF-8" in _one_line(capsys.readouterr().err)


def test_store_that_is_not_a_gatekeep_store(tmp_path, capsys):
    """A file that is no SQLite database, or a database without gatekeep's schema: one line, exit 2."""
    (tmp_path / "text.db").write_text("hello\n")
    db = sqlite3.connect(tmp_path / "other.db")
    db.execute("CREATE TABLE x (a)")
    db.commit()
    db.close()
    for name, expected in [("text.db", "cannot use the store"), ("other.db", "has no gatekeep records")]:
        url = f"sqlite://{tmp_path}/{name}"
        with pytest.raises(SystemExit) as e:
            main(["sessions", "list", "--store", url])
        assert e.value.code == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("gatekeep: ") and expected in line and url in line
    with pytest.raises(SystemExit) as e:
        main(["store", "migrate", "--store", f"sqlite://{tmp_path}/text.db"])
    assert e.value.code == 2
    assert "cannot use the store" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, expected", [
    (["sessions", "list", "--limit", "-5"], "--limit"),
    (["sessions", "list", "--limit", "0"], "--limit"),
    (["sessions", "show", ""], "a session id"),
])
def test_sessions_bad_arguments(tmp_path, capsys, argv, expected):
    """--limit below 1 (SQLite takes -5 as 'no limit') and an empty id (a prefix of every id) are refused."""
    url = _store(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv + ["--store", url])
    assert e.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["audit", "export", "--output", "/nonexistent/dir/out.jsonl"]])
def test_output_file_that_cannot_be_written(tmp_path, capsys, argv):
    url = _store(tmp_path)
    capsys.readouterr()
    assert main(argv + ["--store", url]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("gatekeep: cannot write /nonexistent/dir/out.jsonl: ")


def test_audit_verify_with_a_file_that_is_no_key(tmp_path, capsys):
    url = _store(tmp_path)
    capsys.readouterr()
    bad = tmp_path / "key.pem"
    bad.write_text("not a key\n")
    assert main(["audit", "verify", "--store", url, "--public-key", str(bad)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"gatekeep: {bad}: ") and "Ed25519" in line


# -- gatekeep config check, token new, kubeconfig ---------------------------------------------------


def test_config_check_on_a_file_that_is_not_utf8_or_too_deep(tmp_path, capsys):
    path = tmp_path / "gk.yaml"
    path.write_bytes(b"\xff\xfe")
    assert main(["config", "check", str(path)]) == 1
    assert "not UTF-8" in _one_line(capsys.readouterr().err)
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert main(["config", "check", str(path)]) == 1
    assert "nested too deeply" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["", "a b", "two\nlines", "_x", "x" * 64])
def test_token_new_refuses_names_the_configuration_refuses(capsys, name):
    """No token is made for a name the configuration would not take (the token is shown only once)."""
    assert main(["token", "new", name]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "gatekeep: not an identity name" in _one_line(out.err)


def test_token_new_strips_group_names(capsys):
    """--groups 'dba, ops' means the groups dba and ops, not ' ops'."""
    assert main(["token", "new", "alice", "--groups", "dba, ops,"]) == 0
    assert "groups: [dba, ops]" in capsys.readouterr().out


K8S = 'targets: [{name: k8s, protocol: kubernetes, listen: "tcp:6443"%s}]\nidentities: [{name: a}]\n'


@pytest.mark.parametrize("text, extra, expected", [
    ("- a\n", [], "expected a mapping"),
    ("targets: 5\n", [], "no target 'k8s'"),
    ('targets: [{name: k8s, protocol: kubernetes, listen: "tcp:6443"}]\nidentities: 5\n', [], "no identity 'a'"),
    (K8S % ", tls: {cert: 5}", [], "targets.k8s.tls.cert"),
    ("oidc: 5\n" + K8S % "", ["--exec"], "oidc"),
    (K8S % "", ["--ca", "/nonexistent/ca.pem"], "--ca /nonexistent/ca.pem"),
    (K8S % "", ["--ca", "CONFIG"], "no PEM certificate"),
    ("\xff", [], "not UTF-8"),
])
def test_kubeconfig_on_configs_and_files_it_cannot_use(tmp_path, capsys, text, extra, expected):
    path = tmp_path / "gk.yaml"
    path.write_bytes(text.encode("latin-1"))
    extra = [str(path) if x == "CONFIG" else x for x in extra]
    assert main(["kubeconfig", "k8s", "--identity", "a", "--config", str(path), *extra]) in (1, 2)
    out = capsys.readouterr()
    assert out.out == "" and expected in _one_line(out.err)
