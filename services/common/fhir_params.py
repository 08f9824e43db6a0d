"""The search parameters each type at the public FHIR base declares (CapabilityStatement.rest.resource.searchParam)
and the services read (services.common.fhir_search): one list, so what is declared is what is searched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["token", "reference", "date", "string"]
CASE_SYSTEM = "urn:secondopinion:case"


@dataclass(frozen=True)
class SearchParam:
    """A search parameter a type declares (CapabilityStatement.rest.resource.searchParam)."""

    name: str
    kind: Kind
    documentation: str
    target: str = ""  # a reference parameter: the type it points to

    def declared(self) -> dict[str, str]:
        return {"name": self.name, "type": self.kind, "documentation": self.documentation}


ORDER_IDENTIFIER = (
    "your order's identifier, [system|]value (FHIR token search: value under any system, |value under none, "
    "system|value exactly)"
)
TASK_PARAMS = {p.name: p for p in [
    SearchParam("_id", "token", "the case id (the Task's and its ServiceRequest's id)"),
    SearchParam("identifier", "token", f"the case: {CASE_SYSTEM}|[case id]"),
    SearchParam("group-identifier", "token", f"Task.groupIdentifier: {ORDER_IDENTIFIER}"),
    SearchParam("status", "token", "Task.status (task-status), e.g. in-progress,completed"),
    SearchParam("focus", "reference", "the order: ServiceRequest/[id]", target="ServiceRequest"),
    SearchParam("based-on", "reference", "the order: ServiceRequest/[id]", target="ServiceRequest"),
    SearchParam("_lastUpdated", "date", "meta.lastUpdated, when the case last changed, e.g. ge2026-12-01"),
]}  # fmt: skip
TASK_INCLUDES = ["Task:focus", "Task:based-on"]
ORDER_PARAMS = {p.name: p for p in [
    SearchParam("_id", "token", "the case id (the ServiceRequest's and its Task's id)"),
    SearchParam("identifier", "token", f"ServiceRequest.identifier: {ORDER_IDENTIFIER}"),
    SearchParam("status", "token", "ServiceRequest.status (request-status): every order kept is active"),
    SearchParam("_lastUpdated", "date", "meta.lastUpdated, when the order was received (it never changes)"),
]}  # fmt: skip
REPORT_PARAMS = {p.name: p for p in [
    SearchParam("_id", "token", "the report's id"),
    SearchParam("identifier", "token", f"the case the report answers: {CASE_SYSTEM}|[case id] (the Task's id)"),
    SearchParam("based-on", "reference", "your order: ServiceRequest/[id] (the case id, as intake keeps it)",
                target="ServiceRequest"),
    SearchParam("based-on:identifier", "token", f"your order by its identifier: {ORDER_IDENTIFIER}"),
    SearchParam("_lastUpdated", "date", "meta.lastUpdated, when the report was issued or last amended"),
]}  # fmt: skip


def declared(params: dict[str, SearchParam]) -> list[dict[str, str]]:
    """CapabilityStatement.rest.resource.searchParam of a type; a modifier's parameter is its base one."""
    return [p.declared() for p in params.values() if ":" not in p.name]
