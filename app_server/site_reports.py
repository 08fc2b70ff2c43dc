"""What the server keeps of each site's validation: declared metrics, never weights or images.

Every training result carries, next to its (encrypted or plaintext) update, a small declared
report: the validation of the global model the site received (summary and per-case Dice and
HD95, with hashed case ids), its training loss, steps and time, its device and data counts. The
final validation of the last global model arrives the same way. This module gathers them into
one document per site, written atomically to ``fedseg_site_reports.json`` in the server's run
folder, which is what the reports are built from (in the simulator, in POC and in production).

The document grows with every round, so it is written once per round rather than once per
report: a round's reports are held in memory until the round is aggregated, when its
contributors are recorded (before its global model is persisted), or until
:meth:`SiteReports.flush`; refusals, failures and final validations are written at once. A
server killed in the middle of a round loses only that round's reports, which a resumed job
trains and reports again.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

from fedseg.files import write_json_atomic

#: The server-side file, in the job's run folder.
SITE_REPORTS_FILE = "fedseg_site_reports.json"
#: A resumed job's starting reports, in the server app's custom folder.
RESUMED_REPORTS_FILE = "fedseg_resumed_reports.json"

_SITE_FIELDS = ("device", "data", "harmonization_hash")


class SiteReportError(ValueError):
    """A declared report that does not have the expected form."""


class SiteReports:
    """Per-site documents, built from the reports sites declare with their results.

    Args:
        path: Where to write them (atomically: at the end of each round, at :meth:`flush` and
            after a refusal, a failure or a final validation).
        mode: How updates travelled (``plaintext`` or ``he-packed`` ...), for the reports.
    """

    def __init__(self, path: Path, mode: str):
        self.path = Path(path)
        self.mode = mode
        self.sites: dict[str, dict] = {}
        self.contributors: dict[int, list[str]] = {}
        self.refusals: list[dict] = []
        self.failures: list[str] = []
        self.resumptions: list[dict] = []
        self._lock = threading.Lock()
        self._unwritten = False

    @classmethod
    def open(cls, path: Path, mode: str, resumed: dict | None = None) -> SiteReports:
        """The store at ``path``, with what it already holds (a restarted server goes on).

        Args:
            path: The store's file.
            mode: How updates travel in this job.
            resumed: For a resumed job, what the interrupted job's reports leave for it
                (:func:`resumed_content`); the store starts from it when ``path`` is new.

        Raises:
            SiteReportError: If ``resumed`` comes from a job whose updates travelled otherwise.
        """
        store = cls(path, mode)
        content = json.loads(store.path.read_text()) if store.path.is_file() else resumed
        if content is None:
            return store
        if content["mode"] != mode:
            raise SiteReportError(f"a {content['mode']} job's reports cannot go on in a {mode} job")
        store.sites = content["sites"]
        store.contributors = {int(r): s for r, s in content["round_contributors"].items()}
        store.refusals = content.get("refusals", [])
        store.failures = content.get("failures", [])
        store.resumptions = content.get("resumptions", [])
        return store

    def record_round(self, site: str, round_number: int, report: dict) -> None:
        """Records a training round: the site's validation of the global model and its training.

        In a round without validation (``validation.every_rounds``) the report's ``validation``
        is ``None``; the round is recorded with ``metrics`` ``None`` and no cases. The file
        holds it once the round's contributors are recorded or the store is flushed.

        Raises:
            SiteReportError: If the report lacks a field or a field has the wrong type.
        """
        _require(report, ("validation", "training", *_SITE_FIELDS), site)
        _check_training(report["training"], site)
        if report["validation"] is not None:
            _check_validation(report["validation"], site)
        validation = report["validation"] or {"metrics": None, "cases": []}
        entry = {
            "round": int(round_number),
            "received_at": time.time(),  # when the server got it: round durations
            "metrics": validation["metrics"],
            "cases": validation["cases"],
            "train_loss": report["training"]["loss"],
            "train_steps": report["training"]["steps"],
            "train_seconds": report["training"]["seconds"],
            # None from a site whose fedseg predates declared weights (it counts its steps)
            "aggregation_weight": report["training"].get("weight"),
        }
        with self._lock:
            document = self._site(site, report)
            document["rounds"] = [r for r in document["rounds"] if r["round"] != entry["round"]]
            document["rounds"].append(entry)
            document["rounds"].sort(key=lambda r: r["round"])
            self._unwritten = True

    def record_final(self, site: str, report: dict) -> None:
        """Records the site's validation of the final global model.

        Raises:
            SiteReportError: If the report lacks a field or a field has the wrong type.
        """
        _require(report, ("validation", *_SITE_FIELDS), site)
        _check_validation(report["validation"], site)
        with self._lock:
            document = self._site(site, report)
            document["final"] = {
                "metrics": report["validation"]["metrics"],
                "cases": report["validation"]["cases"],
            }
            self._write()

    def record_contributors(self, round_number: int, sites: list[str]) -> None:
        """Records whose updates went into a round's global model, and writes the round."""
        with self._lock:
            self.contributors[int(round_number)] = sorted(sites)
            self._write()

    def flush(self) -> None:
        """Writes the round reports recorded since the last write, if there are any.

        For jobs whose aggregator records no contributors (NVFlare's stock HE filters), and
        for reports that arrive after their round was aggregated.
        """
        with self._lock:
            if self._unwritten:
                self._write()

    def record_refusal(self, site: str, round_number: int, reason: str) -> None:
        """Records an update that did not go into the global model, and why."""
        with self._lock:
            self.refusals.append({"site": site, "round": round_number, "reason": reason})
            self._write()

    def record_failure(self, message: str) -> None:
        """Records why the job cannot go on (for the operator, beside NVFlare's status)."""
        with self._lock:
            self.failures.append(message)
            self._write()

    def to_dict(self) -> dict:
        """The file's content."""
        return {
            "mode": self.mode,
            "sites": {name: self.sites[name] for name in sorted(self.sites)},
            "round_contributors": {str(r): self.contributors[r] for r in sorted(self.contributors)},
            "refusals": self.refusals,
            "failures": self.failures,
            "resumptions": self.resumptions,
        }

    def _site(self, site: str, report: dict) -> dict:
        document = self.sites.setdefault(site, {"site": site, "rounds": [], "final": None})
        document.update({field: report[field] for field in _SITE_FIELDS})
        return document

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.to_dict(), indent=None)
        self._unwritten = False


def read_site_reports(result_dir: Path, sites: list[str] | None = None, final: bool = True) -> dict:
    """Reads the server's site reports from a job result and checks they are complete.

    Args:
        result_dir: The job's result (downloaded workspace, or the simulator's).
        sites: Sites that must have reported; default every site found.
        final: Whether the sites of the last round must have validated the final global
            model (jobs with NVFlare's stock HE filters cannot send it to the sites). A site
            that dropped out earlier is not asked to; the contributions say so.

    Returns:
        The file's content.

    Raises:
        RuntimeError: If the file is missing, a site reported no round, or no validation of
            the final global model, or a metric is not finite: a job whose validation results
            are missing fails, whatever status NVFlare reported.
    """
    path, content = load_site_reports(result_dir)
    problems = site_report_problems(content, sites, final)
    if problems:
        raise RuntimeError(f"{path}: " + "; ".join(problems) + "; see those sites' logs")
    return content


def load_site_reports(result_dir: Path) -> tuple[Path, dict]:
    """The server's site reports in a job result, unchecked: their file and its content.

    Raises:
        RuntimeError: If the server recorded none.
    """
    found = sorted(Path(result_dir).rglob(SITE_REPORTS_FILE))
    if not found:
        raise RuntimeError(
            f"{result_dir}: the server recorded no site reports ({SITE_REPORTS_FILE}); "
            "see the server log"
        )
    return found[0], json.loads(found[0].read_text())


def site_report_problems(
    content: dict, sites: list[str] | None = None, final: bool = True
) -> list[str]:
    """What is missing or not finite in a job's site reports (see :func:`read_site_reports`).

    Returns:
        One line per site with a problem (empty when the reports are complete).
    """
    documents = content["sites"]
    expected = sorted(sites) if sites is not None else sorted(documents)
    problems = []
    last_round = last_reported_round(content)
    for site in expected:
        document = documents.get(site)
        if document is None or not document["rounds"]:
            problems.append(f"{site} reported no training round")
        elif final and document["rounds"][-1]["round"] == last_round and not document["final"]:
            problems.append(f"{site} did not validate the final global model")
        elif not all(
            _finite_dice(r["metrics"])
            for r in [*validated_rounds(document), *filter(None, [document.get("final")])]
        ):
            problems.append(f"{site} reported non-finite Dice")
    if not expected:
        problems.append("no site reported")
    return problems


def resumed_content(content: dict, next_round: int, interrupted_job: str) -> dict:
    """What an interrupted job's reports leave for the job that resumes it at ``next_round``.

    Rounds from ``next_round`` on (a round under way when the job stopped, reported by some
    sites only) are dropped, so the resumed job reports each round exactly once; so are the
    validations of a final model, which the resumed job makes again. The interrupted job's
    failures move into a ``resumptions`` entry that also says which rounds were dropped.

    Args:
        content: The interrupted job's reports (the file's content).
        next_round: The first round the resumed job trains.
        interrupted_job: The interrupted job's id, for the record.

    Returns:
        The reports the resumed job starts from.
    """
    dropped = set()
    sites = {}
    for name, document in content["sites"].items():
        kept = [r for r in document["rounds"] if r["round"] < next_round]
        dropped |= {r["round"] for r in document["rounds"]} - {r["round"] for r in kept}
        sites[name] = {**document, "rounds": kept, "final": None}
    contributors = {r: s for r, s in content["round_contributors"].items() if int(r) < next_round}
    resumption = {
        "interrupted_job": interrupted_job,
        "next_round": next_round,
        "dropped_rounds": sorted(dropped),
        "failures": content.get("failures", []),
    }
    return {
        "mode": content["mode"],
        "sites": sites,
        "round_contributors": contributors,
        "refusals": [r for r in content.get("refusals", []) if r["round"] < next_round],
        "failures": [],
        "resumptions": [*content.get("resumptions", []), resumption],
    }


def with_rejoined_sites(content: dict, sites: list[str]) -> dict:
    """Resumed reports whose last resumption says which sites it let rejoin (``rejoined``)."""
    *earlier, last = content["resumptions"]
    return {**content, "resumptions": [*earlier, {**last, "rejoined": sorted(sites)}]}


def validated_rounds(document: dict) -> list[dict]:
    """A site's rounds that validated the global model (see ``validation.every_rounds``)."""
    return [r for r in document["rounds"] if r["metrics"] is not None]


def last_reported_round(content: dict) -> int | None:
    """The last round any site reported (the sites still in the job at its end)."""
    rounds = [r["round"] for d in content["sites"].values() for r in d["rounds"]]
    return max(rounds, default=None)


def sites_of_round(content: dict, round_number: int | None) -> list[str]:
    """The sites that reported a round (with an update or with their refusal)."""
    return sorted(
        name
        for name, document in content["sites"].items()
        if any(r["round"] == round_number for r in document["rounds"])
    )


def _finite_dice(metrics: dict) -> bool:
    values = [v for k, v in metrics.items() if k.startswith("dice")]
    return bool(values) and all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _require(report: dict, fields: tuple[str, ...], site: str) -> None:
    """Checks a declared report has ``fields``, and the fields every report carries."""
    if not isinstance(report, dict):
        raise SiteReportError(f"{site} sent no report")
    missing = [f for f in fields if f not in report]
    if missing:
        raise SiteReportError(f"{site}'s report lacks {', '.join(missing)}")
    _expect(isinstance(report["device"], str), site, "device", "a string")
    artifact_hash = report["harmonization_hash"]
    _expect(
        artifact_hash is None or isinstance(artifact_hash, str),
        site,
        "harmonization_hash",
        "a string",
    )
    data = report["data"]
    _expect(isinstance(data, dict), site, "data", "a mapping")
    for key in ("training_cases", "validation_cases"):
        _expect(_is_count(data.get(key)), site, f"data.{key}", "a case count")
    counts = data.get("qc_counts", {})
    _expect(
        isinstance(counts, dict) and all(_is_count(v) for v in counts.values()),
        site,
        "data.qc_counts",
        "a mapping of series counts",
    )


def _check_training(training: dict, site: str) -> None:
    _expect(isinstance(training, dict), site, "training", "a mapping")
    _expect(_is_count(training.get("steps")), site, "training.steps", "a step count")
    for key in ("loss", "seconds"):
        _expect(_is_number(training.get(key)), site, f"training.{key}", "a number")
    weight = training.get("weight")
    _expect(weight is None or _is_number(weight), site, "training.weight", "a number")


def _check_validation(validation: dict, site: str) -> None:
    _expect(isinstance(validation, dict), site, "validation", "a mapping")
    metrics, cases = validation.get("metrics"), validation.get("cases")
    _expect(
        isinstance(metrics, dict)
        and all(_is_number(metrics.get(key)) for key in _SUMMARY_METRICS)
        and all(_is_number(v) for v in metrics.values()),
        site,
        "validation.metrics",
        f"a mapping of numbers with {', '.join(_SUMMARY_METRICS)}",
    )
    _expect(isinstance(cases, list), site, "validation.cases", "a list")
    for case in cases:
        valid = (
            isinstance(case, dict)
            and isinstance(case.get("case_id"), str)
            and isinstance(case.get("dice"), dict)
            and all(_is_number(case["dice"].get(region)) for region in REGIONS)
            # None: a site whose fedseg predates scoring a missed region by the grid diagonal
            and isinstance(case.get("hd95"), dict)
            and all(region in case["hd95"] for region in REGIONS)
            and all(v is None or _is_number(v) for v in case["hd95"].values())
        )
        _expect(
            valid, site, "validation.cases", "case ids with Dice and HD95 numbers of TC, WT, ET"
        )


#: The regions every validation reports, and the summary metrics it reports of them.
REGIONS = ("TC", "WT", "ET")
_SUMMARY_METRICS = (
    *(f"{metric}_{region}" for metric in ("dice", "hd95") for region in REGIONS),
    "dice_mean",
)


def _expect(condition: bool, site: str, field: str, expected: str) -> None:
    if not condition:
        raise SiteReportError(f"{site}'s report: {field} is not {expected}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
