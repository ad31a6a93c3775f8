"""
Secret references: ``env:NAME`` and ``file:PATH``.

A :class:`Secret` keeps the reference for messages and the value for use; its
``repr`` and ``str`` show only the reference, so a secret that ends up in a log
line, an exception or a record shows where it came from, never what it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs


class SecretError(ValueError):
    """A reference that cannot be resolved. The message names the reference only."""


@attrs.frozen(repr=False)
class Secret:
    reference: str
    _value: bytes = attrs.field(eq=False)

    def reveal(self) -> bytes:
        return self._value

    def reveal_text(self) -> str:
        return self._value.decode("utf-8")

    def __repr__(self) -> str:
        return f"<Secret {self.reference}>"

    __str__ = __repr__


def is_reference(value: object) -> bool:
    return isinstance(value, str) and (value.startswith("env:") or value.startswith("file:"))


def resolve(reference: str, base: Path | None = None, *, strip: bool = True) -> Secret:
    """
    Resolve ``env:NAME`` or ``file:PATH`` (relative paths against ``base``).

    ``strip`` removes one trailing newline from file contents, as password files
    usually end with one; keys and certificates are read with ``strip=False``.
    """
    if reference.startswith("env:"):
        name = reference[4:]
        if not name:
            raise SecretError("env: reference without a variable name")
        if name not in os.environ:
            raise SecretError(f"environment variable {name} is not set")
        return Secret(reference, os.environ[name].encode("utf-8"))
    if reference.startswith("file:"):
        path = Path(reference[5:])
        if not reference[5:]:
            raise SecretError("file: reference without a path")
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SecretError(f"cannot read {path}: {e.strerror}") from None
        if strip and data.endswith(b"\n"):
            data = data[:-1]
            if data.endswith(b"\r"):
                data = data[:-1]
        return Secret(reference, data)
    raise SecretError("expected an env:NAME or file:PATH reference")
