"""Readable reports from the sites' metrics: one page per site and one for the federation.

Input: what the server gathered from the sites' declared reports
(:mod:`app_server.site_reports`: per round, the validation of the global model each site
received, per-case Dice and HD95, training loss; the validation of the final global model; data
and device summary, harmonization hash; which sites contributed to each round). Output:
``<site>.json`` + ``<site>.html`` and ``federation.json`` + ``federation.html``, written into
a staging folder that replaces the report folder whole (no page of an earlier run is left
beside them). Metrics only: no image, no patient identifier (cases go under the pseudonyms
their site declared them with, :func:`app_site.training_task.case_pseudonym`). Plots are
inline SVG, so a page is one self-contained file. The JSON is standard JSON: a value that is
not a finite number (an interval of fewer than two cases) is ``null``.
"""

from __future__ import annotations

import html
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from app_server.site_reports import REGIONS, validated_rounds
from fedseg.files import replace_folder, write_json_atomic, write_text_atomic

REGION_NAMES = {"TC": "tumour core", "WT": "whole tumour", "ET": "enhancing tumour"}
MODE_NAMES = {
    "plaintext": "plaintext FedAvg",
    "he-packed": "FedAvg on encrypted updates (packed CKKS; the server never decrypts)",
    "he-stock": "FedAvg on encrypted updates (NVFlare's stock CKKS filters)",
}
COLOURS = {"TC": "#c0392b", "WT": "#2471a3", "ET": "#b7950b"}
#: The summary's model label of a site that validated the final global model.
FINAL_MODEL = "final global model"
#: The federation's page and JSON are named so in the report folder, beside the sites'.
FEDERATION = "federation"
#: The metrics of each region a validation reports, Dice then HD95.
_REGION_METRICS = tuple(f"{metric}_{r}" for metric in ("dice", "hd95") for r in REGIONS)


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a mean.

    Args:
        values: Per-case values.
        level: Confidence level.
        samples: Bootstrap resamples.
        seed: Random seed (reports are reproducible).

    Returns:
        ``(low, high)``; NaN for fewer than two values (one case says nothing of the spread).
    """
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if data.size < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = rng.choice(data, size=(samples, data.size), replace=True).mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return (float(low), float(high))


def site_summary(document: dict) -> dict:
    """Adds the report's summary to a site's document, with bootstrap intervals.

    The summary is the validation of the final global model when the site made one, else its
    last validated round's (of the global model it received then).
    """
    validated = validated_rounds(document)
    last = validated[-1] if validated else None
    summary = {"rounds": len(document["rounds"])}
    evaluated = document.get("final") or last
    if evaluated is not None:
        cases = evaluated["cases"]
        summary["model"] = (
            FINAL_MODEL if document.get("final") else f"global model of round {last['round']}"
        )
        summary["metrics"] = evaluated["metrics"]
        summary["cases"] = cases
        summary["intervals"] = {
            f"{metric}_{r}": bootstrap_interval([c[metric][r] for c in cases])
            for metric in ("dice", "hd95")
            for r in REGIONS
        }
    return {**document, "summary": summary}


def federation_summary(sites: dict[str, dict], round_contributors: dict | None = None) -> dict:
    """All sites side by side: each site's summary, per-round curves, who contributed when.

    ``summary`` holds, per site, the metrics of its summary and which model they measure
    (``model``: the final global model, or the global model of the last round it validated
    when it made no final validation, as in jobs with NVFlare's stock HE filters); both are
    ``None`` for a site that validated nothing.
    """
    return {
        "sites": sorted(sites),
        "summary": {
            name: {
                "model": doc["summary"].get("model"),
                "metrics": doc["summary"].get("metrics"),
            }
            for name, doc in sorted(sites.items())
        },
        "round_contributors": round_contributors or {},
        "curves": {
            name: [
                {"round": r["round"], **{key: r["metrics"][key] for key in _REGION_METRICS}}
                for r in validated_rounds(doc)
            ]
            for name, doc in sorted(sites.items())
        },
        "devices": {name: doc["device"] for name, doc in sorted(sites.items())},
        "harmonization_hashes": sorted(
            {doc.get("harmonization_hash") or "none" for doc in sites.values()}
        ),
    }


def write_reports(report_dir: Path, collected: dict, cross_site: dict | None = None) -> list[Path]:
    """Writes every site's JSON and HTML report and the federation's.

    Args:
        report_dir: Where to write (created).
        collected: What the server gathered (``fedseg_site_reports.json``: ``mode``, ``sites``,
            ``round_contributors``).
        cross_site: Cross-site evaluation matrix (validating site -> model owner -> metrics).

    Returns:
        The files written.

    Raises:
        ValueError: If no site reported, or a site is named ``federation`` (its files would
            be the federation's).
    """
    if not collected.get("sites"):
        raise ValueError("no site metrics to report")
    if FEDERATION in collected["sites"]:
        raise ValueError(f"a site is named {FEDERATION!r}: its report would be the federation's")
    report_dir = Path(report_dir)
    staging = report_dir.with_name(f".{report_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that stopped half-way
    staging.mkdir(parents=True)
    try:
        names = _write_reports(staging, collected, cross_site or {})
        replace_folder(staging, report_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [report_dir / name for name in names]


def _write_reports(folder: Path, collected: dict, cross_site: dict) -> list[str]:
    mode = collected.get("mode", "plaintext")
    refusals = collected.get("refusals", [])
    sites = {}
    for name, document in sorted(collected["sites"].items()):
        own_refusals = [r for r in refusals if r["site"] == name]
        sites[name] = site_summary({**document, "mode": mode, "refusals": own_refusals})
    federation = federation_summary(sites, collected.get("round_contributors"))
    federation["mode"] = mode
    federation["refusals"] = refusals
    federation["resumptions"] = collected.get("resumptions", [])
    federation["absent"] = collected.get("absent", [])
    federation["cross_site"] = cross_site
    pages = {name: (document, render_site(document)) for name, document in sites.items()}
    pages[FEDERATION] = (federation, render_federation(federation))
    for name, (document, page) in pages.items():
        write_json_atomic(folder / f"{name}.json", _finite_or_null(document), allow_nan=False)
        write_text_atomic(folder / f"{name}.html", page)
    return [f"{name}.{kind}" for name in pages for kind in ("json", "html")]


def _finite_or_null(value: object) -> object:
    """``value`` with every float that is not finite replaced by ``None`` (JSON ``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


def render_site(document: dict) -> str:
    """The site's page: curves, last-round table with intervals, cases, data, setup."""
    summary = document["summary"]
    rounds = document["rounds"]
    validated = validated_rounds(document)
    curves = {
        metric: {
            r: [(e["round"], e["metrics"][f"{metric}_{r}"]) for e in validated] for r in REGIONS
        }
        for metric in ("dice", "hd95")
    }
    rows = ""
    case_count = len(summary.get("cases", []))
    if "metrics" in summary:
        for region in REGIONS:
            dice_low, dice_high = summary["intervals"][f"dice_{region}"]
            hd95_low, hd95_high = summary["intervals"][f"hd95_{region}"]
            rows += (
                f"<tr><td>{REGION_NAMES[region]} ({region})</td>"
                f"<td class=num>{summary['metrics'][f'dice_{region}']:.3f}</td>"
                f"<td class=num>{format_number(dice_low)} to {format_number(dice_high)}</td>"
                f"<td class=num>{format_number(summary['metrics'][f'hd95_{region}'], 1)}</td>"
                f"<td class=num>{format_number(hd95_low, 1)} to {format_number(hd95_high, 1)}"
                "</td></tr>"
            )
    validations = [(str(e["round"]), e["metrics"]) for e in validated]
    if document.get("final"):
        validations.append(("final", document["final"]["metrics"]))
    validation_rows = "".join(
        f"<tr><td>{label}</td>{_region_metric_cells(metrics)}</tr>"
        for label, metrics in validations
    )
    case_rows = ""
    for case in summary.get("cases", []):
        cells = "".join(f"<td class=num>{case['dice'][r]:.3f}</td>" for r in REGIONS)
        cells += "".join(f"<td class=num>{format_number(case['hd95'][r], 1)}</td>" for r in REGIONS)
        case_rows += f"<tr><td>{html.escape(case['case_id'])}</td>{cells}</tr>"
    training_rows = "".join(
        f"<tr><td>{e['round']}</td><td class=num>{e['train_steps']:d}</td>"
        f"<td class=num>{format_number(e['train_loss'], 4)}</td>"
        f"<td class=num>{format_number(e['train_seconds'], 1)}</td>"
        f"<td class=num>{format_number(e.get('aggregation_weight'), 1)}</td></tr>"
        for e in rounds
    )
    data = document["data"]
    qc = {key: html.escape(str(count)) for key, count in data.get("qc_counts", {}).items()}
    body = f"""
<h1>Site report: {html.escape(document["site"])}</h1>
<p>Validation of the global model on this site's own validation split: the model each round
started from, and the final global model. Training: {html.escape(_mode(document))}.
Device: <b>{html.escape(document["device"])}</b>. Harmonization artifact:
<b>{html.escape((document.get("harmonization_hash") or "none")[:12])}</b>.</p>
<h2>Dice per round (global model received at the start of the round)</h2>
{line_chart(curves["dice"], "Dice", (0.0, 1.0))}
<h2>HD95 per round (mm; lower is better)</h2>
{line_chart(curves["hd95"], "HD95 (mm)", (0.0, _axis_top(curves["hd95"])))}
<h2>Validation per round</h2>
{
        _long_table(
            len(validations),
            f"<table><tr><th>round</th>{''.join(f'<th>Dice {r}</th>' for r in REGIONS)}"
            f"{''.join(f'<th>HD95 {r} (mm)</th>' for r in REGIONS)}</tr>{validation_rows}</table>",
        )
    }
<h2>{html.escape(summary.get("model", "no validation").capitalize())}</h2>
<table><tr><th>region</th><th>Dice</th><th>95% CI (bootstrap over {case_count} cases)</th>
<th>HD95 (mm)</th><th>95% CI</th></tr>{rows}</table>
<p>HD95 of a region missed entirely, or predicted where the case has none, is the diagonal
of the case's grid: the worst distance it can have.</p>
<h2>Cases ({html.escape(summary.get("model", "-"))})</h2>
<table><tr><th>case</th>{"".join(f"<th>Dice {r}</th>" for r in REGIONS)}
{"".join(f"<th>HD95 {r}</th>" for r in REGIONS)}</tr>{case_rows}</table>
<h2>Data</h2>
<table><tr><th>training cases</th><td class=num>{data["training_cases"]:d}</td></tr>
<tr><th>validation cases</th><td class=num>{data["validation_cases"]:d}</td></tr>
<tr><th>series accepted / rejected / skipped at ingestion</th>
<td class=num>{qc.get("accepted", "-")} / {qc.get("rejected", "-")} / {qc.get("skipped", "-")}</td>
</tr></table>
<h2>Training</h2>
{
        _long_table(
            len(rounds),
            "<table><tr><th>round</th><th>steps</th><th>loss</th><th>seconds</th>"
            f"<th>declared weight</th></tr>{training_rows}</table>",
        )
    }
{_refusals_table(document.get("refusals", []))}"""
    return _page(f"fedseg report: {document['site']}", body)


def render_federation(federation: dict) -> str:
    """The federation's page: every site side by side, and the Dice curves of each site."""
    rows = ""
    for site, summary in federation["summary"].items():
        cells = _region_metric_cells(summary["metrics"] or {})
        rows += (
            f"<tr><td>{html.escape(site)}</td><td>{html.escape(summary['model'] or 'none')}</td>"
            f"{cells}<td>{html.escape(federation['devices'][site])}</td></tr>"
        )
    models = {summary["model"] for summary in federation["summary"].values()}
    heading = (
        "Final global model, all sites"
        if models == {FINAL_MODEL}
        else "Each site's last validation (not every site validated the final global model)"
    )
    charts = ""
    for site, curve in federation["curves"].items():
        dice = {r: [(e["round"], e[f"dice_{r}"]) for e in curve] for r in REGIONS}
        hd95 = {r: [(e["round"], e[f"hd95_{r}"]) for e in curve] for r in REGIONS}
        charts += (
            f"<h3>{html.escape(site)}</h3>"
            + line_chart(dice, "Dice", (0, 1))
            + line_chart(hd95, "HD95 (mm)", (0, _axis_top(hd95)))
        )
    body = f"""
<h1>Federation report</h1>
<p>{len(federation["sites"])} sites; {html.escape(_mode(federation))}. Each site validated
the global model on its own data; only these metrics left the sites.</p>
{_absent_paragraph(federation.get("absent", []))}
<h2>{html.escape(heading)}</h2>
<table><tr><th>site</th><th>model</th>{"".join(f"<th>Dice {r}</th>" for r in REGIONS)}
{"".join(f"<th>HD95 {r} (mm)</th>" for r in REGIONS)}<th>device</th></tr>
{rows}</table>
{_contributors_table(federation["round_contributors"], federation["sites"])}
{_refusals_table(federation.get("refusals", []))}
{_resumptions_table(federation.get("resumptions", []))}
{_cross_site_table(federation["cross_site"], federation["sites"])}
<h2>Dice and HD95 per round</h2>{charts}"""
    return _page("fedseg federation report", body)


def _mode(document: dict) -> str:
    mode = document.get("mode", "plaintext")
    return MODE_NAMES.get(mode, mode)


def _absent_paragraph(absent: list[str]) -> str:
    """The sites the job expected that reported nothing (no page of their own)."""
    if not absent:
        return ""
    return (
        f"<p class=warning><b>No report from {html.escape(', '.join(absent))}</b>: the job "
        "expected these sites, and they reported no round; their logs say why.</p>"
    )


def _contributors_table(contributors: dict, sites: list[str]) -> str:
    """Which sites' updates went into each round's aggregate."""
    if not contributors:
        return ""
    header = "".join(f"<th>{html.escape(s)}</th>" for s in sites)
    rows = "".join(
        f"<tr><td>{html.escape(str(r))}</td>"
        + "".join(f"<td>{'yes' if s in names else 'no'}</td>" for s in sites)
        + "</tr>"
        for r, names in sorted(contributors.items(), key=lambda item: int(item[0]))
    )
    return f"<h2>Contributions per round</h2><table><tr><th>round</th>{header}</tr>{rows}</table>"


def _refusals_table(refusals: list[dict]) -> str:
    """Updates that did not go into the global model: which site, which round, why."""
    if not refusals:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(r['site'])}</td><td class=num>{r['round']}</td>"
        f"<td>{html.escape(r['reason'])}</td></tr>"
        for r in refusals
    )
    return (
        "<h2>Refused updates</h2><table><tr><th>site</th><th>round</th><th>reason</th></tr>"
        f"{rows}</table>"
    )


def _resumptions_table(resumptions: list[dict]) -> str:
    """Interruptions the training went on from: where, and what the interrupted job lost."""
    if not resumptions:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(r['interrupted_job'])}</td><td class=num>{r['next_round']}</td>"
        f"<td>{html.escape(', '.join(map(str, r['dropped_rounds'])) or 'none')}</td>"
        f"<td>{html.escape(_why_it_stopped(r))}</td></tr>"
        for r in resumptions
    )
    return (
        "<h2>Resumed after an interruption</h2><p>Training went on from the last completed "
        "round's global model; a round under way when the job stopped was trained again.</p>"
        "<table><tr><th>interrupted job</th><th>resumed at round</th>"
        f"<th>partial rounds trained again</th><th>why it stopped</th></tr>{rows}</table>"
    )


def _why_it_stopped(resumption: dict) -> str:
    reasons = list(resumption["failures"])
    if resumption.get("rejoined"):
        reasons.append(f"restarted so that {', '.join(resumption['rejoined'])} could rejoin")
    return "; ".join(reasons) or "none recorded"


def _cross_site_table(matrix: dict, sites: list[str]) -> str:
    """Mean Dice of each model (columns) on each site's data (rows), and who sent no model."""
    if not matrix:
        return ""
    owners = sorted({owner for row in matrix.values() for owner in row})
    without = [site for site in sites if site not in owners]
    note = (
        f"<p>No local model from {html.escape(', '.join(without))}: every update it trained was "
        "refused, or it trained no round.</p>"
        if without and len(without) < len(sites)
        else ""
    )
    header = "".join(f"<th>{html.escape(o)} model</th>" for o in owners)
    rows = ""
    for site, row in sorted(matrix.items()):
        cells = "".join(
            f"<td class=num>{format_number((row.get(o) or {}).get('dice_mean'))}</td>"
            for o in owners
        )
        rows += f"<tr><td>{html.escape(site)} data</td>{cells}</tr>"
    return (
        "<h2>Cross-site evaluation (mean Dice of the final models)</h2>"
        f"<table><tr><th></th>{header}</tr>{rows}</table>{note}"
    )


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    label: str,
    value_range: tuple[float, float],
    width: int = 480,
    height: int = 220,
) -> str:
    """An inline SVG line chart of one or more series of (x, y) points, with a legend.

    Points whose y is missing or not finite are left out of their series.
    """
    margin = 40
    xs = [x for points in series.values() for x, _ in points] or [0]
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)
    y_low, y_high = value_range

    def position(x: float, y: float) -> tuple[float, float]:
        px = margin + (x - x_low) / (x_high - x_low) * (width - 2 * margin)
        clipped = min(max(y, y_low), y_high)
        py = height - margin - (clipped - y_low) / (y_high - y_low) * (height - 2 * margin)
        return px, py

    parts = [
        f'<svg class=chart width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(label)} per round">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" '
        f'y2="{height - margin}" stroke="#555"/>',
        f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="#555"/>',
        f'<text x="{margin - 6}" y="{margin + 4}" text-anchor="end">{y_high:g}</text>',
        f'<text x="{margin - 6}" y="{height - margin}" text-anchor="end">{y_low:g}</text>',
        f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">round</text>',
        f'<text x="{margin}" y="{margin - 14}" font-weight="bold">{html.escape(label)}</text>',
    ]
    for x in _ticks(sorted(set(xs))):
        px, _ = position(x, y_low)
        parts.append(
            f'<text x="{px:.1f}" y="{height - margin + 14}" text-anchor="middle">{x:g}</text>'
        )
    for index, (name, all_points) in enumerate(series.items()):
        # a value that is not a number has no place on the axis: left out, not drawn at 0
        points = [(x, y) for x, y in all_points if y is not None and math.isfinite(y)]
        colour = COLOURS.get(name, "#333")
        coordinates = " ".join("{:.1f},{:.1f}".format(*position(x, y)) for x, y in points)
        parts.append(
            f'<polyline points="{coordinates}" fill="none" stroke="{colour}" stroke-width="2"/>'
        )
        for x, y in points:
            px, py = position(x, y)
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>')
        parts.append(
            f'<text x="{width - margin + 4}" y="{margin + 14 * index}" fill="{colour}">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


#: Tables longer than this many rows start folded (a long job has a row per round).
_FOLDED_ROWS = 30


def _long_table(rows: int, table: str) -> str:
    """``table`` as it is, or folded under a line that says how many rows it holds."""
    if rows <= _FOLDED_ROWS:
        return table
    return f"<details><summary>{rows} rows (show)</summary>{table}</details>"


def _region_metric_cells(metrics: dict) -> str:
    """Table cells of a validation's Dice (3 decimals) and HD95 (mm, 1 decimal) per region."""
    return "".join(
        f"<td class=num>{format_number(metrics.get(key), 3 if key.startswith('dice') else 1)}</td>"
        for key in _REGION_METRICS
    )


def _ticks(values: list[float], most: int = 10) -> list[float]:
    """At most ``most`` of the sorted ``values`` to label an axis with, first and last included."""
    if len(values) <= most:
        return values
    step = (len(values) - 1) / (most - 1)
    return [values[round(index * step)] for index in range(most)]


def _axis_top(series: dict[str, list[tuple[float, float]]]) -> float:
    """A round upper end for a chart's value axis: the largest finite value, at least 1."""
    values = [y for points in series.values() for _, y in points if y is not None]
    largest = max([y for y in values if math.isfinite(y)], default=1.0)
    step = 10 ** math.floor(math.log10(max(largest, 1.0)))
    return math.ceil(max(largest, 1.0) / step) * step


def format_number(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or ``n/a`` when it is missing or not finite."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 60em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
p.warning {{ border-left: 4px solid #c0392b; padding-left: 0.6em; }}
svg.chart text {{ font-size: 12px; }}
</style></head><body>{body}
</body></html>
"""
