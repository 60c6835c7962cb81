"""Every kustomize overlay renders, and kubeconform -strict accepts every object it renders against the
vendored Kubernetes, Strimzi and CloudNativePG schemas (deploy/schemas); the manifests carry no secret
value; and every VRS_ variable they set is a field the services' settings classes read.

kustomize and kubeconform come from ``deploy/install-tools.sh`` (``.cache/bin``) or the PATH; without them
the tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from shared.settings import AuthSettings, BusSettings
from tests.factories import unavailable

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "deploy" / "schemas"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
SCHEMA_LOCATIONS = [
    f"{SCHEMAS}/kubernetes/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
    f"{SCHEMAS}/crds/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
]
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}
_URL_PASSWORD = re.compile(r"://[^:/@\s]+:([^@\s]+)@")


def _tool(name: str) -> str:
    local = ROOT / ".cache" / "bin" / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        unavailable(f"{name} not found (bash deploy/install-tools.sh)")
    return found


@pytest.fixture(scope="module")
def kustomize() -> str:
    return _tool("kustomize")


@pytest.fixture(scope="module")
def kubeconform() -> str:
    return _tool("kubeconform")


def _build(kustomize: str, overlay: str) -> str:
    result = subprocess.run([kustomize, "build", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _validate(kubeconform: str, rendered: str) -> subprocess.CompletedProcess[str]:
    locations = [arg for loc in SCHEMA_LOCATIONS for arg in ("-schema-location", loc)]
    # No -ignore-missing-schemas: a kind without a vendored schema is an error, not a pass.
    return subprocess.run(
        [kubeconform, "-strict", "-summary", "-output", "text", *locations, "-"],
        input=rendered,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def rendered(kustomize: str) -> dict[str, str]:
    return {overlay: _build(kustomize, overlay) for overlay in OVERLAYS}


def _objects(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_both_overlays_exist() -> None:
    assert OVERLAYS == ["dev", "prod"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid_against_the_vendored_schemas(
    overlay: str, rendered: dict[str, str], kubeconform: str
) -> None:
    result = _validate(kubeconform, rendered[overlay])
    assert result.returncode == 0, result.stdout + result.stderr
    count = len(_objects(rendered[overlay]))
    assert f"{count} resources found" in result.stdout and f"Valid: {count}," in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("kind", "breakage"),
    [
        ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(imagePullPolice="Always")),
        ("KafkaTopic", lambda o: o["spec"].update(partitions="many")),
        ("KafkaUser", lambda o: o["spec"]["authorization"]["acls"][0].update(operations=["Steal"])),
        ("Cluster", lambda o: o["spec"]["postgresql"]["synchronous"].update(method="some")),
        ("NetworkPolicy", lambda o: o["spec"].update(podSelectors={})),
    ],
)
def test_validation_rejects_a_broken_object(
    kind: str, breakage: Any, rendered: dict[str, str], kubeconform: str
) -> None:
    """The check can fail: one wrong field in one object of the prod overlay is reported."""
    objects = _objects(rendered["prod"])
    target = next(o for o in objects if o["kind"] == kind and o["spec"])
    breakage(target)
    result = _validate(kubeconform, yaml.safe_dump_all(objects))
    assert result.returncode != 0
    assert f"{kind} {target['metadata']['name']} is invalid" in result.stdout, result.stdout


def test_an_unknown_kind_is_an_error(rendered: dict[str, str], kubeconform: str) -> None:
    extra = {"apiVersion": "example.org/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    result = _validate(kubeconform, rendered["prod"] + "---\n" + yaml.safe_dump(extra))
    assert result.returncode != 0 and "could not find schema for Gadget" in result.stdout, result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values(overlay: str, rendered: dict[str, str]) -> None:
    objects = _objects(rendered[overlay])
    assert not [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"]
    for o in objects:
        for container in _containers(o):
            for env in container.get("env", []):
                # A DSN's password is always a reference to a variable filled from a secret.
                for password in _URL_PASSWORD.findall(env.get("value", "")):
                    assert re.fullmatch(r"\$\(PG_\w+_PASSWORD\)", password), env["name"]
    assert "change-me" not in rendered[overlay] and "PRIVATE KEY" not in rendered[overlay]


def _containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if obj["kind"] in WORKLOAD_KINDS:
        pod = obj["spec"]["template"]["spec"]
        yield from pod.get("initContainers", [])
        yield from pod["containers"]


def _settings_classes() -> dict[str, type[BaseSettings]]:
    classes: dict[str, type[BaseSettings]] = {"VRS_AUTH_": AuthSettings, "VRS_BUS_": BusSettings}
    for service, name in [
        ("registry", "RegistrySettings"),
        ("records", "RecordsSettings"),
        ("stats", "StatsSettings"),
        ("gateway", "GatewaySettings"),
    ]:
        classes[f"VRS_{service.upper()}_"] = getattr(importlib.import_module(f"services.{service}.settings"), name)
    return classes


def _variables(objects: list[dict[str, Any]]) -> set[str]:
    names = set()
    for o in objects:
        if o["kind"] == "ConfigMap":
            names.update(o.get("data", {}))
        for container in _containers(o):
            names.update(env["name"] for env in container.get("env", []))
    return names


# Read outside the settings classes: shared.settings.var_dir(), and the environment field's alias.
NOT_A_FIELD = {"VRS_VAR_DIR", "VRS_ENVIRONMENT"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_vrs_variable_is_a_settings_field(overlay: str, rendered: dict[str, str]) -> None:
    classes = _settings_classes()
    unknown = []
    for name in sorted(_variables(_objects(rendered[overlay]))):
        if not name.startswith("VRS_") or name in NOT_A_FIELD:
            continue
        prefix = next((p for p in classes if name.startswith(p)), None)
        if prefix is None or name.removeprefix(prefix).lower() not in classes[prefix].model_fields:
            unknown.append(name)
    assert not unknown, f"set in deploy/k8s but read by no settings class: {unknown}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_promised_objects_are_there(overlay: str, rendered: dict[str, str]) -> None:
    objects = _objects(rendered[overlay])
    names: dict[str, set[str]] = {}
    for o in objects:
        names.setdefault(o["kind"], set()).add(o["metadata"]["name"])
    apis = {"registry", "records", "stats", "gateway"}
    workers = {"registry-relay", "records-relay", "records-coupon-consumer", "stats-consumer"}
    assert names["Deployment"] | names["StatefulSet"] == apis | workers
    assert names["StatefulSet"] == {"gateway"}  # one audit chain per stable pod name, its anchor on its volume
    assert apis <= names["HorizontalPodAutoscaler"] and apis <= names["PodDisruptionBudget"]
    assert names["Service"] == apis | {"gateway-pods"}
    assert names["Job"] == {"vrs-migrate"}
    assert names["KafkaTopic"] == {"dose-events", "coupon-events"}
    assert names["KafkaUser"] == workers
    databases = {"registry-main", "registry-s0", "registry-s1", "records-main", "records-s0", "records-s1"}
    assert names["Cluster"] == databases | {"stats", "gateway"}
    for o in objects:
        if o["kind"] in WORKLOAD_KINDS:
            pod = o["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in _containers(o):
                assert container["securityContext"]["readOnlyRootFilesystem"] is True
                assert container["resources"]["requests"] and container["resources"]["limits"]
        if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] in apis:
            container = o["spec"]["template"]["spec"]["containers"][0]
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_prod_is_replicated_and_backed_up(rendered: dict[str, str]) -> None:
    objects = _objects(rendered["prod"])
    for o in objects:
        if o["kind"] == "Cluster":
            spec = o["spec"]
            assert spec["instances"] == 3 and spec["postgresql"]["synchronous"]["number"] >= 1
            assert spec["backup"]["barmanObjectStore"]["wal"]
        if o["kind"] == "KafkaTopic":
            assert o["spec"]["replicas"] == 3 and o["spec"]["config"]["min.insync.replicas"] == 2
            assert o["spec"]["config"]["retention.ms"] == -1
    clusters = {o["metadata"]["name"] for o in objects if o["kind"] == "Cluster"}
    backed_up = {o["spec"]["cluster"]["name"] for o in objects if o["kind"] == "ScheduledBackup"}
    assert backed_up == clusters


def test_every_command_is_one_the_image_has(rendered: dict[str, str]) -> None:
    """`vrs …` commands parse (a worker the code lacks is an argparse error); uvicorn targets and protocols import."""
    from shared.cli import build_parser

    commands = {
        tuple(container["command"])
        for o in _objects(rendered["prod"])
        for container in _containers(o)
        if container["command"][0] in ("vrs", "uvicorn")
    }
    assert len(commands) == 9  # four APIs, four workers, the migration
    for command in commands:
        if command[0] == "vrs":
            args = build_parser().parse_args(list(command[1:]))
            assert callable(args.func), command
        else:
            module, factory = command[1].split(":")
            assert callable(getattr(importlib.import_module(module), factory)), command
            # A protocol class of our own (the gateway's) imports too; otherwise it is one uvicorn names.
            protocol = command[command.index("--http") + 1]
            if ":" in protocol:
                module, name = protocol.split(":")
                assert isinstance(getattr(importlib.import_module(module), name), type), command
            else:
                assert protocol == "httptools", command


RESTORE = ROOT / "deploy" / "restore"


@pytest.mark.parametrize("example", sorted(p.name for p in RESTORE.glob("*.yaml")))
def test_restore_example_is_valid(example: str, kubeconform: str) -> None:
    text = (RESTORE / example).read_text()
    result = _validate(kubeconform, text)
    assert result.returncode == 0 and "Valid: 1," in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("example", sorted(p.name for p in RESTORE.glob("*.yaml")))
def test_restore_example_is_the_live_cluster_bootstrapped_from_its_backups(
    example: str, rendered: dict[str, str]
) -> None:
    """What a restore must not change (instances, replication, TLS, sizes) is what prod runs; it reads the
    lost cluster's archive and writes a new one."""
    [restore] = _objects((RESTORE / example).read_text())
    live = next(
        o for o in _objects(rendered["prod"]) if o["kind"] == "Cluster" and o["metadata"] == restore["metadata"]
    )
    spec, live_spec = dict(restore["spec"]), dict(live["spec"])
    recovery, sources = spec.pop("bootstrap")["recovery"], spec.pop("externalClusters")
    assert live_spec.pop("bootstrap")["initdb"] == {k: recovery[k] for k in ("database", "owner")}
    [source] = [s for s in sources if s["name"] == recovery["source"]]
    store, live_store = spec["backup"]["barmanObjectStore"], live_spec["backup"]["barmanObjectStore"]
    assert source["barmanObjectStore"]["serverName"] == live["metadata"]["name"]
    assert source["barmanObjectStore"]["destinationPath"] == live_store["destinationPath"]
    assert store.pop("serverName") != live["metadata"]["name"]
    assert spec == live_spec
