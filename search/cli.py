"""The `mergesearch` command line. Only this module prints; everything else logs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from mergesearch.errors import MergesearchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Search per-layer merge ratios between fine-tunes of one base model.",
)
log = logging.getLogger("mergesearch")

StorageOpt = Annotated[str, typer.Option("--storage", help="study database URL, e.g. "
                                         "sqlite:///runs/demo/study.db or postgresql://host/db")]
StudyOpt = Annotated[str | None, typer.Option("--study", help="study name (may be left out "
                                              "when the storage holds one study)")]


def parse_duration(text: str | None) -> float | None:
    """Seconds in `90`, `90s`, `30m`, `8h` or `1h30m`."""
    if text is None:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if not parts or not any(parts.groups()):
        raise MergesearchError(f"--timeout {text!r}: write a duration like 90s, 30m, 8h or 1h30m")
    h, m, s = (int(g or 0) for g in parts.groups())
    return float(h * 3600 + m * 60 + s)


def _no_traceback_for_ctrl_c(record: logging.LogRecord) -> bool:
    """Optuna (and SQLAlchemy's pool, when Ctrl-C lands mid-query) log the interrupt with a
    traceback: keep the line only."""
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
        record.exc_info = None
    return True


def _raised_during_ctrl_c(error: BaseException) -> bool:
    """Whether `error` was raised while handling a Ctrl-C (optuna's trial bookkeeping can
    fail that way when the interrupt lands between the objective and its tell)."""
    seen = error.__context__
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def _quiet_libraries() -> None:
    import optuna
    import transformers

    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's chatter
    logging.getLogger("alembic").setLevel(logging.WARNING)  # each schema check
    transformers.utils.logging.disable_progress_bar()
    for handler in [*optuna.logging.get_logger("optuna").handlers, *logging.getLogger().handlers]:
        handler.addFilter(_no_traceback_for_ctrl_c)


@app.command()
def launch(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="study spec (YAML)")],
    storage: Annotated[str | None, typer.Option(help="overrides the spec's storage")] = None,
    study: Annotated[str | None, typer.Option(help="overrides the spec's name")] = None,
    n_trials: Annotated[int | None, typer.Option(help="total finished trials wanted")] = None,
    timeout: Annotated[str | None, typer.Option(help="stop after this long, e.g. 8h")] = None,
    test: Annotated[bool, typer.Option(help="score baselines and best trials on test")] = True,
) -> None:
    """Create the study (or resume it) and run trials until the budget is spent."""
    from search.run import launch_study

    summary = launch_study(spec_path, storage, study, n_trials, parse_duration(timeout), test)
    typer.echo(summary)


@app.command()
def worker(
    storage: StorageOpt,
    study: StudyOpt = None,
    n_trials: Annotated[int | None, typer.Option(help="total finished trials wanted")] = None,
    timeout: Annotated[str | None, typer.Option(help="stop after this long, e.g. 8h")] = None,
) -> None:
    """Join a running study: its spec is read from the storage."""
    from search.run import join_study

    typer.echo(join_study(storage, study, n_trials, parse_duration(timeout)))


@app.command()
def status(storage: StorageOpt, study: StudyOpt = None) -> None:
    """Print the study's trials as a table."""
    from search.run import status_table

    typer.echo(status_table(storage, study))


@app.command()
def report(
    storage: StorageOpt,
    study: StudyOpt = None,
    out: Annotated[Path | None, typer.Option(
        help="write DIR/report.html, a self-contained page with figures")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="the machine-readable form: printed, or DIR/report.json with --out")
    ] = False,
) -> None:
    """Summarise the study: trial counts, baselines, best trial or Pareto set; with --out,
    an HTML page with the Pareto front, weight profiles, history and importances."""
    from search.report import build_report
    from search.run import format_report
    from search.study import load_study

    result = build_report(load_study(storage, study))
    if out is not None:
        from search.report_page import write_report

        for path in write_report(result, out, as_json):
            typer.echo(f"wrote {path}")
    else:
        typer.echo(json.dumps(result, indent=2) if as_json else format_report(result))


@app.command()
def evaluate(
    spec_path: Annotated[Path | None, typer.Argument(
        metavar="[SPEC]", help="spec whose probes to run (with --model)")] = None,
    model: Annotated[Path | None, typer.Option(help="Hugging Face model folder to score")
                     ] = None,
    storage: Annotated[str | None, typer.Option(
        help="a study's database: score its --trials instead of a model")] = None,
    study: StudyOpt = None,
    trials: Annotated[str, typer.Option(help="with --storage: best, pareto, or numbers "
                                        "like 3,17")] = "best",
    split: Annotated[str, typer.Option(help="dev or test")] = "dev",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    items: Annotated[Path | None, typer.Option(help="write per-item outputs (JSONL)")] = None,
) -> None:
    """Score one model on the spec's probes; or a study's chosen trials on its test split."""
    if split not in ("dev", "test"):
        raise MergesearchError(f"--split {split!r}: choose dev or test")
    if storage is not None:
        if spec_path is not None or model is not None or items is not None:
            raise MergesearchError("--storage scores a study's trials: give no SPEC, --model "
                                   "or --items with it")
        if split != "test":
            raise MergesearchError("--storage: trials have their dev values already; "
                                   "use --split test")
        from search.run import score_trials_on_test

        scored = score_trials_on_test(storage, study, trials)
        if as_json:
            typer.echo(json.dumps(scored, indent=2))
        else:
            for number, entry in scored.items():
                values = "  ".join(f"{k} dev {entry['dev'][k]:.4f} test {v:.4f}"
                                   for k, v in entry["test"].items())
                typer.echo(f"trial {number}: {values}")
        return
    if spec_path is None or model is None:
        raise MergesearchError("give SPEC and --model DIR, or --storage URL --split test")
    from search.run import evaluate_model

    if items is None:
        result = evaluate_model(spec_path, model, split)
    else:  # streamed to a hidden file beside OUT, renamed into place when complete
        with _jsonl_writer(items) as write:
            result = evaluate_model(spec_path, model, split,
                                    lambda chunk: write([item.to_dict() for item in chunk]))
    summary = {"model": str(model), "split": split, "objectives": result.objectives,
               "probes": result.probes}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for name, value in result.objectives.items():
            typer.echo(f"{name:>20}  {value:.4f}")


@contextlib.contextmanager
def _jsonl_writer(path: Path) -> Iterator[Callable[[list[dict]], None]]:
    """Append rows to a hidden file beside `path`, flushed per call; rename it to `path` on
    success, delete it on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            def write(rows: list[dict]) -> None:
                f.writelines(json.dumps(row) + "\n" for row in rows)
                f.flush()
            yield write
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@app.command()
def export(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR")],
    storage: StorageOpt,
    study: StudyOpt = None,
    trial: Annotated[str | None, typer.Option(
        help="a trial number; best (one objective) or knee (the Pareto front's knee); "
             "default: best, or knee for a Pareto study, unless a rule picks")] = None,
    at_least: Annotated[list[str], typer.Option(
        "--min", help="rule: only trials with dev OBJECTIVE >= VALUE (repeatable), e.g. "
                      "instruction=0.9")] = [],  # noqa: B006 (typer reads the default)
    at_most: Annotated[list[str], typer.Option(
        "--max", help="rule: only trials with dev OBJECTIVE <= VALUE (repeatable)")
    ] = [],  # noqa: B006
    maximize: Annotated[str | None, typer.Option(
        help="rule: of those, the highest dev value of this objective")] = None,
    minimize: Annotated[str | None, typer.Option(
        help="rule: of those, the lowest dev value of this objective")] = None,
    force: Annotated[bool, typer.Option(help="replace OUT_DIR if it exists")] = False,
    device: Annotated[str, typer.Option(
        help="device to rebuild the merge on: auto (the kind it was scored on, if here), "
             "cpu, cuda")] = "auto",
) -> None:
    """Write a trial's merged model as a Hugging Face folder with its model card."""
    from search.export import export_trial
    from search.selection import Rule
    from search.study import load_study
    from storage.records import RecordStore

    rule = Rule.parse(at_least, at_most, maximize, minimize)
    if rule is not None and trial is not None:
        raise MergesearchError("give --trial or a rule (--min/--max/--maximize/--minimize), "
                               "not both")
    if trial is not None and trial not in ("best", "knee") and not trial.isdigit():
        raise MergesearchError(f"--trial {trial!r}: give a trial number, best or knee")
    loaded = load_study(storage, study)
    which = rule or trial or ("best" if len(loaded.directions) == 1 else "knee")
    record = export_trial(loaded, which, out_dir, force, device, RecordStore.open(storage))
    typer.echo(f"exported trial {record['trial']}, {record['chosen_as']}, to {out_dir} "
               f"(weights sha256 {record['weights_sha256'][:16]}…)")
    if record["weights_verified"] is not True:
        typer.echo(f"warning: weights not compared with the scored trial's: "
                   f"{record['weights_verified']}", err=True)


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(metavar="CONFIG.yml", help="a mergekit config")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR")],
    force: Annotated[bool, typer.Option(help="replace OUT_DIR if it exists")] = False,
    placement: Annotated[str, typer.Option(
        help="where parents live: memory, mmap, pinned, or a device such as cuda")] = "memory",
) -> None:
    """Merge models as a mergekit YAML config says and write a Hugging Face folder."""
    from search.merge_config import merge_config

    record = merge_config(config, out_dir, force, placement)
    recipe = record["recipe"]
    typer.echo(f"merged {', '.join(recipe['models'])} with {recipe['method']} "
               f"({record['weights_dtype']}) into {out_dir}")


@app.command()
def dashboard(
    storage: StorageOpt,
    port: Annotated[int, typer.Option(help="port to serve on")] = 8080,
    host: Annotated[str, typer.Option(help="address to bind; 127.0.0.1 keeps it local")] = (
        "127.0.0.1"
    ),
    artifacts: Annotated[Path | None, typer.Option(
        help="artifact folder (trials' item outputs); default: the one the studies' specs "
             "name")] = None,
) -> None:
    """Serve optuna-dashboard for the storage (local only unless --host says otherwise)."""
    from optuna_dashboard import run_server

    from search.study import artifact_folder
    from storage import open_storage
    from storage.artifacts import artifact_store

    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: serving on {host}: anyone who can reach it sees the study", err=True)
    opened = open_storage(storage, create=False)
    folder = artifacts or artifact_folder(opened, storage)
    typer.echo(f"dashboard on http://{host}:{port}/ (Ctrl-C stops it; artifacts in {folder})")
    run_server(opened, host=host, port=port, artifact_store=artifact_store(folder))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for the study, spec and export")] = Path(
        "runs/demo"
    ),
    n_trials: Annotated[int, typer.Option(help="trials to run")] = 30,
) -> None:
    """Run the built-in demo study end to end on the CPU (tiny models, offline)."""
    from search.demo.run import run_demo

    run_demo(out, n_trials, echo=typer.echo)


def _terminate(signum, frame) -> None:
    """`kill` stops as Ctrl-C does (between chunks in a study), through the cleanup that ends
    an engine's processes: vLLM's would otherwise outlive this one. Where Ctrl-C is ignored
    (a background job), it stops at once."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        # Not standalone: typer hands back exit codes (130 for Ctrl-C) instead of exiting.
        code = app(standalone_mode=False)
    except MergesearchError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(1)
    except typer.exceptions.TyperException as e:  # usage: unknown option, missing argument
        e.show()  # type: ignore[attr-defined]
        sys.exit(getattr(e, "exit_code", 2))
    except Exception as e:
        if not _raised_during_ctrl_c(e):
            raise
        code = 130
    if code == 130:
        typer.echo("interrupted: finished trials are saved; run the same command to resume",
                   err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
