"""Tests for masking: detectors, strategies, and masked PostgreSQL DataRows / COPY rows.

The decoders at the top are written here, independently of gatekeep, from the
PostgreSQL wire formats: a masked value must decode as its column's type in the
format the client asked for (what psycopg, JDBC or libpq-based clients would do).
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatekeep.masking import detectors, strategies
from gatekeep.masking.rules import ColumnGlob, MaskingRule, MaskPlan
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres._masking import (DETECT_ALL, REFUSE, Catalog, detect_all, mask_copy_text_row,
                                                 mask_data_row, plan_columns)

TEXT, VARCHAR, BPCHAR, NAME, XML = 25, 1043, 1042, 19, 142
INT2, INT4, INT8 = 21, 23, 20
UUID, BYTEA, NUMERIC, JSON, JSONB, BOOL, FLOAT8 = 2950, 17, 1700, 114, 3802, 16, 701
TEXT_ARRAY = 1009
TABLE_OID = 16500

SAMPLES = {
    "email": "alice@example.com",
    "credit_card": "4111 1111 1111 1111",
    "iban": "GB82WEST12345698765432",
    "us_ssn": "123-45-6789",
    "phone": "+1 415 555 2671",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "aws_access_key": "AKIAIOSFODNN7EXAMPLE",
    "private_key": "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7\n-----END PRIVATE KEY-----",
}


def rule(name="r", *, columns=(), names=(), detectors_=(), strategy="redact", keep=4, key=b"k" * 32):
    return MaskingRule(name, None, None, None, tuple(ColumnGlob.parse(c) for c in columns), tuple(names), (),
                       tuple(detectors_), strategy, keep, key)


# -- decoders (independent of gatekeep) ---------------------------------------------------------------

_INT_SIZES = {INT2: 2, INT4: 4, INT8: 8}
_NUMERIC_TEXT = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$|^(NaN|-?Infinity)$")
_BYTEA_HEX = re.compile(r"^\\x([0-9a-fA-F]{2})*$")


def decode_numeric_binary(v: bytes) -> Decimal | str:
    ndigits, weight, sign, dscale = struct.unpack("!hhHh", v[:8])
    assert ndigits >= 0 and len(v) == 8 + 2 * ndigits, "numeric binary length does not match ndigits"
    assert sign in (0x0000, 0x4000, 0xC000, 0xD000, 0xF000), hex(sign)
    assert dscale >= 0
    digits = struct.unpack("!%dh" % ndigits, v[8:])
    assert all(0 <= d < 10000 for d in digits)
    if sign >= 0xC000:
        return {0xC000: "NaN", 0xD000: "Infinity", 0xF000: "-Infinity"}[sign]
    value = Decimal(0)
    for i, d in enumerate(digits):
        value += Decimal(d) * (Decimal(10000) ** (weight - i))
    return -value if sign == 0x4000 else value


def decode_text_array_binary(v: bytes) -> list:
    ndim, flags, elem = struct.unpack("!iii", v[:12])
    assert 0 <= ndim <= 6 and flags in (0, 1) and elem == TEXT
    pos, count = 12, 1
    for _ in range(ndim):
        size, _lb = struct.unpack("!ii", v[pos:pos + 8])
        assert size >= 0
        count *= size
        pos += 8
    if ndim == 0:
        count = 0
    out = []
    for _ in range(count):
        (n,) = struct.unpack("!i", v[pos:pos + 4])
        pos += 4
        if n == -1:
            out.append(None)
            continue
        assert n >= 0 and pos + n <= len(v)
        out.append(v[pos:pos + n].decode("utf-8"))
        pos += n
    assert pos == len(v), "trailing bytes in a binary array"
    return out


def decode_text_array_text(s: str) -> list:
    """A one-dimensional text[] literal as PostgreSQL prints it."""
    assert s.startswith("{") and s.endswith("}"), f"not an array literal: {s!r}"
    body, out, i = s[1:-1], [], 0
    if not body:
        return out
    while True:
        if body[i] == '"':
            i += 1
            item = []
            while body[i] != '"':
                if body[i] == "\\":
                    i += 1
                item.append(body[i])
                i += 1
            i += 1
            out.append("".join(item))
        else:
            j = i
            while j < len(body) and body[j] != ",":
                assert body[j] not in '"{}\\', f"bad unquoted element in {s!r}"
                j += 1
            word = body[i:j]
            out.append(None if word == "NULL" else word)
            i = j
        if i == len(body):
            return out
        assert body[i] == ",", f"expected , in {s!r}"
        i += 1


def decode(type_oid: int, binary: bool, v: bytes):
    """Decode a non-NULL value as a client would; raise if it is not a valid value of the type."""
    if type_oid in (TEXT, VARCHAR, BPCHAR, NAME, XML):
        return v.decode("utf-8")
    if type_oid in _INT_SIZES:
        size = _INT_SIZES[type_oid]
        if binary:
            assert len(v) == size, f"binary int{size} must be exactly {size} bytes, got {len(v)}"
            return int.from_bytes(v, "big", signed=True)
        s = v.decode("ascii")
        assert re.fullmatch(r"-?\d+", s), s
        n = int(s)
        assert -(1 << (8 * size - 1)) <= n < (1 << (8 * size - 1))
        return n
    if type_oid == UUID:
        if binary:
            assert len(v) == 16
            return uuid.UUID(bytes=v)
        s = v.decode("ascii")
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", s), s
        return uuid.UUID(s)
    if type_oid == BYTEA:
        if binary:
            return v
        s = v.decode("ascii")
        assert _BYTEA_HEX.match(s), s
        return bytes.fromhex(s[2:])
    if type_oid == NUMERIC:
        if binary:
            return decode_numeric_binary(v)
        s = v.decode("ascii")
        assert _NUMERIC_TEXT.match(s), s
        return Decimal(s)
    if type_oid == JSON:
        return json.loads(v.decode("utf-8"))
    if type_oid == JSONB:
        if binary:
            assert v[:1] == b"\x01", "binary jsonb starts with version 1"
            return json.loads(v[1:].decode("utf-8"))
        return json.loads(v.decode("utf-8"))
    if type_oid == BOOL:
        if binary:
            assert v in (b"\x00", b"\x01")
            return v == b"\x01"
        assert v in (b"t", b"f")
        return v == b"t"
    if type_oid == FLOAT8:
        if binary:
            assert len(v) == 8
            return struct.unpack("!d", v)[0]
        return float(v.decode("ascii"))
    if type_oid == TEXT_ARRAY:
        return decode_text_array_binary(v) if binary else decode_text_array_text(v.decode("utf-8"))
    raise AssertionError(f"no decoder for type {type_oid}")


def assert_valid_data_row(message: bytes, types: list[int], binary: list[bool]) -> tuple:
    """The whole DataRow message is well framed and every value decodes as its column's type."""
    assert message[:1] == b"D"
    assert int.from_bytes(message[1:5], "big") == len(message) - 1, "DataRow length field is wrong"
    values = pg.parse_data_row(message[5:])
    assert len(values) == len(types)
    for v, t, b in zip(values, types, binary):
        if v is not None:
            decode(t, b, v)
    return values


# -- encoders for generated values -------------------------------------------------------------------


def numeric_binary(d: Decimal) -> bytes:
    sign = 0x4000 if d < 0 else 0
    d = abs(d)
    text = format(d, "f")
    whole, _, frac = text.partition(".")
    dscale = len(frac)
    whole = whole.lstrip("0")
    whole = "0" * (-len(whole) % 4) + whole
    frac = frac + "0" * (-len(frac) % 4)
    groups = [int(whole[i:i + 4]) for i in range(0, len(whole), 4)] + [int(frac[i:i + 4]) for i in range(0, len(frac), 4)]
    weight = len(whole) // 4 - 1
    while groups and groups[0] == 0:
        groups.pop(0)
        weight -= 1
    while groups and groups[-1] == 0:
        groups.pop()
    if not groups:
        weight, sign = 0, 0
    return struct.pack("!hhHh", len(groups), weight, sign, dscale) + struct.pack("!%dh" % len(groups), *groups)


def text_array_literal(items: list) -> str:
    def one(x):
        if x is None:
            return "NULL"
        return '"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "{" + ",".join(one(x) for x in items) + "}"


def text_array_binary(items: list) -> bytes:
    out = struct.pack("!iiiii", 1, int(any(x is None for x in items)), TEXT, len(items), 1) if items else \
        struct.pack("!iii", 0, 0, TEXT)
    for x in items:
        if x is None:
            out += struct.pack("!i", -1)
        else:
            b = x.encode()
            out += struct.pack("!i", len(b)) + b
    return out


def test_own_encoders_round_trip_through_own_decoders():
    """The test's numeric and text[] encoders agree with its decoders (so the decoders can be trusted)."""
    for d in (Decimal("0"), Decimal("120.50"), Decimal("-0.0001"), Decimal("123456789.123456789"), Decimal("10000")):
        assert decode(NUMERIC, True, numeric_binary(d)) == d
    items = ["a", None, 'q"uote', "b\\s", ""]
    assert decode(TEXT_ARRAY, True, text_array_binary(items)) == items
    assert decode(TEXT_ARRAY, False, text_array_literal(items).encode()) == items
    with pytest.raises(AssertionError):
        decode(INT4, True, b"hmac:00")
    with pytest.raises(AssertionError):
        decode(TEXT_ARRAY, False, b"****")


# -- detectors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, positive, negative", [
    ("email", ["alice@example.com", "reply to a.b+tag@mail.example.co.uk please"],
     ["alice@localhost", "not an email @ all", "@example.com"]),
    ("credit_card", ["4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111", "5500005555555559",
                     "340000000000009"],
     ["4111111111111112", "1234567890123", "order 2024-01-15", "12345678901234567890123"]),
    ("iban", ["GB82WEST12345698765432", "GB82 WEST 1234 5698 7654 32", "DE89370400440532013000"],
     ["GB83WEST12345698765432", "XX00 not an iban"]),
    ("us_ssn", ["123-45-6789", "ssn: 555-12-3456."],
     ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000", "123456789", "1123-45-6789"]),
    ("phone", ["+1 415 555 2671", "(415) 555-2671", "415-555-2671", "+44 20 7946 0958"],
     ["2024-01-15", "call 5552671", "v1.2.3"]),
    ("jwt", [SAMPLES["jwt"]], ["eyJhbGc.eyJzd.short", "eyJ only"]),
    ("aws_access_key", ["AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A"],
     ["AKIA123", "BKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLEX"]),
    ("private_key", [SAMPLES["private_key"], "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA"],
     ["-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----", "-----BEGIN CERTIFICATE-----"]),
])
def test_detector_positive_and_negative(name, positive, negative):
    """Each detector finds its values (with checksums where the format has one) and ignores look-alikes."""
    for text in positive:
        assert list(detectors.find(name, text)), (name, text)
    for text in negative:
        assert not list(detectors.find(name, text)), (name, text)


def test_detector_spans_cover_exactly_the_value():
    """A detector's span is exactly the sensitive value inside surrounding text."""
    text = "card 4111 1111 1111 1111 on file"
    [(start, end)] = list(detectors.find("credit_card", text))
    assert text[start:end] == "4111 1111 1111 1111"


def test_spans_merge_overlaps_from_several_detectors():
    """spans() returns non-overlapping spans in order, each named by a detector."""
    text = "mail alice@example.com, card 4111111111111111, ssn 123-45-6789"
    found = detectors.spans(("email", "credit_card", "us_ssn"), text)
    assert [n for _, _, n in found] == ["email", "credit_card", "us_ssn"]
    assert all(found[i][1] <= found[i + 1][0] for i in range(len(found) - 1))


@pytest.mark.parametrize("name, value", [
    ("aws_access_key", "AKIAABCDEFGHIJKLMNOP"),  # valid format, no digit
    ("jwt", "eyJhbGciOiJhYWEifQ.eyJzdWIiOiJhYWEifQ.abcdefghijklmnopqrstuv"),  # no digit, dash or @
])
def test_values_without_digits_are_still_masked(name, value):
    """mask_spans masks every value its detectors find, including ones without a digit, @ or dash."""
    assert list(detectors.find(name, value))
    r = rule("secrets", detectors_=(name,))
    assert strategies.mask_spans((r,), f"key {value} here") == "key **** here"


# -- strategies ------------------------------------------------------------------------------------------


def test_strategy_redact_partial_hash_null():
    """redact gives ****, partial keeps the last characters, hash a keyed HMAC, null None."""
    assert strategies.mask_text(rule(strategy="redact"), "secret") == "****"
    assert strategies.mask_text(rule(strategy="partial", keep=4), "4111111111111111") == "****1111"
    assert strategies.mask_text(rule(strategy="partial", keep=4), "abcd") == "****"
    assert strategies.mask_text(rule(strategy="partial", keep=0), "abcdef") == "****"
    h = strategies.mask_text(rule(strategy="hash"), "alice@example.com")
    assert re.fullmatch(r"hmac:[0-9a-f]{24}", h)
    assert strategies.mask_text(rule(strategy="hash"), "alice@example.com") == h
    assert strategies.mask_text(rule(strategy="hash", key=b"other"), "alice@example.com") != h
    assert strategies.mask_text(rule(strategy="hash"), "bob@example.com") != h
    assert strategies.mask_text(rule(strategy="null"), "secret") is None


def test_mask_spans_replaces_only_the_found_spans_and_counts_them():
    """Detector masking replaces the spans, keeps the rest, and counts per rule/detector."""
    counts: dict = {}
    r = rule("pii", detectors_=("email", "credit_card"), strategy="partial", keep=4)
    out = strategies.mask_spans((r,), "to alice@example.com and bob@example.com, card 4111111111111111", counts)
    assert out == "to ****.com and ****.com, card ****1111"
    assert counts == {"pii/email": 2, "pii/credit_card": 1}


def test_mask_spans_returns_the_same_object_when_nothing_matches():
    """Unmatched text is returned as the very same object (the caller's no-change signal)."""
    text = "nothing to see 12345"
    assert strategies.mask_spans((rule(detectors_=("email", "credit_card")),), text) is text


def test_mask_spans_null_strategy_drops_the_whole_value():
    """With the null strategy a value containing a match becomes None, and is counted."""
    counts: dict = {}
    assert strategies.mask_spans((rule("n", detectors_=("us_ssn",), strategy="null"),), "ssn 123-45-6789", counts) is None
    assert counts == {"n/us_ssn": 1}


# -- DataRows: explicit cases -----------------------------------------------------------------------------


def fields(*types, binary=False, table=True):
    return [pg.Field(f"c{i}", TABLE_OID if table else 0, i + 1, t, -1, -1, 1 if binary else 0)
            for i, t in enumerate(types)]


def catalog_for(n):
    return {(TABLE_OID, i + 1): ("public", "t", f"c{i}") for i in range(n)}


def mask_one(type_oid, value, r, binary=False):
    """Mask a one-column row; return (new message or None, counts)."""
    plan = MaskPlan((r,))
    cols = plan_columns(plan, fields(type_oid, binary=binary), None, catalog_for(1))
    counts: dict = {}
    body = pg.data_row([value])[5:]
    return mask_data_row(cols, body, counts), counts


def only_value(message):
    return pg.parse_data_row(message[5:])[0]


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("type_oid", [TEXT, VARCHAR, BPCHAR, NAME])
def test_text_columns_take_every_strategy(type_oid, binary):
    """Text-like columns become ****, ****tail, hmac:... or NULL in text and binary format."""
    value = b"alice@example.com"
    out, counts = mask_one(type_oid, value, rule("e", columns=["public.t.c0"], strategy="redact"), binary)
    assert only_value(out) == b"****" and counts == {"e": 1}
    out, _ = mask_one(type_oid, value, rule("e", columns=["public.t.c0"], strategy="partial", keep=4), binary)
    assert only_value(out) == b"****.com"
    out, _ = mask_one(type_oid, value, rule("e", columns=["public.t.c0"], strategy="hash"), binary)
    assert re.fullmatch(rb"hmac:[0-9a-f]{24}", only_value(out))
    out, _ = mask_one(type_oid, value, rule("e", columns=["*.c0"], strategy="null"), binary)
    assert only_value(out) is None


@pytest.mark.parametrize("type_oid, text_value, binary_value", [
    (INT2, b"12", (12).to_bytes(2, "big")),
    (INT4, b"123456", (123456).to_bytes(4, "big")),
    (INT8, b"-9000000000", (-9000000000).to_bytes(8, "big", signed=True)),
    (UUID, b"6f1c1a6e-1b0e-4c53-9a1e-0c2f5b1f9d10", uuid.UUID("6f1c1a6e-1b0e-4c53-9a1e-0c2f5b1f9d10").bytes),
    (BYTEA, b"\\xdeadbeef", bytes.fromhex("deadbeef")),
])
@pytest.mark.parametrize("binary", [False, True])
def test_hash_keeps_the_type_of_integers_uuid_and_bytea(type_oid, text_value, binary_value, binary):
    """hash turns int2/4/8, uuid and bytea into a keyed hash of the same type (right size in binary)."""
    value = binary_value if binary else text_value
    r = rule("h", columns=["public.t.c0"], strategy="hash")
    out, counts = mask_one(type_oid, value, r, binary)
    masked = only_value(out)
    assert masked is not None and masked != value
    decode(type_oid, binary, masked)
    again, _ = mask_one(type_oid, value, r, binary)
    assert only_value(again) == masked, "the same value hashes the same way (joins still work)"
    assert counts == {"h": 1}


@pytest.mark.parametrize("type_oid, value", [
    (INT4, (7).to_bytes(4, "big")), (INT8, (7).to_bytes(8, "big")), (UUID, uuid.uuid4().bytes),
    (BYTEA, b"\x00\x01"), (NUMERIC, numeric_binary(Decimal("120.50"))), (BOOL, b"\x01"),
    (FLOAT8, struct.pack("!d", 1.5)),
])
@pytest.mark.parametrize("strategy", ["redact", "partial", "null"])
def test_non_text_values_that_cannot_keep_their_type_become_null(type_oid, value, strategy):
    """A redacted or partial number, uuid or bytea is NULL (never text in a binary integer's place)."""
    out, counts = mask_one(type_oid, value, rule("x", columns=["public.t.c0"], strategy=strategy), True)
    assert only_value(out) is None
    assert counts == {"x": 1}


def test_numeric_hash_text_is_a_number_and_binary_is_null():
    """hash of numeric is an integer literal in text format, NULL in binary format."""
    r = rule("n", columns=["public.t.c0"], strategy="hash")
    out, _ = mask_one(NUMERIC, b"120.50", r, False)
    decode(NUMERIC, False, only_value(out))
    out, _ = mask_one(NUMERIC, numeric_binary(Decimal("120.50")), r, True)
    assert only_value(out) is None


@pytest.mark.parametrize("type_oid, binary, value", [
    (JSON, False, b'{"email": "alice@example.com"}'),
    (JSON, True, b'{"email": "alice@example.com"}'),
    (JSONB, False, b'{"email": "alice@example.com"}'),
    (JSONB, True, b'\x01{"email": "alice@example.com"}'),
])
@pytest.mark.parametrize("strategy", ["redact", "partial", "hash"])
def test_json_columns_become_a_json_string(type_oid, binary, value, strategy):
    """A masked json/jsonb column is a JSON string (jsonb binary keeps its version byte)."""
    out, _ = mask_one(type_oid, value, rule("j", columns=["public.t.c0"], strategy=strategy), binary)
    decoded = decode(type_oid, binary, only_value(out))
    assert isinstance(decoded, str) and "alice@example.com" not in decoded


@pytest.mark.parametrize("type_oid, binary, value", [
    (JSON, False, b'{"card": "4111 1111 1111 1111", "n": 4111111111111111, "ok": [1, 2]}'),
    (JSONB, True, b'\x01{"card": "4111 1111 1111 1111", "n": 4111111111111111}'),
    (JSONB, False, b'[4111111111111111]'),
    (JSON, False, b'"4111111111111111"'),
])
@pytest.mark.parametrize("strategy", ["redact", "partial", "hash"])
def test_detectors_inside_json_keep_it_valid_json(type_oid, binary, value, strategy):
    """Detector hits inside JSON (in strings or bare numbers) leave valid JSON without the card number."""
    r = rule("cards", detectors_=("credit_card",), strategy=strategy)
    cols = plan_columns(MaskPlan((r,)), fields(type_oid, binary=binary), None, {})
    counts: dict = {}
    out = mask_data_row(cols, pg.data_row([value])[5:], counts)
    decoded = decode(type_oid, binary, only_value(out))
    assert "4111111111111111" not in json.dumps(decoded) and "4111 1111 1111 1111" not in json.dumps(decoded)
    assert counts.get("cards/credit_card", 0) >= 1


def test_rows_with_nothing_to_mask_are_untouched():
    """mask_data_row returns None (send the original bytes) when no value changes."""
    r = rule("cards", detectors_=("credit_card", "email"))
    cols = plan_columns(MaskPlan((r,)), fields(TEXT, INT4, JSON, table=False), None, {})
    body = pg.data_row([b"hello", (5).to_bytes(4, "big"), b'{"a": 1}'])[5:]
    counts: dict = {}
    assert mask_data_row(cols, body, counts) is None
    assert counts == {}
    nulls = pg.data_row([None, None, None])[5:]
    assert mask_data_row(cols, nulls, counts) is None


def test_plan_is_none_when_no_column_can_need_masking():
    """Without detectors, a result with no rule-matched column has no plan at all."""
    r = rule("ssn", columns=["public.users.ssn"])
    assert plan_columns(MaskPlan((r,)), fields(TEXT, INT4), None, catalog_for(2)) is None
    # detectors only look at text-like and json columns
    d = rule("d", detectors_=("email",))
    assert plan_columns(MaskPlan((d,)), fields(INT4, UUID, BYTEA, table=False), None, {}) is None


def test_only_matched_columns_change_and_others_are_byte_identical():
    """In a masked row, columns without a rule keep their exact bytes."""
    plan = MaskPlan((rule("e", columns=["public.t.c1"]),))
    cols = plan_columns(plan, fields(INT4, TEXT, TEXT, binary=True), None, catalog_for(3))
    values = [(1).to_bytes(4, "big"), b"alice@example.com", "naïve ünïcode".encode()]
    out = mask_data_row(cols, pg.data_row(values)[5:], {})
    got = pg.parse_data_row(out[5:])
    assert got == (values[0], b"****", values[2])


def test_name_rules_and_fallback_for_unknown_tables():
    """names match result column names; a column of a table missing from the catalog falls back to the column glob."""
    by_name = MaskPlan((rule("n", names=["secret_*"]),))
    cols = plan_columns(by_name, [pg.Field("secret_token", 0, 0, TEXT)], None, {})
    assert only_value(mask_data_row(cols, pg.data_row([b"abc"])[5:], {})) == b"****"
    fallback = MaskPlan((rule("e", columns=["*.email"]),))
    cols = plan_columns(fallback, [pg.Field("email", 99999, 2, TEXT)], None, {})
    assert only_value(mask_data_row(cols, pg.data_row([b"a@b.example"])[5:], {})) == b"****"


def test_bind_result_formats_override_the_row_description():
    """The formats a Bind asked for decide text or binary masking (one format for all, or one per column)."""
    plan = MaskPlan((rule("h", columns=["public.t.c0", "public.t.c1"], strategy="hash"),))
    flds = fields(INT4, INT8)  # described as text
    cols = plan_columns(plan, flds, [1], catalog_for(2))
    out = mask_data_row(cols, pg.data_row([(1).to_bytes(4, "big"), (2).to_bytes(8, "big")])[5:], {})
    assert_valid_data_row(out, [INT4, INT8], [True, True])
    cols = plan_columns(plan, flds, [0, 1], catalog_for(2))
    out = mask_data_row(cols, pg.data_row([b"1", (2).to_bytes(8, "big")])[5:], {})
    assert_valid_data_row(out, [INT4, INT8], [False, True])


@pytest.mark.parametrize("binary", [False, True])
def test_text_array_columns_stay_valid_arrays(binary):
    """A text[] column masked by a column rule or by detectors still decodes as a text[] array."""
    items = ["alice@example.com", "plain"]
    value = text_array_binary(items) if binary else text_array_literal(items).encode()
    for r in (rule("e", columns=["public.t.c0"]), rule("d", detectors_=("email",))):
        cols = plan_columns(MaskPlan((r,)), fields(TEXT_ARRAY, binary=binary), None, catalog_for(1))
        out = mask_data_row(cols, pg.data_row([value])[5:], {})
        if out is not None:
            assert_valid_data_row(out, [TEXT_ARRAY], [binary])


# -- DataRows: property ----------------------------------------------------------------------------

SCALAR_TYPES = [TEXT, VARCHAR, BPCHAR, NAME, INT2, INT4, INT8, UUID, BYTEA, NUMERIC, JSON, JSONB, BOOL, FLOAT8]

_plain_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
_samples = st.sampled_from(list(SAMPLES.values()))
_sensitive_text = st.lists(st.one_of(_plain_text, _samples, _samples), max_size=4).map(
    lambda parts: " | ".join(parts))
_json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), _sensitive_text,
              st.floats(allow_nan=False, allow_infinity=False)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_sensitive_text, inner, max_size=3)),
    max_leaves=6)
_decimals = st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-10**12, max_value=10**12)


def value_strategy(type_oid: int, binary: bool):
    """Valid values of a type in a format, as the server would send them."""
    if type_oid in (TEXT, VARCHAR, BPCHAR, NAME):
        return _sensitive_text.map(str.encode)
    if type_oid in _INT_SIZES:
        size = _INT_SIZES[type_oid]
        ints = st.integers(-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1)
        return ints.map(lambda n: n.to_bytes(size, "big", signed=True) if binary else str(n).encode())
    if type_oid == UUID:
        return st.uuids().map(lambda u: u.bytes if binary else str(u).encode())
    if type_oid == BYTEA:
        return st.binary(max_size=20).map(lambda b: b if binary else b"\\x" + b.hex().encode())
    if type_oid == NUMERIC:
        return _decimals.map(lambda d: numeric_binary(d) if binary else format(d, "f").encode())
    if type_oid == JSON:
        return _json_value.map(lambda v: json.dumps(v).encode())
    if type_oid == JSONB:
        return _json_value.map(lambda v: (b"\x01" if binary else b"") + json.dumps(v).encode())
    if type_oid == BOOL:
        return st.booleans().map(lambda v: (b"\x01" if v else b"\x00") if binary else (b"t" if v else b"f"))
    if type_oid == FLOAT8:
        return st.floats(allow_nan=False, allow_infinity=False).map(
            lambda f: struct.pack("!d", f) if binary else repr(f).encode())
    if type_oid == TEXT_ARRAY:
        items = st.lists(st.one_of(st.none(), _sensitive_text), max_size=3)
        return items.map(lambda xs: text_array_binary(xs) if binary else text_array_literal(xs).encode())
    raise AssertionError(type_oid)


@st.composite
def masked_rows(draw, types=SCALAR_TYPES + [TEXT, JSON, JSONB]):
    n = draw(st.integers(1, 6))
    col_types = [draw(st.sampled_from(types)) for _ in range(n)]
    col_binary = [draw(st.booleans()) for _ in range(n)]
    values = [draw(st.one_of(st.none(), value_strategy(t, b))) for t, b in zip(col_types, col_binary)]
    rules = []
    by_name = draw(st.booleans())
    for i in range(n):
        strategy = draw(st.sampled_from([None, None, None, "redact", "partial", "hash", "null"]))
        if strategy is None:
            continue
        keep = draw(st.integers(0, 8))
        if by_name:
            rules.append(rule(f"col{i}", names=[f"c{i}"], strategy=strategy, keep=keep))
        else:
            rules.append(rule(f"col{i}", columns=[f"public.t.c{i}"], strategy=strategy, keep=keep))
    found = draw(st.lists(st.sampled_from(detectors.NAMES), unique=True, max_size=len(detectors.NAMES)))
    if found:
        rules.append(rule("det", detectors_=tuple(found), strategy=draw(
            st.sampled_from(["redact", "partial", "hash", "null"])), keep=draw(st.integers(0, 6))))
    # formats: from the RowDescription, or from a Bind (one for all / one per column)
    how = draw(st.sampled_from(["description", "bind-each", "bind-one"]))
    if how == "bind-one":
        col_binary = [col_binary[0]] * n
        formats = [1 if col_binary[0] else 0]
    elif how == "bind-each":
        formats = [1 if b else 0 for b in col_binary]
    else:
        formats = None
    if how == "bind-one":
        values = [draw(st.one_of(st.none(), value_strategy(t, col_binary[0]))) for t in col_types]
    flds = [pg.Field(f"c{i}", 0 if by_name else TABLE_OID, 0 if by_name else i + 1, t, -1, -1,
                     (1 if b else 0) if formats is None else 0)
            for i, (t, b) in enumerate(zip(col_types, col_binary))]
    return col_types, col_binary, values, rules, flds, formats


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masked_rows())
def test_masked_data_rows_always_decode(case):
    """Any row shape, format, values and rules: the masked DataRow re-parses and every value decodes as its type."""
    types, binary, values, rules, flds, formats = case
    plan = MaskPlan(tuple(rules))
    cols = plan_columns(plan, flds, formats, {} if flds[0].table_oid == 0 else catalog_for(len(flds)))
    message = pg.data_row(values)
    counts: dict = {}
    out = mask_data_row(cols, message[5:], counts) if cols is not None else None
    if out is None:
        out = message
    masked = assert_valid_data_row(out, types, binary)
    ruled = {int(r.name[3:]): r for r in rules if r.name.startswith("col")}
    for i, (old, new) in enumerate(zip(values, masked)):
        if i in ruled:
            if old is not None and new is not None and types[i] in (TEXT, VARCHAR, BPCHAR, NAME):
                assert new != old or old.startswith(b"****"), (i, old, new)
        elif new != old:
            # only detectors may change a column without a column rule, and only text-like/json ones
            assert types[i] in (TEXT, VARCHAR, BPCHAR, NAME, JSON, JSONB), (types[i], old, new)
    for i, r in ruled.items():
        assert counts.get(r.name, 0) == (0 if values[i] is None else 1), (r.name, counts)


@settings(max_examples=300, deadline=None)
@given(_json_value, st.sampled_from([JSON, JSONB]), st.booleans(),
       st.sampled_from(["redact", "partial", "hash", "null"]), st.integers(0, 6))
def test_detector_masked_json_always_decodes(value, type_oid, binary, strategy, keep):
    """JSON/JSONB values with secrets anywhere (keys, strings, numbers) stay valid JSON after detector masking."""
    r = rule("all", detectors_=detectors.NAMES, strategy=strategy, keep=keep)
    raw = json.dumps(value).encode()
    if type_oid == JSONB and binary:
        raw = b"\x01" + raw
    cols = plan_columns(MaskPlan((r,)), fields(type_oid, binary=binary, table=False), None, {})
    out = mask_data_row(cols, pg.data_row([raw])[5:], {}) or pg.data_row([raw])
    assert_valid_data_row(out, [type_oid], [binary])


@settings(max_examples=200, deadline=None)
@given(st.lists(_sensitive_text.map(str.encode), min_size=1, max_size=5),
       st.sampled_from(["redact", "hash", "null"]))
def test_detected_values_never_survive_in_text_columns(values, strategy):
    """With every detector on and a non-partial strategy, no sample secret remains in any text value."""
    r = rule("all", detectors_=detectors.NAMES, strategy=strategy)
    flds = fields(*([TEXT] * len(values)), table=False)
    cols = plan_columns(MaskPlan((r,)), flds, None, {})
    out = mask_data_row(cols, pg.data_row(values)[5:], {}) or pg.data_row(values)
    for v in pg.parse_data_row(out[5:]):
        if v is not None:
            for secret in SAMPLES.values():
                assert secret.encode() not in v


@settings(max_examples=200, deadline=None)
@given(masked_rows(types=[TEXT, TEXT_ARRAY]))
def test_masked_rows_with_text_arrays_always_decode(case):
    """Rows with text[] columns (which gatekeep treats as text-like) still decode after masking."""
    types, binary, values, rules, flds, formats = case
    plan = MaskPlan(tuple(rules))
    cols = plan_columns(plan, flds, formats, {} if flds[0].table_oid == 0 else catalog_for(len(flds)))
    message = pg.data_row(values)
    out = (mask_data_row(cols, message[5:], {}) if cols is not None else None) or message
    assert_valid_data_row(out, types, binary)


# -- COPY text rows --------------------------------------------------------------------------------

_COPY_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\b": "\\b", "\f": "\\f", "\v": "\\v"}
_VALID_COPY_FIELD = re.compile(r"^(?:\\N|(?:[^\\\t\n\r]|\\[bfnrtv\\])*)$", re.S)


def copy_escape(value: str | None) -> str:
    """PostgreSQL's COPY TO text-format escaping."""
    if value is None:
        return "\\N"
    return "".join(_COPY_ESCAPES.get(c, c) for c in value)


def copy_unescape(field: str) -> str | None:
    if field == "\\N":
        return None
    rev = {v[1]: k for k, v in _COPY_ESCAPES.items()}
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\":
            out.append(rev[field[i + 1]])
            i += 2
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def copy_catalog(columns):
    cat = Catalog()
    for i, (name, type_oid) in enumerate(columns):
        cat.add_row([str(TABLE_OID).encode(), str(i + 1).encode(), b"public", b"users", name.encode(),
                     str(type_oid).encode()])
    return cat


USERS = [("id", INT4), ("name", TEXT), ("email", TEXT), ("ssn", TEXT), ("notes", TEXT)]


def test_copy_row_masks_columns_and_detectors_and_keeps_the_rest():
    """A COPY users row gets email/ssn masked by column, detector hits masked, other fields byte-identical."""
    plan = MaskPlan((rule("email", columns=["*.email"], strategy="partial"),
                     rule("ssn", columns=["public.users.ssn"], strategy="hash"),
                     rule("cards", detectors_=("credit_card",))))
    cols = copy_catalog(USERS).copy_columns(plan, ["public"], (None, "users"), None)
    assert isinstance(cols, list)
    row = "1\tal\\tice\talice@example.com\t123-45-6789\tpaid with 4111111111111111\n"
    counts: dict = {}
    out = mask_copy_text_row(cols, row.encode(), counts)
    assert out[:1] == b"d"
    fields_ = out[5:].decode().rstrip("\n").split("\t")
    assert fields_[0] == "1" and fields_[1] == "al\\tice"
    assert fields_[2] == "****.com"
    assert re.fullmatch(r"hmac:[0-9a-f]{24}", fields_[3])
    assert fields_[4] == "paid with ****"
    assert counts == {"email": 1, "ssn": 1, "cards/credit_card": 1}


def test_copy_row_with_its_own_delimiter_and_null_string():
    """DELIMITER ',' splits at commas but not at an escaped one; a masked value holding the delimiter is escaped;
    the NULL string stays NULL."""
    from gatekeep.protocols.postgres._masking import CopyLayout, copy_target

    plan = MaskPlan((rule("email", columns=["*.email"]), rule("cards", detectors_=("credit_card",))))
    cols = copy_catalog(USERS).copy_columns(plan, ["public"], (None, "users"), ["name", "email", "notes"])
    layout = CopyLayout(delimiter=",", null="nil")
    out = mask_copy_text_row(cols, b"smith\\, al,al@example.com,card 4111111111111111\n", {}, layout=layout)
    assert out[5:] == b"smith\\, al,****,card ****\n"
    assert mask_copy_text_row(cols, b"al,nil,nil\n", {}, layout=layout) is None
    target = copy_target("COPY users (email) TO STDOUT WITH (DELIMITER ';', NULL 'nil', HEADER)")
    assert target["layout"] == CopyLayout(";", "nil", True) and target["other_options"] == []
    assert copy_target("COPY users TO STDOUT WITH (ENCODING 'LATIN1')")["other_options"] == ["encoding"]


def test_copy_row_with_nothing_to_mask_is_untouched():
    """A COPY row with no rule-matched column and no detector hit returns None (sent as is)."""
    plan = MaskPlan((rule("cards", detectors_=("credit_card",)),))
    cols = copy_catalog(USERS).copy_columns(plan, ["public"], ("public", "users"), ["name", "notes"])
    assert mask_copy_text_row(cols, b"alice\tnothing here\n", {}) is None


def test_copy_columns_list_follows_the_named_order():
    """COPY users (ssn, id) masks the first field (ssn), not the table's first column."""
    plan = MaskPlan((rule("ssn", columns=["public.users.ssn"]),))
    cols = copy_catalog(USERS).copy_columns(plan, ["public"], (None, "users"), ["ssn", "id"])
    out = mask_copy_text_row(cols, b"123-45-6789\t1\n", {})
    assert out[5:] == b"****\t1\n"


def test_copy_of_a_table_missing_from_the_catalog_is_refused():
    """COPY of a table gatekeep's catalog does not know (created after the session began) is refused while column rules apply."""
    plan = MaskPlan((rule("email", columns=["*.email"]), rule("cards", detectors_=("credit_card",))))
    assert copy_catalog(USERS).copy_columns(plan, ["public"], (None, "leak"), None) == REFUSE


def test_copy_of_a_known_table_without_masked_columns_runs_the_detectors_on_every_field():
    """COPY of a table the catalog lists but whose columns no rule names gets the detectors on every field."""
    plan = MaskPlan((rule("email", columns=["*.email"]), rule("cards", detectors_=("credit_card",))))
    cat = copy_catalog(USERS)
    cat.add_row([b"99", b"0", b"billing", b"invoices", b"", b"5000"])
    assert cat.copy_columns(plan, ["public"], ("billing", "invoices"), None) == DETECT_ALL
    cols = detect_all(plan, 2)
    out = mask_copy_text_row(cols, b"1\tpaid with 4111111111111111\n", {})
    assert out is not None and b"4111111111111111" not in out


_copy_text = st.one_of(st.none(), st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                                          max_size=20),
                       st.sampled_from(list(SAMPLES.values())),
                       st.sampled_from(["\\N", "\\", "a\tb", "x\ny", "\r", "\\.", "****"]))


@settings(max_examples=400, deadline=None)
@given(st.lists(_copy_text, min_size=len(USERS), max_size=len(USERS)),
       st.sampled_from(["redact", "partial", "hash", "null"]),
       st.sampled_from(["redact", "partial", "hash", "null"]),
       st.lists(st.sampled_from(detectors.NAMES), unique=True, max_size=3),
       st.booleans())
def test_masked_copy_rows_keep_fields_and_valid_escapes(values, col_strategy, det_strategy, found, newline):
    """A masked COPY text row keeps its field count, valid escapes and UTF-8, and unmasked fields byte-identical."""
    values[0] = None if values[0] is None else "7"
    rules_ = [rule("email", columns=["*.email"], strategy=col_strategy),
              rule("ssn", columns=["public.users.ssn"], strategy="hash")]
    if found:
        rules_.append(rule("det", detectors_=tuple(found), strategy=det_strategy))
    cols = copy_catalog(USERS).copy_columns(MaskPlan(tuple(rules_)), ["public"], (None, "users"), None)
    original = [copy_escape(v) for v in values]
    line = "\t".join(original) + ("\n" if newline else "")
    out = mask_copy_text_row(cols, line.encode(), {})
    data = line.encode() if out is None else out[5:]
    if out is not None:
        assert out[:1] == b"d" and int.from_bytes(out[1:5], "big") == len(out) - 1
    text = data.decode("utf-8")
    assert text.endswith("\n") == newline
    got = (text[:-1] if newline else text).split("\t")
    assert len(got) == len(USERS)
    for i, f in enumerate(got):
        assert _VALID_COPY_FIELD.match(f), f
        copy_unescape(f)
        if i in (0, 1) and not found:
            assert f == original[i]
