"""`mergesearch report --out DIR`: the report as one self-contained HTML page (inline SVG
figures, inline CSS, nothing fetched), drawn from the report dict alone."""

from __future__ import annotations

import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2

from mergesearch.errors import MergesearchError
from search import figures

TEMPLATES = Path(__file__).parent / "templates"


def _fmt(values: dict[str, float] | None, name: str) -> str:
    return "" if not values or name not in values else f"{values[name]:.3f}"


def _how_chosen(report: dict[str, Any]) -> str:
    if report["pareto"]:
        return ("the knee of the feasible Pareto front: with each objective scaled to [0, 1] "
                "over the front, the member with the largest sum")
    return "the feasible trial with the best dev value"


def _figures(report: dict[str, Any]) -> list[dict[str, str | None]]:
    return [
        {"title": "Pareto front", "svg": figures.pareto(report),
         "caption": "Dev objectives of every complete trial. The line joins the feasible "
                    "trials no other feasible trial beats on every objective; green marks "
                    "the parents and their uniform average; the star is the selected merge.",
         "missing": ("One objective: no front to draw." if len(report["objectives"]) < 2
                     else "No complete trial yet.")},
        {"title": "Per-layer weight profile", "svg": figures.weight_profile(report),
         "caption": "The mixing weight each layer takes in the selected trial (bold) and "
                    "the other best trials: where along the depth each parent is kept.",
         "missing": "The search space has no per-layer genes."},
        {"title": "Optimisation history", "svg": figures.history(report),
         "caption": "Dev value of each trial in the order they ran, with the best feasible "
                    "value so far; ticks on the axis mark pruned and failed trials.",
         "missing": ""},
        {"title": "Parameter importances", "svg": figures.importances(report),
         "caption": "fANOVA importance of each searched parameter for each objective (dev "
                    "values of complete trials): how much of the objective's variance it "
                    "explains.",
         "missing": "Not computed: " + "; ".join(
             f"{name}: {why}" for name, why in report["importances"]["not_computed"].items())},
    ]


def render(report: dict[str, Any]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    selected = next((t for t in report["best"] + report["top"]
                     if t["trial"] == report["selected"]), None)
    return env.get_template("report.html.j2").render(
        r=report, selected=selected, how=_how_chosen(report), figures=_figures(report),
        front={t["trial"] for t in report["best"]}, fmt=_fmt,
        label=figures.baseline_label(report),
        version=metadata.version("mergesearch"))


def _write(path: Path, text: str) -> None:
    """Replace `path` whole or not at all."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_report(report: dict[str, Any], out: Path, as_json: bool = False) -> list[Path]:
    """report.html (and report.json with `as_json`) in `out`; returns the paths written."""
    if out.exists() and not out.is_dir():
        raise MergesearchError(f"--out {out} is a file, not a folder; choose another")
    files = {"report.html": render(report)}  # drawn before anything is written
    if as_json:
        files["report.json"] = json.dumps(report, indent=2) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        _write(out / name, text)
    return [out / name for name in files]
