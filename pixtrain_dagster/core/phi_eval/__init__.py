"""The PHI evaluation set and its scoring: recall per identifier kind and the false-positive rate.

An identifier counts as caught only when detected spans cover every letter and digit of it (a half-removed
phone number is a miss). A clean sentence counts as a false positive when anything in it is detected.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

EVAL_SET = Path(__file__).with_name("eval_set.jsonl")
HOLDOUT_SET = Path(__file__).with_name("holdout_set.jsonl")  # written after tuning; never tuned on

# Kinds whose shape a pattern can describe (the 0.98 target); names need more than a pattern (0.90 target).
NAME_KINDS = ("NAME",)


@dataclass
class EvalScore:
    found: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    clean_sentences: int = 0
    false_positive_sentences: int = 0
    misses: list[tuple[str, int]] = field(default_factory=list)  # (kind, line): for whoever edits the set
    false_positive_lines: list[int] = field(default_factory=list)

    def recall(self, kind: str) -> float:
        return self.found[kind] / self.total[kind]

    @property
    def false_positive_rate(self) -> float:
        return self.false_positive_sentences / self.clean_sentences


def load_eval_set(path: Path = EVAL_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score(detect: Callable[[str], list[tuple[int, int]]], rows: list[dict] | None = None) -> EvalScore:
    """``detect(text)`` returns (start, end) spans it would replace."""
    result = EvalScore()
    for line_no, row in enumerate(rows if rows is not None else load_eval_set(), start=1):
        text = row["text"]
        spans = detect(text)
        covered = [False] * len(text)
        for start, end in spans:
            for i in range(start, end):
                covered[i] = True
        if not row["phi"]:
            result.clean_sentences += 1
            if spans:
                result.false_positive_sentences += 1
                result.false_positive_lines.append(line_no)
            continue
        cursor = 0
        for item in row["phi"]:
            start = text.index(item["text"], cursor)
            end = start + len(item["text"])
            cursor = end
            result.total[item["kind"]] += 1
            if all(covered[i] for i in range(start, end) if text[i].isalnum()):
                result.found[item["kind"]] += 1
            else:
                result.misses.append((item["kind"], line_no))
    return result
