"""
Masking of a text stream that arrives in chunks (SSH channels, recorded WebSocket and
``kubectl exec`` streams).

A value split across two chunks (``4111 1111`` then `` 1111 1111``) must be
masked like one that arrives whole. :class:`StreamMasker` therefore keeps back
the end of what it has seen that could still be the start of a sensitive value
(a trailing run without whitespace, plus a run of digits, capitals, spaces and
dashes before it, a private key block not yet ended) and masks it together
with what follows. :meth:`StreamMasker.flush` releases what is kept back (at
the end of the stream, or when an interactive stream has been quiet for a
moment).

Pure: text in, text out.
"""

from __future__ import annotations

import re

from gatekeep.masking import detectors
from gatekeep.masking.strategies import REDACTED, mask_spans

#: the longest value kept back: longer runs are masked as they stand
MAX_HOLD = 4096
#: a private key block is kept back until its END line, up to this size
MAX_KEY = 64 * 1024

_LEADING_TOKEN = re.compile(r"\S*")
_TAIL_SPACED = re.compile(r"(?:[0-9A-Z][ -]?){1,48}\Z")
_KEY_BEGIN = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
_KEY_END = re.compile(r"-----END (?:[A-Z]+ )?PRIVATE KEY-----")
_KEY_BLOCK = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----.*?-----END (?:[A-Z]+ )?PRIVATE KEY-----", re.S)
_PARTIAL_BEGIN = re.compile(r"-{1,5}(?:B(?:E(?:G(?:I(?:N(?: [A-Z ]*-{0,5})?)?)?)?)?)?\Z")


class StreamMasker:
    """Masks ``rules`` (detector masking rules) in a stream of text chunks; ``counts`` tallies what was masked."""

    def __init__(self, rules: tuple) -> None:
        self.rules = rules
        self.carry = ""
        self.counts: dict[str, int] = {}
        self.in_key = False
        self._names = tuple(dict.fromkeys(n for r in rules for n in r.detectors if n != "private_key"))

    def feed(self, text: str) -> str:
        """Masked text that is safe to release now (possibly empty)."""
        if not self.rules:
            return text
        buf = self.carry + text
        out = []
        if self.in_key:
            m = _KEY_END.search(buf)
            if m is None:
                self.carry = buf[-40:]
                return ""
            out.append(REDACTED)
            buf = buf[m.end():]
            self.in_key = False
        cut = self._cut(buf, self._names)
        head, self.carry = buf[:cut], buf[cut:]
        if len(self.carry) > MAX_KEY:
            # an unterminated key block: mask it and everything up to its END line
            out.append(self._mask(head))
            self.carry = ""
            self.in_key = True
            self.counts["private_key"] = self.counts.get("private_key", 0) + 1
            return "".join(out) + REDACTED
        out.append(self._mask(head))
        return "".join(out)

    def flush(self) -> str:
        """Release what is kept back, masked as it stands."""
        if self.in_key:
            self.carry = ""
            return ""
        rest, self.carry = self.carry, ""
        return self._mask(rest) if rest else ""

    def _mask(self, text: str) -> str:
        masked = mask_spans(self.rules, text, self.counts)
        return REDACTED if masked is None else masked

    @staticmethod
    def _cut(buf: str, names: tuple = ()) -> int:
        """Where the part that could still grow into a sensitive value begins."""
        cut = len(buf)
        begin = None
        for m in _KEY_BEGIN.finditer(buf):
            begin = m
        if begin is not None and _KEY_END.search(buf, begin.end()) is None:
            return begin.start()
        # only the end of the buffer can hold a partial value: look at no more than that (linear time)
        end = len(buf)
        partial = _PARTIAL_BEGIN.search(buf, max(0, end - 64))
        if partial is not None:
            cut = partial.start()
        tail = buf[max(0, cut - MAX_HOLD):cut][::-1]
        run = _LEADING_TOKEN.match(tail).end()
        if run:
            cut -= run
        m2 = _TAIL_SPACED.search(buf, max(0, end - 100))
        if m2 is not None and m2.start() < cut:
            cut = m2.start()
        # a complete key block is masked whole: never cut inside it
        for m in _KEY_BLOCK.finditer(buf):
            if m.start() < cut < m.end():
                cut = m.end()
        # never cut inside a value the detectors find whole
        base = max(0, cut - MAX_HOLD)
        window = buf[base:]
        if names and detectors.could_match(window):
            for start, end, _ in detectors.spans(names, window):
                if base + start < cut < base + end:
                    cut = base + start
        return cut
