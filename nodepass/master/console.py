"""The web console: a single-page app served by the master itself at
``{prefix}/`` (``http://127.0.0.1:9090/api/``).

Like the Swagger UI page (:mod:`nodepass.master.swagger`), the console must
work on an air-gapped host, so it is plain HTML, CSS and ES modules shipped
in the package (``nodepass/master/console/``): no CDN, no build step.  Its
files are public -- they hold no data; the page asks for the API key and
sends it as ``X-API-Key`` with every API call it makes (the key lives in the
tab's ``sessionStorage``, never in a URL).

Paths outside ``{prefix}/v1`` used to be the JSON 404; :meth:`Console.render`
claims a few of them before that catch-all sees the request:

* ``/`` and ``{prefix}`` redirect (302) to ``{prefix}/``, so a bare host name
  or a missing slash still lands on the console (the page's relative asset
  URLs need the trailing slash);
* ``{prefix}/`` is the page;
* ``{prefix}/console/NAME`` is one of the files of the console directory,
  looked up by exact name in a table made once, so no path can reach
  anything else (no traversal, no listing).

Everything the console serves carries a strict Content-Security-Policy: the
page builds its DOM from text only, and the policy makes sure that even a
mistake there could not run an injected script (aliases, tags and log lines
are written by whoever holds the key, or by the tunnels' peers).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

from nodepass.master.records import json_utf8
from nodepass.master.site import CORS

#: Where the console's files are, inside the package.
CONSOLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "console")
#: The URL segment under ``{prefix}/`` holding the console's assets.
ASSETS = b"console"
PAGE = "index.html"

_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".html": b"text/html; charset=utf-8",
}

#: No inline script or style, nothing from elsewhere, no framing: the page
#: talks to its own origin only.
CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    b"content-security-policy": CSP,
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    # Small files, revalidated each time: a master upgrade shows at once.
    b"cache-control": b"no-cache",
}


@functools.cache
def console_files() -> dict[str, tuple[bytes, bytes]]:
    """``{name: (content type, bytes)}`` of the console's files, read once.

    Only plain names with a known extension are served; the table is the
    whole of what the console can answer, which is what keeps a request
    path from naming any other file."""
    files: dict[str, tuple[bytes, bytes]] = {}
    for name in sorted(os.listdir(CONSOLE_DIR)):
        kind = _TYPES.get(os.path.splitext(name)[1])
        path = os.path.join(CONSOLE_DIR, name)
        if kind is None or name.startswith(".") or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            files[name] = (kind, f.read())
    return files


def where_things_are(prefix: str) -> str:
    """The message of the ``{prefix}/v1`` answer: that path is no route,
    but whoever opens it is looking for something, so say where the
    console, the docs and the routes are.  It stays a 404
    ``{"error": ...}`` like every path that is no route (clients and the
    API's own tests rely on that shape)."""
    root = prefix.rstrip("/")
    return (
        f"Not found: {root}/v1 is the API's root, not a route. Web console: {root}/ - API docs: {root}/v1/docs"
        f" - OpenAPI: {root}/v1/openapi.json - routes: under {root}/v1/, with the X-API-Key header"
    )


class Console:
    """Answers the console's paths of one master (prefix ``prefix``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.root = self.prefix.encode("utf-8")

    def render(self, request: Any) -> Optional[bytes]:
        """The answer for a console path, or None for any other path (the
        JSON 404 catch-all's), and for OPTIONS (the catch-all's 200).

        The path is compared as :class:`~nodepass.master.api.MasterRoot`
        compares it with ``{prefix}/v1``: Twisted's decoded segments,
        joined, leading slashes dropped."""
        path = b"/" + b"/".join(request.postpath).lstrip(b"/")
        assets = self.root + b"/" + ASSETS + b"/"
        if path in (b"/", self.root, self.root + b"/"):
            if path != self.root + b"/":
                return self._answer(request, self._redirect)
            return self._answer(request, lambda r: self._file(r, PAGE))
        if path.startswith(assets):
            name = path[len(assets) :].decode("utf-8", "replace")
            if name != PAGE and name in console_files():
                return self._answer(request, lambda r: self._file(r, name))
        return None

    def _answer(self, request: Any, serve: Any) -> Optional[bytes]:
        """CORS headers on every answer (as on all of the master's); GET and
        HEAD served, OPTIONS left to the catch-all, anything else 405."""
        if request.method == b"OPTIONS":
            return None
        for name, value in CORS.items():
            request.setHeader(name, value)
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD, OPTIONS")
            request.setHeader(b"content-type", b"application/json")
            return json_utf8({"error": "Method not allowed"})
        result: bytes = serve(request)
        return result

    def _redirect(self, request: Any) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"location", self.root + b"/")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"The console is at " + self.root + b"/\n"

    def _file(self, request: Any, name: str) -> bytes:
        kind, body = console_files()[name]
        request.setResponseCode(200)
        request.setHeader(b"content-type", kind)
        for header, value in _HEADERS.items():
            request.setHeader(header, value)
        return body
