"""What an HTTP request asks for, and the rules that match it."""

from pathlib import Path

import pytest

from gatekeep.config import ConfigError, Node
from gatekeep.model import Action
from gatekeep.policy.engine import read_rule
from gatekeep.plugin import protocol_plugins
from gatekeep.protocols.http._codec import REQUEST, ProtocolError, parse_head
from gatekeep.protocols.http._request import normalise_path, parse_request
from gatekeep.protocols.http.policy import facts_for, read_match


def req(line, headers=b"Host: Api.Example.com:8443\r\n"):
    return parse_request(parse_head(line + b"\r\n" + headers + b"\r\n", REQUEST))


def match(**keys):
    return read_match(Node(keys, "match", Path(".")))


def test_request_parts():
    """Method, normalised path, query and host (lower case, no port) are read from the head."""
    r = req(b"GET /v1//users/%41?limit=5 HTTP/1.1")
    assert (r.method, r.path, r.query, r.host) == ("GET", "/v1/users/A", "limit=5", "api.example.com")
    assert r.unjudgeable is None


def test_absolute_form_is_read_in_origin_form_and_must_agree_with_host():
    """An absolute-form target is judged and forwarded as its path and query; one whose authority is not the
    Host field's is refused (400), so the host judged is the host the upstream routes by."""
    r = req(b"GET HTTP://Api.example.com:8443/x?y=1 HTTP/1.1")
    assert (r.target, r.path, r.query, r.host) == ("/x?y=1", "/x", "y=1", "api.example.com")
    assert req(b"GET http://api.example.com:8443 HTTP/1.1").target == "/"
    with pytest.raises(ProtocolError, match="authority"):
        req(b"GET http://other.example/x?y=1 HTTP/1.1")
    with pytest.raises(ProtocolError, match="authority"):
        req(b"GET http://www.example/ HTTP/1.1", headers=b"Host: admin.example\r\n")


@pytest.mark.parametrize("headers", [b"Host: www.example\r\nHost: admin.example\r\n", b"Host: www.example, admin.example\r\n",
                                     b"Host: a b\r\n", b"Host: user@admin.example\r\n"])
def test_one_host_only(headers):
    """Two Host fields, or a Host value that is not one host (a list, a space, userinfo), are refused with 400:
    a rule on hosts would judge one and the upstream route by another."""
    with pytest.raises(ProtocolError) as e:
        req(b"GET / HTTP/1.1", headers=headers)
    assert e.value.status == 400


def test_a_fragment_in_the_target_is_refused():
    """``GET /public#/../admin`` is refused: the judged path would end at the #, some servers' would not."""
    with pytest.raises(ProtocolError, match="fragment"):
        req(b"GET /public#/../admin/users HTTP/1.1")


@pytest.mark.parametrize("raw", ["/a/../admin", "/a/%2e%2e/admin", "/a%2fb", "/a/./b", "/a%5cb", "/admin;x=1/secret",
                                 "/admin%3b/secret"])
def test_tricky_paths_are_unjudgeable(raw):
    """Dot segments and encoded separators make a request unjudgeable."""
    assert normalise_path(raw)[1] is not None


def test_http11_needs_host():
    """An HTTP/1.1 request without Host is refused."""
    with pytest.raises(ProtocolError):
        req(b"GET / HTTP/1.1", headers=b"")


def test_match_keys():
    """methods, hosts, paths and query globs must all fit."""
    m = match(methods=["post", "PUT"], paths=["/v1/users/*"], hosts=["api.*"], query={"dry_run": "false"})
    assert m.matches(facts_for(req(b"POST /v1/users/7?dry_run=false HTTP/1.1")), None)
    assert not m.matches(facts_for(req(b"GET /v1/users/7?dry_run=false HTTP/1.1")), None)
    assert not m.matches(facts_for(req(b"POST /v1/users/7?dry_run=true HTTP/1.1")), None)
    assert not m.matches(facts_for(req(b"POST /v2/users/7?dry_run=false HTTP/1.1")), None)
    assert match(query={"debug": "*"}).matches(facts_for(req(b"GET /?debug HTTP/1.1")), None)


def test_bad_match_keys_name_their_path():
    """A path glob without a leading slash, or a query that is not a mapping, is refused with its key path."""
    with pytest.raises(ConfigError, match=r"match.paths\[0\]"):
        match(paths=["admin/*"])
    with pytest.raises(ConfigError, match="match.query"):
        match(query=["x"])


def test_facts_summary_and_cache_key():
    """Facts summarise the request and cache by method (and its override), host, target (and a path override)."""
    f = facts_for(req(b"GET /a?b=1 HTTP/1.1"))
    assert f.summary() == {"method": "GET", "host": "api.example.com", "path": "/a", "query": "b=1"}
    assert f.cache_key == ("GET", None, "api.example.com", "/a?b=1", None)


def test_rule_owner_with_mixed_keys():
    """A rule mixing Kubernetes and HTTP keys belongs to kubernetes; a rule with HTTP keys only to http."""
    plugins = protocol_plugins()
    mixed = read_rule(Node({"name": "x", "action": "deny", "match": {"paths": ["/api/*"], "verbs": ["get"]}}, "p",
                           Path(".")), plugins)
    assert mixed.protocol == "kubernetes"
    plain = read_rule(Node({"name": "y", "action": "deny", "match": {"paths": ["/api/*"]}}, "p", Path(".")), plugins)
    assert plain.protocol == "http"


def _engine(policies, default_action="allow"):
    from types import SimpleNamespace

    from gatekeep.policy.engine import RuleEngine
    rules = tuple(read_rule(Node(d, f"policies[{i}]", Path(".")), protocol_plugins()) for i, d in enumerate(policies))
    return RuleEngine(rules, {"api": SimpleNamespace(default_action=default_action, unjudgeable="deny")},
                      protocol_plugins())


def _op(request):
    from gatekeep.model import ClientAddress, Identity, Operation, Session
    session = Session("s1", Identity("agent", frozenset({"agents"})), "api", "http", ClientAddress("127.0.0.1", 1),
                      False, 0.0)
    return Operation(session, 1, "http", f"{request.method} {request.target}", 0.0, request)


@pytest.mark.parametrize("header", [b"X-HTTP-Method-Override", b"X-HTTP-Method", b"X-Method-Override"])
def test_a_method_override_is_judged_as_well_as_the_method(header):
    """POST with X-HTTP-Method-Override: DELETE is a DELETE to servers that honour it: a deny rule on DELETE fits;
    an allow rule must fit both methods."""
    r = req(b"POST /v1/users/7 HTTP/1.1", b"Host: api\r\n" + header + b": delete\r\n")
    assert (r.method, r.method_override) == ("POST", "DELETE")
    deny = _engine([{"name": "no-deletes", "match": {"methods": ["DELETE"]}, "action": "deny"}])
    assert deny.decide(_op(r)).rule == "no-deletes"
    assert deny.decide(_op(req(b"POST /v1/users/7 HTTP/1.1", b"Host: api\r\n"))).allowed
    allow = _engine([{"name": "posts-only", "match": {"methods": ["POST"]}, "action": "allow"}], default_action="deny")
    assert not allow.decide(_op(r)).allowed
    assert allow.decide(_op(req(b"POST /v1/users/7 HTTP/1.1", b"Host: api\r\nX-HTTP-Method-Override: POST\r\n"))).allowed
    assert facts_for(r).summary()["method_override"] == "DELETE"


@pytest.mark.parametrize("header", [b"X-Original-URL", b"X-Rewrite-URL", b"X-Override-URL"])
def test_a_path_override_is_judged_as_well_as_the_path(header):
    """GET /public with X-Original-URL: /admin/users is /admin/users to servers that honour it (IIS, Symfony): a
    deny rule on /admin/* fits; an allow rule must fit both paths; an override gatekeep cannot judge is
    unjudgeable."""
    r = req(b"GET /public HTTP/1.1", b"Host: api\r\n" + header + b": /admin/%75sers?x=1\r\n")
    assert (r.path, r.path_override) == ("/public", "/admin/users")
    deny = _engine([{"name": "no-admin", "match": {"paths": ["/admin/*"]}, "action": "deny"}])
    assert deny.decide(_op(r)).rule == "no-admin"
    assert deny.decide(_op(req(b"GET /public HTTP/1.1", b"Host: api\r\n"))).allowed
    allow = _engine([{"name": "public", "match": {"paths": ["/public"]}, "action": "allow"}], default_action="deny")
    assert not allow.decide(_op(r)).allowed
    assert allow.decide(_op(req(b"GET /public HTTP/1.1", b"Host: api\r\n" + header + b": /public\r\n"))).allowed
    assert facts_for(r).summary()["path_override"] == "/admin/users"
    odd = req(b"GET /public HTTP/1.1", b"Host: api\r\n" + header + b": /a/../admin\r\n")
    assert odd.unjudgeable is not None


@pytest.mark.parametrize("header", [b"X-Original-URL", b"X-Rewrite-URL", b"X-Override-URL"])
@pytest.mark.parametrize("url", [b"http://[/admin/users", b"https://[::1/admin/users?x=1", b"http://a]b/admin/users"])
def test_an_absolute_path_override_with_a_broken_authority_is_still_judged(header, url):
    """An override URL whose authority no URL parser takes (an unclosed IPv6 bracket) is judged by its path, as a
    server that honours it would read it; it used to raise out of the relay."""
    r = req(b"GET /public HTTP/1.1", b"Host: api\r\n" + header + b": " + url + b"\r\n")
    assert r.path_override == "/admin/users"
    deny = _engine([{"name": "no-admin", "match": {"paths": ["/admin/*"]}, "action": "deny"}])
    assert deny.decide(_op(r)).rule == "no-admin"


def test_query_parameter_names_match_without_case():
    """?DRY_RUN=false is ?dry_run=false to servers that read names without case: a rule on dry_run fits it."""
    deny = _engine([{"name": "no-dry-run-off", "match": {"query": {"dry_run": "false"}}, "action": "deny"}])
    for target in (b"/x?DRY_RUN=false", b"/x?Dry_Run=false&dry_run=true", b"/x?dry%5Frun=false"):
        assert deny.decide(_op(req(b"GET " + target + b" HTTP/1.1", b"Host: api\r\n"))).rule == "no-dry-run-off"
    assert deny.decide(_op(req(b"GET /x?dry_run=true HTTP/1.1", b"Host: api\r\n"))).allowed


def test_an_allow_rule_on_a_query_parameter_must_fit_every_value():
    """?mode=read&mode=write: a deny rule on mode=write fits; an allow rule on mode=read does not (a server that
    takes the last value sees a write)."""
    allow = _engine([{"name": "reads", "match": {"query": {"mode": "read"}}, "action": "allow"}], default_action="deny")
    assert allow.decide(_op(req(b"GET /x?mode=read HTTP/1.1", b"Host: api\r\n"))).allowed
    assert not allow.decide(_op(req(b"GET /x?mode=read&MODE=write HTTP/1.1", b"Host: api\r\n"))).allowed
    deny = _engine([{"name": "no-writes", "match": {"query": {"mode": "write"}}, "action": "deny"}])
    assert deny.decide(_op(req(b"GET /x?mode=read&mode=write HTTP/1.1", b"Host: api\r\n"))).rule == "no-writes"


NO_DELETES = {"name": "no-deletes", "match": {"methods": ["DELETE"]}, "action": "deny"}


@pytest.mark.parametrize("headers", [
    # Express's method-override (and Node, which joins repeated fields with ", ") takes the FIRST value
    b"Host: api\r\nX-HTTP-Method-Override: DELETE\r\nX-HTTP-Method-Override: GET\r\n",
    b"Host: api\r\nX-HTTP-Method-Override: DELETE, GET\r\n",
    b"Host: api\r\nX-HTTP-Method-Override: DELETE,POST\r\n",
])
def test_a_repeated_method_override_is_judged_by_its_first_value(headers):
    """Express's method-override reads ``X-HTTP-Method-Override`` and, when the field repeats (Node joins the
    values with ", "), acts on the first value: ``DELETE``. gatekeep takes the whole joined value ``DELETE, GET``
    as the override: gatekeep judges the first too, so a deny rule on DELETE fits."""
    r = req(b"POST /v1/users/7 HTTP/1.1", headers)
    decision = _engine([NO_DELETES]).decide(_op(r))
    assert decision.action is Action.DENY and decision.rule == "no-deletes", (decision, r.method_override)


@pytest.mark.parametrize("target", [b"/v1/users/7?_method=DELETE", b"/v1/users/7?_method=delete&x=1"])
def test_a_method_override_query_parameter_is_judged(target):
    """Laravel/Symfony (``_method`` with httpMethodParameterOverride, on in every Laravel app: read from the POST
    body, else the query string) and Express's ``methodOverride('_method')`` (the query string) act on
    ``POST /v1/users/7?_method=DELETE`` as a DELETE: gatekeep judges it as an override, so a deny rule on DELETE
    fits."""
    r = req(b"POST " + target + b" HTTP/1.1")
    decision = _engine([NO_DELETES]).decide(_op(r))
    assert decision.action is Action.DENY and decision.rule == "no-deletes", decision


NO_REAL_RUNS = {"name": "no-real-runs", "match": {"paths": ["/v1/jobs/*/run"], "query": {"dry_run": "false"}},
                "action": "deny"}


@pytest.mark.parametrize("query", [
    b"x=1;dry_run=false",      # Rack 2 (Rails < 7.1), Perl CGI, Python < 3.9.2: ";" separates parameters too
    b"dry.run=false",          # PHP: "." and " " in a parameter name become "_" ($_GET['dry_run'])
    b"dry+run=false",
    b"dry%20run=false",
    b"dry[run=false",          # PHP: an unmatched "[" becomes "_"
])
def test_query_parameters_as_common_servers_read_them(query):
    """A deny rule on ``dry_run=false`` is dodged by spelling the parameter as a server other than Python's
    parse_qs reads it: Rack 2 / Perl split on ``;`` as well as ``&``, and PHP rewrites ``.``, `` `` and ``[`` in
    a name to ``_``: gatekeep reads the query all these ways at once, so the deny rule fits."""
    r = req(b"POST /v1/jobs/9/run?" + query + b" HTTP/1.1")
    decision = _engine([NO_REAL_RUNS]).decide(_op(r))
    assert decision.action is Action.DENY, (decision, r.params())


NO_ADMIN_HOST = {"name": "no-admin-host", "match": {"hosts": ["admin.internal"]}, "action": "deny"}


@pytest.mark.parametrize("host", [b"admin.internal.", b"ADMIN.internal.:8443"])
def test_a_host_with_a_trailing_dot_is_the_same_host(host):
    """``Host: admin.internal.`` is the fully qualified spelling of ``admin.internal``: nginx and Apache strip the
    trailing dot before they pick a virtual host, so with ``host_header: client`` the request reaches the admin
    vhost. gatekeep drops the dot too, so the rule fits."""
    r = req(b"GET /users HTTP/1.1", b"Host: " + host + b"\r\n")
    decision = _engine([NO_ADMIN_HOST]).decide(_op(r))
    assert decision.action is Action.DENY and decision.rule == "no-admin-host", (decision, r.host)


def test_two_different_method_overrides_are_unjudgeable():
    """``?_method=PATCH`` and ``X-HTTP-Method-Override: DELETE``: servers act on one or the other; policy judges a
    request as its method and one override, so a request naming two is unjudgeable (denied by default)."""
    r = req(b"POST /v1/users/7?_method=PATCH HTTP/1.1", b"Host: api\r\nX-HTTP-Method-Override: DELETE\r\n")
    assert r.unjudgeable and "two different methods" in r.unjudgeable
    decision = _engine([]).decide(_op(r))
    assert decision.action is Action.DENY


@pytest.mark.parametrize("line,headers", [(b"TRACE / HTTP/1.1", b"Host: api\r\n"),
                                          (b"POST / HTTP/1.1", b"Host: api\r\nX-HTTP-Method-Override: TRACK\r\n"),
                                          (b"POST / HTTP/1.1", b"Host: api\r\nX-HTTP-Method-Override: TRACE\r\n")])
def test_trace_is_refused_whatever_the_rules_say(line, headers):
    """A server that implements TRACE echoes the request it got, with the target's credentials gatekeep added:
    refused with rule ``trace`` even when every rule and the default allow."""
    r = req(line, headers)
    everything = {"name": "everything", "match": {"methods": ["*"]}, "action": "allow"}
    decision = _engine([everything]).decide(_op(r))
    assert decision.action is Action.DENY and decision.rule == "trace"
