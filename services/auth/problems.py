"""The error body every service returns (see services.common.http.problem), for OpenAPI documents."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class FieldError(BaseModel):
    field: str = Field(examples=["patient.birth_date"])
    message: str = Field(examples=["Field required"])


class Problem(BaseModel):
    """What went wrong and what to do; never echoes the values sent."""

    title: str = Field(examples=["Invalid request"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["The request does not match the schema; fix the fields listed."])
    errors: list[FieldError] | None = None


def problem_response(status: int, description: str, detail: str) -> dict[str, Any]:
    """An OpenAPI `responses` entry: the Problem schema with an example."""
    return {
        "description": description,
        "model": Problem,
        "content": {"application/json": {"example": {"title": "Error", "status": status, "detail": detail}}},
    }


AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: problem_response(401, "No API key, or it is invalid or revoked", "an API key is required: send …"),
    403: problem_response(
        403, "The key's role may not do this", "this needs the role operations; your key has …"
    ),
}
