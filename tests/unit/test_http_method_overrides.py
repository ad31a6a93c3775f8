"""The `_method` query override and the query read as PHP reads it (gatekeep/protocols/http/_request.py).

PHP (and so Symfony's Request::getMethod() and Laravel, which read `_method` from the query string when the body
has none) builds $_GET with php_register_variable_ex: the name is percent-decoded, leading spaces are dropped,
'.' and ' ' become '_', and of a repeated name the LAST value wins.
"""

import pytest

from gatekeep.model import Action

from .test_http_policy import NO_DELETES, NO_REAL_RUNS, _engine, _op, req


@pytest.mark.parametrize("target", [
    b"/v1/users/7?%5Fmethod=DELETE",   # percent-encoded
    b"/v1/users/7?.method=DELETE",     # PHP: $_GET['_method'] (the '.' becomes '_')
    b"/v1/users/7?+_method=DELETE",    # PHP: leading space dropped
])
def test_method_override_parameter_spelled_as_php_reads_it(target):
    r = req(b"POST " + target + b" HTTP/1.1")
    decision = _engine([NO_DELETES]).decide(_op(r))
    assert decision.action is Action.DENY, (decision, r.method_override)


def test_repeated_method_parameter_php_takes_the_last():
    """`?_method=GET&_method=DELETE`: PHP's $_GET keeps the last (DELETE), so Symfony/Laravel run a DELETE;
    other readers take the first. Two different overrides: unjudgeable, denied."""
    r = req(b"POST /v1/users/7?_method=GET&_method=DELETE HTTP/1.1")
    decision = _engine([NO_DELETES]).decide(_op(r))
    assert decision.action is Action.DENY, (decision, r.method_override)


def test_two_different_override_headers():
    """`X-HTTP-Method-Override: PATCH` and `X-HTTP-Method: DELETE` (OData/Microsoft stacks read the latter): two
    different overrides, unjudgeable, denied."""
    r = req(b"POST /v1/users/7 HTTP/1.1",
            b"Host: api\r\nX-HTTP-Method-Override: PATCH\r\nX-HTTP-Method: DELETE\r\n")
    decision = _engine([NO_DELETES]).decide(_op(r))
    assert decision.action is Action.DENY, (decision, r.method_override)


def test_query_name_with_leading_space_as_php_reads_it():
    """PHP drops leading spaces of a parameter name: `?+dry_run=false` is $_GET['dry_run'], and the deny rule on
    dry_run=false fits it."""
    r = req(b"POST /v1/jobs/9/run?+dry_run=false HTTP/1.1")
    decision = _engine([NO_REAL_RUNS]).decide(_op(r))
    assert decision.action is Action.DENY, decision
