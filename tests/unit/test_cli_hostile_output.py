"""
Recorded text that would drive the auditor's terminal (ESC sequences, carriage returns, 8-bit controls,
bidirectional overrides in statements, errors, names) is printed spelled out by ``gatekeep sessions`` and
``gatekeep audit``; a replayed terminal stream keeps its drawing and loses what makes a terminal answer.
"""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeep.safetext import json_text, printable, printable_lines
from gatekeep.cli.main import main
from gatekeep.model import (
    Action, ClientAddress, Decision, Identity, LoginFailure, Operation, Outcome, Session, SessionEnd, StreamEvent,
)
from gatekeep.store.sqlite import SQLiteStore

E = "\x1b"
#: moves up and erases twice: the two lines printed before it vanish
HIDE = f"{E}[1A{E}[2K{E}[1A{E}[2K"
STATEMENT = f"SELECT 1 /*{HIDE}*/"
#: the carriage return puts the cursor back at the start: "SELECT 1;" overwrites "DROP TABLE"
OVERWRITE = "DROP TABLE users; --\rSELECT 1;"
#: right-to-left override: the rest reads backwards
REVERSED = "SELECT 1 -- \u202e;sresu ELBAT PORD"
#: a statement whose second line pretends to be the next line of the transcript
FORGED = "SELECT 1;\n[+   9.000s] agent@db> SELECT 2"
CLIPBOARD = f"relation {E}]52;c;cm0gLXJmIH4K\x07x does not exist"
NAME = f"agent{E}[8m"  # conceal: what follows is invisible
CLAIMED = f"root{E}[2J\u2066"
REASON = "allowed \x9b2J by rule"  # an 8-bit CSI: erase the screen

#: what may not reach a terminal raw: C0 but tab and line feed, DEL, C1, bidi controls, lone surrogates
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _safe(text: str) -> str:
    assert not UNSAFE.search(text), repr(UNSAFE.search(text))
    return text


# -- the helper -------------------------------------------------------------------------------


def test_printable_spells_out_controls_and_keeps_the_rest():
    """C0 (but tab), DEL, C1, bidi controls and lone surrogates are spelled out; other text is kept."""
    assert printable("a\x1b[2Jb\r\n\t\x00\x7f\x9b\x85\u202e\u2066\u200f\ud800 é ✓ \\x1b") == \
        "a\\x1b[2Jb\\r\\n\t\\x00\\x7f\\x9b\\x85\\u202e\\u2066\\u200f\\ud800 é ✓ \\x1b"
    assert printable(["a\x1b"]) == "['a\\x1b']"
    assert printable_lines("one\r\ntwo\x1b[A\n") == ["one\\r", "two\\x1b[A"]
    assert printable_lines("") == printable_lines(None) == [""]


@given(st.text() | st.lists(st.sampled_from(
    ["\x1b", "\r", "\n", "\x9b", "\u202e", "\ud800", "a", "é", "\\"])).map("".join))
def test_nothing_unsafe_survives_and_json_keeps_the_value(text):
    """Whatever the text: printable() and printable_lines() hold nothing unsafe (lines no line feed), and
    json_text() is the same JSON value with nothing unsafe in it."""
    _safe(printable(text))
    assert "\n" not in printable(text)
    for line in printable_lines(text):
        assert "\n" not in _safe(line)
    assert json.loads(_safe(json_text({"k": text, text: [text]}))) == {"k": text, text: [text]}


@pytest.fixture
def url(tmp_path):
    """A store with one hostile session (statements, error, names), a failed login, and one with a terminal."""
    store = SQLiteStore(tmp_path / "gk.db")
    s = Session("s-hostile-1", Identity(NAME, frozenset({"agents"}), "token"), "db", "postgres",
                ClientAddress("10.0.0.7", 5000), False, 100.0, {})
    allowed = Decision(Action.ALLOW, "reads", REASON)
    events = [s]
    for seq, text in enumerate((STATEMENT, OVERWRITE, REVERSED, FORGED), 1):
        events.append((Operation(s, seq, "query", text, 100.0 + seq), allowed))
    events.append((Operation(s, 5, "query", "SELECT * FROM missing", 106.0), allowed))
    events.append(Outcome(s.id, 5, 106.5, 0.5, None, None, "42P01", CLIPBOARD))
    events.append(SessionEnd(s.id, 110.0, 10, 20, "client closed"))
    events.append(LoginFailure("db", "postgres", ClientAddress("10.0.0.9", 4000), CLAIMED, "unknown identity", 50.0))
    t = Session("t-terminal-1", Identity("alice", frozenset(), "ssh-key"), "box", "ssh",
                ClientAddress("10.0.0.8", 5001), False, 200.0, {})
    events.append(t)
    for i, data in enumerate(TERMINAL):
        events.append(StreamEvent(t.id, "channel-0", 200.0 + i / 10, "o", data))
    events.append(StreamEvent(t.id, "channel-0", 201.0, "i", "ls\r"))
    store.write(events)
    store.close()
    return f"sqlite://{tmp_path}/gk.db"


#: a shell session: colours, a clear, cursor movement, and queries and clipboard writes, some cut across events
TERMINAL = [
    f"{E}[H{E}[2J{E}[1;34m~/src{E}[0m $ ls\r\n",
    f"{E}[32mREADME{E}[0m  {E}[31mbuild.sh{E}[0m\r\n{E}[6n",
    f"{E}[",  # a device status query cut in two
    f"5n{E}[c{E}]52;c;cm0gLXJmIH4K\x07{E}P$q",
    f"m{E}\\{E}[21t{E}[3;1Hdone{E}[K",
    f"\x9b6n{E}]5",  # an 8-bit CPR query, and a clipboard write cut after its number's first digit
    "2;c;ZWNobyBoaQ==\x07 $ ",
]
FILTERED = (f"{E}[H{E}[2J{E}[1;34m~/src{E}[0m $ ls\r\n{E}[32mREADME{E}[0m  {E}[31mbuild.sh{E}[0m\r\n"
            f"{E}[3;1Hdone{E}[K $ ")


def test_sessions_show_spells_out_what_the_terminal_would_act_on(url, capsys):
    """Cursor movement and erasing, a carriage return, a bidi override, an OSC 52 in an error message, an 8-bit
    CSI in a reason and a conceal in the identity come out as visible escapes, the rest of the text as it is."""
    assert main(["sessions", "show", "s-hostile", "--store", url]) == 0
    out = _safe(capsys.readouterr().out)
    assert "      SELECT 1 /*\\x1b[1A\\x1b[2K\\x1b[1A\\x1b[2K*/\n" in out
    assert "      DROP TABLE users; --\\rSELECT 1;\n" in out
    assert "      SELECT 1 -- \\u202e;sresu ELBAT PORD\n" in out
    assert "      SELECT 1;\n      [+   9.000s] agent@db> SELECT 2\n" in out  # a multi-line statement, indented
    assert "ERROR 42P01 relation \\x1b]52;c;cm0gLXJmIH4K\\x07x does not exist" in out
    assert "rule: reads allowed \\x9b2J by rule" in out
    assert "identity  agent\\x1b[8m (groups: agents; by token)" in out


def test_sessions_list_and_failed_logins_spell_out_names(url, capsys):
    """An identity or a claimed user name with ESC sequences or bidi controls is listed spelled out."""
    assert main(["sessions", "list", "--store", url]) == 0
    out = _safe(capsys.readouterr().out)
    assert "agent\\x1b[8m" in out and "s-hostile-1" in out
    assert main(["sessions", "list", "--failed-logins", "--store", url]) == 0
    out = _safe(capsys.readouterr().out)
    assert "root\\x1b[2J\\u2066" in out and "unknown identity" in out


def test_the_replay_transcript_spells_out_and_indents(url, capsys):
    """The timed transcript shows each statement spelled out; a statement's second line is indented, so it
    cannot pass for a line of the transcript."""
    assert main(["sessions", "replay", "s-hostile", "--no-wait", "--store", url]) == 0
    out = _safe(capsys.readouterr().out)
    assert "agent\\x1b[8m@db> SELECT 1 /*\\x1b[1A\\x1b[2K\\x1b[1A\\x1b[2K*/\n" in out
    assert "agent\\x1b[8m@db> DROP TABLE users; --\\rSELECT 1;\n" in out
    assert "agent\\x1b[8m@db> SELECT 1 -- \\u202e;sresu ELBAT PORD\n" in out
    assert "agent\\x1b[8m@db> SELECT 1;\n             [+   9.000s] agent@db> SELECT 2\n" in out
    assert "             ERROR 42P01 relation \\x1b]52;c;cm0gLXJmIH4K\\x07x does not exist\n" in out
    assert not re.search(r"^\[\+   9\.000s\]", out, re.M)


def test_json_output_keeps_the_text_and_cannot_carry_raw_controls(url, capsys):
    """--json is unchanged: the exact recorded text, escaped by JSON (ASCII only)."""
    assert main(["sessions", "show", "s-hostile", "--json", "--store", url]) == 0
    out = capsys.readouterr().out
    assert out.isascii() and _safe(out)
    texts = [r["text"] for r in json.loads(out)["records"]]
    assert texts[:4] == [STATEMENT, OVERWRITE, REVERSED, FORGED]
    assert json.loads(out)["identity"] == NAME


def test_stream_replay_keeps_the_drawing_and_drops_answers_and_clipboard(url, capsys):
    """Replaying a terminal stream keeps SGR colours, clearing and cursor movement, and drops DSR, CPR, DA,
    window reports, DCS and OSC 52, also when one is cut across two recorded events or in 8-bit form."""
    assert main(["sessions", "replay", "t-terminal", "--no-wait", "--store", url]) == 0
    out = capsys.readouterr().out
    assert out == FILTERED
    for seq in (f"{E}[6n", f"{E}[5n", f"{E}[c", f"{E}]52", f"{E}P", f"{E}[21t", "\x9b"):
        assert seq not in out


def test_raw_replay_writes_the_stream_as_recorded(url, capsys):
    """--raw writes every output event exactly as recorded (and no input)."""
    assert main(["sessions", "replay", "t-terminal", "--no-wait", "--raw", "--store", url]) == 0
    assert capsys.readouterr().out == "".join(TERMINAL)


def test_audit_verify_spells_out_what_a_tampered_store_holds(url, tmp_path, capsys):
    """A row inserted into the sessions table is reported by its id, which the inserter chose: spelled out."""
    db = sqlite3.connect(tmp_path / "gk.db")
    db.execute("INSERT INTO sessions (id, node, identity, groups, auth_method, target, protocol, client, tls,"
               " attributes, started_at) VALUES (?, 'gatekeep', 'x', '[]', 'token', 'db', 'postgres', 'c', 0, '{}', 1)",
               (f"fake{E}[2K\rall good",))
    db.commit()
    db.close()
    assert main(["audit", "verify", "--store", url]) == 1
    out = _safe(capsys.readouterr().out)
    assert "session fake\\x1b[2K\\rall good: its row in sessions has no record in the ledger (inserted)" in out


def test_audit_export_escapes_8bit_and_bidi_controls_in_its_json(url, capsys):
    """The JSON lines carry the recorded text exactly, with no raw 8-bit or bidi control in them."""
    assert main(["audit", "export", "--store", url]) == 0
    out = _safe(capsys.readouterr().out)
    texts = [json.loads(line)["data"].get("text") for line in out.splitlines()]
    assert STATEMENT in texts and REVERSED in texts
    reasons = [json.loads(line)["data"].get("decision", {}).get("reason") for line in out.splitlines()]
    assert "\\u009b2J" in out and REASON in reasons


def test_an_exported_cast_drops_what_would_make_the_terminal_playing_it_answer(url, tmp_path):
    """``sessions export`` (asciicast) filters the output as replay does: played later with ``asciinema play``,
    the cast draws the same screen and answers nothing; ``--raw`` exports the stream as recorded."""
    cast = tmp_path / "s.cast"
    assert main(["sessions", "export", "t-terminal", "--store", url, "-o", str(cast)]) == 0
    header, *events = [json.loads(line) for line in cast.read_text().splitlines()]
    assert header["version"] == 2
    assert "".join(e[2] for e in events if e[1] == "o") == FILTERED
    times = [e[0] for e in events]
    assert times == sorted(times)
    assert main(["sessions", "export", "t-terminal", "--store", url, "-o", str(cast), "--raw"]) == 0
    _, *events = [json.loads(line) for line in cast.read_text().splitlines()]
    assert "".join(e[2] for e in events if e[1] == "o") == "".join(TERMINAL)


def test_login_prints_what_the_identity_provider_wrote_spelled_out(monkeypatch, capsys):
    """The device login's lines carry the identity provider's address, code and errors: spelled out."""
    from gatekeep.cli import login_cmd
    from gatekeep.identity.device import LoginError

    def fake_login(issuer, client_id, scope=None, resource=None, tell=None):
        tell(f"open https://idp.example/device and enter {E}]52;c;cm0gLXJmIH4K\x07CODE")
        raise LoginError(f"the identity provider said: {E}[2Jaccess_denied")

    monkeypatch.setattr(login_cmd, "device_login", fake_login)
    assert main(["login", "--issuer", "https://idp.example", "--client-id", "cli"]) == 1
    err = capsys.readouterr().err
    assert _safe(err) and "\\x1b]52;c;cm0gLXJmIH4K\\x07CODE" in err and "\\x1b[2Jaccess_denied" in err
