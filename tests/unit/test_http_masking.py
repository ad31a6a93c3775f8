"""JSON and text masking for HTTP bodies: key names, globs, JSON paths, detectors, strategies."""

import json

import pytest

from gatekeep.masking.rules import MaskingRule
from gatekeep.protocols.http._jsonmask import JsonMasker, PathSyntaxError, Unmaskable, parse_path, path_matches


def rule(name="r", keys=(), detectors=(), strategy="redact", keep=4):
    return MaskingRule(name, None, None, None, keys=tuple(keys), detectors=tuple(detectors), strategy=strategy,
                       keep=keep)


DOC = {"user": {"email": "a@example.com", "password": "pw", "age": 42},
       "items": [{"token": "t1", "note": "card 4111 1111 1111 1111"}, {"token": "t2"}],
       "api_token": "x"}


def test_parse_path():
    """JSON paths parse into steps, with .. and [*] and quoted keys."""
    assert parse_path("$.a.b") == ("a", "b")
    assert parse_path("$.items[*].token") == ("items", "*", "token")
    assert parse_path("$..email") == (("..",), "email")
    assert parse_path("$['odd key'][0]") == ("odd key", 0)
    with pytest.raises(PathSyntaxError):
        parse_path("a.b")


def test_path_matches():
    """Paths match concrete positions; .. spans any depth."""
    assert path_matches(parse_path("$.items[*].token"), ("items", 3, "token"))
    assert not path_matches(parse_path("$.items[*].token"), ("items", 3, "x", "token"))
    assert path_matches(parse_path("$..token"), ("a", 0, "b", "token"))


def test_keys_globs_and_paths():
    """Key names, key globs and JSON paths mask what they name and nothing else."""
    m = JsonMasker((rule("k", keys=["password", "*_token", "$.items[*].token", "$..email"]),))
    counts = {}
    out = m.mask(DOC, counts)
    assert out["user"] == {"email": "****", "password": "****", "age": 42}
    assert [i["token"] for i in out["items"]] == ["****", "****"] and out["api_token"] == "****"
    assert counts == {"k": 5}
    assert DOC["user"]["password"] == "pw"  # the input is not changed


def test_detectors_in_strings_and_null_strategy():
    """Detectors mask spans inside strings; a matched key with the null strategy becomes null."""
    m = JsonMasker((rule("d", detectors=["credit_card"]), rule("n", keys=["age"], strategy="null")))
    counts = {}
    out = m.mask(DOC, counts)
    assert out["items"][0]["note"] == "card ****" and out["user"]["age"] is None
    assert counts == {"d/credit_card": 1, "n": 1}


def test_partial_and_containers():
    """A key naming an object masks every scalar inside it, keeping the shape."""
    m = JsonMasker((rule("p", keys=["user"], strategy="partial", keep=2),))
    out = m.mask(DOC, {})
    assert out["user"] == {"email": "****om", "password": "****", "age": "****"}


def test_mask_body_unchanged_and_not_json():
    """mask_body returns None when nothing changed, and raises ValueError for text that is not JSON."""
    m = JsonMasker((rule("k", keys=["nothing-here"]),))
    assert m.mask_body(json.dumps(DOC).encode(), {}) is None
    with pytest.raises(ValueError):
        m.mask_body(b"not json", {})


def test_a_body_masking_cannot_read_through_is_unmaskable_not_a_value_error():
    """Too deep to parse or to walk, or in a charset that is no text encoding: Unmaskable (callers fail closed),
    never the ValueError that lets a body that is not JSON be read as text."""
    m = JsonMasker((rule("k", keys=["password"]),))
    deep = b"[" * 5000 + b"]" * 5000
    for body, charset in ((deep, None), (deep, "latin-1"), (b'{"password":"x"}', "base64")):
        with pytest.raises(Unmaskable) as e:
            m.mask_body(body, {}, charset=charset)
        assert not isinstance(e.value, ValueError)
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(Unmaskable):
        m.mask({"password": "x", "n": nested}, {})


def test_text_masking():
    """Text bodies get the detectors."""
    m = JsonMasker((rule("d", detectors=["email"]),), text=True)
    assert m.mask_text("mail a@example.com now", {}) == "mail **** now"
