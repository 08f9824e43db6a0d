"""The ATNA feed on Kubernetes (component `atna-forward`, added to an overlay where a hospital asks for it): a
hardened forwarder per service database running `secondopinion audit forward`, the settings the code reads,
mutual TLS material from a Secret, egress to its database and the repository only; valid in dev and prod."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.auth.atna_forward import AtnaSettings
from tests.deploy.conftest import K8S, Manifest, named, of_kind
from tests.deploy.test_k8s_schemas import KUBERNETES_VERSION
from tests.deploy.test_routing_and_network import allowed_ports, namespace_policies, outside_rules

SERVICES = ("intake", "records", "insurance", "review")


@pytest.fixture(scope="module")
def with_feed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Manifest]]:
    """Each overlay built with the component added, as an install adds it."""
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    built = {}
    for overlay in ("dev", "prod"):
        kustomization = tree / "overlays" / overlay / "kustomization.yaml"
        document = yaml.safe_load(kustomization.read_text())
        document["components"] = [*document.get("components", []), "../../components/atna-forward"]
        kustomization.write_text(yaml.safe_dump(document, sort_keys=False))
        out = subprocess.run(
            [shutil.which("kubectl") or "kubectl", "kustomize", str(Path(kustomization).parent)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        built[overlay] = [doc for doc in yaml.safe_load_all(out) if doc]
    return built


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_one_hardened_forwarder_per_service_database(
    with_feed: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = with_feed[overlay]
    intake_image = named(docs, "Deployment", "intake")["spec"]["template"]["spec"]["containers"][0]["image"]
    settings = named(docs, "ConfigMap", next(c["metadata"]["name"] for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("atna-settings")))["data"]  # fmt: skip
    assert set(settings) <= {f"AUDIT_ATNA_{name.upper()}" for name in AtnaSettings.model_fields}
    assert settings["AUDIT_ATNA_URL"].startswith("tls://")
    for service in SERVICES:
        deployment = named(docs, "Deployment", f"audit-forward-{service}")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["python", "-m", "services.common.cli", "audit", "forward"]
        assert container["image"] == intake_image, "keep the component's image in step with base"
        [database] = [e for e in container["env"] if e["name"] == "DATABASE_URL"]
        assert database["valueFrom"]["secretKeyRef"] == {"name": f"{service}-database", "key": "url"}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for path in ("AUDIT_ATNA_CA_FILE", "AUDIT_ATNA_CERT_FILE", "AUDIT_ATNA_KEY_FILE"):
            assert (
                str(Path(settings[path]).parent) in mounts
                and mounts[str(Path(settings[path]).parent)]["readOnly"]
            )
        if overlay == "prod":
            assert "/etc/secondopinion/ca" in mounts  # the database's CA, for sslmode=verify-full
        assert (
            pod["serviceAccountName"] == f"audit-forward-{service}"
            and pod["automountServiceAccountToken"] is False
        )
        assert pod["securityContext"]["runAsNonRoot"] is True
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and "/tmp" in mounts
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_forwarders_reach_their_database_and_the_repository_only(
    with_feed: dict[str, list[Manifest]], overlay: str
) -> None:
    policy = named(with_feed[overlay], "NetworkPolicy", "audit-forward-egress")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "audit-forward"}
    ports = sorted(port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"])
    assert ports == [5432, 6514]
    policies = namespace_policies(with_feed[overlay])
    for service in SERVICES:
        labels = named(with_feed[overlay], "Deployment", f"audit-forward-{service}")["spec"]["template"]["metadata"]["labels"]  # fmt: skip
        assert labels["app.kubernetes.io/component"] == "audit-forward"
        # No other policy (the services' egress to partners, PACS, payers) lets a forwarder out further.
        assert allowed_ports(policies, labels, "Egress") == {53, 5432}
        assert outside_rules(policies, labels) == {
            ("0.0.0.0/0", frozenset(), frozenset({("TCP", 6514, None)}))
        }


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_component_validates(with_feed: dict[str, list[Manifest]], overlay: str) -> None:
    for doc in with_feed[overlay]:
        if "audit-forward" in doc["metadata"]["name"] or doc["metadata"]["name"].startswith("atna-settings"):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
