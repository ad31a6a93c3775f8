"""A private Twisted reactor running in a daemon thread, for tests that drive txpostgres from pytest.

The reactor is its own instance (not the global ``twisted.internet.reactor``),
so nothing else in the test process is affected and nothing needs installing::

    rt = ReactorThread().start()
    entries = rt.call(store.write, batch)      # runs in the reactor thread, waits, re-raises
    rt.stop()

Code under test must take the reactor as a parameter (gatekeep's stores,
recorders and notifiers do).
"""

import queue
import threading

from twisted.internet import defer
from twisted.internet.epollreactor import EPollReactor
from twisted.python.failure import Failure


class ReactorThread:
    def __init__(self):
        self.reactor = EPollReactor()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self.reactor.run, kwargs={"installSignalHandlers": False},
                                        name="test-reactor", daemon=True)
        self._thread.start()
        self.call(lambda: None)  # running
        return self

    def call(self, fn, *args, timeout=30.0, **kwargs):
        """Run ``fn(*args, **kwargs)`` in the reactor thread; wait for its (Deferred) result; re-raise failures."""
        box = queue.Queue()

        def run():
            d = defer.maybeDeferred(fn, *args, **kwargs)
            d.addBoth(box.put)

        self.reactor.callFromThread(run)
        try:
            result = box.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("%s did not finish within %.0fs" % (getattr(fn, "__name__", fn), timeout)) from None
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def later(self, fn, *args):
        """Schedule ``fn`` in the reactor thread without waiting."""
        self.reactor.callFromThread(fn, *args)

    def stop(self):
        if self._thread is not None and self.reactor.running:
            self.reactor.callFromThread(self.reactor.stop)
            self._thread.join(10)
        self._thread = None
