"""The one Ingress routes every public path prefix of DESIGN.md to its owner, the DICOM SCP is
reachable, and the NetworkPolicies deny by default and allow each process exactly what it needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.conftest import OVERLAYS, ROOT, Manifest, named, of_kind

# DESIGN.md, "Processes and the public contract" (kept here because DESIGN.md lives outside the repo;
# when it is found next to the repo, the test below checks this copy against it).
PATH_PREFIXES: dict[str, list[str]] = {
    "intake": [
        "/v1/cases",
        "/v1/partners",
        "/webhooks/",
        "/fhir/ServiceRequest",
        "/fhir/Task",
    ],
    "records": ["/v1/records", "/dicomweb/"],
    "insurance": ["/v1/coverage", "/fhir/CoverageEligibilityRequest", "/fhir/CoverageEligibilityResponse"],
    "review": ["/v1/specialists", "/v1/reviews", "/v1/reports", "/fhir/DiagnosticReport"],
}
# Prefixes this repository serves beyond DESIGN.md's table (additive: each overlaps none of the table's, so one
# ingress still routes every path to one owner). FHIR Subscriptions live beside the Task they notify about.
BEYOND_DESIGN: dict[str, list[str]] = {"intake": ["/fhir/Subscription"]}
DESIGN_CANDIDATES = (ROOT / "DESIGN.md", ROOT / "docs" / "DESIGN.md", ROOT.parent / "shared" / "DESIGN.md")

DNS, POSTGRES, AMQP, AMQPS, TEMPORAL, HTTPS = 53, 5432, 5672, 5671, 7233, 443
EXPECTED_EGRESS: dict[str, set[int]] = {
    "intake": {DNS, POSTGRES, AMQP, AMQPS, TEMPORAL},
    "records": {DNS, POSTGRES, AMQP, AMQPS},
    "insurance": {DNS, POSTGRES, AMQP, AMQPS},
    "review": {DNS, POSTGRES, AMQP, AMQPS, HTTPS},  # records' copy of the report, through the ingress
    "worker": {DNS, AMQP, AMQPS, TEMPORAL},
    "migrate": {DNS, POSTGRES},
}
EXPECTED_INGRESS: dict[str, set[int | str]] = {
    "intake": {"http"},
    "records": {"http", "dicom"},
    "insurance": {"http"},
    "review": {"http"},
    "worker": set(),
    "migrate": set(),
}


def prefixes_in_design(text: str) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*`services/(\w+)`\s*\|[^|]*\|([^|]*)\|", line)
        if match:
            table[match.group(1)] = re.findall(r"`([^`]+)`", match.group(2))
    return table


def test_prefix_table_matches_design_md() -> None:
    design = next((p for p in DESIGN_CANDIDATES if p.is_file()), None)
    if design is None:
        pytest.skip("DESIGN.md is not next to this checkout; the copy in this module is used")
    assert prefixes_in_design(Path(design).read_text()) == PATH_PREFIXES


def test_prefixes_beyond_design_overlap_none_of_its_prefixes() -> None:
    contract = [p.rstrip("/") for prefixes in PATH_PREFIXES.values() for p in prefixes]
    for prefixes in BEYOND_DESIGN.values():
        for extra in prefixes:
            assert extra.rstrip("/") not in contract
            assert not any(
                f"{extra.rstrip('/')}/".startswith(f"{c}/") or f"{c}/".startswith(f"{extra.rstrip('/')}/")
                for c in contract
            ), f"{extra} overlaps a prefix of DESIGN.md's table"


def ingress_routes(docs: list[Manifest]) -> dict[tuple[str, str], str]:
    (ingress,) = of_kind(docs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    return {(p["path"], p["pathType"]): p["backend"]["service"]["name"] for p in rule["http"]["paths"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_path_prefix_has_an_ingress_rule_to_its_owner(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    routes = ingress_routes(manifests[overlay])
    expected = {
        (p.rstrip("/"), "Prefix"): owner
        for table in (PATH_PREFIXES, BEYOND_DESIGN)
        for owner, prefixes in table.items()
        for p in prefixes
    }
    expected[("/fhir", "Exact")] = "intake"
    expected[("/fhir/", "Exact")] = "intake"  # the same base as FHIR client libraries write it ("[base]/")
    expected[("/fhir/metadata", "Exact")] = "intake"  # the CapabilityStatement, beside POST /fhir
    # SMART Backend Services: discovery under the FHIR base, and the token endpoint it names (intake's own).
    expected[("/fhir/.well-known/smart-configuration", "Exact")] = "intake"
    expected[("/auth/token", "Exact")] = "intake"
    assert routes == expected
    services = {s["metadata"]["name"] for s in of_kind(manifests[overlay], "Service")}
    assert set(routes.values()) <= services


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dicom_scp_has_its_own_service(manifests: dict[str, list[Manifest]], overlay: str) -> None:
    port = {"dev": 11112, "prod": 2762}[overlay]  # plain DIMSE in dev, DICOM TLS's port in prod
    service = named(manifests[overlay], "Service", "records-dicom")
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "records"}
    assert service["spec"]["ports"] == [{"name": "dicom", "port": port, "targetPort": "dicom"}]
    (container,) = named(manifests[overlay], "Deployment", "records")["spec"]["template"]["spec"][
        "containers"
    ]
    assert {"name": "dicom", "containerPort": port} in container["ports"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present = labels.get(expr["key"])
        if expr["operator"] == "In" and present not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and present in expr["values"]:
            return False
    return True


def allowed_ports(policies: list[Manifest], labels: dict[str, str], direction: str) -> set[int | str]:
    rules_key = "egress" if direction == "Egress" else "ingress"
    ports: set[int | str] = set()
    for policy in policies:
        spec = policy["spec"]
        if direction in spec["policyTypes"] and selects(spec["podSelector"], labels):
            for rule in spec.get(rules_key, []):
                ports |= {p["port"] for p in rule.get("ports", [])}
    return ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_allow_exactly_what_each_needs(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = manifests[overlay]
    policies = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["namespace"] == "secondopinion"]
    deny = named(docs, "NetworkPolicy", "default-deny-all")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for workload in (d for d in docs if d["kind"] in ("Deployment", "Job")):
        name = workload["metadata"]["name"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert allowed_ports(policies, labels, "Egress") == EXPECTED_EGRESS[name], name
        assert allowed_ports(policies, labels, "Ingress") == EXPECTED_INGRESS[name], name
