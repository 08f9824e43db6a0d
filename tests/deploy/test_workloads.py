"""What a platform team checks on every workload: the right command, hardened pods, probes on the
HTTP services, requests and limits, disruption budgets, settings that the code actually reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import Settings
from tests.deploy.conftest import K8S, OVERLAYS, ROOT, Manifest, named, of_kind, pod_specs

# process -> (module run by `python -m`, HTTP port from Settings or None)
PROCESSES: dict[str, tuple[str, int | None]] = {
    "intake": ("services.intake.main", Settings().intake_port),
    "records": ("services.records.main", Settings().records_port),
    "insurance": ("services.insurance.main", Settings().insurance_port),
    "review": ("services.review.main", Settings().review_port),
    "worker": ("workflows.worker", None),
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_deployment_per_process_running_its_module(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind(manifests[overlay], "Deployment")}
    assert set(deployments) == set(PROCESSES)
    for name, (module, port) in PROCESSES.items():
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", module]
        assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), module
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("http") == port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_is_hardened_and_bounded(manifests: dict[str, list[Manifest]], overlay: str) -> None:
    workloads = pod_specs(manifests[overlay])
    assert {name for name, _ in workloads} == {*PROCESSES, "migrate"}
    for name, pod in workloads:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["serviceAccountName"] == name
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where} {kind}"
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_http_services_have_health_and_readiness_probes(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    for name, (_, port) in PROCESSES.items():
        if port is None:
            continue
        (container,) = named(manifests[overlay], "Deployment", name)["spec"]["template"]["spec"]["containers"]
        for probe, path in (
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ):
            assert container[probe]["httpGet"] == {"path": path, "port": "http"}, f"{name} {probe}"
        service = named(manifests[overlay], "Service", name)
        assert service["spec"]["selector"] == {"app.kubernetes.io/name": name}
        assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_disruption_budget(manifests: dict[str, list[Manifest]], overlay: str) -> None:
    budgets = {
        b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: b["spec"]
        for b in of_kind(manifests[overlay], "PodDisruptionBudget")
    }
    assert set(budgets) == set(PROCESSES)
    assert all(spec.get("maxUnavailable") == 1 for spec in budgets.values())


def test_settings_in_the_config_map_are_read_by_the_code() -> None:
    lines = (K8S / "base" / "settings.env").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in lines if line)
    known = {name.upper() for name in Settings.model_fields} | {"SSL_CERT_FILE"}
    assert settings and not set(settings) - known
    # Uvicorn binds 127.0.0.1 by default; in a pod the kubelet and the ingress must reach it.
    assert settings["HOST"] == "0.0.0.0"
    assert settings["DATA_DIR"] == "/data"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dicom_scp_listens_where_its_service_sends(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    [container] = named(manifests[overlay], "Deployment", "records")["spec"]["template"]["spec"]["containers"]
    assert {"name": "RECORDS_SCP_HOST", "value": "0.0.0.0"} in container["env"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_gets_its_own_database_and_the_migration_job_covers_all(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = manifests[overlay]
    databases = {d["spec"]["name"]: d["spec"]["owner"] for d in of_kind(docs, "Database")}
    migrate = named(docs, "Job", "migrate")["spec"]["template"]["spec"]["containers"]
    migrated = {c["name"] for c in migrate}
    for name, (_, port) in PROCESSES.items():
        if port is None:
            continue
        assert databases[name] == name
        assert name in migrated
        for container in (c for c in migrate if c["name"] == name):
            assert f"upgrade('{name}')" in container["command"][-1]
        for deployment_container in named(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in deployment_container["env"]}
            assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == f"{name}-database"
    assert databases["temporal"] == databases["temporal_visibility"] == "temporal"


def test_dev_runs_one_replica_of_everything(manifests: dict[str, list[Manifest]]) -> None:
    docs = manifests["dev"]
    assert {d["spec"]["replicas"] for d in of_kind(docs, "Deployment")} == {1}
    assert named(docs, "RabbitmqCluster", "secondopinion-mq")["spec"]["replicas"] == 1
    assert named(docs, "Cluster", "secondopinion-db")["spec"]["instances"] == 1
    assert not of_kind(docs, "ScaledObject") and not of_kind(docs, "HorizontalPodAutoscaler")


def test_prod_is_highly_available(manifests: dict[str, list[Manifest]]) -> None:
    docs = manifests["prod"]
    assert named(docs, "RabbitmqCluster", "secondopinion-mq")["spec"]["replicas"] == 3
    assert named(docs, "Cluster", "secondopinion-db")["spec"]["instances"] == 3
    for scaled in of_kind(docs, "ScaledObject"):
        assert scaled["spec"]["minReplicaCount"] >= 3
    for deployment in of_kind(docs, "Deployment"):
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count in prod"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_intake_reads_reports_for_hl7_with_the_key_from_its_optional_secret(
    manifests: dict[str, list[Manifest]], overlay: str
) -> None:
    assert "intake_report_key" in Settings.model_fields  # INTAKE_REPORT_KEY, what the HL7 sender reads
    for deployment in of_kind(manifests[overlay], "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        if deployment["metadata"]["name"] != "intake":
            assert "INTAKE_REPORT_KEY" not in env
            continue
        ref = env["INTAKE_REPORT_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "intake-report-key", "key": "key", "optional": True}
