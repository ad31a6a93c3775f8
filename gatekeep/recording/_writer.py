"""
The recording writer process (see gatekeep.recording.process): reads frames of
events on stdin, stores each frame in one transaction, answers on stdout.

Run by the gateway as ``python -m gatekeep.recording._writer``; the first frame
carries its settings (the store's path, the node name, the signing key).
"""

from __future__ import annotations

import os
import struct
import sys
import time
from typing import Any, BinaryIO

from gatekeep.recording.process import frame, unpack_events

_LEN = struct.Struct("!I")


def read_frame(stream: BinaryIO) -> Any:
    import pickle

    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = _LEN.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def send(out: BinaryIO, message: Any) -> None:
    out.write(frame(message))
    out.flush()


def write_with_retries(store: Any, frame_id: int, events: list[Any], out: BinaryIO,
                       refuse_strict: bool = False) -> list[Any]:
    """
    Store the events; keep trying while the store fails (nothing is dropped but poison). With
    ``refuse_strict`` (strict durability and on_failure deny) the gateway refuses the frame's operations when
    told it is failing: from then on they are kept as those refusals.
    """
    from gatekeep.recording import refuse_in_batch, refused_as_data

    delay, attempts = 0.2, 0
    while True:
        try:
            return list(store.write(events))
        except Exception as e:
            attempts += 1
            error = f"{type(e).__name__}: {str(e)[:200]}"
            if refuse_strict and attempts == 1:
                refuse_in_batch(events, error)
            send(out, ("failing", frame_id, error))
            if attempts == 3 and len(events) > 1:
                written, failed = [], []
                for event in events:
                    try:
                        written.extend(store.write([event]))
                    except Exception:
                        failed.append(event)
                if len(failed) < len(events):
                    for event in failed:
                        send(out, ("dropped", type(event).__name__))
                    return written
            if attempts == 3 and len(events) == 1 and refused_as_data(e):  # poison: retrying never stores it
                send(out, ("dropped", type(events[0]).__name__))
                return []
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def main() -> int:
    from gatekeep.store import ledger
    from gatekeep.store.sqlite import SQLiteStore

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    init = read_frame(stdin)
    if not init or init[0] != "init":
        sys.stderr.write("recording writer: no settings\n")
        return 2
    settings = init[1]
    if settings.get("nice"):
        try:
            os.nice(settings["nice"])
        except OSError as e:  # not allowed here: the writer runs at the gateway's priority
            sys.stderr.write(f"recording writer: cannot lower its priority: {e}\n")
    signer = ledger.load_signer(settings["signing_key"]) if settings.get("signing_key") else None
    store = SQLiteStore(settings["path"], node=settings["node"], signer=signer)
    want_entries = settings.get("want_entries", False)
    store.keep_entries = want_entries  # the committed entries are only sent back for sinks
    while True:
        message = read_frame(stdin)
        if message is None:
            break
        if message[0] == "batch":
            _, frame_id, packed = message
            events = unpack_events(packed)
            entries = write_with_retries(store, frame_id, events, stdout, settings.get("refuse_strict", False))
            send(stdout, ("ok", frame_id, [e.export() for e in entries] if want_entries else None))
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
