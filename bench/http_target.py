"""A small HTTP target for the HTTP benchmark: twisted.web answering every GET with a fixed body.

    .venv/bin/python bench/http_target.py --listen 127.0.0.1:PORT [--size 1024] [--json]

HTTP/1.1 with keep-alive, Content-Length on every response; ``--json`` sends a
JSON document of about ``--size`` bytes (for masking runs), otherwise text/plain.
"""

from __future__ import annotations

import argparse
import json
import sys

from twisted.web import resource, server


class Fixed(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        return self.body

    render_POST = render_GET


def make_body(size: int, as_json: bool) -> tuple[bytes, bytes]:
    if not as_json:
        return (b"x" * (size - 1) + b"\n"), b"text/plain"
    items, n = [], 0
    while n < size:
        item = {"id": len(items), "name": f"user{len(items)}", "email": f"user{len(items)}@example.com"}
        items.append(item)
        n += len(json.dumps(item)) + 1
    return json.dumps({"items": items}).encode(), b"application/json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from twisted.internet import reactor

    host, _, port = args.listen.rpartition(":")
    body, ctype = make_body(args.size, args.json)
    site = server.Site(Fixed(body, ctype))
    site.log = lambda request: None
    reactor.listenTCP(int(port), site, interface=host or "127.0.0.1", backlog=256)
    print(f"http target on {args.listen} ({len(body)} byte {ctype.decode()} bodies)", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
