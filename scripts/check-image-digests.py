#!/usr/bin/env python3
"""Every image a production deployment runs must be pinned by digest (``...@sha256:<64 hex>``).

Checks the rendered k8s/pixtrain-infra manifests (every container and init container) and the Dagster chart
images named in the layered dagster-values files (webserver, daemon, code locations, the chart's
check-db-ready and init containers), after an optional code-location tag override (what the deploy script
passes with --set). Exit 0 when all are pinned; 1 with one line per unpinned image otherwise.
The all-zero digest is the values files' placeholder: refused unless --allow-placeholder (dry runs).

Usage: check-image-digests.py --rendered INFRA.yaml --dagster-values A.yaml [B.yaml ...]
                              [--code-location-tag TAG] [--allow-placeholder]
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from typing import Any

import yaml

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
PLACEHOLDER = "@sha256:" + "0" * 64


def helm_merge(base: Any, override: Any) -> Any:
    """Helm's values layering: maps merge recursively, lists and scalars replace, null deletes."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = helm_merge(base.get(key), value)
        return merged
    return copy.deepcopy(override)


def _containers(doc: dict) -> list[tuple[str, str]]:
    spec = doc.get("spec") or {}
    if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec = spec.get("template", {}).get("spec", {})
    elif doc.get("kind") == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    elif doc.get("kind") != "Pod":
        return []
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    return [
        (f"{where} container {c['name']}", str(c.get("image", "")))
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    ]


def infra_images(rendered_text: str) -> list[tuple[str, str]]:
    return [item for doc in yaml.safe_load_all(rendered_text) if doc for item in _containers(doc)]


def dagster_images(values: dict) -> list[tuple[str, str]]:
    def ref(where: str, image: dict | None) -> tuple[str, str]:
        image = image or {}
        return where, f"{image.get('repository', '<chart default>')}:{image.get('tag', '<chart default>')}"

    found = [
        ref("dagsterWebserver.image", values.get("dagsterWebserver", {}).get("image")),
        ref("dagsterDaemon.image", values.get("dagsterDaemon", {}).get("image")),
        ref("postgresql.image (check-db-ready)", values.get("postgresql", {}).get("image")),
        ref("busybox.image (init-user-deployment)", values.get("busybox", {}).get("image")),
    ]
    for index, deployment in enumerate(values.get("dagster-user-deployments", {}).get("deployments") or []):
        found.append(ref(f"dagster-user-deployments.deployments[{index}].image", deployment.get("image")))
    return found


def problems(images: list[tuple[str, str]], allow_placeholder: bool) -> list[str]:
    found = []
    for where, image in images:
        if not DIGEST.search(image):
            found.append(f"{where}: {image} is not pinned by digest (use TAG@sha256:<digest>)")
        elif image.endswith(PLACEHOLDER) and not allow_placeholder:
            found.append(f"{where}: {image} still has the placeholder digest; set the digest the release pushed")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rendered", required=True)
    parser.add_argument("--dagster-values", nargs="+", required=True)
    parser.add_argument("--code-location-tag", default="")
    parser.add_argument("--allow-placeholder", action="store_true")
    args = parser.parse_args(argv)
    values: dict = {}
    for path in args.dagster_values:
        with open(path) as handle:
            values = helm_merge(values, yaml.safe_load(handle) or {})
    if args.code_location_tag:
        values["dagster-user-deployments"]["deployments"][0]["image"]["tag"] = args.code_location_tag
    with open(args.rendered) as handle:
        images = infra_images(handle.read()) + dagster_images(values)
    found = problems(images, args.allow_placeholder)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
