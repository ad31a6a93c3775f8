"""Recording: the recorder, the event schema, sinks."""


class RecordingUnavailable(Exception):
    """The store cannot take records and the configuration says to deny (``recording.on_failure: deny``)."""
