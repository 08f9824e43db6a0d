"""The error body every service returns (see services.common.http.problem), for OpenAPI documents."""

from __future__ import annotations

from typing import Any

from services.common.openapi import PROBLEM_JSON, FieldError, Problem

__all__ = ["AUTH_ERRORS", "FieldError", "Problem", "problem_response"]


def problem_response(status: int, description: str, detail: str) -> dict[str, Any]:
    """An OpenAPI `responses` entry: the Problem schema with an example."""
    return {
        "description": description,
        "model": Problem,
        "content": {PROBLEM_JSON: {"example": {"title": "Error", "status": status, "detail": detail}}},
    }


AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: problem_response(401, "No API key, or it is invalid or revoked", "an API key is required: send …"),
    403: problem_response(
        403, "The key's role may not do this", "this needs the role operations; your key has …"
    ),
}
