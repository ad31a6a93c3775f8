"""
The HTTP/1.1 relay (``protocol: http``), also the base of the Kubernetes plugin.

``_codec`` (pure message reader on llhttp), ``_request`` (what a request asks
for), ``_headers`` (credentials, rewriting, redaction), ``_jsonmask`` (JSON and
text masking), ``_websocket`` (frames, for recording), ``_dialect`` (what a
protocol on top may change), ``_exchange`` (one request/response and its
records), ``relay``, ``_upstream`` and ``_factory`` (the Twisted side), ``policy``,
``plugin``. See docs/http.md.
"""
