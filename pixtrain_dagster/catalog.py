"""How the assets present themselves in the Dagster UI: owners, kinds, governance tags, standard metadata keys,
code versions derived from the code each asset runs, and links to that code. One place, so every asset says
the same things the same way; the assets call these helpers and ``assets/__init__.py`` applies the last two.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import re
import textwrap
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dagster import (
    AnchorBasedFilePathMapping,
    AssetsDefinition,
    BetaWarning,
    MetadataValue,
    TableColumn,
    TableSchema,
    link_code_references_to_git,
    with_source_code_references,
)

PACKAGE = "pixtrain_dagster"
PACKAGE_DIR = Path(__file__).resolve().parent
OWNERS_ENV = "PIXTRAIN_ASSET_OWNERS"
DEFAULT_OWNERS = ("team:ml-platform",)
GIT_URL_ENV = "PIXTRAIN_GIT_URL"
GIT_COMMIT_ENV = "PIXTRAIN_GIT_COMMIT"

# What an asset holds, for the HIPAA review: filter the catalog by tag `phi`.
PHI_RAW = "raw"  # may hold identifiers as they arrived
PHI_SCRUBBED = "scrubbed"  # conversation text after de-identification
PHI_DERIVED = "derived"  # model weights or replies learnt from scrubbed text (memorisation is possible)
PHI_NONE = "none"  # no conversation content (base model, synthetic probes)
PHI_LEVELS = (PHI_RAW, PHI_SCRUBBED, PHI_DERIVED, PHI_NONE)


def owners() -> list[str]:
    """Owning team(s) shown in the UI: PIXTRAIN_ASSET_OWNERS (comma-separated ``team:name`` or e-mail addresses)."""
    configured = [o.strip() for o in os.environ.get(OWNERS_ENV, "").split(",") if o.strip()]
    return configured or list(DEFAULT_OWNERS)


def governance_tags(phi: str, compute: str) -> dict[str, str]:
    """``phi``: what the artifact may contain (PHI_LEVELS); ``compute``: the pod kind that produces it."""
    if phi not in PHI_LEVELS:
        raise ValueError(f"phi tag {phi!r} is not one of {PHI_LEVELS}")
    return {"phi": phi, "compute": compute}


CONVERSATION_SCHEMA = TableSchema(
    columns=[
        TableColumn(
            "messages",
            "list<struct<role: string, content: string>>",
            description="An optional system message, then user/assistant turns alternating from the user and "
            "ending with the assistant's reply (the text learnt); identifiers replaced by "
            "placeholders such as [NAME].",
        ),
    ]
)


def uri_metadata(uri: str) -> dict[str, Any]:
    """``dagster/uri``: where the artifact lives (shown by the UI as the asset's address)."""
    return {"dagster/uri": MetadataValue.path(str(uri))}


def table_metadata(row_count: int, column_schema: TableSchema | None = None) -> dict[str, Any]:
    """``dagster/row_count`` (and ``dagster/column_schema``), the keys the UI charts and shows as columns."""
    metadata: dict[str, Any] = {"dagster/row_count": MetadataValue.int(int(row_count))}
    if column_schema is not None:
        metadata["dagster/column_schema"] = column_schema
    return metadata


# ---- code versions ---------------------------------------------------------------------------------------------


def code_version_of(fn: Callable[..., Any]) -> str:
    """A version that changes when the code ``fn`` runs changes: its own source, the Config classes in its
    signature, every module of this package it reaches (the modules of the names it uses, the modules it
    imports, and what those import, transitively) and the JSON data beside those modules in a subpackage (the bias
    probe set). Blank and comment-only lines do not count. The unit is the module: a function's version also
    moves when another function of a module it reaches changes.

    Plain text and a regular expression for imports, not syntax trees: this runs when the code location loads.
    """
    digest = hashlib.sha256()
    digest.update(_normalised(inspect.getsource(fn)).encode())
    for parameter in inspect.signature(fn).parameters.values():
        if inspect.isclass(parameter.annotation) and parameter.annotation.__module__.startswith(PACKAGE):
            digest.update(_normalised(inspect.getsource(parameter.annotation)).encode())
    modules = _closure(frozenset(_modules_used_by(fn)))
    for module in sorted(modules):
        digest.update(f"\0{module}\0".encode())
        digest.update(_normalised(_source(module)).encode())
    for data_file in sorted({path for module in modules for path in _data_files(module)}):
        digest.update(f"\0{data_file.relative_to(PACKAGE_DIR)}\0".encode())
        digest.update(data_file.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _data_files(module: str) -> tuple[Path, ...]:
    """JSON data shipped beside a module inside a subpackage (the bias probe set): behaviour, not code, but it
    changes what the asset produces. The package root's folders of sample data are inputs, not behaviour."""
    folder = _module_file(module).parent
    if folder == PACKAGE_DIR or folder.parent == PACKAGE_DIR:
        return ()
    return tuple(sorted(folder.glob("*.json")))


_IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]+)|import[ \t]+([\w., \t]+))", re.MULTILINE
)


def _normalised(source: str) -> str:
    lines = (line.rstrip() for line in source.splitlines())
    return "\n".join(line for line in lines if line and not line.lstrip().startswith("#"))


def _modules_used_by(fn: Callable[..., Any]) -> set[str]:
    source = textwrap.dedent(inspect.getsource(fn))
    modules = {fn.__module__} | _imports_in(source, fn.__module__)
    for name in re.findall(r"\b[A-Za-z_]\w*\b", source):
        value = fn.__globals__.get(name)
        if value is None:
            continue
        owner = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if isinstance(owner, str) and owner.startswith(PACKAGE):
            modules.add(owner)
    return modules


@functools.cache
def _closure(modules: frozenset[str]) -> frozenset[str]:
    seen: set[str] = set()
    pending = list(modules)
    while pending:
        module = pending.pop()
        if module not in seen and _module_file(module) is not None:
            seen.add(module)
            pending += _module_imports(module)
    return frozenset(seen)


@functools.cache
def _source(module: str) -> str:
    return _module_file(module).read_text()


@functools.cache
def _module_imports(module: str) -> frozenset[str]:
    return frozenset(_imports_in(_source(module), module))


@functools.cache
def _module_file(module: str) -> Path | None:
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE_DIR / relative.with_suffix(".py"), PACKAGE_DIR / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_in(source: str, module: str) -> set[str]:
    """This package's modules imported anywhere in ``source`` (also inside functions: the lazy imports)."""
    file = _module_file(module)
    package = module if file is not None and file.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for origin, names, plain in _IMPORT.findall(source):
        if plain:
            found |= {name.strip().split(" ")[0] for name in plain.split(",")}
            continue
        base = importlib.util.resolve_name(origin, package) if origin.startswith(".") else origin
        found.add(base)
        for name in names.strip("()").replace("\n", " ").split(","):
            if name.strip():
                found.add(f"{base}.{name.split()[0]}")  # `from . import x` may name a module
    return {name for name in found if _module_file(name) is not None}


def with_code_versions(assets: Sequence[AssetsDefinition]) -> list[AssetsDefinition]:
    """Each asset with ``code_version`` = ``code_version_of`` its compute function."""
    versioned = []
    for assets_def in assets:
        version = code_version_of(assets_def.op.compute_fn.decorated_fn)
        versioned.append(assets_def.map_asset_specs(lambda spec, v=version: spec.replace_attributes(code_version=v)))
    return versioned


# ---- links to the code -----------------------------------------------------------------------------------------


def with_code_links(assets: Iterable[AssetsDefinition]) -> list[AssetsDefinition]:
    """Source references on every asset: local file and line; with PIXTRAIN_GIT_URL set (the image's build
    args), links to that file at PIXTRAIN_GIT_COMMIT (else ``main``) on GitHub or GitLab."""
    with warnings.catch_warnings():
        # The code-reference helpers and the metadata classes they build are beta in Dagster 1.13; scoped to this
        # call (dagster is pinned, and tests/test_catalog.py checks the references they attach).
        warnings.simplefilter("ignore", BetaWarning)
        linked = with_source_code_references(list(assets))
        git_url = os.environ.get(GIT_URL_ENV)
        if git_url:
            linked = link_code_references_to_git(
                linked,
                git_url=git_url,
                git_branch=os.environ.get(GIT_COMMIT_ENV) or "main",
                file_path_mapping=AnchorBasedFilePathMapping(
                    local_file_anchor=PACKAGE_DIR / "__init__.py",
                    file_anchor_path_in_repository=f"{PACKAGE}/__init__.py",
                ),
            )
    return list(linked)
