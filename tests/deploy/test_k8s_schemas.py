"""Every overlay builds, and every manifest in it is valid: built-in kinds against the Kubernetes
1.32 OpenAPI schemas (strict: unknown fields are errors), custom resources against the fields their
operators require."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.conftest import OVERLAYS, Manifest

KUBERNETES_VERSION = "1.32.0"

# Custom resources: the fields each operator's CRD marks required, plus the ones this platform relies on.
CUSTOM_REQUIRED: dict[tuple[str, str], list[str]] = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): ["spec.replicas"],
    ("postgresql.cnpg.io/v1", "Cluster"): ["spec.instances", "spec.storage.size", "spec.managed.roles"],
    ("postgresql.cnpg.io/v1", "Database"): ["spec.name", "spec.owner", "spec.cluster.name"],
    ("keda.sh/v1alpha1", "ScaledObject"): ["spec.scaleTargetRef.name", "spec.triggers"],
    ("keda.sh/v1alpha1", "TriggerAuthentication"): ["spec.secretTargetRef"],
    ("cert-manager.io/v1", "Certificate"): ["spec.secretName", "spec.issuerRef.name", "spec.dnsNames"],
}


def lookup(doc: Manifest, dotted: str) -> Any:
    value: Any = doc
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def custom_resource_errors(doc: Manifest) -> list[str]:
    required = CUSTOM_REQUIRED[(doc["apiVersion"], doc["kind"])]
    errors = [f"missing {field}" for field in required if lookup(doc, field) in (None, "", [], {})]
    if doc["kind"] == "ScaledObject":
        for trigger in doc["spec"].get("triggers", []):
            if not trigger.get("type") or not isinstance(trigger.get("metadata"), dict):
                errors.append("a trigger without type or metadata")
            elif not all(isinstance(v, str) for v in trigger["metadata"].values()):
                errors.append(f"{trigger['type']} trigger metadata values must be strings")
    if doc["kind"] == "Cluster":
        for role in doc["spec"]["managed"]["roles"]:
            if "password" in role or not lookup(role, "passwordSecret.name"):
                errors.append(f"role {role.get('name')} must take its password from a Secret")
    return errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates(manifests: dict[str, list[Manifest]], overlay: str) -> None:
    failures = []
    for doc in manifests[overlay]:
        where = f"{doc['kind']} {doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_REQUIRED:
            failures += [f"{where}: {e}" for e in custom_resource_errors(doc)]
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            failures.append(f"{where}: unknown kind {doc['apiVersion']}/{doc['kind']}")
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{where}: {exc.message} at {'.'.join(str(p) for p in exc.path)}")
    assert not failures, "\n".join(failures)


def test_validation_rejects_a_broken_manifest(manifests: dict[str, list[Manifest]]) -> None:
    deployment = next(d for d in manifests["dev"] if d["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    database = next(d for d in manifests["dev"] if d["kind"] == "Database")
    assert custom_resource_errors({**database, "spec": {"name": "x"}}) == [
        "missing spec.owner",
        "missing spec.cluster.name",
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_carries_a_value(manifests: dict[str, list[Manifest]], overlay: str) -> None:
    docs = manifests[overlay]
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert all(not s.get("data") and not s.get("stringData") for s in secrets)
    for config_map in (d for d in docs if d["kind"] == "ConfigMap"):
        for key, value in config_map.get("data", {}).items():
            assert "@" not in value and "password" not in value.lower(), f"credential in ConfigMap key {key}"
    for doc in docs:
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for env in container.get("env", []):
                if env["name"] in ("DATABASE_URL", "AMQP_URL", "CODEC_KEY", "CODEC_OLD_KEYS"):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env["name"]
