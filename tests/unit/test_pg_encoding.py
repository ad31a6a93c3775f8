"""Client encodings: which gatekeep reads (and how), which it refuses."""

import pytest

from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres import _encoding


@pytest.mark.parametrize("name", ["SJIS", "Shift_JIS", "shift-jis", "Mskanji", "WIN932", "SHIFT_JIS_2004", "BIG5",
                                  "win950", "GBK", "CP936", "UHC", "windows949", "GB18030", "JOHAB"])
def test_encodings_whose_characters_can_hold_ascii_bytes_are_unsafe(name):
    assert _encoding.is_unsafe(name)


@pytest.mark.parametrize("name, codec", [("UTF8", "utf-8"), ("unicode", "utf-8"), ("LATIN1", "latin-1"),
                                         ("ISO_8859_1", "latin-1"), ("WIN1252", "cp1252"), ("EUC_JP", "euc_jp"),
                                         ("KOI8R", "koi8_r"), ("SQL_ASCII", "latin-1"), ("MULE_INTERNAL", "latin-1"),
                                         (None, "utf-8")])
def test_safe_encodings_and_their_codecs(name, codec):
    assert not _encoding.is_unsafe(name or "UTF8")
    assert _encoding.codec_for(name) == codec


def test_every_unsafe_multibyte_character_with_an_ascii_byte_is_invalid_utf8():
    """Why a UTF8 session is safe from these tricks: such bytes are never valid UTF-8, so they are refused."""
    for codec, text in (("shift_jis", "ソ"), ("big5", "ツ"), ("gbk", "乗")):
        raw = text.encode(codec)
        assert raw[1:] == b"\\", (codec, raw)  # one character to the server, a backslash to a UTF-8 reader
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")


def test_parse_reads_the_query_in_the_session_encoding_and_says_when_it_cannot():
    body = b"s1\0SELECT 'caf\xe9'\0\0\0"
    parse = pg.parse_parse(body, "latin-1")
    assert (parse.statement, parse.query, parse.unreadable) == ("s1", "SELECT 'café'", False)
    parse = pg.parse_parse(body)  # UTF8: 0xE9 then a quote is not UTF-8
    assert parse.unreadable and parse.query == "SELECT 'caf\ufffd'"
    assert not pg.parse_parse(b"s1\0SELECT 'caf\xc3\xa9'\0\0\0").unreadable


def test_reading_settings_know_when_a_statement_may_be_misread():
    """A group that runs code may change the settings: statements that depend on them are in doubt until the
    server has answered it; other statements never are."""
    s = _encoding.ReadingSettings()
    assert not s.in_doubt(b"SELECT '\\'")
    s.runs_code()  # SELECT f() in the group being sent
    assert s.in_doubt(b"SELECT 'a\\'") and not s.in_doubt(b"SELECT 1")
    s.group_sent()
    assert not s.group_unsettling and s.in_doubt(b"SELECT 'a\\'")
    fired = []
    s.wait().addCallback(fired.append)
    s.group_sent()  # a later group, nothing in it runs code
    s.answered()  # the answer to the group that ran code
    assert fired == [None] and not s.in_doubt(b"SELECT 'a\\'")
    s.answered()
    assert s.reported("client_encoding", "LATIN1") is None and s.codec == "latin-1"
    assert not s.in_doubt("café".encode("latin-1"))
    s.runs_code()
    assert s.in_doubt("café".encode("latin-1"))  # outside UTF8, non-ASCII bytes depend on the encoding
    assert "not supported" in s.reported("standard_conforming_strings", "off")
    assert "not supported" in s.reported("client_encoding", "SJIS") and s.codec == "latin-1"
