"""Loopback port helpers for tests that start real servers."""

import errno
import socket
import time

_handed_out = set()


def free_port(host="127.0.0.1"):
    """Return a TCP port on ``host`` that is free right now.

    The kernel picks the port; ports already returned by this process are
    never returned twice, so two servers started in one test run cannot be
    given the same number.  (Another process may still grab the port before
    the caller binds it; that race is accepted.)
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("could not find an unused free port on %s" % (host,))


def port_open(host, port, timeout=0.5):
    """True if a TCP connection to (host, port) succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host, port, timeout=10.0, interval=0.05, abort=None):
    """Wait until (host, port) accepts TCP connections.

    Gives up after ``timeout`` seconds with ``TimeoutError``.  ``abort`` is an
    optional callable checked between attempts; if it returns a true value
    (e.g. "the server process exited") waiting stops at once with
    ``RuntimeError``.
    """
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(1.0, timeout)):
                return
        except OSError as e:
            last_error = e
        if abort is not None and abort():
            raise RuntimeError(
                "gave up waiting for %s:%d: abort condition met" % (host, port))
        if time.monotonic() >= deadline:
            raise TimeoutError(
                "%s:%d did not accept connections within %.1fs (last error: %s)"
                % (host, port, timeout,
                   errno.errorcode.get(getattr(last_error, "errno", None), last_error)))
        time.sleep(interval)
