"""A route class that keeps the headers an auth error carries (`Retry-After` on 429, `WWW-Authenticate`
on 401) on the error body every service returns: a problem, or under /fhir an OperationOutcome."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from services.common.http import error_for


class AuthRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as exc:
                if not exc.headers:
                    raise
                # Under /fhir an OperationOutcome: a FHIR client parses every error body as one.
                response = error_for(request, exc.status_code, "Error", str(exc.detail))
                response.headers.update(exc.headers)
                return response

        return route
