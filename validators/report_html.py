"""The audit report's page: one self-contained HTML file that a reviewer reads top-down.

1. The first screen (fits 1280x800): the verdict band (RELEASED / WITHHELD / NOT VALIDATED
   and why, in one line), what was released and withheld, the method and its parameters, and
   the gates that decided it.
2. Failing gates only, each with its evidence: value against bound, the worst shards and
   keys, and the plot that shows it.
3. Gates that were not evaluated, required (they block) apart from optional (they do not).
4. Details by family (privacy, utility, quality, run) showing only what applies to the method
   and was measured: no "nan", no plot of empty or constant data, no attribute confusion for
   obscuring methods.
5. The grid of anonymized regions, cut from the released files only.

Each section is one function here; the numbers come from :mod:`veil.validators.report`. Gates,
sample statuses and metrics are rendered from whatever the validation summary holds, so a new
gate or count appears without a change here.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from typing import Any

from veil.validators.report import (
    _FAMILIES,
    _PAIRING,
    MAX_FAILING_KEYS,
    _names,
    gate_blocks,
    metric_family,
    metric_label,
)

#: Rows of the first screen's gate table; the rest are in the full table under Details.
MAX_SUMMARY_GATES = 14
#: Quarantined samples listed by key under Run (all of them are in the manifests).
MAX_QUARANTINE_ROWS = 500

#: What a sample status of the validation's samples table means for the release.
_STATUS_LABELS = {
    "paired": "released, compared with its original",
    "no_image_released": "released metadata with no image (nothing to check)",
    "missing_original": "released with no original to check against",
    "error": "released, could not be compared with its original",
    "not_released": "withheld: quarantined by Veil",
    "missing_anonymized": "withheld: no released copy",
}

#: Detail groups: title and the metric families they show. Detection goes to privacy for
#: obscuring methods (a face found again is a leak) and to utility for synthesis (it must be).
_GROUPS = {
    "privacy": ("Privacy", ("identity", "restored", "leakage", "residual")),
    "utility": ("Utility", ("attributes", "utility")),
    "quality": ("Quality", ("distribution", "background", "face")),
    "run": ("Run", ("other",)),
}


class Markup(str):
    """Table cell content that is already HTML (escaped where it holds data)."""


def esc(value: Any) -> str:
    return html.escape(str(value))


def _cell(value: Any) -> str:
    return value if isinstance(value, Markup) else esc(value)


def table(
    headers: list[str] | None,
    rows: list[list[Any]],
    *,
    row_attrs: list[str] | None = None,
    cls: str = "",
    row_headers: bool = False,
) -> str:
    """A table with column headers (None: a key-value table, whose first cells are row
    headers); with ``row_headers`` the first cell of each row is a row header."""
    row_headers = row_headers or headers is None
    head = "".join(f"<th scope='col'>{esc(h)}</th>" for h in headers or [])
    attrs = row_attrs or [""] * len(rows)
    body = []
    for a, row in zip(attrs, rows, strict=True):
        cells = [
            f"<th scope='row'>{_cell(row[0])}</th>" if row_headers else f"<td>{_cell(row[0])}</td>"
        ]
        cells += [f"<td>{_cell(c)}</td>" for c in row[1:]]
        body.append(f"<tr{a}>{''.join(cells)}</tr>")
    klass = f" class='{cls}'" if cls else ""
    thead = f"<thead><tr>{head}</tr></thead>" if headers is not None else ""
    return f"<table{klass}>{thead}<tbody>{''.join(body)}</tbody></table>"


def measured(value: Any) -> bool:
    """A value worth showing: not None, not NaN or infinite."""
    if value is None:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def fmt(value: Any) -> str:
    if not measured(value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _plot_img(name: str, b64: str) -> str:
    return (
        f"<img alt='plot: {esc(name)}' data-plot='{esc(name)}' src='data:image/png;base64,{b64}'>"
    )


_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fff}
.verdict{padding:12px 32px 12px;color:#fff}
.verdict.released{background:#1b7f3b}.verdict.withheld{background:#b42318}
.verdict.not_validated{background:#5b6270}
.verdict .kicker{margin:0;font-size:13px}
.verdict h1{margin:0;font-size:40px;line-height:1.15;letter-spacing:.04em}
.verdict .why{margin:.2em 0 0;font-size:17px;max-width:1200px}
main{padding:0 32px 32px;max-width:1280px}
#overview{display:grid;grid-template-columns:minmax(0,5fr) minmax(0,7fr);gap:0 32px;
 padding:4px 0 10px;border-bottom:4px solid #1f4e79}
#overview h2{font-size:13px;margin:.7em 0 .3em;text-transform:uppercase;letter-spacing:.06em;color:#444}
#overview p{margin:.2em 0}
h2{font-size:20px;margin:1.2em 0 .4em}h3{font-size:16px;margin:1em 0 .3em}h4{font-size:14px;margin:.8em 0 .2em}
table{border-collapse:collapse;margin:.3em 0 1em}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:#f2f4f7;border-bottom:1px solid #aab}
tbody th{font-weight:500}.measure b{font-size:16px}
table.compact th,table.compact td{padding:2px 6px;font-size:13px}
table.gates td{white-space:nowrap}
.st{font-weight:700}.st-failed{color:#b42318}.st-passed{color:#1b7f3b}.st-not_evaluated{color:#9a5b00}
.bad{color:#b42318}.ok{color:#1b7f3b}.muted{color:#666}small{color:#555}
code{font-size:12px}
.keys{columns:4;font-size:12px;margin:.2em 0 .6em;padding-left:1.4em}
.plots{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
img{max-width:100%;height:auto}
article.failing{border-left:4px solid #b42318;padding:0 0 4px 14px;margin:0 0 18px}
article.failing.warning{border-left-color:#9a5b00}article.warning .measure b.bad{color:#9a5b00}
.grid{display:flex;flex-wrap:wrap;gap:6px}.grid figure{margin:0;font-size:11px}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}
@media print{.verdict{print-color-adjust:exact;-webkit-print-color-adjust:exact}
 main{padding:0 8px}article.failing,figure,img,table{break-inside:avoid}}
"""


def render_page(report: dict[str, Any], plots: dict[str, str], grid: list[dict[str, str]]) -> str:
    """The whole page. ``plots`` are base64 PNGs by name (run and validation plots), ``grid``
    the anonymized crops (empty for a validation-only folder)."""
    title = "Veil audit report" if "run" in report.get("contents", []) else "Veil validation report"
    validation = report.get("validation")
    shown: set[str] = set()  # plots already placed as evidence of a failing gate
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{esc(title)}: {esc(report['verdict']['label'])}</title><style>{_CSS}</style></head><body>",
        verdict_band(report, title),
        "<main>",
        overview(report),
    ]
    if validation is not None and validation.get("status") != "unreadable":
        parts.append(failing_gates(validation, plots, shown))
        parts.append(not_evaluated_gates(validation))
    parts.append(details(report, plots, shown))
    if "run" in report.get("contents", []):
        parts.append(grid_section(grid))
    parts.append("</main></body></html>")
    return "".join(parts)


# ------------------------------------------------------------------------------ first screen


def verdict_band(report: dict[str, Any], title: str) -> str:
    v = report["verdict"]
    return (
        f"<header id='verdict' class='verdict {esc(v['status'])}' data-status='{esc(v['status'])}'>"
        f"<p class='kicker'>{esc(title)} &middot; <code>{esc(report.get('output'))}</code></p>"
        f"<h1>{esc(v['label'])}</h1><p class='why'>{esc(v['why'])}</p></header>"
    )


def overview(report: dict[str, Any]) -> str:
    left = "<div>" + release_summary(report) + method_block(report) + "</div>"
    right = "<div>" + deciding_gates(report.get("validation")) + "</div>"
    return f"<section id='overview' aria-label='Summary'>{left}{right}</section>"


def release_summary(report: dict[str, Any]) -> str:
    """What was released and withheld: from the manifests of a run, else from the statuses of
    the validation's samples table (one row per key of either dataset)."""
    rows: list[list[Any]] = []
    validation = report.get("validation") or {}
    if "run" in report.get("contents", []):
        counts = report.get("counts") or {}
        released = counts.get("anonymized", 0) + counts.get("clean", 0)
        rows.append(
            [
                "released",
                f"{released} samples ({counts.get('anonymized', 0)} anonymized, "
                f"{counts.get('clean', 0)} with no face found)",
            ]
        )
        withheld = counts.get("quarantined", 0)
        reasons = list((report.get("quarantine_reasons") or {}).items())
        why = ", ".join(f"{reason} {n}" for reason, n in reasons[:3])
        why += f", {len(reasons) - 3} more reasons" if len(reasons) > 3 else ""
        rows.append(
            [
                "withheld",
                Markup(
                    f"<span class='{'bad' if withheld else 'ok'}'>{withheld} quarantined"
                    f"</span>" + (f": {esc(why)}" if why else "")
                ),
            ]
        )
        keys = report.get("keys") or {}
        duplicated = keys.get("duplicated") or []
        if duplicated:
            rows.append(
                [
                    "input keys",
                    Markup(
                        f"<span class='bad'>{keys.get('manifest_rows')} manifest rows for "
                        f"{keys.get('distinct')} keys; repeated: "
                        f"{esc(', '.join(duplicated[:5]))}</span>"
                    ),
                ]
            )
        else:
            rows.append(
                [
                    "input keys",
                    f"all {keys.get('distinct', report.get('samples'))} in the manifests, "
                    "each exactly once",
                ]
            )
        if validation.get("pairing"):
            pairing = validation["pairing"]
            rows.append(
                [
                    "validated",
                    f"{fmt(pairing.get('pairs'))} pairs, "
                    f"{fmt(pairing.get('faces_original'))} original faces",
                ]
            )
    elif validation.get("statuses"):
        statuses = validation["statuses"]
        # Released statuses first, then withheld, then any other the validation counts.
        order = list(_STATUS_LABELS)
        for status, n in sorted(
            statuses.items(),
            key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]),
        ):
            label = _STATUS_LABELS.get(status, status.replace("_", " "))
            bad = status in ("missing_original", "error") and n
            rows.append([Markup(f"<span class='bad'>{esc(label)}</span>") if bad else label, n])
        rows.append(["keys accounted for (one per key of either dataset)", sum(statuses.values())])
    else:
        return "<h2 id='release'>Released and withheld</h2><p class='muted'>No per-sample table was found.</p>"
    return "<h2 id='release'>Released and withheld</h2>" + table(None, rows, cls="compact")


def method_block(report: dict[str, Any]) -> str:
    m = report.get("method") or {}
    kind = {
        "synthesis": "identity replacement",
        "obscuring": "obscuring",
        "unknown": "made by another tool",
    }.get(m.get("kind"), m.get("kind"))
    lines = [f"<b>{esc(m.get('name'))}</b> <span class='muted'>({esc(kind)})</span>"]
    if m.get("params"):
        lines.append(esc(m["params"]))
    elif "run" not in report.get("contents", []):
        validation = report.get("validation") or {}
        lines.append(
            f"<small>parameters not recorded: the dataset <code>{esc(validation.get('anonymized'))}"
            f"</code> was validated as given against <code>{esc(validation.get('original'))}</code></small>"
        )
    if m.get("detection"):
        lines.append(f"<small>{esc(m['detection'])}</small>")
    return "<h2 id='method'>Method</h2><p>" + "<br>".join(lines) + "</p>"


def _gate_order(gate: dict[str, Any]) -> int:
    """Failed, then required but not evaluated (both block), passed, then what never blocks."""
    status = str(gate.get("status"))
    if not gate_blocks(gate):
        return 3
    if status == "not_evaluated":
        return 1 if gate.get("required") else 3
    return 0 if status == "failed" else 2


def deciding(gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gates that decide the release: every evaluated blocking one and the required ones
    that could not be evaluated (those fail it); failures first."""
    return sorted(
        (
            g
            for g in gates
            if gate_blocks(g) and (g.get("status") != "not_evaluated" or g.get("required"))
        ),
        key=_gate_order,
    )


def optional_not_evaluated(gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        g
        for g in gates
        if g.get("status") == "not_evaluated" and not (g.get("required") and gate_blocks(g))
    ]


def failed_warnings(gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g for g in gates if g.get("status") == "failed" and not gate_blocks(g)]


def bound_text(gate: dict[str, Any]) -> str:
    lo, hi = gate.get("min"), gate.get("max")
    if measured(lo) and measured(hi):
        bound = f"{fmt(lo)} to {fmt(hi)}"
    elif measured(lo):
        bound = f">= {fmt(lo)}"
    elif measured(hi):
        bound = f"<= {fmt(hi)}"
    else:
        bound = "-"
    if (gate.get("table") or "dataset") != "dataset":
        mostly = gate.get("mostly")
        share = f"{mostly:.0%}" if measured(mostly) else "100%"
        rows = "every row" if share == "100%" else f">= {share} of rows"
        return f"{gate.get('metric')} {bound} in {rows}"
    return bound


def overridden_text(gate: dict[str, Any]) -> str:
    """What the run's gates file changed in the gate it extends ("" when nothing), e.g.
    ``changed by the gates file: severity critical -> warning``."""
    changes = gate.get("overridden") or {}
    if not changes:
        return ""
    parts = [f"{name} {fmt(old)} -> {fmt(new)}" for name, (old, new) in sorted(changes.items())]
    return "changed by the gates file: " + "; ".join(parts)


def value_text(gate: dict[str, Any]) -> str:
    if gate.get("status") == "not_evaluated":
        return "not evaluated"
    value = gate.get("value")
    if (gate.get("table") or "dataset") != "dataset" and measured(value):
        return f"{value:.1%} of rows"
    return fmt(value)


def _status_cell(gate: dict[str, Any]) -> Markup:
    st = str(gate.get("status"))
    word = {"passed": "pass", "failed": "FAIL", "not_evaluated": "not evaluated"}.get(st, st)
    return Markup(f"<span class='st st-{esc(st)}'>{esc(word)}</span>")


def _gate_row_attrs(gate: dict[str, Any]) -> str:
    return (
        f" class='gate' data-gate='{esc(gate.get('name'))}' data-status='{esc(gate.get('status'))}'"
        f" data-required='{'yes' if gate.get('required') else 'no'}'"
    )


def deciding_gates(validation: dict[str, Any] | None) -> str:
    head = "<h2 id='deciding-gates'>Gates that decided it</h2>"
    if validation is None:
        return head + (
            "<p class='muted'>None were run. <code>veil validate --original IN --anonymized OUT "
            "--output OUT</code> (or <code>veil run --gates default</code>) measures the release "
            "and writes RELEASE.json only when every gate passes.</p>"
        )
    if validation.get("status") == "unreadable":
        return head + f"<p class='bad'>Unknown: {esc(validation.get('error'))}</p>"
    gates = validation.get("gates") or []
    rows = deciding(gates)
    if not rows:
        return head + "<p class='muted'>No gate was evaluated.</p>"
    shown = rows[:MAX_SUMMARY_GATES]
    body = table(
        ["gate", "result", "value", "bound"],
        [[g.get("name"), _status_cell(g), value_text(g), bound_text(g)] for g in shown],
        row_attrs=[_gate_row_attrs(g) for g in shown],
        cls="compact gates",
        row_headers=True,
    )
    notes = []
    if len(rows) > len(shown):
        notes.append(
            f"{len(rows) - len(shown)} more passed gates: see <a href='#gates'>all gates</a>"
        )
    warnings = failed_warnings(gates)
    if warnings:
        notes.append(
            f"<a href='#failing-warnings'>{len(warnings)} warning gate{'s' if len(warnings) > 1 else ''}"
            "</a> failed (do not block)"
        )
    changed = [g for g in gates if g.get("overridden")]
    if changed:
        notes.append(
            f"<a href='#gates'>{len(changed)} gate{'s' if len(changed) > 1 else ''}</a> changed by "
            f"the gates file ({esc(_names([str(g.get('name')) for g in changed]))})"
        )
    optional = optional_not_evaluated(gates)
    if optional:
        notes.append(
            f"<a href='#not-evaluated'>{len(optional)} optional gate{'s' if len(optional) > 1 else ''}"
            "</a> not evaluated (do not block)"
        )
    return head + body + (f"<p><small>{'; '.join(notes)}.</small></p>" if notes else "")


# ----------------------------------------------------------------------------- failing gates


def evidence_plots(gate: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """Names of the plots that show why ``gate`` failed (those that were drawn)."""
    metric = str(gate.get("metric") or "")
    table_name = gate.get("table") or "dataset"
    parts = metric.split(".")
    wanted: list[str] = []
    if table_name == "samples":
        wanted.append(f"shards-{metric}")
    elif table_name == "faces":
        for prefix in ("reidentified_", "sim_", "score_", "rank_"):
            if metric.startswith(prefix):
                wanted.append(f"verification-{metric.removeprefix(prefix)}")
        if metric.startswith("detected_"):
            wanted.append("detection-rate")
    elif parts[0] == "identity" and len(parts) == 3:
        wanted += [f"verification-{parts[1]}", f"shards-max_score_{parts[1]}"]
    elif parts[0] == "leakage" and len(parts) == 3:
        wanted.append(f"verification-{parts[2]}")
    elif parts[0] == "detection":
        wanted.append("detection-rate")
    elif parts[0] == "attributes" and len(parts) == 2:
        wanted.append(f"confusion-{parts[1].split('_')[0]}")
    elif parts[0] == "residual":
        wanted.append("shards-residual_faces")
    elif parts[0] == "background" and len(parts) == 2:
        wanted.append(f"shards-background_{parts[1].split('_')[0]}")
    return [name for name in wanted if name in plots]


def _metric_cell(gate: dict[str, Any]) -> Markup:
    metric = str(gate.get("metric") or "")
    if (gate.get("table") or "dataset") == "dataset":
        return Markup(f"{esc(metric_label(metric))} <code>{esc(metric)}</code>")
    return Markup(f"column <code>{esc(metric)}</code> of each {esc(gate.get('table'))} row")


def failing_gates(validation: dict[str, Any], plots: dict[str, str], shown: set[str]) -> str:
    """Only the gates that failed, each with value against bound, the shards and keys that
    drove it, and its plots (which then are not repeated under Details)."""
    gates = validation.get("gates") or []
    failed = [g for g in gates if g.get("status") == "failed" and gate_blocks(g)]
    warnings = failed_warnings(gates)
    parts = ["<section id='failing'><h2>Failing gates</h2>"]
    if not failed:
        parts.append("<p class='ok'>No gate that decides the release failed.</p>")
    for g in failed + warnings:
        if warnings and g is warnings[0]:
            parts.append(
                "<h3 id='failing-warnings'>Warnings: failed, but they do not block the release</h3>"
            )
        name = esc(g.get("name"))
        if not gate_blocks(g):
            required = f"{g.get('severity')}: reported only"
        else:
            required = (
                "required"
                if g.get("required")
                else "optional, but a failure still blocks the release"
            )
        warn = "" if gate_blocks(g) else " warning"
        parts.append(
            f"<article class='failing{warn}' data-failing-gate='{name}'><h3>{name} "
            f"<small>({esc(required)})</small></h3>"
        )
        if g.get("description"):
            parts.append(f"<p>{esc(g['description'])}</p>")
        changed = overridden_text(g)
        if changed:
            parts.append(f"<p class='changed'>{esc(changed)}</p>")
        off = f" (off by {fmt(g.get('margin'))})" if measured(g.get("margin")) else ""
        parts.append(
            f"<p class='measure'>value <b class='bad'>{esc(value_text(g))}</b> against bound "
            f"<b>{esc(bound_text(g))}</b>{esc(off)}<br><small>{_metric_cell(g)}</small></p>"
        )
        if g.get("reason"):
            parts.append(f"<p>{esc(g['reason'])}</p>")
        parts.append(_worst_shards(g))
        keys = [str(k) for k in (g.get("failing_keys") or [])][:MAX_FAILING_KEYS]
        if keys:
            noun = (
                "faces" if g.get("table") == "faces" or any("#" in k for k in keys) else "samples"
            )
            parts.append(
                f"<h4>{len(keys)} {noun} that drove it, worst first</h4><ul class='keys'>"
                + "".join(f"<li><code>{esc(k)}</code></li>" for k in keys)
                + "</ul>"
            )
        elif (g.get("table") or "dataset") == "dataset":
            parts.append("<p class='muted'>A dataset-level metric: no single sample drove it.</p>")
        names = evidence_plots(g, plots)
        if names:
            parts.append(
                "<div class='plots'>" + "".join(_plot_img(n, plots[n]) for n in names) + "</div>"
            )
            shown.update(names)
        parts.append("</article>")
    parts.append("</section>")
    return "".join(parts)


def _worst_shards(gate: dict[str, Any]) -> str:
    shards = gate.get("worst_shards") or []
    if not shards:
        return ""
    if "rows_outside" in shards[0]:
        rows = [[s["shard"], f"{s['rows_outside']} of {s['rows']}"] for s in shards]
        return "<h4>Worst shards</h4>" + table(
            ["shard", "rows outside the bound"], rows, cls="compact"
        )
    rows = [[s["shard"], fmt(s.get("value"))] for s in shards]
    return "<h4>Worst shards</h4>" + table(["shard", "its own value"], rows, cls="compact")


def not_evaluated_gates(validation: dict[str, Any]) -> str:
    """Gates that could not be evaluated (a model is missing, no row to check): required ones
    block the release, optional ones do not; neither is a failure."""
    gates = [g for g in validation.get("gates") or [] if g.get("status") == "not_evaluated"]
    if not gates:
        return ""
    parts = ["<section id='not-evaluated'><h2>Not evaluated</h2>"]
    for required, title in (
        (True, "Required: these block the release"),
        (False, "Optional: reported only, they do not block the release"),
    ):
        group = [g for g in gates if bool(g.get("required") and gate_blocks(g)) == required]
        if not group:
            continue
        parts.append(f"<h3>{esc(title)}</h3><ul>")
        parts.extend(
            f"<li data-not-evaluated='{esc(g.get('name'))}'><b>{esc(g.get('name'))}</b>: not evaluated: "
            f"{esc(g.get('reason') or 'no reason recorded')}</li>"
            for g in group
        )
        parts.append("</ul>")
    parts.append("</section>")
    return "".join(parts)


# ---------------------------------------------------------------------------------- details


def plot_group(name: str, kind: str) -> str:
    """The detail group a plot belongs to."""
    if (
        name.startswith(("verification-", "certify_", "shards-max_score_"))
        or name == "shards-residual_faces"
    ):
        return "privacy"
    if name.startswith("confusion-"):
        return "utility"
    if name == "detection-rate":
        return "privacy" if kind == "obscuring" else "utility"
    if name in ("status", "faces_per_image", "scores", "stages"):
        return "run"
    return "quality"


def metric_group(name: str, kind: str) -> str | None:
    """The detail group of a flat metric, or None when it does not apply to the method
    (attributes of an obscured face) or belongs to the pairing counts."""
    family = metric_family(name)
    if family == "pairing" or (family == "attributes" and kind == "obscuring"):
        return None
    if family == "detection":
        return "privacy" if kind == "obscuring" else "utility"
    for group, (_, families) in _GROUPS.items():
        if family in families:
            return group
    return "run"


def details(report: dict[str, Any], plots: dict[str, str], shown: set[str]) -> str:
    kind = (report.get("method") or {}).get("kind", "unknown")
    validation = report.get("validation") or {}
    metrics = validation.get("metrics") or {}
    by_group: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in sorted(metrics):
        group = metric_group(name, kind)
        if (
            group is not None
            and measured(metrics[name])
            and not isinstance(metrics[name], dict | list)
        ):
            by_group[group][metric_family(name)].append(name)
    parts = ["<section id='details'><h2>Details</h2>"]
    if validation.get("gates"):
        parts.append(all_gates(validation["gates"]))
    extra = {"privacy": _run_privacy(report), "run": run_details(report)}
    for group, (title, _) in _GROUPS.items():
        body = []
        for family, names in by_group[group].items():
            body.append(
                f"<h4 data-family='{esc(family)}'>{esc(_FAMILIES.get(family, family))}</h4>"
            )
            body.append(
                table(
                    ["measure", "value"],
                    [
                        [
                            Markup(f"{esc(metric_label(n))} <small><code>{esc(n)}</code></small>"),
                            fmt(metrics[n]),
                        ]
                        for n in names
                    ],
                    cls="compact",
                    row_headers=True,
                )
            )
        if group == "utility" and kind == "obscuring":
            body.append(
                "<p class='muted'>Attributes (gender, expression, age) are not compared for obscuring "
                "methods: read off a blurred or filled face they mean nothing.</p>"
            )
        group_plots = [n for n in plots if plot_group(n, kind) == group and n not in shown]
        figures = (
            "<div class='plots'>" + "".join(_plot_img(n, plots[n]) for n in group_plots) + "</div>"
            if group_plots
            else ""
        )
        # The run's tables say more than its plots; elsewhere the plots follow their metrics.
        body += (
            [extra.get(group, ""), figures] if group == "run" else [figures, extra.get(group, "")]
        )
        if not any(body):
            body.append("<p class='muted'>Nothing was measured here for this method.</p>")
        parts.append(
            f"<section id='details-{group}' data-group='{group}'><h3>{esc(title)}</h3>{''.join(body)}"
            "</section>"
        )
    parts.append("</section>")
    return "".join(parts)


def _decides(gate: dict[str, Any]) -> str:
    if not gate_blocks(gate):
        return f"no ({gate.get('severity')})"
    return "yes" if gate.get("required") else "if evaluated"


def _gate_name_cell(gate: dict[str, Any]) -> Markup:
    """Name and description, and what the gates file changed in the gate, if anything."""
    cell = f"{esc(gate.get('name'))}<br><small>{esc(gate.get('description') or '')}</small>"
    changed = overridden_text(gate)
    if changed:
        cell += f"<br><small class='changed'>{esc(changed)}</small>"
    return Markup(cell)


def all_gates(gates: list[dict[str, Any]]) -> str:
    gates = sorted(gates, key=_gate_order)
    rows = [
        [
            _gate_name_cell(g),
            g.get("category") or "-",
            _metric_cell(g),
            value_text(g),
            bound_text(g),
            _status_cell(g),
            _decides(g),
            fmt(g.get("margin")) if g.get("status") == "failed" else "-",
            g.get("reason") or "",
        ]
        for g in gates
    ]
    return "<h3 id='gates'>All gates</h3>" + table(
        [
            "gate",
            "category",
            "measured",
            "value",
            "bound",
            "result",
            "blocks the release",
            "off by",
            "note",
        ],
        rows,
        row_attrs=[_gate_row_attrs(g) for g in gates],
        row_headers=True,
    )


def _run_privacy(report: dict[str, Any]) -> str:
    parts = []
    if report.get("pii"):
        parts.append(pii_table(report["pii"]))
    if report.get("synthesis"):
        parts.append(synthesis_table(report["synthesis"]))
    if report.get("pairing"):
        parts.append(pairing_block(report["pairing"], report.get("_pool_sheet")))
    e = report.get("epsilon")
    if e:
        parts.append(
            "<h4 id='dp'>Differential privacy</h4>"
            f"<p>DP pixelization on {e['samples']} samples; per-region epsilon min {e['min']:.3g}, "
            f"median {e['median']:.3g}, max {e['max']:.3g}.</p>"
        )
    return "".join(parts)


def pii_table(pii: dict[str, Any]) -> str:
    """Personal data per class: policy, what was found, kept, and quarantined by the re-scan;
    entity types only, never what was read."""
    classes = pii.get("classes") or []
    if [c["class"] for c in classes] == ["faces"]:
        return ""  # a faces-only run: the face figures above say it all

    def n(value: Any) -> Any:
        return "-" if value is None else value

    rows = [[c["class"], c["policy"], n(c["regions"] if c["class"] != "metadata" else c["redactions"]),
             c["samples"], n(c["kept"]), c["residual_quarantined"]] for c in classes]
    ents = ", ".join(f"{k}: {v}" for k, v in (pii.get("text_entities") or {}).items()) or "-"
    red = ", ".join(f"{k}: {v}" for k, v in (pii.get("redacted_entities") or {}).items()) or "-"
    return ("<h4 id='pii'>Personal data by class</h4>"
            "<p>Each class was searched by its own detector and anonymized by its policy; the "
            "re-scan ran every class's detector again on the released bytes. Only entity types are "
            "recorded, never the text read.</p>"
            + table(["class", "policy", "regions (text fields: spans redacted)", "samples",
                     "kept unchanged", "quarantined: still found after re-scan"], rows, cls="compact")
            + table(["", "value"], [[f"image text entities (scope {pii.get('text_scope') or 'pii'})", ents],
                                    ["text-field entities redacted", red]], cls="compact", row_headers=True))


def pairing_block(pairing: dict[str, Any], sheet_b64: str | None) -> str:
    """Pool and pseudo-identity figures, with the pool's contact sheet (generated faces only:
    a pool imported from photos has none)."""
    dist = pairing.get("pair_distance")
    info = pairing.get("pool_info") or {}
    rows = [
        # Plain strings: table() escapes them.
        ["pool", f"{pairing.get('pool')} ({info.get('generator', '?')}, {info.get('count', '?')} faces)"],
        ["pairing distance in attribute space",
         f"median {dist['median']:.3f} (min {dist['min']:.3f}, max {dist['max']:.3f})" if dist else "-"],
    ]
    if pairing.get("pseudo_identities") is not None:
        per = ", ".join(f"{n} face(s): {k}" for n, k in pairing["faces_per_pseudo_identity"].items())
        rows.append(["released faces with a pseudo-identity", pairing["faces_with_pseudo_identity"]])
        rows.append(["pseudo-identities (one per real person found)", pairing["pseudo_identities"]])
        rows.append(["pseudo-identities by number of released faces", per or "-"])
    img = (f"<p><img alt='synthetic pool faces' style='max-width:100%' "
           f"src='data:image/png;base64,{sheet_b64}'></p>" if sheet_b64 else "")
    return ("<h4 id='pairing'>Synthetic pool and pseudo-identities</h4>"
            "<p>Real faces were paired with synthetic faces of other identities; with "
            "pseudo-identities, every face of one real person became the same synthetic person. "
            "The mapping is not written anywhere. Pool faces below are generated, never real.</p>"
            + table(["", "value"], rows, cls="compact", row_headers=True) + img)


def synthesis_table(syn: dict[str, Any]) -> str:
    """The FSAP figures: what was done to each face and how its identity changed (numbers only:
    the faces appear in the grid, cut from the released files)."""

    def d(stats: dict[str, Any] | None, spec: str = ".3f") -> str:
        if not stats:
            return "-"
        return (
            f"median {format(stats['median'], spec)} (min {format(stats['min'], spec)}, "
            f"max {format(stats['max'], spec)})"
        )

    rows = [
        ["faces with a synthesis record", syn["faces"]],
        [f"identity replaced ({syn.get('method', 'fsap')})", syn["optimised"]],
        ["too small for a recognizer: obscured by the fallback", syn["fallback"]],
        ["faces in quarantined samples (not released)", syn["in_quarantined_samples"]],
        ["latent space / optimised recognizer", f"{syn.get('latent')} / {syn.get('recognizer')}"],
        ["iterations per face", d(syn["iterations"], ".0f")],
        [
            "rounds (0 = first optimisation passed)",
            ", ".join(f"{k}: {v}" for k, v in syn["rounds"].items()) or "-",
        ],
        [f"final similarity under {syn.get('recognizer')} (1 = same face)", d(syn["similarity"])],
        ["seconds per face", d(syn["seconds_per_face"], ".1f")],
    ]
    for name, cert in syn["certifiers"].items():
        rule = (
            f"same person if {'<=' if cert['metric'] == 'euclidean' else '>='} {cert['threshold']}"
        )
        rows.append([f"{name} (certifying) score before encoding, {rule}", d(cert["score"])])
        rows.append([f"{name} score on the released bytes", d(cert["released"])])
    return (
        f"<h4 id='synthesis'>Identity replacement ({'diffusion' if syn.get('method') == 'diffusion' else 'FSAP'})</h4>"
        "<p>Each face was moved away from its identity in a latent space, against one recognizer, "
        "and certified by another on the released image; a face still matched is optimised again "
        "more strongly, then its sample is quarantined.</p>"
        + table(["", "value"], rows, cls="compact", row_headers=True)
    )


def run_details(report: dict[str, Any]) -> str:
    """Counts, shards, detections, throughput, quarantined keys, pairing, recognizers, models,
    environment and configuration."""
    validation = report.get("validation") or {}
    parts = []
    if "run" in report.get("contents", []):
        counts, t = report["counts"], report["throughput"]
        ips = t.get("images_per_second")
        parts.append(
            "<h4 id='summary'>Samples</h4>"
            + table(
                [
                    "samples",
                    "anonymized",
                    "clean",
                    "quarantined",
                    "faces anonymized",
                    "images/s",
                    "runner",
                    "phase",
                ],
                [
                    [
                        report["samples"],
                        counts.get("anonymized", 0),
                        counts.get("clean", 0),
                        counts.get("quarantined", 0),
                        report["faces"],
                        f"{ips:.2f}" if measured(ips) and ips else "-",
                        t.get("runner") or "-",
                        report.get("phase") or "-",
                    ]
                ],
                cls="compact",
            )
        )
        if report["quarantined"]:
            parts.append("<h4 id='quarantine'>Quarantined samples (not released)</h4>")
            parts.append(
                table(
                    ["reason", "count"],
                    [[k, v] for k, v in report["quarantine_reasons"].items()],
                    cls="compact",
                )
            )
            parts.append(
                table(
                    ["key", "shard", "reason"],
                    [
                        [q["key"], q["shard"], q["reason"]]
                        for q in report["quarantined"][:MAX_QUARANTINE_ROWS]
                    ],
                    cls="compact",
                )
            )
        parts.append(
            "<h4 id='shards'>Shards</h4>"
            + table(
                ["shard", "samples", "anonymized", "clean", "quarantined", "faces", "CPU s"],
                [
                    [
                        s["shard"],
                        s["samples"],
                        s["anonymized"],
                        s["clean"],
                        s["quarantined"],
                        s["faces"],
                        s["cpu_seconds"],
                    ]
                    for s in report["shards"]
                ],
                cls="compact",
            )
        )
        parts.append("<h4 id='detections'>Detections</h4>")
        if report["detections_by_detector"]:
            parts.append(
                table(
                    ["detector", "regions"],
                    [[k, v] for k, v in report["detections_by_detector"].items()],
                    cls="compact",
                )
            )
        s = report.get("score_summary")
        if s:
            parts.append(
                f"<p>Detector scores: min {s['min']:.2f}, median {s['median']:.2f}, max {s['max']:.2f}.</p>"
            )
        if report["rescan_rounds"]:
            parts.append(
                table(
                    ["re-scan strengthening rounds", "samples"],
                    [[k, v] for k, v in report["rescan_rounds"].items()],
                    cls="compact",
                )
            )
        if t["median_stage_seconds"]:
            parts.append(
                "<h4 id='throughput'>Throughput</h4>"
                + table(
                    ["stage", "median ms / image"],
                    [[k, f"{v * 1000:.1f}"] for k, v in t["median_stage_seconds"].items()],
                    cls="compact",
                )
            )
    if validation:
        parts.append(_validation_run(validation))
    models = [("run", m) for m in report.get("models") or []] + [
        ("validation", m) for m in validation.get("models") or []
    ]
    if models:
        parts.append(
            "<h4 id='models'>Models</h4>"
            + table(
                ["used by", "name", "sha256", "license", "used for", "path / error"],
                [
                    [
                        who,
                        m.get("name") or "-",
                        _sha_cell(m.get("sha256")),
                        m.get("license") or "-",
                        m.get("used_for") or "-",
                        m.get("path") or m.get("error") or "-",
                    ]
                    for who, m in models
                ],
                cls="compact",
            )
        )
    env = report.get("environment") or {}
    if env.get("packages"):
        parts.append(
            "<h4 id='environment'>Environment</h4><details><summary>package versions</summary>"
            + table(
                ["package", "version"], [[k, v] for k, v in env["packages"].items()], cls="compact"
            )
            + "</details>"
        )
    if report.get("config"):
        parts.append(
            "<h4 id='config'>Run configuration</h4><details><summary>configuration as run</summary>"
            f"<pre>{esc(json.dumps(report.get('config'), indent=2, default=str))}</pre></details>"
        )
    return "".join(parts)


def _gates_files_cell(validation: dict[str, Any]) -> Any:
    """The gates file and each file it extends, with the start of its sha256 (summary.json
    has them whole); older summaries name the file only."""
    files = validation.get("gates_files") or []
    if not files:
        return fmt(validation.get("gates_file"))
    lines = [f"<code>{esc(f.get('file'))}</code> <small>sha256 {esc(str(f.get('sha256'))[:12])}</small>"
             for f in files]
    return Markup("<br>extends ".join(lines))


def _validation_run(validation: dict[str, Any]) -> str:
    parts = ["<h4 id='validation-run'>Validation</h4>"]
    seconds, ips = validation.get("seconds"), validation.get("images_per_second")
    facts = [
        ["originals", Markup(f"<code>{esc(fmt(validation.get('original')))}</code>")],
        ["anonymized", Markup(f"<code>{esc(fmt(validation.get('anonymized')))}</code>")],
        ["gates file", _gates_files_cell(validation)],
        ["RELEASE.json", validation.get("release_file") or "not present"],
    ]
    if measured(seconds):
        facts.append(
            ["time", f"{fmt(seconds)} s" + (f", {fmt(ips)} images/s" if measured(ips) else "")]
        )
    parts.append(table(None, facts, cls="compact"))
    pairing = {k: v for k, v in (validation.get("pairing") or {}).items() if measured(v)}
    if pairing:
        parts.append(
            table(
                [_PAIRING[k][0] if k in _PAIRING else k for k in pairing],
                [[fmt(v) for v in pairing.values()]],
                cls="compact",
            )
        )
    statuses = validation.get("statuses") or {}
    if statuses:
        parts.append(
            table(
                ["sample status", "keys"],
                [[_STATUS_LABELS.get(k, k.replace("_", " ")), v] for k, v in statuses.items()],
                cls="compact",
            )
        )
    tables = validation.get("tables") or {}
    parts.append(
        f"<p class='muted'>Tables: {fmt((tables.get('samples') or {}).get('rows'))} sample rows, "
        f"{fmt((tables.get('faces') or {}).get('rows'))} face rows, "
        f"{fmt(validation.get('per_shard_count'))} shards (validation/summary.json).</p>"
    )
    recognizers = validation.get("recognizers") or {}
    if recognizers:
        rows = []
        for name, info in sorted(recognizers.items()):
            info = info or {}
            metric, threshold = info.get("metric"), info.get("threshold")
            rule = "-"
            if metric in ("cosine", "euclidean") and measured(threshold):
                rule = f"{'cosine similarity >=' if metric == 'cosine' else 'distance <='} {fmt(threshold)}"
            rows.append(
                [
                    name,
                    "available"
                    if info.get("available")
                    else Markup(
                        f"<span class='bad'>not available</span>: {esc(info.get('reason') or '')}"
                    ),
                    rule,
                    info.get("role") or "-",
                ]
            )
        independent = (validation.get("details") or {}).get("independent_recognizers")
        note = ""
        if independent == []:
            note = (
                "<p class='bad'>No available recognizer is independent of this release: each one"
                " was optimised against or certified it, so their verdicts hold by construction."
                " Add one the method never saw (e.g. facenet-vggface2, with its weights).</p>"
            )
        parts.append(
            "<h4 id='recognizers'>Recognizers</h4>"
            + table(
                ["recognizer", "available", "same person if", "part in the release"],
                rows,
                cls="compact",
                row_headers=True,
            )
            + note
        )
    return "".join(parts)


def _sha_cell(sha: Any) -> Markup:
    if not sha:
        return Markup("-")
    return Markup(f"<code title='{esc(sha)}'>{esc(str(sha)[:12])}</code>")


# ------------------------------------------------------------------------------------- grid


def grid_section(grid: list[dict[str, str]]) -> str:
    parts = [
        "<section id='grid'><h2>Anonymized regions (from the released files)</h2>",
        "<p class='muted'>Crops around regions that were anonymized and passed the re-scan, cut from the "
        "released files; never an original.</p><div class='grid'>",
    ]
    parts.extend(
        f"<figure><img alt='anonymized region of {esc(g['key'])}' src='data:image/jpeg;base64,{g['b64']}'>"
        f"<figcaption>{esc(g['key'])}</figcaption></figure>"
        for g in grid
    )
    if not grid:
        parts.append("<p class='muted'>No anonymized region to show.</p>")
    parts.append("</div></section>")
    return "".join(parts)
