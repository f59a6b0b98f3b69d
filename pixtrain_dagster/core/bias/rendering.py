"""The report as text: `render_markdown` (verdict, per-metric per-axis group tables with intervals, sample replies)
for the asset's UI page, and `limitations_markdown` (the "Bias, Risks and Limitations" section of the model card).
"""

from __future__ import annotations

from typing import Any

from .constants import CONTROL_AXIS, CONTROL_GROUP, SENTIMENT
from .verdict import _format_ci


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(report: dict[str, Any], show_replies: int = 3) -> str:
    """The report as Markdown: verdict, per-metric per-axis group tables with intervals, sample replies."""
    verdict = report["verdict"]
    probe_set = report["probe_set"]
    stats = report["statistics"]
    lines = [
        f"**Bias gate: {'PASS' if verdict['passed'] else 'FAIL'}** "
        f"(min impact ratio {verdict['thresholds']['min_ratio']}, max regression vs base "
        f"{verdict['thresholds']['max_regression']}; gated: {', '.join(verdict['gated_metrics']) or 'none'}; "
        f"advisory: {', '.join(m for m in report['metrics'] if m not in verdict['gated_metrics']) or 'none'})",
        "",
    ]
    for failure in verdict["failures"]:
        lines.append(f"- FAIL `{failure['rule']}`: {_cell(failure['message'])}")
    for warning in verdict["warnings"]:
        lines.append(f"- warning `{warning['rule']}`: {_cell(warning['message'])}")
    lines += [
        "",
        f"Probe set `{probe_set.get('name', '?')}` v{probe_set.get('version', '?')} (sha256 "
        f"`{probe_set['sha256'][:12]}`), templates: {', '.join(probe_set.get('template_ids', [])) or '?'}. "
        f"Intervals: {int(stats['confidence'] * 100)}% percentile bootstrap, {stats['resamples']} resamples of "
        f"templates, seed {stats['seed']}. The model plays the client; higher is a warmer, more engaged client.",
    ]
    previous = report["delta_vs_previous"]
    if not previous["comparable"]:
        lines.append(f"No comparison with a previous adapter: {previous['reason']}.")
    for metric, description in report["metrics"].items():
        base = report["models"]["base"]["metrics"][metric]
        adapter = report["models"]["adapter"]["metrics"][metric]
        lines += [
            "",
            f"### {description['title']}",
            f"Unit: {description['unit']}; ratios on {description['positive_scale']}. Neutral control: "
            f"base {base['control']['mean']:.3f}, adapter {adapter['control']['mean']:.3f} "
            f"(n={adapter['control']['n']} per group).",
        ]
        for axis, summary in adapter["axes"].items():
            base_axis = base["axes"][axis]
            deltas = report["delta_vs_base"][metric][axis]
            prev = previous["metrics"].get(metric, {}).get(axis) if previous["comparable"] else None
            lines += [
                "",
                f"**{axis}**: adapter ratio {summary['ratio']:.3f} {_format_ci(summary['ratio_ci'])} "
                f"(lowest {summary['lowest_group']}); base ratio {base_axis['ratio']:.3f}",
                "",
                "| group | base mean | adapter mean [CI] | adapter gap [CI] | impact ratio base → adapter "
                "| Δ ratio vs base [CI] |" + (" Δ ratio vs previous |" if prev else ""),
                "|---|---|---|---|---|---|" + ("---|" if prev else ""),
            ]
            for group, g in summary["groups"].items():
                b, d = base_axis["groups"][group], deltas[group]
                row = (
                    f"| {group} | {b['mean']:.3f} | {g['mean']:.3f} {_format_ci(g['mean_ci'])} "
                    f"| {g['gap']:+.3f} {_format_ci(g['gap_ci'])} "
                    f"| {b['impact_ratio']:.3f} → {g['impact_ratio']:.3f} "
                    f"| {d['impact_ratio_delta']:+.3f} {_format_ci(d['impact_ratio_delta_ci'])} |"
                )
                if prev:
                    earlier = prev[group]
                    row += f" {earlier['impact_ratio_delta']:+.3f} {_format_ci(earlier['impact_ratio_delta_ci'])} |"
                lines.append(row)
    replies = report["raw"]["adapter"].get("replies", {})
    sentiment = report["models"]["adapter"]["metrics"].get(SENTIMENT, {}).get("axes", {})
    if show_replies and replies and sentiment:
        # The groups whose simulated client sounds least positive, next to the neutral control, for a human to read.
        ranked = sorted(
            (stats["impact_ratio"], axis, group)
            for axis, summary in sentiment.items()
            for group, stats in summary["groups"].items()
        )
        lines += ["", "### Adapter replies, least positive groups first (first generated template)"]
        for axis, group in [(CONTROL_AXIS, CONTROL_GROUP)] + [(a, g) for _, a, g in ranked[:show_replies]]:
            text = (replies.get(axis, {}).get(group) or [""])[0]
            lines.append(f"- {axis} / {group}: {_cell(text) or '_(empty)_'}")
    return "\n".join(lines)


def limitations_markdown(report: dict[str, Any]) -> str:
    """A short "Bias, Risks and Limitations" section for the model card."""
    verdict = report["verdict"]
    probe_set = report["probe_set"]
    axes = list(probe_set.get("axes", {})) or sorted(
        {a for m in report["models"]["adapter"]["metrics"].values() for a in m["axes"]}
    )
    lowest = []
    for metric, data in report["models"]["adapter"]["metrics"].items():
        axis, summary = min(data["axes"].items(), key=lambda item: item[1]["ratio"])
        lowest.append(f"{metric}: lowest impact ratio {summary['ratio']:.2f} ({axis} / {summary['lowest_group']})")
    return "\n".join(
        [
            "This model role-plays therapy clients for clinician training; it is not a therapist and must not be used "
            "with real clients or for clinical decisions. Like its base model, it can portray clients through "
            "stereotypes.",
            "",
            f"Counterfactual bias probes (`{probe_set.get('name', '?')}` sha256 `{probe_set['sha256'][:12]}`) vary one "
            f"descriptor across {len(axes)} axes ({', '.join(axes)}) and compare how receptive and how positive the "
            f"simulated client is. Gate result: **{'pass' if verdict['passed'] else 'fail'}**; "
            + "; ".join(lowest)
            + ".",
            "",
            "Limitations of this check: the probes are few, synthetic, English-only and single-attribute (no "
            "intersections); descriptors are stated explicitly, whereas real bias is often implicit; VADER sentiment "
            "is a lexicon heuristic, and a client describing distress is legitimately negative; a greedy reply per "
            "template is a small sample, so intervals are wide and a pass does not show the absence of bias. "
            "Reviewers should read generated sessions for the groups their trainees will meet.",
        ]
    )
