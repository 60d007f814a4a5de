"""The report's figures, drawn from the report dict (search/report.py) as inline SVG.

matplotlib's object API only (no pyplot): no global figure state and no GUI backend.
"""

from __future__ import annotations

import io
import itertools
import re
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from search.selection import dominates

PARENT_MARKERS = "s^Dv<>p"
MUTED, ACCENT, FRONT = "#9aa5b1", "#d62728", "#1f77b4"
LINES = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
         "#bcbd22", "#17becf"]  # matplotlib's tab10 without the red kept for the selection


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "mergesearch"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog: the SVG sits inside HTML
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # no dates: stable


def _figure(panels: int, width: float = 5.2, height: float = 3.6) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes)


def baseline_label(report: dict[str, Any]):
    """How a baseline is named: a parent, the uniform average, or a warm start."""
    def label(name: str) -> str:
        if name == "uniform":
            return "uniform average"
        if name in report["parents"]:
            return f"parent {name}"
        return f"warm start {name.removeprefix('warm:')}"
    return label


def _sign(report: dict, name: str) -> float:
    return 1.0 if report["directions"][report["objectives"].index(name)] == "maximize" else -1.0


def _front(points: list[tuple[float, float]], sx: float, sy: float) -> list[tuple[float, float]]:
    """The non-dominated points (signs: 1 to maximise), along the x axis."""
    return sorted({p for p in points if not any(dominates(q, p, (sx, sy)) for q in points)})


def pareto(report: dict[str, Any]) -> str | None:
    """Dev objectives against each other: every complete trial, the feasible front, the
    parents, the uniform average and the selected trial marked."""
    names = report["objectives"]
    complete = [h for h in report["history"] if h["dev"]]
    if len(names) < 2 or not complete:
        return None
    pairs = list(itertools.combinations(names, 2))[:3]
    fig, axes = _figure(len(pairs), width=8.0, height=5.0)
    baselines = {b["trial"]: b["name"] for b in report["baselines"]}
    label = baseline_label(report)
    for ax, (x, y) in zip(axes, pairs, strict=True):
        ok = [(h["dev"][x], h["dev"][y]) for h in complete if h["feasible"]]
        bad = [(h["dev"][x], h["dev"][y]) for h in complete if not h["feasible"]]
        if ok:
            ax.scatter(*zip(*ok, strict=True), s=18, color=MUTED, label="feasible trial",
                       zorder=2)
        if bad:
            ax.scatter(*zip(*bad, strict=True), s=22, marker="x", color=MUTED,
                       label="breaks a constraint", zorder=2)
        front = _front(ok, _sign(report, x), _sign(report, y))
        if front:
            ax.plot(*zip(*front, strict=True), "-o", color=FRONT, ms=5, lw=1.2,
                    label="Pareto front (feasible)", zorder=3)
        markers = iter(PARENT_MARKERS)
        for h in complete:
            name = baselines.get(h["trial"])
            if name is None:
                continue
            marker = "P" if name == "uniform" else next(markers, "o")
            ax.scatter(h["dev"][x], h["dev"][y], s=70, marker=marker, color="#2ca02c",
                       edgecolor="black", linewidth=0.6, label=label(name), zorder=4)
            ax.annotate(name, (h["dev"][x], h["dev"][y]), xytext=(6, 6), fontsize=9,
                        textcoords="offset points", color="#1b5e20")
        chosen = next((h for h in complete if h["trial"] == report["selected"]), None)
        if chosen:
            ax.scatter(chosen["dev"][x], chosen["dev"][y], s=180, marker="*", color=ACCENT,
                       edgecolor="black", linewidth=0.6, zorder=5,
                       label=f"selected: trial {chosen['trial']}")
            ax.annotate(f"trial {chosen['trial']}", (chosen["dev"][x], chosen["dev"][y]),
                        xytext=(8, 8), fontsize=9, textcoords="offset points", color=ACCENT,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none",
                              "alpha": 0.85}, zorder=6)
        ax.set_xlabel(f"{x} (dev)")
        ax.set_ylabel(f"{y} (dev)")
    _legend_outside(axes[-1])
    return _svg(fig)


def _legend_outside(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def weight_profile(report: dict[str, Any]) -> str | None:
    """Mixing weight against depth, one line per trial; a panel per model drawn."""
    profiles = report["profiles"]
    if not profiles["layers"] or not profiles["series"]:
        return None
    lines = list(dict.fromkeys(s["line"] for s in profiles["series"]))
    fig, axes = _figure(len(lines), width=7.5, height=4.2)
    layers = list(range(profiles["layers"]))
    for ax, line in zip(axes, lines, strict=True):
        colors = itertools.cycle(LINES)
        for series in (s for s in profiles["series"] if s["line"] == line):
            chosen = series["trial"] == report["selected"]
            ax.plot(layers, series["values"], "-o", ms=3.5,
                    lw=2.4 if chosen else 1.0, color=ACCENT if chosen else next(colors),
                    alpha=1.0 if chosen else 0.75, zorder=3 if chosen else 2,
                    label=f"trial {series['trial']}" + (" (selected)" if chosen else ""))
        ax.set_xlabel("layer (0 = nearest the embeddings)")
        ax.set_ylabel(line)
        ax.set_xticks(layers if len(layers) <= 16 else layers[::max(1, len(layers) // 16)])
        _legend_outside(ax)
    return _svg(fig)


def history(report: dict[str, Any]) -> str:
    """Each objective's dev value by trial number, the running best of feasible trials, and
    where trials were pruned or failed."""
    names = report["objectives"]
    fig, axes = _figure(len(names), width=5.2, height=3.4)
    rows = report["history"]
    baselines = {b["trial"] for b in report["baselines"]}
    for ax, name in zip(axes, names, strict=True):
        sign = _sign(report, name)
        done = [h for h in rows if h["dev"]]
        searched = [h for h in done if h["trial"] not in baselines]
        base = [h for h in done if h["trial"] in baselines]
        ax.scatter([h["trial"] for h in searched], [h["dev"][name] for h in searched], s=14,
                   color=FRONT, alpha=0.7, label="trial")
        ax.scatter([h["trial"] for h in base], [h["dev"][name] for h in base], s=40,
                   marker="s", color="#2ca02c", edgecolor="black", linewidth=0.5,
                   label="baseline (parent, average)")
        best, xs, ys = None, [], []
        for h in done:
            if h["feasible"] and (best is None or sign * h["dev"][name] > sign * best):
                best = h["dev"][name]
            if best is not None:
                xs.append(h["trial"])
                ys.append(best)
        ax.step(xs, ys, where="post", color=ACCENT, lw=1.4, label="best so far (feasible)")
        for state, marker, color in (("pruned", "|", MUTED), ("fail", "x", ACCENT)):
            stopped = [h["trial"] for h in rows if h["state"] == state]
            if stopped:
                ax.scatter(stopped, [0] * len(stopped), marker=marker, color=color, s=40,
                           transform=ax.get_xaxis_transform(), clip_on=False,
                           label="pruned" if state == "pruned" else "failed")
        ax.set_xlabel("trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{name} (dev)")
    axes[0].legend(fontsize=8, framealpha=0.85)
    return _svg(fig)


def importances(report: dict[str, Any], top: int = 15) -> str | None:
    """fANOVA importance of the most important parameters, a panel per objective."""
    found = report["importances"]["objectives"]
    if not found:
        return None
    fig, axes = _figure(len(found), width=4.6,
                        height=0.9 + 0.28 * min(top, max(len(v) for v in found.values())))
    for ax, (name, values) in zip(axes, found.items(), strict=True):
        ranked = list(values.items())[:top][::-1]
        ax.barh([k for k, _ in ranked], [v for _, v in ranked], color=FRONT)
        ax.set_xlabel(f"importance for {name}")
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0)
    return _svg(fig)
