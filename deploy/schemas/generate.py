"""Generate the JSON schemas kubeconform validates ``deploy/k8s`` against (vendored beside this file).

Only the kinds the manifests use are written, each standalone (every ``$ref`` inlined) and strict (an object
with declared properties accepts no other key), without descriptions:

- ``kubernetes/<kind>-<group>-<version>.json`` from Kubernetes' OpenAPI v2 document (``swagger.json``);
- ``crds/<group>/<kind>_<version>.json`` from the operators' CustomResourceDefinition YAML.

Regenerate (see deploy/README.md, "Validating the manifests") with::

    go mod download -json k8s.io/kubernetes@v1.34.2        # "Dir" → api/openapi-spec/swagger.json
    python deploy/schemas/generate.py --swagger <Dir>/api/openapi-spec/swagger.json \\
        --crd <strimzi>/install/cluster-operator/04{0,3,4,5}-Crd-*.yaml \\
        --crd <cloudnative-pg>/config/crd/bases/postgresql.cnpg.io_{clusters,scheduledbackups}.yaml
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

# (group, version, kind) of every Kubernetes kind deploy/k8s uses; "" is the core group.
KUBERNETES_KINDS = [
    ("", "v1", "Namespace"),
    ("", "v1", "ConfigMap"),
    ("", "v1", "Service"),
    ("", "v1", "ServiceAccount"),
    ("apps", "v1", "Deployment"),
    ("apps", "v1", "StatefulSet"),
    ("batch", "v1", "Job"),
    ("autoscaling", "v2", "HorizontalPodAutoscaler"),
    ("policy", "v1", "PodDisruptionBudget"),
    ("networking.k8s.io", "v1", "NetworkPolicy"),
]
# CRD kinds kept from the operators' files (others in the same files are dropped).
CRD_KINDS = {
    ("kafka.strimzi.io", "v1", "Kafka"),
    ("kafka.strimzi.io", "v1", "KafkaNodePool"),
    ("kafka.strimzi.io", "v1", "KafkaTopic"),
    ("kafka.strimzi.io", "v1", "KafkaUser"),
    ("postgresql.cnpg.io", "v1", "Cluster"),
    ("postgresql.cnpg.io", "v1", "ScheduledBackup"),
}

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}
# Keys that only document or drive server-side behaviour; kubeconform cannot use them.
DROPPED = {
    "description",
    "x-kubernetes-patch-merge-key",
    "x-kubernetes-patch-strategy",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
    "x-kubernetes-unions",
    "x-kubernetes-group-version-kind",
    "x-kubernetes-embedded-resource",
}


def strict(schema: Any) -> Any:
    """Copy of ``schema`` without documentation keys, with OpenAPI idioms turned into JSON Schema, and
    ``additionalProperties: false`` on every object that declares its properties."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("format") == "int-or-string" or schema.get("x-kubernetes-int-or-string"):
        return dict(INT_OR_STRING)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DROPPED:
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: strict(sub) for name, sub in value.items()}
        else:
            out[key] = strict(value)
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _inline(schema: Any, definitions: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    if isinstance(schema, list):
        return [_inline(item, definitions, seen) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if ref is not None:
        name = ref.removeprefix("#/definitions/")
        if name == "io.k8s.apimachinery.pkg.api.resource.Quantity":
            return dict(QUANTITY)
        if name in seen:
            raise ValueError(f"recursive definition {name}: not supported in a standalone schema")
        return _inline(definitions[name], definitions, (*seen, name))
    return {key: _inline(value, definitions, seen) for key, value in schema.items()}


def kubernetes_file(group: str, version: str, kind: str) -> str:
    # kubeconform's {{ .ResourceKind }}{{ .KindSuffix }}: the group's first label, then the version.
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{kind.lower()}{suffix}.json"


def kubernetes_schemas(swagger: dict[str, Any]) -> dict[str, Any]:
    definitions: dict[str, Any] = swagger["definitions"]
    by_gvk = {}
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            by_gvk[(gvk["group"], gvk["version"], gvk["kind"])] = name
    out = {}
    for group, version, kind in KUBERNETES_KINDS:
        name = by_gvk[(group, version, kind)]
        schema = strict(_inline(definitions[name], definitions, (name,)))
        api_version = f"{group}/{version}" if group else version
        schema["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
        schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
        out[kubernetes_file(group, version, kind)] = schema
    return out


def crd_schemas(documents: Iterable[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for crd in documents:
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if (group, version["name"], kind) not in CRD_KINDS:
                continue
            schema = strict(version["schema"]["openAPIV3Schema"])
            schema["properties"]["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
            schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
            # ObjectMeta is left open by CRDs; the API server checks it like any object's.
            schema["properties"]["metadata"] = {"type": "object"}
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
            out[f"{group}/{kind.lower()}_{version['name']}.json"] = schema
    return out


def write(directory: Path, schemas: dict[str, Any]) -> None:
    for relative, schema in sorted(schemas.items()):
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swagger", type=Path, required=True, help="Kubernetes api/openapi-spec/swagger.json")
    parser.add_argument("--crd", type=Path, action="append", default=[], help="a CRD YAML file (repeatable)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)

    k8s = kubernetes_schemas(json.loads(args.swagger.read_text()))
    documents = [doc for path in args.crd for doc in yaml.safe_load_all(path.read_text())]
    crds = crd_schemas(documents)
    missing = {f"{g}/{v} {k}" for g, v, k in CRD_KINDS} - {
        f"{s['properties']['apiVersion']['enum'][0]} {s['properties']['kind']['enum'][0]}" for s in crds.values()
    }
    if missing:
        parser.error(f"no CRD given for {', '.join(sorted(missing))}")
    write(args.out / "kubernetes", k8s)
    write(args.out / "crds", crds)
    print(f"wrote {len(k8s)} Kubernetes and {len(crds)} CRD schemas under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
