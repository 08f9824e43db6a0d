"""A route class that keeps the headers an auth error carries (`Retry-After` on 429, `WWW-Authenticate`
on 401) on the error body every service returns: a problem, or under /fhir an OperationOutcome.

An answer to a signed link (services.auth.signed_links) may be cached by the browser no longer than the link
lives (`Cache-Control: private, max-age=<seconds left>`), and a page it leads to is sent no Referer that would
carry the link on (`Referrer-Policy: no-referrer`)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from services.auth.deps import LINK_STATE
from services.auth.signed_links import VerifiedLink
from services.common.http import error_for


class AuthRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except HTTPException as exc:
                if not exc.headers:
                    raise
                # Under /fhir an OperationOutcome: a FHIR client parses every error body as one.
                response = error_for(request, exc.status_code, "Error", str(exc.detail))
                response.headers.update(exc.headers)
                return response
            link = getattr(request.state, LINK_STATE, None)
            if isinstance(link, VerifiedLink):
                response.headers["Cache-Control"] = f"private, max-age={link.remaining()}"
                response.headers["Referrer-Policy"] = "no-referrer"
            return response

        return route
