"""``python -m virtex.report RUN_DIR``: the paper's table for this model and its curves.

Reads what the runs under ``RUN_DIR`` (itself included) wrote: the pretraining run's
``metrics.jsonl`` (loss and learning rates against step) and ``config.gin`` (which model),
every ``sweep.csv`` with a ``voc07/mAP`` column (the VOC07 curve; the chosen checkpoint is
the best mAP, ties to the later step, unless a ``best.json`` names it), and every
``metrics.json`` (the downstream results). Writes ``report.md``, a self-contained
``report.html`` (figures inlined) and the figures as PNG under ``report/``. The paper's
numbers come from the published model zoo (:mod:`virtex.zoo`) for the same model.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virtex import io, zoo
from virtex.errors import UserError

# our metric key -> (row label, zoo field with the number the paper reports, if the
# project keeps it): the paper's tasks, in the paper's order
PAPER_ROWS: dict[str, tuple[str, str | None]] = {
    "voc07/mAP": ("VOC07 linear SVM, mAP", "voc07_mAP"),
    "imagenet/top1": ("ImageNet linear, top-1", "imagenet_top1"),
    "inat/top1": ("iNaturalist 2018 fine-tuning, top-1", None),
    "coco/bbox_AP": ("COCO Mask R-CNN, box AP", None),
    "coco/segm_AP": ("COCO Mask R-CNN, mask AP", None),
    "lvis/segm_AP": ("LVIS Mask R-CNN, mask AP", None),
    "voc_det/AP50": ("VOC07+12 Faster R-CNN, AP50", None),
    "coco_captioning/CIDEr": ("COCO captioning, CIDEr", None),
    "coco_captioning/SPICE": ("COCO captioning, SPICE", None),
}
# bookkeeping a run also records, not results
_NOT_RESULTS = ("/backend_detectron2", "/images")


def is_headline(key: str) -> bool:
    """A metric the summary tables show: at most one ``/`` (per-class details have more),
    not a ``random_init/`` comparison."""
    return key.count("/") <= 1 and not key.startswith("random_init/")


@dataclass
class Report:
    run_dir: Path
    model: zoo.ZooModel | None = None
    arch: dict[str, str] = field(default_factory=dict)   # task, backbone, textual_size
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    sweep: list[tuple[int, float]] = field(default_factory=list)
    chosen: int | None = None
    results: dict[str, float] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)


def _runs(run_dir: Path) -> list[Path]:
    found = {p.parent for name in ("config.gin", "metrics.json", "metrics.jsonl", "sweep.csv")
             for p in run_dir.rglob(name)}
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


_BINDING = {"task": re.compile(r"^(?:experiment\.)?task = @tasks\.(\w+)", re.M),
            "backbone": re.compile(r"^visual = @backbones\.(\w+)\(\)", re.M),
            "textual_size": re.compile(r"^textual_size = '([\w]+)'", re.M)}


def _architecture(config: str) -> dict[str, str]:
    return {key: m[1] for key, rx in _BINDING.items() if (m := rx.search(config))}


def _published(arch: dict[str, str]) -> zoo.ZooModel | None:
    for model in zoo.models().values():
        if (model.task, model.backbone) == (arch.get("task"), arch.get("backbone")) and \
                model.textual_size == arch.get("textual_size"):
            return model
    return None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a half-written last line
            continue
    return rows


def collect(run_dir: str | Path) -> Report:
    """Everything the report shows, read from the run directories under ``run_dir``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"report: run directory '{run_dir}' does not exist")
    runs = _runs(run_dir)
    if not runs:
        raise UserError(f"report: '{run_dir}' holds no run (no config.gin, metrics.json or "
                        "sweep.csv under it)")
    report = Report(run_dir)
    for run in runs:
        config = run / "config.gin"
        arch = _architecture(config.read_text()) if config.is_file() else {}
        if "task" in arch and not report.arch:
            report.arch = arch
        log = run / "metrics.jsonl"
        if log.is_file() and not report.curves:
            rows = _read_jsonl(log)
            for key in ("loss/total", *sorted({k for r in rows for k in r if k.startswith("lr/")})):
                points = [(int(r["step"]), float(r[key])) for r in rows if key in r]
                if points:
                    report.curves[key] = points
        sweep = run / "sweep.csv"
        if sweep.is_file() and not report.sweep:
            with open(sweep, newline="") as f:
                report.sweep = sorted((int(r["step"]), float(r["voc07/mAP"]))
                                      for r in csv.DictReader(f) if r.get("voc07/mAP"))
        metrics = run / "metrics.json"
        if metrics.is_file():
            for key, value in json.loads(metrics.read_text()).items():
                if is_headline(key) and not key.startswith("train/"):
                    report.results.setdefault(key, float(value))
    best = run_dir / "best.json"
    if best.is_file():
        report.chosen = int(json.loads(best.read_text())["step"])
    elif report.sweep:
        report.chosen = max(report.sweep, key=lambda p: (p[1], p[0]))[0]
    if report.chosen in dict(report.sweep):  # the chosen checkpoint's, not the last one's
        report.results["voc07/mAP"] = dict(report.sweep)[report.chosen]
    report.model = _published(report.arch)
    return report


def _plot(points: dict[str, list[tuple[int, float]]], title: str, ylabel: str, path: Path,
          mark: tuple[int, float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for label, series in points.items():
        ax.plot([s for s, _ in series], [v for _, v in series], label=label, marker=".")
    if mark is not None:
        ax.plot([mark[0]], [mark[1]], "r*", markersize=14, label=f"chosen: step {mark[0]}")
    ax.set(title=title, xlabel="iteration", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    io.atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def figures(report: Report) -> list[Path]:
    """PNG figures under ``RUN_DIR/report/``: loss, learning rate, VOC07 mAP."""
    out = report.run_dir / "report"
    made = []
    if "loss/total" in report.curves:
        made.append(_plot({"loss": report.curves["loss/total"]}, "Pretraining loss", "loss",
                          out / "loss.png"))
    lrs = {k.removeprefix("lr/"): v for k, v in report.curves.items() if k.startswith("lr/")}
    if lrs:
        made.append(_plot(lrs, "Learning rate", "learning rate", out / "lr.png"))
    if report.sweep:
        mark = (report.chosen, dict(report.sweep)[report.chosen]) \
            if report.chosen in dict(report.sweep) else None
        made.append(_plot({"VOC07 mAP": report.sweep}, "VOC07 mAP against iteration", "mAP",
                          out / "voc07_map.png", mark))
    report.figures = made
    return made


def table(report: Report) -> list[tuple[str, str, str]]:
    """(task, ours, paper) rows: the paper's tasks first, then every other headline metric."""
    rows = []
    for key, (label, published) in PAPER_ROWS.items():
        ours = report.results.get(key)
        paper = getattr(report.model, published) if report.model and published else None
        if ours is not None or paper is not None:
            rows.append((label, "—" if ours is None else f"{ours:.2f}",
                         "—" if paper is None else f"{paper:.1f}"))
    rows += [(key, f"{value:.2f}", "—") for key, value in sorted(report.results.items())
             if key not in PAPER_ROWS and not key.endswith(_NOT_RESULTS)
             and value == value]  # NaN: a metric with nothing to measure (no large objects)
    return rows


def _title(report: Report) -> str:
    arch = ", ".join(f"{k} {v}" for k, v in report.arch.items()) or "model not recorded"
    name = f" (published as {report.model.name})" if report.model else ""
    return f"{arch}{name}"


def markdown(report: Report) -> str:
    lines = [f"# virtex report: {report.run_dir.name}", "", f"Model: {_title(report)}", ""]
    if report.chosen is not None:
        lines += [f"Chosen checkpoint: step {report.chosen} (best VOC07 mAP)", ""]
    lines += ["| task | this run | paper |", "|---|---:|---:|"]
    lines += [f"| {task} | {ours} | {paper} |" for task, ours, paper in table(report)]
    lines += [""] + [f"![{p.stem}](report/{p.name})" for p in report.figures]
    return "\n".join(lines) + "\n"


def page(report: Report) -> str:
    """The self-contained HTML report (figures inlined as data URIs)."""
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(t)}</td><td>{esc(o)}</td><td>{esc(p)}</td></tr>"
                   for t, o, p in table(report))
    images = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{esc(p.stem)}</figcaption>'
        "</figure>" for p in report.figures)
    chosen = "" if report.chosen is None else \
        f"<p>Chosen checkpoint: step {report.chosen} (best VOC07 mAP)</p>"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>virtex report: {esc(report.run_dir.name)}</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:60em}"
        "table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px 10px}"
        "td+td{text-align:right}figure{display:inline-block;margin:1em}"
        "</style></head><body>"
        f"<h1>virtex report: {esc(report.run_dir.name)}</h1><p>Model: {esc(_title(report))}</p>"
        f"{chosen}<table id='results'><tr><th>task</th><th>this run</th><th>paper</th></tr>"
        f"{rows}</table>{images}</body></html>\n")


def write(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the figures; returns the two report files."""
    report = collect(run_dir)
    figures(report)
    md = io.write_text(report.run_dir / "report.md", markdown(report))
    page_path = io.write_text(report.run_dir / "report.html", page(report))
    return md, page_path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m virtex.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory (a pretraining run, a sweep, a pipeline)")
    args = ap.parse_args(argv)
    try:
        md, page_path = write(args.run_dir)
    except UserError as exc:
        print(f"virtex: error: {exc}", file=sys.stderr)
        return 2
    print(md.read_text(), end="")
    print(f"report: {page_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
