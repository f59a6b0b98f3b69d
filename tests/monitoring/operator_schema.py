"""Schemas of the prometheus-operator custom resources our chart renders (PodMonitor, PrometheusRule), for
checking them without an API server.

Two sources:

* ``models`` (always available): the pydantic models of ``cloudcoil-models-prometheus-operator==0.80.1.0``
  (PyPI, a pinned test dependency), generated from the prometheus-operator v0.80.1 CRDs: field names (camelCase
  aliases), types, enums, required fields and the CRDs' regex patterns (durations, ...). The generated models
  *ignore* unknown fields by default, so they are applied with ``extra="forbid"`` (recursive: every nested model),
  ``strict=True`` (no "true" -> True or 15 -> "15" coercion) and ``by_name=False`` (a snake_case Python field name
  such as ``pod_metrics_endpoints`` is an unknown field, as it is to the API server).
  Why v0.80 and not the v0.93 the stack runs: the v0.93 builds of the package (0.93.1.x) require Python >= 3.14;
  this project runs on 3.11, where 0.80.1.0 is the newest. Our rendered objects pass both the v0.80 models and
  the v0.93.0 CRDs (checked with a local copy). ``extra=`` at validation time needs pydantic >= 2.12 (2.14.4
  here); an older pydantic raises TypeError, it does not pass silently.
* ``crd`` (optional): the ``openAPIV3Schema`` of the real CRD manifests
  ``monitoring.coreos.com_podmonitors.yaml`` / ``monitoring.coreos.com_prometheusrules.yaml`` of the
  prometheus-operator release the cluster runs (v0.93.0, ``example/prometheus-operator-crd/``). Third-party files,
  so not committed here: used when found in ``$PIXTRAIN_PROMETHEUS_CRDS_DIR``, ``<repo>/shared/crds/`` or
  ``<repo>/../shared/crds/``; the tests that need them are skipped with the reason otherwise. Each object schema
  with properties is closed (``additionalProperties: false``), as the API server's strict field validation
  (kubectl's default) rejects unknown fields of a structural CRD schema.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml

from .prom_support import REPO_ROOT
from support import closed_schema

MODELS_PACKAGE = "cloudcoil-models-prometheus-operator"
PLURALS = {"PodMonitor": "podmonitors", "PrometheusRule": "prometheusrules"}
CRDS_DIR_ENV = "PIXTRAIN_PROMETHEUS_CRDS_DIR"


def model_errors(obj: dict[str, Any]) -> list[str]:
    """Every violation of ``obj`` against the prometheus-operator models, as "field.path: message"."""
    import pydantic
    from cloudcoil.models.prometheus_operator import v1

    model = {"PodMonitor": v1.PodMonitor, "PrometheusRule": v1.PrometheusRule}[obj["kind"]]
    try:
        model.model_validate(obj, strict=True, extra="forbid", by_alias=True, by_name=False)
    except pydantic.ValidationError as error:
        return sorted(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors())
    return []


def crd_dir() -> Path | None:
    """The first folder holding both CRD manifests, or None."""
    candidates = [os.environ.get(CRDS_DIR_ENV, ""), REPO_ROOT / "shared" / "crds", REPO_ROOT.parent / "shared" / "crds"]
    for candidate in candidates:
        if candidate and all((Path(candidate) / crd_file_name(kind)).is_file() for kind in PLURALS):
            return Path(candidate)
    return None


def crd_file_name(kind: str) -> str:
    return f"monitoring.coreos.com_{PLURALS[kind]}.yaml"


@functools.cache
def crd_schema(path: Path, kind: str) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["group"] == "monitoring.coreos.com" and crd["spec"]["names"]["kind"] == kind, path
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = closed_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # metadata is validated by the API server itself, not by the CRD schema
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def crd_version(path: Path) -> str:
    crd = yaml.safe_load(path.read_text())
    return crd["metadata"].get("annotations", {}).get("operator.prometheus.io/version", "unknown")


def crd_errors(obj: dict[str, Any], directory: Path) -> list[str]:
    """Every violation of ``obj`` against the closed CRD schema found in ``directory``."""
    import jsonschema

    schema = crd_schema(directory / crd_file_name(obj["kind"]), obj["kind"])
    # No metaschema check: the CRDs carry Go regexes ("(?i)" mid-pattern) that Python's re rejects as patterns;
    # they only matter for fields we do not set.
    validator = jsonschema.Draft7Validator(schema)
    found = []
    for error in validator.iter_errors(obj):
        where = [str(p) for p in error.absolute_path]
        if error.validator == "additionalProperties":  # name each unknown field, as the models' errors do
            known = error.schema.get("properties", {})
            found += [f"{'.'.join(where + [name])}: unknown field" for name in error.instance if name not in known]
        else:
            found.append(f"{'.'.join(where) or '<root>'}: {error.message[:300]}")
    return sorted(found)
