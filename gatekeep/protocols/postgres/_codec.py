"""PostgreSQL frontend/backend protocol 3.0: pure framing, parsing and encoding.

Nothing here does I/O or imports Twisted. The codec is three modules, and this
one is the name the rest of gatekeep uses for all of them (``_codec as pg``):

- :mod:`._wire`: message type codes, ``Message``, ``MessageReader`` (frames a
  stream into messages) and ``Scanner`` (follows the message boundaries of a
  stream that is relayed unchanged and hands out only the messages asked for);
- :mod:`._messages`: the ``parse_*`` functions, which decode message bodies;
- :mod:`._encode`: the lower-case encoder functions, which return complete wire bytes.

Strings are UTF-8 on the wire. Parsers raise ``ProtocolError`` for malformed
input (truncation, a missing or embedded NUL, invalid UTF-8, trailing bytes);
encoders raise ``ValueError`` for values that cannot be put on the wire.
"""

from gatekeep.protocols.postgres._encode import *  # noqa: F401,F403
from gatekeep.protocols.postgres._messages import *  # noqa: F401,F403
from gatekeep.protocols.postgres._wire import *  # noqa: F401,F403
