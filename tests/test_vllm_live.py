"""The vLLM engine, running: vLLM's CPU build here (`make test` installs it), its CUDA build on
a GPU machine. Candidates swapped into one warm engine must score exactly as a fresh engine
started on each exported merge, and as the HF engine; the prefix cache must not leak one
candidate's KV into the next; whole studies run through `launch` and `worker`, fail trials
cleanly, and leave no vLLM process behind.

The parents are the demo's trained tiny Llamas (built offline by search/demo/build.py), whose
greedy choices are clear-cut, so float32 engines agree token for token."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from evaluators.engines import GenerationRequest, HFEngine, LoglikelihoodRequest
from evaluators.engines.vllm_engine import VLLMEngine, VLLMOptions, vllm_build, vllm_missing
from merging import Materializer, MergeRecipe, Parents
from merging.materializer import WeightsHash
from search.export import write_model_folder
from storage.records import RecordStore

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "search" / "demo" / "assets"
MODELS = {name: ASSETS / "models" / name for name in ("base", "clinical", "instruct")}
KV_BYTES = 64 * 2**20  # the demo models need 4 KiB per token in float32
ENGINE = f"vllm:{vllm_build()}:float32"  # what the studies below record as the engine

if vllm_missing():  # these tests must run wherever `make test` does: never skip them
    pytest.fail(f"the vLLM engine tests need vLLM: {vllm_missing()[0]}; `make test` installs "
                "it", pytrace=False)

RECIPES = [
    MergeRecipe("linear", ("clinical", "instruct"),
                {"clinical": {"weight": {"layers.0": 0.2, "layers.3": 0.9, "*": 0.6}},
                 "instruct": {"weight": 0.5}}),
    MergeRecipe("dare_ties", ("clinical", "instruct"),
                {"clinical": {"weight": 0.6, "density": 0.5},
                 "instruct": {"weight": 0.4, "density": 0.7}}, base="base", seed=3),
]


def options(**changes) -> VLLMOptions:
    return VLLMOptions(**{"dtype": "float32", "enforce_eager": True,
                          "kv_cache_memory_bytes": KV_BYTES, **changes})


def _rows(name: str, n: int) -> list[dict]:
    lines = (ASSETS / "probes" / name).read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


GENERATE = [GenerationRequest("Summarize the radiology findings into a short impression.\n"
                              f"Findings: {row['findings']}", max_new_tokens=32)
            for row in _rows("radiology.jsonl", 6)] + [
    GenerationRequest(row["prompt"], max_new_tokens=48) for row in _rows("instructions.jsonl", 4)]
SCORE = [LoglikelihoodRequest(f"Findings: {row['findings']}\nImpression:",
                              " " + row["impression"]) for row in _rows("radiology.jsonl", 8)]
# Long enough to fill several KV blocks, so a second request reuses them from the cache.
LONG = GenerationRequest("Summarize the radiology findings into a short impression.\nFindings: "
                         + " ".join(row["findings"] for row in _rows("radiology.jsonl", 12)),
                         max_new_tokens=24)


def results(engine) -> tuple[list[str], list[tuple[float, bool]]]:
    return engine.generate(GENERATE + [LONG]), engine.loglikelihood(SCORE)


def long_run(engine: VLLMEngine):
    """vLLM's own output for the long prompt: how many of its tokens came from the prefix
    cache, and the log-probability of the greedy answer, which tells candidates apart."""
    params = engine._sampling(temperature=0.0, max_tokens=LONG.max_new_tokens, logprobs=1)
    return engine.llm.generate([{"prompt_token_ids": engine.encode(LONG)}], params,
                               use_tqdm=False)[0]


@pytest.fixture(scope="module")
def warm():
    """One engine for the module, prefix caching on, the three parents held in its worker."""
    engine = VLLMEngine(MODELS["instruct"], options(enable_prefix_caching=True),
                        parents=MODELS, placement="auto")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> list[tuple[Path, str]]:
    """Each recipe merged and written as export writes it, with the hash export records."""
    materializer = Materializer(Parents(MODELS))
    folders = []
    for i, recipe in enumerate(RECIPES):
        digest = WeightsHash()
        folder = tmp_path_factory.mktemp("exports") / f"recipe{i}"
        write_model_folder(folder, materializer.tensors(recipe, torch.float32, digest),
                           MODELS["instruct"], torch.float32, {})
        folders.append((folder, digest.hexdigest()))
    return folders


@pytest.fixture(scope="module")
def fresh(exported) -> list[tuple[list[str], list, float]]:
    """What a vLLM engine started on each exported folder scores: texts, log-likelihoods,
    and the long prompt's answer's log-probability."""
    scored = []
    for folder, _ in exported:
        engine = VLLMEngine(folder, options())
        scored.append((*results(engine), long_run(engine).outputs[0].cumulative_logprob))
        engine.close()
    return scored


# DELLA cannot prune at density 0.1 with epsilon 0.2: the merge refuses layer 2's tensors.
REFUSED = MergeRecipe("della", ("clinical", "instruct"),
                      {"clinical": {"weight": 0.5}, "instruct": {"weight": 0.5}},
                      {"density": {"layers.2": 0.1, "*": 0.5}, "epsilon": 0.2}, base="base")


def test_swapped_recipes_score_as_fresh_engines_and_the_hf_engine(warm, exported, fresh):
    """Between the two, a recipe the merger refuses: the engine must hold none of it."""
    for recipe, (folder, digest), (texts, scores, _) in zip(RECIPES, exported, fresh,
                                                             strict=True):
        if recipe is RECIPES[1]:
            with pytest.raises(Exception, match="tensor 'model.layers.2.*epsilon = 0.2"):
                warm.load_recipe(REFUSED)
        assert warm.load_recipe(recipe).hexdigest() == digest, recipe.method
        warm_texts, warm_scores = results(warm)
        assert warm_texts == texts, recipe.method
        same_scores(warm_scores, scores, tolerance=1e-5)
        hf = HFEngine(folder, device="cpu", dtype="float32")
        hf_texts, hf_scores = results(hf)
        hf.close()
        assert warm_texts == hf_texts, recipe.method
        same_scores(warm_scores, hf_scores, tolerance=1e-4)
    assert fresh[0] != fresh[1]  # two different merges


def same_scores(scores: list[tuple[float, bool]], expected: list[tuple[float, bool]],
                tolerance: float) -> None:
    assert [greedy for _, greedy in scores] == [greedy for _, greedy in expected]
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in expected], abs=tolerance)


def test_the_prefix_cache_is_reset_at_each_swap(warm, fresh):
    """The long prompt is served from the cache under one candidate, and recomputed, not
    read back, after the swap: its answer's log-probability is then a fresh engine's."""
    warm.load_recipe(RECIPES[0])
    first, again = long_run(warm), long_run(warm)
    assert first.num_cached_tokens == 0 < again.num_cached_tokens
    warm.load_recipe(RECIPES[1])
    after = long_run(warm)
    assert after.num_cached_tokens == 0
    logprob_a, logprob_b = fresh[0][2], fresh[1][2]
    assert abs(logprob_a - logprob_b) > 1e-3  # the candidates tell apart on this prompt
    assert first.outputs[0].cumulative_logprob == pytest.approx(logprob_a, abs=1e-5)
    assert after.outputs[0].cumulative_logprob == pytest.approx(logprob_b, abs=1e-5)


# ------------------------------------------------------------------ whole studies

def study_spec(tmp_path: Path, **changes) -> Path:
    """The README's vLLM example (the demo study on the vLLM engine), with few items and
    trials, in float32 and eager."""
    example = ROOT / "examples" / "demo_vllm.yaml"
    spec = yaml.safe_load(example.read_text())
    for entry in spec["parents"] + spec["probes"]:
        entry["path"] = str((example.parent / entry["path"]).resolve())
    for probe in spec["probes"]:
        probe["limit"] = 8
    spec["engine"] = {"kind": "vllm", "dtype": "float32", "enforce_eager": True,
                      "kv_cache_memory_bytes": KV_BYTES}
    spec["evaluation"] = {"chunk_size": 8, "test_top_k": 1}
    spec["budget"] = {"n_trials": 5}
    spec.pop("constraints")
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def mergesearch(*args: str, cwd: Path) -> subprocess.Popen:
    """The CLI as a user runs it, in a session of its own (so that every process it starts
    can be found afterwards), its output in files beside the study (never a pipe that
    nobody reads while another process is waited for)."""
    name = cwd / f"{args[0]}-{time.monotonic_ns()}"
    process = subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=cwd,
                               stdout=open(f"{name}.out", "w"), stderr=open(f"{name}.err", "w"),
                               start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    process.logs = name  # type: ignore[attr-defined]
    return process


def wait_for_study(process: subprocess.Popen, folder: Path) -> None:
    """Until launch has made its study (which it does once its engine runs)."""
    deadline = time.monotonic() + 300
    while not (folder / "study.db").exists():
        assert process.poll() is None, Path(f"{process.logs}.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "launch made no study in 300 s"
        time.sleep(1)


def processes_of(session: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                found.append(process)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    """Wait for the CLI to exit, then for every process of its session to be gone."""
    process.wait(timeout=timeout)
    out, err = (Path(f"{process.logs}.{kind}").read_text() for kind in ("out", "err"))
    deadline = time.monotonic() + 30
    while (left := processes_of(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left behind: {[p.name() for p in left]}\n{err[-3000:]}"
    return process.returncode, out, err


def study_report(storage: str) -> dict:
    return json.loads(subprocess.run(
        [sys.executable, "-m", "search.cli", "report", "--storage", storage, "--json"],
        capture_output=True, text=True, check=True).stdout)


def test_launch_and_a_worker_run_a_vllm_study_and_export_proves_its_hash(tmp_path):
    # Trials take about a second: both processes run them for a while, not to a count, so
    # that the worker, which starts its engine once launch has made the study, has its turn.
    spec = study_spec(tmp_path, budget={"n_trials": 1000})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    launch = mergesearch("launch", str(spec), "--timeout", "60", cwd=tmp_path)
    wait_for_study(launch, tmp_path)  # the worker joins a study that exists
    worker = mergesearch("worker", "--storage", storage, "--timeout", "20", cwd=tmp_path)
    code, out, err = finish(launch)
    assert code == 0, err[-3000:]
    assert f"scored by the {ENGINE} engine" in out
    code, worker_out, worker_err = finish(worker)
    assert code == 0, worker_err[-3000:]
    assert f"scored by the {ENGINE} engine" in worker_out
    assert re.search(r"trial \d+ dev", worker_err), worker_err[-3000:]  # it scored trials

    report = study_report(storage)
    assert report["trials"]["complete"] >= 5 and report["trials"]["fail"] == 0
    evaluations = RecordStore.open(storage).evaluations("demo-vllm")
    scored = [e for e in evaluations if e.outcome == "complete"]
    assert scored and all(e.engine == ENGINE and e.items for e in scored)
    assert {e.items[0].output for e in scored if e.split == "dev"} - {""}

    done = subprocess.run([sys.executable, "-m", "search.cli", "export", "--storage", storage,
                           str(tmp_path / "export")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    card = json.loads((tmp_path / "export" / "mergesearch_recipe.json").read_text())
    assert card["weights_verified"] is True


def test_a_trial_that_fails_inside_the_worker_is_failed_and_the_engine_goes_on(tmp_path):
    """DELLA with epsilon 0.2 cannot merge at density <= 0.2 or >= 0.8: the merge raises in
    vLLM's worker process; the trial fails with the reason, the next runs on that engine."""
    spec = study_spec(tmp_path, parents=[{"name": n, "path": str(MODELS[n])} for n in MODELS],
                      merge={"method": "della", "base": "base", "genes": "global",
                             "outer_genes": False,
                             "params": {"density": [0.05, 0.95], "epsilon": 0.2}},
                      sampler={"name": "random"}, budget={"n_trials": 6})
    code, _, err = finish(mergesearch("launch", str(spec), "--no-test", cwd=tmp_path))
    assert code == 0, err[-3000:]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    report = study_report(storage)
    assert report["trials"]["fail"] >= 1 and report["trials"]["complete"] == 6
    assert all("epsilon = 0.2 with density" in f["reason"]
               for f in report["failures"]["trials"])


@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_an_interrupted_launch_leaves_no_vllm_process(tmp_path, stop):
    launch = mergesearch("launch", str(study_spec(tmp_path, budget={"n_trials": 200})),
                         cwd=tmp_path)
    wait_for_study(launch, tmp_path)
    time.sleep(5)  # trials are under way
    if stop == "ctrl-c":  # the terminal signals the whole foreground group
        os.killpg(launch.pid, signal.SIGINT)
    else:  # `kill PID` signals launch alone
        os.kill(launch.pid, signal.SIGTERM)
    code, _, err = finish(launch, timeout=120)
    assert code == 130, err[-3000:]
    assert "interrupted: finished trials are saved" in err


def test_an_error_after_the_engine_started_leaves_no_vllm_process(tmp_path):
    """The storage is opened once the engine runs: a database that is not there ends
    launch with one error, and the engine's processes end with it."""
    launch = mergesearch("launch", str(study_spec(tmp_path)), "--storage",
                         "postgresql://root@127.0.0.1:5432/mergesearch_no_such_database",
                         cwd=tmp_path)
    code, _, err = finish(launch)
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: ")
