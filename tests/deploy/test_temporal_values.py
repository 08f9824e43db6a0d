"""The Temporal chart values: persistence on the CloudNativePG cluster, the case workflow's namespace,
and every search attribute the workflow sets registered with the type the code declares."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import yaml

from services.common.config import Settings
from services.common.temporal import SEARCH_ATTRIBUTES
from tests.deploy.conftest import K8S, Manifest, of_kind
from tests.deploy.test_k8s_schemas import KUBERNETES_VERSION

VALUES = K8S / "temporal" / "values.yaml"
PROD_VALUES = K8S / "temporal" / "values-prod.yaml"


def load(path: Any) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


def search_attribute_job() -> Manifest:
    return yaml.safe_load(load(VALUES)["extraObjects"]["search-attributes"])  # type: ignore[no-any-return]


def test_persistence_uses_the_cnpg_databases(manifests: dict[str, list[Manifest]]) -> None:
    persistence = load(VALUES)["server"]["config"]["persistence"]
    databases = {d["spec"]["name"]: d["spec"]["owner"] for d in of_kind(manifests["prod"], "Database")}
    for store in ("default", "visibility"):
        sql = persistence["datastores"][store]["sql"]
        assert sql["pluginName"] == "postgres12"
        assert sql["connectAddr"].startswith("secondopinion-db-rw.secondopinion-data.svc")
        assert databases[sql["databaseName"]] == sql["user"]
        assert "password" not in sql and sql["existingSecret"]
    assert persistence["numHistoryShards"] == 512


def test_the_workflow_namespace_is_created() -> None:
    namespaces = load(VALUES)["server"]["config"]["namespaces"]
    config = dict(line.split("=", 1) for line in (K8S / "base" / "settings.env").read_text().splitlines())
    assert namespaces["create"] is True
    assert [n["name"] for n in namespaces["namespace"]] == [config["TEMPORAL_NAMESPACE"]]
    assert config["TEMPORAL_TASK_QUEUE"] == Settings().temporal_task_queue


def test_every_search_attribute_is_registered_with_its_type() -> None:
    job = search_attribute_job()
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    registered = dict(
        pair.split("=") for pair in script.split("for attr in ", 1)[1].split(";")[0].split() if "=" in pair
    )
    kinds = {"KEYWORD": "Keyword", "DATETIME": "Datetime"}
    assert registered == {key.name: kinds[key.indexed_value_type.name] for key in SEARCH_ATTRIBUTES}
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"


def test_prod_values_add_objects_and_tls_without_dropping_the_base() -> None:
    base, prod = load(VALUES), load(PROD_VALUES)
    # Helm merges maps and replaces lists: extraObjects must be maps for prod to add to them.
    assert isinstance(base["extraObjects"], dict) and isinstance(prod["extraObjects"], dict)
    assert not set(base["extraObjects"]) & set(prod["extraObjects"])
    assert prod["server"]["tls"]["internode"]["enabled"] is True
    for store in ("default", "visibility"):
        assert prod["server"]["config"]["persistence"]["datastores"][store]["sql"]["tls"]["enabled"] is True
    assert prod["server"]["replicaCount"] >= 3
