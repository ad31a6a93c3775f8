"""
Detectors: find sensitive values inside text, with a check where the format has
one (Luhn for card numbers, ISO 13616 mod-97 for IBANs), so a random run of
digits is not mistaken for a card.

Each detector returns the spans it found; masking replaces exactly those spans.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

Span = tuple[int, int]


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    s = text.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def _card_ok(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _ssn_ok(text: str) -> bool:
    area, group, serial = text[0:3], text[4:6], text[7:11]
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


_PATTERNS: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None]] = {
    "email": (re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})+"), None),
    "credit_card": (re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"), _card_ok),
    "iban": (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"), _iban_ok),
    "us_ssn": (re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"), _ssn_ok),
    "phone": (re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?\(?\d{1,4}\)?(?:[ .-]?\d{2,4}){2,4}|\(\d{3}\) ?\d{3}-\d{4}|\d{3}-\d{3}-\d{4})(?![\w-])"), None),
    "jwt": (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}"), None),
    "aws_access_key": (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"), None),
    "private_key": (re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----.*?(?:-----END (?:[A-Z]+ )?PRIVATE KEY-----|\Z)", re.S), None),
}

NAMES = tuple(_PATTERNS)


def find(name: str, text: str) -> Iterator[Span]:
    pattern, check = _PATTERNS[name]
    for m in pattern.finditer(text):
        if check is None or check(m.group(0)):
            yield m.span()


def spans(names: tuple[str, ...], text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping spans found by any of ``names``, in order, with the detector's name."""
    found: list[tuple[int, int, str]] = []
    for name in names:
        for start, end in find(name, text):
            found.append((start, end, name))
    if len(found) < 2:
        return found
    found.sort(key=lambda f: (f[0], -f[1]))
    merged = [found[0]]
    for s, e, n in found[1:]:
        ps, pe, pn = merged[-1]
        if s < pe:
            if e > pe:
                merged[-1] = (ps, e, pn)
        else:
            merged.append((s, e, n))
    return merged


_ANCHORS = re.compile(r"[\d@]|-----BEGIN|eyJ|(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]")


def could_match(text: str) -> bool:
    """Cheap pre-check: every detector's match holds a digit, an @, or one of a few fixed prefixes."""
    return _ANCHORS.search(text) is not None
