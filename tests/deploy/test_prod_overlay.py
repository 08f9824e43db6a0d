"""Production: KEDA scales each service on CPU and its own queue and the worker on the Temporal
backlog; TLS on the ingress, RabbitMQ and PostgreSQL; the codec key comes from a Secret."""

from __future__ import annotations

from services.common.amqp import QUEUES
from services.common.config import Settings
from services.records.retrieval import RetrievalSettings
from tests.deploy.conftest import Manifest, named, of_kind

SERVICES = ("intake", "records", "insurance", "review")


def triggers(scaled_object: Manifest) -> dict[str, dict[str, str]]:
    return {t["type"]: t["metadata"] for t in scaled_object["spec"]["triggers"]}


def test_each_service_scales_on_cpu_and_its_queue(manifests: dict[str, list[Manifest]]) -> None:
    docs = manifests["prod"]
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in of_kind(docs, "ScaledObject")}
    deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    assert set(scaled) == deployments, "one autoscaler per Deployment"
    assert not of_kind(docs, "HorizontalPodAutoscaler"), "a second HPA would fight KEDA's"
    for service in SERVICES:
        by_type = triggers(scaled[service])
        assert by_type["cpu"]["value"] == "70"
        assert by_type["rabbitmq"]["queueName"] == service
        assert by_type["rabbitmq"]["mode"] == "QueueLength"
        assert service in QUEUES


def test_worker_scales_on_the_temporal_backlog(manifests: dict[str, list[Manifest]]) -> None:
    by_type = triggers(named(manifests["prod"], "ScaledObject", "worker"))
    settings = Settings()
    assert by_type["temporal"]["taskQueue"] == settings.temporal_task_queue
    config = of_kind(manifests["prod"], "ConfigMap")[0]["data"]
    assert by_type["temporal"]["namespace"] == config["TEMPORAL_NAMESPACE"]
    assert by_type["temporal"]["endpoint"] == config["TEMPORAL_ADDRESS"]
    assert by_type["rabbitmq"]["queueName"] == "workflows.bridge" and "workflows.bridge" in QUEUES


def test_tls_everywhere_we_terminate_it(manifests: dict[str, list[Manifest]]) -> None:
    docs = manifests["prod"]
    (ingress,) = of_kind(docs, "Ingress")
    assert ingress["spec"]["tls"][0]["hosts"] == [ingress["spec"]["rules"][0]["host"]]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
    mq = named(docs, "RabbitmqCluster", "secondopinion-mq")["spec"]["tls"]
    assert mq == {"secretName": "secondopinion-mq-tls", "disableNonTLSListeners": True}
    db = named(docs, "Cluster", "secondopinion-db")["spec"]
    assert db["certificates"]["serverTLSSecret"] == "secondopinion-db-tls"
    assert db["postgresql"]["pg_hba"][-1] == "host all all all reject"
    certificates = {c["spec"]["secretName"] for c in of_kind(docs, "Certificate")}
    assert {"secondopinion-mq-tls", "secondopinion-db-tls"} <= certificates
    dev_ingress = of_kind(manifests["dev"], "Ingress")[0]
    assert "tls" not in dev_ingress["spec"]


def test_codec_key_comes_from_a_secret_only_where_temporal_is_used(
    manifests: dict[str, list[Manifest]],
) -> None:
    docs = manifests["prod"]
    config = of_kind(docs, "ConfigMap")[0]["data"]
    assert config["ENV"] == "prod"
    for deployment in of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        if name in ("intake", "worker"):
            assert env["CODEC_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "codec", "key": "key"}
            assert env["CODEC_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "codec", "key": "key_id"}
        else:
            assert "CODEC_KEY" not in env
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/etc/secondopinion/ca" in mounts
    assert "CODEC_KEY" not in of_kind(manifests["dev"], "ConfigMap")[0]["data"]


def test_the_payer_login_comes_from_a_secret_only_for_insurance(manifests: dict[str, list[Manifest]]) -> None:
    for overlay in ("prod", "dev"):
        for deployment in of_kind(manifests[overlay], "Deployment"):
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            env = {e["name"]: e for e in container["env"]}
            if overlay == "prod" and deployment["metadata"]["name"] == "insurance":
                for name, key in (
                    ("USERNAME", "username"),
                    ("PASSWORD", "password"),
                    ("SENDER_ID", "sender_id"),
                ):
                    ref = env[f"INSURANCE_CORE_{name}"]["valueFrom"]["secretKeyRef"]
                    assert ref == {"name": "payer-core", "key": key}
                logins = env["INSURANCE_CORE_LOGINS"]["valueFrom"]["secretKeyRef"]
                assert logins == {"name": "payer-core", "key": "logins", "optional": True}
                volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
                assert volumes["payer-core-certs"]["secret"]["secretName"] == "payer-core-certs"
                mounts = {m["name"]: m for m in container["volumeMounts"]}
                assert mounts["payer-core-certs"]["readOnly"] is True
            else:
                assert not any(n.startswith("INSURANCE_CORE_") for n in env)


def test_records_serves_dicom_only_over_tls_and_so_starts_in_prod(
    manifests: dict[str, list[Manifest]],
) -> None:
    docs = manifests["prod"]
    (container,) = named(docs, "Deployment", "records")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    paths = ("RECORDS_SCP_TLS_CERT_PATH", "RECORDS_SCP_TLS_KEY_PATH", "RECORDS_SCP_TLS_CLIENT_CA_PATH")
    assert (env["RECORDS_SCP_PLAIN"], env["RECORDS_SCP_TLS_PORT"]) == ("false", "2762")
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert all(any(env[p].startswith(m + "/") for m in mounted) for p in paths)
    assert env["RECORDS_DICOM_TLS_DIR"] in mounted
    # What records checks at start with ENV=prod (the files aside, which the cluster provides).
    options = RetrievalSettings(scp_host=env["RECORDS_SCP_HOST"], scp_plain=env["RECORDS_SCP_PLAIN"])  # type: ignore[arg-type]
    assert options.production_problems() == []
    certificates = {c["spec"]["secretName"]: c for c in of_kind(docs, "Certificate")}
    assert "server auth" in certificates["records-dicom-tls"]["spec"]["usages"]


def test_review_signs_reports_with_the_certificate_from_its_secret_and_so_starts_in_prod(
    manifests: dict[str, list[Manifest]],
) -> None:
    for overlay in ("prod", "dev"):
        for deployment in of_kind(manifests[overlay], "Deployment"):
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            env = {e["name"]: e for e in container["env"]}
            signing = {n for n in env if n.startswith("REVIEW_REPORT_SIGNING_")}
            if overlay == "dev" or deployment["metadata"]["name"] != "review":
                assert not signing
                continue
            mounted = {m["mountPath"]: m for m in container["volumeMounts"]}
            for setting in ("KEY_FILE", "CERT_FILE", "CHAIN_FILE"):
                path = env[f"REVIEW_REPORT_SIGNING_{setting}"]["value"]
                assert mounted["/etc/secondopinion/report-signing"]["readOnly"] and path.startswith(
                    "/etc/secondopinion/report-signing/"
                )
            volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
            assert volumes["report-signing"]["secret"]["secretName"] == "report-signing"
            passphrase = env["REVIEW_REPORT_SIGNING_PASSPHRASE"]["valueFrom"]["secretKeyRef"]
            assert passphrase == {"name": "report-signing", "key": "passphrase", "optional": True}
