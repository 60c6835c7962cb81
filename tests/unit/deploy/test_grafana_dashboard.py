"""The Grafana dashboard queries only metrics the services export, and is a well-formed dashboard."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "vrs-dashboard.json"
# Every module that defines VRS metrics: the four apps pull in the relay, the consumer and shared code.
MODULES = [f"services.{name}.app" for name in ("registry", "records", "stats", "gateway")]


def _exported() -> set[str]:
    for module in MODULES:
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_count", "_sum"],
            "gauge": [""],
        }.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def _targets(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_queried_metric_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported()
    queried = {name for expr in _targets(dashboard) for name in re.findall(r"\bvrs_[a-z0-9_]+", expr)}
    assert queried, "the dashboard queries nothing"
    assert not queried - exported, f"queried but exported by no service: {sorted(queried - exported)}"


def test_panels_have_unique_ids_and_a_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
