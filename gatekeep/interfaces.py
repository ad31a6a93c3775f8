"""
The extension points of gatekeep.

Each is a ``zope.interface`` interface with a default implementation in the
package and an in-memory one in :mod:`gatekeep.testing`. Methods may return a
plain value or a ``Deferred``; callers go through :mod:`gatekeep.chain`, which
accepts both and turns every failure in identity or policy into a denial.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IIdentityProvider(Interface):
    """Turns credentials into an :class:`gatekeep.model.Identity`."""

    def authenticateToken(name, token):
        """
        Check a bearer token presented for ``name`` (``None`` when the protocol
        carries no user name, as with HTTP bearer tokens).

        @return: the Identity, or None when the token is not valid for ``name``
            (or a Deferred firing with one of these, when the provider must
            fetch something first: see C{Chain.authenticate_token_async}).
            Comparison must be constant-time; the result must not reveal whether
            the name or the token was wrong.
        """

    def authenticatePublicKey(name, blob):
        """
        @param blob: an SSH public key blob (the base64-decoded part of an
            authorized_keys line).
        @return: the Identity if ``blob`` is registered for ``name``, else None.
        """

    def scramVerifier(name):
        """
        @return: ``(ScramVerifier, Identity)`` for an identity that can log in
            with SCRAM-SHA-256 without its token crossing the wire, or None.
        """


class IAccessCheck(Interface):
    """
    An identity provider that can say again, later, whether a login it granted
    still holds (optional; see :mod:`gatekeep.access`). Asked after a
    configuration reload and whenever a provider reports new facts.
    """

    def recheck(identity):
        """
        @param identity: an Identity with a L{gatekeep.model.Grant}.
        @return: C{True} while the login holds; a reason (str) once it does not
            (the session is ended with it); None when the login is not this
            provider's.
        """


class ICertificateIdentities(Interface):
    """An identity provider that names the identities a client certificate may log in as (optional)."""

    def authenticateCertificate(name, fingerprint):
        """
        @param fingerprint: the sha256 of the verified certificate (hex), for the grant.
        @return: the Identity ``name`` (method "certificate"), or None.
        """


class IPolicy(Interface):
    """Decides on each operation before the relay carries it out."""

    def decide(operation):
        """
        @param operation: a L{gatekeep.model.Operation}.
        @return: a L{gatekeep.model.Decision} (or a Deferred firing with one).
        """


class IApprovals(Interface):
    """Holds operations that a ``review`` rule matched until people decide."""

    def hold(operation, decision, notify):
        """
        @param decision: the REVIEW decision (its rule names the review settings).
        @param notify: None, or a callable taking a L{gatekeep.chain.Hold}; call
            it at once when the operation is held, so the client can be told.
        @return: a Decision (e.g. an allow from a still-open window grant), or a
            Deferred firing with the final Decision. Cancelling the Deferred
            withdraws the request.
        """

    def withdraw(request_ids, reason):
        """
        Withdraw held requests, recording ``reason`` (why their client no longer
        waits: "the client closed the connection", "access ended: ...") as
        their resolution; their Deferreds then fail with CancelledError, as if
        cancelled. @return: how many of them were held.
        """


class IApprovalStore(Interface):
    """
    The history of approval requests. The live state of a held request belongs
    to the approvals service; a store keeps every change and answers queries.
    """

    def save(event):
        """Keep an L{gatekeep.approvals.ApprovalEvent} (the request as it is after
        a change). Must not block: called from the reactor thread."""

    def get(request_id):
        """@return: a Deferred firing with the L{gatekeep.approvals.ApprovalRequest} or None."""

    def find(status=None, limit=100, session_id=None):
        """@return: a Deferred firing with requests, newest first."""

    def recover(node, now):
        """At start (may block).
        @return: C{(pending, grants)}: the requests C{node} left pending (the
            service records them as withdrawn) and its approved requests whose
            window grant is still open."""


class IMasking(Interface):
    """Chooses how results are masked before they reach a client."""

    def planFor(session):
        """
        @return: a protocol-neutral masking plan for the session (an object the
            protocol's masker understands), or None when nothing is masked.
        """


class IRecorder(Interface):
    """Receives everything that happens, in order, for one or more sessions."""

    def sessionStarted(session):
        """A session passed authentication."""

    def loginFailed(failure):
        """An authentication attempt failed (L{gatekeep.model.LoginFailure})."""

    def operationStarted(operation, decision):
        """An operation was judged. May return a Deferred: the relay waits for it
        before forwarding (strict durability)."""

    def operationFinished(outcome):
        """An operation ended (L{gatekeep.model.Outcome})."""

    def sessionEnded(end):
        """A session ended (L{gatekeep.model.SessionEnd})."""

    def streamData(event):
        """A piece of a recorded stream (L{gatekeep.model.StreamEvent})."""

    def record(value):
        """Any other recordable value: one with C{event_kind}, C{session_id} and
        C{event_data()}, such as L{gatekeep.approvals.ApprovalEvent}."""

    def flush():
        """@return: a Deferred that fires when everything received so far is stored."""


class IStore(Interface):
    """Persistent records: sessions, operations and failed logins."""

    def write(batch):
        """Store a list of events (model values) atomically; return the ledger
        entries appended. SQLite: blocking, called from the recorder's writer
        thread. PostgreSQL: returns a Deferred, called from the reactor thread
        (L{gatekeep.recording.async_recorder.AsyncRecorder})."""

    def sessions(limit, target=None, identity=None):
        """@return: a list of session rows (dicts), newest first. Blocking."""

    def session(session_id):
        """@return: one session row with its operations, or None. Blocking.
        ``session_id`` may be a unique prefix."""

    def loginFailures(limit):
        """@return: failed logins, newest first. Blocking."""

    def streams(session_id):
        """@return: {stream name: [(at, kind, data), ...]} for a session, in order. Blocking."""

    def close():
        """Release the store."""


class IProtocolPlugin(Interface):
    """
    A protocol gatekeep can relay. Found with C{twisted.plugin.getPlugins}
    in the C{gatekeep.plugins} package; see docs/writing-a-protocol-plugin.md.
    """

    name = Attribute("The value of C{targets[].protocol} this plugin serves.")
    matchKeys = Attribute("Policy C{match} keys this plugin understands (a tuple of names).")

    def parseMatch(node):
        """
        Read a rule's C{match} keys that belong to this protocol.

        @return: an object with C{matches(facts, operation) -> bool}.
        """

    def facts(operation, target):
        """
        Describe an operation for policy: an object with C{unjudgeable} (a
        reason or None), C{summary()} (JSON-ready, recorded with the decision)
        and C{cache_key} (hashable, or None when the decision must not be cached).
        Return None when the plugin has nothing to say about the operation.
        """

    def parseTarget(node):
        """
        Read the protocol's own keys of one target.

        @param node: a L{gatekeep.config.Node} for C{targets[i]}; the plugin
            reads its keys through it so errors name the key path.
        @return: the plugin's attrs configuration value.
        """

    def makeFactory(target, gateway):
        """
        @param target: a L{gatekeep.config.TargetConfig}.
        @param gateway: the L{gatekeep.chain.Gateway} (chain, clock, reactor).
        @return: an C{IProtocolFactory} to listen with on C{target.listen}.
        """
