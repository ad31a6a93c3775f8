"""
Client encodings (and the other setting the server's lexer reads statements
by, ``standard_conforming_strings``): how gatekeep reads statement text as the
server will. Pure.

The server converts every statement from the session's ``client_encoding``
before it parses it, so gatekeep must read the bytes in that encoding too, or
the two can disagree about where a string literal ends. Every server encoding
is ASCII-safe: a byte below 0x80 is always that ASCII character. Some client
encodings are not: in SJIS, BIG5, GBK, UHC, GB18030, JOHAB and SHIFT_JIS_2004
the second byte of a character can be 0x5C, a backslash to any reader that
does not know the encoding. ``E'\\x95\\x5c'; DELETE ... --'`` in SJIS is one
character in a string, then a DELETE; read as UTF-8 it is one string holding
the DELETE. gatekeep does not relay sessions in those encodings (the
PostgreSQL documentation calls them client-only for the same reason).

In the ASCII-safe encodings, quotes, backslashes, semicolons and dollars are
where they seem; gatekeep decodes with the encoding's Python codec so that
non-ASCII names read as the server reads them. In UTF8 (the default) a
statement that is not valid UTF-8 is refused: the server would refuse it too,
unless the session had just switched to another encoding by a path gatekeep
could not see in time.
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred

#: client-only encodings whose multi-byte characters can contain ASCII bytes, by normalised name (PostgreSQL's
#: own names and aliases: letters and digits only, lower case)
UNSAFE = frozenset({
    "sjis", "shiftjis", "mskanji", "win932", "windows932", "shiftjis2004",
    "big5", "win950", "windows950",
    "gbk", "win936", "windows936", "cp936",
    "uhc", "win949", "windows949",
    "gb18030",
    "johab",
})

#: the ASCII-safe encodings and the Python codecs that read them, by normalised name; any other
#: (single-byte) encoding is read as latin-1, which keeps every byte as it is
CODECS = {
    "utf8": "utf-8", "unicode": "utf-8", "sqlascii": "latin-1", "latin1": "latin-1", "iso88591": "latin-1",
    "latin2": "iso8859-2", "iso88592": "iso8859-2", "latin9": "iso8859-15", "iso885915": "iso8859-15",
    "win1250": "cp1250", "win1251": "cp1251", "win1252": "cp1252", "win1253": "cp1253", "win1254": "cp1254",
    "win1255": "cp1255", "win1256": "cp1256", "win1257": "cp1257", "win1258": "cp1258", "win866": "cp866",
    "win874": "cp874", "koi8": "koi8_r", "koi8r": "koi8_r", "koi8u": "koi8_u",
    "eucjp": "euc_jp", "euckr": "euc_kr", "euccn": "gb2312", "eucjis2004": "euc_jis_2004",
    # read for masking only: sessions in these are not relayed
    "sjis": "shift_jis", "shiftjis": "shift_jis", "mskanji": "shift_jis", "win932": "cp932", "windows932": "cp932",
    "shiftjis2004": "shift_jis_2004", "big5": "big5", "win950": "cp950", "windows950": "cp950", "gbk": "gbk",
    "win936": "gbk", "windows936": "gbk", "cp936": "gbk", "uhc": "cp949", "win949": "cp949",
    "windows949": "cp949", "gb18030": "gb18030", "johab": "johab",
}

_NOT_ALNUM = re.compile(r"[^0-9a-z]")


def normalise(name: str) -> str:
    """An encoding name as PostgreSQL compares them: letters and digits, lower case (``Shift_JIS`` is ``shiftjis``)."""
    return _NOT_ALNUM.sub("", name.lower())


def is_unsafe(name: str) -> bool:
    """Whether a client encoding can hide ASCII bytes inside its characters."""
    return normalise(name) in UNSAFE


def codec_for(name: str | None) -> str:
    """The Python codec for a client encoding (UTF-8 when none is known)."""
    if not name:
        return "utf-8"
    return CODECS.get(normalise(name), "latin-1")


def refusal(name: str) -> str:
    """Why a session in ``name`` is not relayed."""
    return (f"client_encoding {name} is not supported: its characters can contain ASCII bytes (such as a "
            f"backslash), so gatekeep could not read statements as the server does; use UTF8")


#: the settings the server's parser reads a statement by, and the rule a change gatekeep refuses is denied by
SETTINGS = {"client_encoding": "client-encoding", "standard_conforming_strings": "standard-conforming-strings"}

#: how PostgreSQL spells "on" for a boolean setting (unique prefixes of on, true, yes, and 1)
_ON = frozenset({"on", "true", "tru", "tr", "t", "yes", "ye", "y", "1"})

SCS_REFUSED = ("standard_conforming_strings off is not supported: backslashes would then escape quotes in "
               "every string, which gatekeep's parser (PostgreSQL's own, with the default) does not read so")


def setting_refused(name: str, value: str | None) -> tuple[str, str] | None:
    """(rule, reason) when a statement sets ``name`` to ``value`` (None: not a constant) and gatekeep could no
    longer read statements as the server does; None when the change is fine."""
    if value is None:
        return SETTINGS[name], (f"{name} set to a value that is not a constant: gatekeep must know it to read "
                                "the statements that follow")
    if name == "client_encoding" and is_unsafe(value):
        return SETTINGS[name], refusal(value)
    if name == "standard_conforming_strings" and value.strip().lower() not in _ON:
        return SETTINGS[name], SCS_REFUSED
    return None


def reported_refused(name: str, value: str) -> str | None:
    """Why a session whose server reports ``name = value`` (ParameterStatus) cannot go on, or None."""
    refused = setting_refused(name, value) if name in SETTINGS else None
    return refused[1] if refused else None


class ReadingSettings:
    """
    What one session's statements are read by, as the server last reported it, and whether that may be
    changing. Sans-IO: the relay says when a group of messages goes out (``group_sent``), when a statement
    in it runs code (``runs_code``: a function call, DO or CALL may change client_encoding or
    standard_conforming_strings, and the server reports that only just before the group's ReadyForQuery),
    and when a ReadyForQuery comes (``answered``).
    """

    def __init__(self) -> None:
        #: the Python codec of the session's client_encoding
        self.codec = "utf-8"
        #: the group being sent runs code that may change the settings
        self.group_unsettling = False
        self._sent = 0
        self._done = 0
        self._settle_at = 0  # the group after whose answer the settings are known again
        self._waiting: list[Deferred] = []

    def runs_code(self) -> None:
        self.group_unsettling = True

    def group_sent(self) -> None:
        self._sent += 1
        if self.group_unsettling:
            self.group_unsettling = False
            self._settle_at = self._sent

    def answered(self) -> None:
        """A ReadyForQuery: what waits goes on once the groups that may have changed the settings are answered."""
        self._done += 1
        if self._waiting and self._done >= self._settle_at:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def in_doubt(self, raw: bytes) -> bool:
        """Whether a statement (``raw``) reads differently under other settings while they may be changing."""
        return (self.group_unsettling or self._settle_at > self._done) and (
            b"\\" in raw or (self.codec != "utf-8" and not raw.isascii()))

    def wait(self) -> Deferred:
        """Fires once the groups that may have changed the settings are answered."""
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def reported(self, name: str, value: str) -> str | None:
        """The server reports a setting: why the session cannot go on, or None (statements are read by it)."""
        why = reported_refused(name, value)
        if why is None and name == "client_encoding":
            self.codec = codec_for(value)
        return why
