"""The TrainJob (trainer.kubeflow.org/v1alpha1) schema, for validating our manifests without a cluster.

Two sources, same Go types of Kubeflow Trainer v2.3.0:

* ``api-models``: the JSON schema of ``kubeflow_trainer_api.models.TrainerV1alpha1TrainJob`` from the PyPI
  package ``kubeflow-trainer-api==2.3.0`` (Kubeflow's Python models generated from the Trainer's OpenAPI
  spec). Always available: a pinned test dependency.
* ``crd``: ``openAPIV3Schema`` of the CRD manifest ``manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml``
  of kubeflow/trainer at tag v2.3.0 (commit 658725bdae5c7e3a0854d93ac6ff492e109a22ab), the schema the API
  server enforces, with its enums, patterns and length limits. Not committed here (third-party file): used
  when a copy is found at ``$PIXTRAIN_TRAINJOB_CRD`` or ``shared/crds/trainer.kubeflow.org_trainjobs.yaml``.

Both are "closed" before use: an object schema with properties gets ``additionalProperties: false``, as the
API server's strict field validation (kubectl's default) rejects unknown fields of a structural CRD schema.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml

from .k8s_support import REPO_ROOT
from support import closed_schema

CRD_FILE_NAME = "trainer.kubeflow.org_trainjobs.yaml"


@functools.cache
def api_models_schema() -> dict[str, Any]:
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    schema = TrainerV1alpha1TrainJob.model_json_schema(by_alias=True)
    # The generated models type resource.Quantity as an object; on the wire (and in the CRD) it is a
    # string or a number ("16", "64Gi", 8).
    for name in list(schema["$defs"]):
        if name in ("IoK8sApimachineryPkgApiResourceQuantity", "IoK8sApimachineryPkgUtilIntstrIntOrString"):
            schema["$defs"][name] = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    return closed_schema(schema)


def crd_path() -> Path | None:
    candidates = [
        os.environ.get("PIXTRAIN_TRAINJOB_CRD", ""),
        REPO_ROOT / "shared" / "crds" / CRD_FILE_NAME,
        REPO_ROOT.parent / "shared" / "crds" / CRD_FILE_NAME,
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@functools.cache
def crd_schema(path: Path) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["group"] == "trainer.kubeflow.org" and crd["spec"]["names"]["kind"] == "TrainJob", path
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return closed_schema(version["schema"]["openAPIV3Schema"])


def _leaves(error):
    # anyOf (the models' "or null") reports only "not valid under any": show the deepest reasons.
    if not error.context:
        yield error
    for sub in error.context:
        yield from _leaves(sub)


def errors(manifest: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every schema violation of ``manifest`` as "field.path: message"; empty when it conforms."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    return sorted(
        {
            f"{'.'.join(str(p) for p in leaf.absolute_path) or '<root>'}: {leaf.message[:300]}"
            for error in validator.iter_errors(manifest)
            for leaf in _leaves(error)
            if "is not of type 'null'" not in leaf.message
        }
    )
