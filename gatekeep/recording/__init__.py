"""Recording: the recorder, the event schema, sinks."""


class RecordingUnavailable(Exception):
    """The store cannot take records and the configuration says to deny (``recording.on_failure: deny``)."""


class InOrder:
    """
    The recorder methods that only pass a value on, in order, to ``self._add``
    (every recorder keeps one ordered stream of events; only how it stores them,
    and how ``operationStarted`` treats strict durability, differ).
    """

    def _add(self, value: object) -> None:
        raise NotImplementedError

    def sessionStarted(self, session: object) -> None:
        self._add(session)

    def loginFailed(self, failure: object) -> None:
        self._add(failure)

    def operationFinished(self, outcome: object) -> None:
        self._add(outcome)

    def sessionEnded(self, end: object) -> None:
        self._add(end)

    def streamData(self, event: object) -> None:
        self._add(event)

    def record(self, value: object) -> None:
        """Another recordable value (an approval event), stored in order with the rest."""
        self._add(value)
