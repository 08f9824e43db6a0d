"""The one Ingress routes every public path prefix of DESIGN.md to its owner, the DICOM SCP is
reachable, and the NetworkPolicies deny by default and allow each process exactly what it needs: its peers
in the cluster, and outside it the destinations its code calls (partners, PACS, payers, the timestamp
authority) on public addresses only, never the cloud's metadata address."""

from __future__ import annotations

import ipaddress
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

DNS, POSTGRES, AMQP, AMQPS, TEMPORAL, HTTPS, HTTP = 53, 5432, 5672, 5671, 7233, 443, 80
# Ports of peers in the cluster (chosen by namespace and pod labels).
EXPECTED_EGRESS: dict[str, set[int]] = {
    "intake": {DNS, POSTGRES, AMQP, AMQPS, TEMPORAL, HTTPS},  # the report from review, through the ingress
    "records": {DNS, POSTGRES, AMQP, AMQPS},
    "insurance": {DNS, POSTGRES, AMQP, AMQPS},
    "review": {DNS, POSTGRES, AMQP, AMQPS, HTTPS},  # records' copy of the report, through the ingress
    "worker": {DNS, AMQP, AMQPS, TEMPORAL},
    "migrate": {DNS, POSTGRES},
}
# Destinations outside the cluster (ipBlock peers), each as (CIDR, its excepts, ports); a port is
# (protocol, port, endPort), ANY_TCP every TCP port. PUBLIC is the internet without the cluster's and the
# cloud's own addresses: RFC 1918, CGNAT, link-local (169.254.169.254, the metadata service), loopback.
ANY_TCP = ("TCP", None, None)
NOT_PUBLIC = frozenset(
    {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8"}
)
Rule = tuple[str, frozenset[str], frozenset[tuple[str, int | str | None, int | None]]]


def public(*ports: tuple[str, int | None, int | None]) -> Rule:
    return ("0.0.0.0/0", NOT_PUBLIC, frozenset(ports))


# intake: partners' webhook / FHIR Subscription endpoints, HL7 MLLP listeners, jwks_uri (any port they give);
# records: PACS, DICOMweb sources, workstations (any port), and private facility networks (all of RFC 1918 in
# dev, only the networks an install names in prod: TEST-NET-1 until it does); insurance: CAQH CORE (443);
# review: the RFC 3161 timestamp authority (443, or 80 for a plain-HTTP one).
EXPECTED_OUTSIDE: dict[str, dict[str, set[Rule]]] = {
    overlay: {
        "intake": {public(ANY_TCP)},
        "records": {public(ANY_TCP)}
        | {
            (cidr, frozenset(), frozenset({ANY_TCP}))
            for cidr in (
                ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"] if overlay == "dev" else ["192.0.2.0/24"]
            )
        },
        "insurance": {public(("TCP", HTTPS, None))},
        "review": {public(("TCP", HTTPS, None), ("TCP", HTTP, None))},
        "worker": set(),
        "migrate": set(),
    }
    for overlay in OVERLAYS
}
EXPECTED_INGRESS: dict[str, set[int | str]] = {
    "intake": {"http"},
    "records": {"http", "dicom"},
    "insurance": {"http"},
    "review": {"http"},
    "worker": {"metrics"},  # Prometheus scrapes the SDK metrics
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
def test_the_hl7_order_listener_is_served_in_prod_over_tls_with_client_certificates_only(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    """Intake refuses to listen for HL7 orders outside development without its TLS settings (all three), so prod
    gives it the port, the certificate and key, and the CAs engines' client certificates are checked against;
    dev, where plain MLLP is taken from loopback only, serves none."""
    (container,) = named(manifests[overlay], "Deployment", "intake")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    services = {s["metadata"]["name"] for s in of_kind(manifests[overlay], "Service")}
    if overlay == "dev":
        assert "INTAKE_MLLP_PORT" not in env and "intake-mllp" not in services
        return
    assert {"name": "mllp", "containerPort": 2575} in container["ports"]
    assert env["INTAKE_MLLP_PORT"] == "2575"
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {
        v["name"]: v
        for v in named(manifests[overlay], "Deployment", "intake")["spec"]["template"]["spec"]["volumes"]
    }
    sources = {s["secret"]["name"] for s in volumes["hl7-tls"]["projected"]["sources"]}
    assert sources == {"intake-mllp-tls", "hl7-peers"}
    for setting in ("INTAKE_MLLP_TLS_CERT", "INTAKE_MLLP_TLS_KEY", "INTAKE_MLLP_CLIENT_CAS"):
        assert env[setting].startswith(mounted["hl7-tls"] + "/"), setting
    service = named(manifests[overlay], "Service", "intake-mllp")
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "intake"}
    assert service["spec"]["ports"] == [{"name": "mllp", "port": 2575, "targetPort": "mllp"}]
    certificate = named(manifests[overlay], "Certificate", "intake-mllp-tls")["spec"]
    assert certificate["secretName"] == "intake-mllp-tls" and "server auth" in certificate["usages"]


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


def cluster_peer(peer: dict) -> bool:
    return "ipBlock" not in peer and bool({"podSelector", "namespaceSelector"} & set(peer))


def selecting(policies: list[Manifest], labels: dict[str, str], direction: str) -> list[dict]:
    """The rules of `direction` that apply to a pod with `labels`."""
    key = "egress" if direction == "Egress" else "ingress"
    return [
        rule
        for policy in policies
        if direction in policy["spec"]["policyTypes"] and selects(policy["spec"]["podSelector"], labels)
        for rule in policy["spec"].get(key, [])
    ]


def allowed_ports(policies: list[Manifest], labels: dict[str, str], direction: str) -> set[int | str]:
    """Ingress: the ports of every rule. Egress: the ports of the rules whose peers are in the cluster."""
    ports: set[int | str] = set()
    for rule in selecting(policies, labels, direction):
        peers = rule.get("to" if direction == "Egress" else "from", [])
        if direction == "Egress" and not (peers and all(cluster_peer(p) for p in peers)):
            continue
        ports |= {p["port"] for p in rule.get("ports", [])}
    return ports


def outside_rules(policies: list[Manifest], labels: dict[str, str]) -> set[Rule]:
    """Every egress destination that is not a cluster peer, with its ports. A rule without `to` is
    everywhere and one without `ports` every port of every protocol: both show as such, and differ from any
    expectation."""
    found: set[Rule] = set()
    for rule in selecting(policies, labels, "Egress"):
        ports = frozenset(
            (p.get("protocol", "TCP"), p.get("port"), p.get("endPort")) for p in rule.get("ports", [])
        ) or frozenset({("any protocol", None, None)})
        peers = rule.get("to") or [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]
        assert all(cluster_peer(p) for p in peers) or not any(cluster_peer(p) for p in peers), rule
        for peer in peers:
            if "ipBlock" in peer:
                block = peer["ipBlock"]
                found.add((block["cidr"], frozenset(block.get("except", [])), ports))
    return found


def reaches(policies: list[Manifest], labels: dict[str, str], address: str, port: int) -> bool:
    """Whether a pod with `labels` may open a TCP connection to `address`:`port` outside the cluster."""
    ip = ipaddress.ip_address(address)
    for rule in selecting(policies, labels, "Egress"):
        ports = rule.get("ports") or [{}]
        if not any(
            p.get("protocol", "TCP") == "TCP"
            and (
                "port" not in p
                or p["port"] == port
                or (isinstance(p["port"], int) and p["port"] <= port <= p.get("endPort", p["port"]))
            )
            for p in ports
        ):
            continue
        for peer in rule.get("to") or [{"ipBlock": {"cidr": "0.0.0.0/0"}}]:
            block = peer.get("ipBlock")
            if block is None or ip.version != ipaddress.ip_network(block["cidr"]).version:
                continue
            if ip in ipaddress.ip_network(block["cidr"]) and not any(
                ip in ipaddress.ip_network(e) for e in block.get("except", [])
            ):
                return True
    return False


def namespace_policies(docs: list[Manifest]) -> list[Manifest]:
    return [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["namespace"] == "secondopinion"]


def workloads(docs: list[Manifest]) -> dict[str, dict[str, str]]:
    """Each Deployment's and Job's name and its pods' labels."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_allow_exactly_what_each_needs(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = manifests[overlay]
    policies = namespace_policies(docs)
    deny = named(docs, "NetworkPolicy", "default-deny-all")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, labels in workloads(docs).items():
        assert allowed_ports(policies, labels, "Egress") == EXPECTED_EGRESS[name], name
        # prod also takes hospitals' HL7 v2 orders on intake's MLLP listener (TLS only; none in dev)
        mllp = {"mllp"} if overlay == "prod" and name == "intake" else set()
        assert allowed_ports(policies, labels, "Ingress") == EXPECTED_INGRESS[name] | mllp, name
        assert outside_rules(policies, labels) == EXPECTED_OUTSIDE[overlay][name], name


PARTNER = "203.0.113.25"  # a public address, as far as a NetworkPolicy can tell
# The cloud metadata services (AWS, GCP, Azure: 169.254.169.254; Alibaba: 100.100.100.200) and loopback.
NEVER = ("169.254.169.254", "100.100.100.200", "127.0.0.1")
# Addresses of pods, Services and nodes on a cluster's private network (RFC 1918).
CLUSTER_NETWORK = ("10.96.0.1", "172.20.3.4", "192.168.1.10")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_reaches_the_partners_its_code_calls_on_their_ports(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = manifests[overlay]
    policies = namespace_policies(docs)
    labels = workloads(docs)
    # intake: a webhook endpoint on 443 or 8443, an MLLP listener on 6661 or 2575, a jwks_uri.
    for port in (443, 8443, 6661, 2575):
        assert reaches(policies, labels["intake"], PARTNER, port), port
    # records: a PACS on 104, 11112 or DICOM TLS's 2762, Orthanc's DICOMweb on 8042, a DICOMweb source on 443.
    for port in (104, 11112, 2762, 8042, 443):
        assert reaches(policies, labels["records"], PARTNER, port), port
    # records: a facility's PACS over a VPN: in dev anywhere on RFC 1918, in prod only on the networks named.
    assert reaches(policies, labels["records"], "10.20.30.40", 104) is (overlay == "dev")
    assert reaches(policies, labels["insurance"], PARTNER, 443)
    assert not reaches(policies, labels["insurance"], PARTNER, 8443)
    for port in (443, 80):
        assert reaches(policies, labels["review"], PARTNER, port), port
    assert not reaches(policies, labels["review"], PARTNER, 8080)
    for name in ("worker", "migrate"):
        assert not any(reaches(policies, labels[name], PARTNER, port) for port in (80, 443, 104, 6661)), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_service_reaches_the_metadata_service_or_the_cluster_outside_its_peers(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = manifests[overlay]
    policies = namespace_policies(docs)
    for name, labels in workloads(docs).items():
        for port in (80, 443, 8080, 10250):
            for address in NEVER:
                assert not reaches(policies, labels, address, port), f"{name} -> {address}:{port}"
            # Only dev's records, whose facility PACS may sit anywhere on RFC 1918 (prod names their networks).
            for address in CLUSTER_NETWORK:
                expected = name == "records" and overlay == "dev"
                assert reaches(policies, labels, address, port) is expected, f"{name} -> {address}:{port}"
