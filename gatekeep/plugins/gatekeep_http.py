"""The HTTP protocol plugin (``protocol: http``)."""

from gatekeep.protocols.http.plugin import HttpPlugin

http = HttpPlugin()
