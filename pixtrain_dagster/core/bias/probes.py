"""The probe set: `ProbeTemplate`, `ProbeSet`, `load_probe_set` with its validation (`ProbeSetError`), and the
canonical sha256 that versions ``bias_probes.json`` (which lies next to this file, `PROBE_SET_PATH`).

Probe direction
---------------
The fine-tuned model speaks as the client (system = client persona, user = therapist, assistant = client). A probe
is a short session in which only a demographic descriptor changes: the persona ("You are role-playing a therapy
client: a Muslim.") and the client's first statement ("As a Muslim, I've been feeling really overwhelmed at work
lately.") name the group, the therapist answers supportively, and we measure the model's NEXT CLIENT TURN. The
neutral control names no group. The harm we look for is a simulated client whose engagement or tone depends on who
the client is: trainees would then practise on stereotyped portrayals of some groups.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .constants import CONTROL_AXIS, CONTROL_GROUP

PROBE_SET_PATH = Path(__file__).with_name("bias_probes.json")


class ProbeSetError(ValueError):
    """The probe file is malformed; the message says which entry and what is wrong."""


@dataclass(frozen=True)
class ProbeTemplate:
    id: str
    therapist_opening: str
    client_statement: str  # contains "{descriptor}" once
    neutral_client_statement: str
    therapist_response: str
    reference_replies: tuple[str, ...]


@dataclass(frozen=True)
class ProbeSet:
    name: str
    version: int
    sha256: str  # of the whole probe file's canonical JSON, whatever subset is selected
    persona_template: str
    neutral_persona: str
    templates: tuple[ProbeTemplate, ...]  # the selected templates, in file order
    axes: dict[str, dict[str, str]]  # axis -> group -> descriptor phrase

    @property
    def template_ids(self) -> list[str]:
        return [t.id for t in self.templates]

    def groups(self) -> list[tuple[str, str]]:
        """(axis, group) pairs, the neutral control first."""
        return [(CONTROL_AXIS, CONTROL_GROUP)] + [(a, g) for a, groups in self.axes.items() for g in groups]

    def prompt_messages(self, template: ProbeTemplate, axis: str, group: str) -> list[dict[str, str]]:
        """The session up to (not including) the client turn being measured."""
        if axis == CONTROL_AXIS:
            persona, statement = self.neutral_persona, template.neutral_client_statement
        else:
            descriptor = self.axes[axis][group]
            persona = self.persona_template.format(descriptor=descriptor)
            statement = template.client_statement.format(descriptor=descriptor)
        return [
            {"role": "system", "content": persona},
            {"role": "user", "content": template.therapist_opening},
            {"role": "assistant", "content": statement},
            {"role": "user", "content": template.therapist_response},
        ]

    def likelihood_probe_ids(self) -> list[str]:
        return [f"{t.id}#{i}" for t in self.templates for i in range(len(t.reference_replies))]

    def generation_templates(self, count: int) -> list[ProbeTemplate]:
        return list(self.templates[: max(0, count)])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "template_ids": self.template_ids,
            "axes": {axis: list(groups) for axis, groups in self.axes.items()},
        }


def canonical_sha256(data: Any) -> str:
    """sha256 of JSON with sorted keys and no insignificant whitespace: formatting changes keep the version."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_probe_set(max_templates: int | None = None, path: Path | None = None) -> ProbeSet:
    """The probe set, optionally limited to its first ``max_templates`` templates (cheap tests and CPU demos)."""
    path = Path(path or PROBE_SET_PATH)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ProbeSetError(f"cannot read probe set {path}: {error}") from None
    _validate_probe_data(data, path)
    if max_templates is not None and max_templates < 1:
        raise ProbeSetError(f"max_templates must be >= 1 or None (got {max_templates})")
    templates = tuple(
        ProbeTemplate(
            id=t["id"],
            therapist_opening=t["therapist_opening"],
            client_statement=t["client_statement"],
            neutral_client_statement=t["neutral_client_statement"],
            therapist_response=t["therapist_response"],
            reference_replies=tuple(t["reference_replies"]),
        )
        for t in data["templates"][:max_templates]
    )
    return ProbeSet(
        name=data["name"],
        version=int(data["version"]),
        sha256=canonical_sha256(data),
        persona_template=data["persona_template"],
        neutral_persona=data["neutral_persona"],
        templates=templates,
        axes={axis: dict(groups) for axis, groups in data["axes"].items()},
    )


def _validate_probe_data(data: Any, path: Path) -> None:
    problems = []
    for key in ("name", "version", "persona_template", "neutral_persona", "templates", "axes"):
        if key not in data:
            problems.append(f"missing top-level key {key!r}")
    if problems:
        raise ProbeSetError(f"probe set {path}: " + "; ".join(problems))
    if data["persona_template"].count("{descriptor}") != 1:
        problems.append("persona_template must contain {descriptor} exactly once")
    seen = set()
    for index, template in enumerate(data["templates"]):
        where = f"template {index} ({template.get('id', '?')})"
        if template.get("id") in seen:
            problems.append(f"{where}: duplicate id")
        seen.add(template.get("id"))
        if str(template.get("client_statement", "")).count("{descriptor}") != 1:
            problems.append(f"{where}: client_statement must contain {{descriptor}} exactly once")
        if "{" in str(template.get("neutral_client_statement", "{")):
            problems.append(f"{where}: neutral_client_statement must name no descriptor")
        if not template.get("reference_replies"):
            problems.append(f"{where}: needs at least one reference reply")
    if not data["templates"]:
        problems.append("no templates")
    if CONTROL_AXIS in data["axes"]:
        problems.append(f"axis name {CONTROL_AXIS!r} is reserved for the neutral control")
    for axis, groups in data["axes"].items():
        if not isinstance(groups, dict) or len(groups) < 2:
            problems.append(f"axis {axis!r} needs at least two groups (group -> descriptor phrase)")
    if problems:
        raise ProbeSetError(f"probe set {path}: " + "; ".join(problems))
