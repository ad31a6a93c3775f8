"""
A channel's terminal stream as asciicast v2 events.

:class:`ChannelRecording` turns the bytes of one channel into
:class:`gatekeep.model.StreamEvent` values: ``o`` for output (stdout and
stderr), ``i`` for input, ``r`` for a resize (``"COLSxROWS"``) and ``m`` for a
marker. Bytes are decoded as UTF-8 incrementally (a character split across
chunks is decoded whole; invalid bytes become U+FFFD), output and input are
masked with the session's detector rules across chunk boundaries, and a
channel stops being recorded after ``limit`` bytes (a marker says so).

Events go to ``sink`` (the chain's ``stream_data``); the clock is injected.
"""

from __future__ import annotations

import codecs
from typing import Any, Callable

from gatekeep.model import StreamEvent
from gatekeep.masking.strategies import REDACTED, mask_spans
from gatekeep.masking.stream import StreamMasker


class ChannelRecording:
    def __init__(self, session_id: str, stream: str, sink: Callable[[StreamEvent], Any], clock: Callable[[], float],
                 rules: tuple = (), *, record_input: bool = True, limit: int = 16 * 1024 * 1024) -> None:
        self.session_id = session_id
        self.stream = stream
        self.sink = sink
        self.clock = clock
        self.record_input = record_input
        self.limit = limit
        self.recorded = 0
        self.stopped = False
        self._decoders = {"o": codecs.getincrementaldecoder("utf-8")("replace"),
                          "i": codecs.getincrementaldecoder("utf-8")("replace")}
        self._maskers = {"o": StreamMasker(rules), "i": StreamMasker(rules)} if rules else None

    @property
    def masked(self) -> dict[str, int]:
        if self._maskers is None:
            return {}
        out: dict[str, int] = {}
        for m in self._maskers.values():
            for k, v in m.counts.items():
                out[k] = out.get(k, 0) + v
        return out

    def output(self, data: bytes) -> None:
        self._add("o", data)

    def input(self, data: bytes) -> None:
        if self.record_input:
            self._add("i", data)

    def resize(self, cols: int, rows: int) -> None:
        self._emit("r", f"{cols}x{rows}")

    def marker(self, text: str) -> None:
        if self._maskers is not None:
            masked = mask_spans(self._maskers["o"].rules, text)
            text = REDACTED if masked is None else masked
        self._emit("m", text)

    def flush(self) -> None:
        """Release text kept back for masking (the stream was quiet, or ends)."""
        for kind in ("o", "i"):
            text = self._decoders[kind].decode(b"", final=False)
            if self._maskers is not None:
                text = self._maskers[kind].feed(text) + self._maskers[kind].flush()
            if text:
                self._emit(kind, text)

    def close(self) -> None:
        for kind in ("o", "i"):
            text = self._decoders[kind].decode(b"", final=True)
            if self._maskers is not None:
                text = self._maskers[kind].feed(text) + self._maskers[kind].flush()
            if text:
                self._emit(kind, text)
        self.stopped = True

    def _add(self, kind: str, data: bytes) -> None:
        if self.stopped or not data:
            return
        if self.recorded + len(data) > self.limit:
            self.stopped = True
            self._emit("m", f"gatekeep: recording stopped after {self.recorded} bytes")
            return
        self.recorded += len(data)
        text = self._decoders[kind].decode(data)
        if self._maskers is not None:
            text = self._maskers[kind].feed(text)
        if text:
            self._emit(kind, text)

    def _emit(self, kind: str, data: str) -> None:
        self.sink(StreamEvent(self.session_id, self.stream, self.clock(), kind, data))
