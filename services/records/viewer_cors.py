"""CORS on `/dicomweb` for the browser viewers named in VIEWER_ORIGINS (OHIF Viewer served from its own origin).

A viewer sends the specialist's key in `Authorization`, which makes each request "non-simple": the browser
first asks with a preflight (`OPTIONS`, `Access-Control-Request-Headers: authorization`), which carries no key
and is answered here, before any route or key is looked at. A listed origin is named back in
`Access-Control-Allow-Origin` (never `*`), on errors too, so the viewer can read a 401 or 404; any other origin
gets no CORS headers, and the browser keeps the answer from its page. No cookies are involved, so credentials
are not allowed. The other routes of records (uploads, the API) get no CORS: no browser page calls them.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

PREFIX = "/dicomweb"
# What a viewer reads of an answer besides the CORS-safelisted headers (Content-Type, Content-Length, ...).
EXPOSED = (
    "Content-Type",
    "Content-Length",
    "Content-Location",
    "ETag",
    "Last-Modified",
    "Warning",
    "Retry-After",
)


class ViewerCors:
    """An ASGI middleware: CORS for `origins` on `/dicomweb` paths, nothing for others or when `origins` is
    empty."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.cors = (
            CORSMiddleware(
                app,
                allow_origins=list(origins),
                allow_methods=["GET", "HEAD"],
                allow_headers=["Authorization", "Accept"],
                allow_credentials=False,
                expose_headers=list(EXPOSED),
                max_age=600,
            )
            if origins
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if self.cors is not None and (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.cors(scope, receive, send)
            return
        await self.app(scope, receive, send)
