"""The exported folder's provenance: parents' file hashes, software versions, and the model
card (README.md) that shows them with the recipe and the scores next to the parents'."""

from __future__ import annotations

import hashlib
import json
import platform
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import yaml

PACKAGES = ("mergesearch", "torch", "transformers", "safetensors", "optuna", "lm_eval",
            "vllm")


def software_versions() -> dict[str, str]:
    """Installed versions of what made and scored the merge (vLLM only where installed)."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in a model folder, by name (weights hashed in parallel: hashlib
    releases the GIL, and an 8B parent is 16 GB)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip((p.name for p in files), pool.map(_sha256, files), strict=True))


def _verified(verified: bool | str) -> str:
    if verified is True:
        return "the same bytes as the trial scored"
    return f"not compared with the trial's weights: {verified}"


def _score(values: dict | None, name: str) -> str:
    return "" if not values or name not in values else f"{values[name]:.4f}"


def _scores_table(record: dict) -> str:
    columns = [(f"this merge (trial {record['trial']})", record["dev"], record["test"])]
    columns += [(name, b["dev"], b["test"]) for name, b in record["baselines"].items()]
    header = "| objective | " + " | ".join(f"{c[0]} dev | {c[0]} test" for c in columns) + " |"
    rows = [f"| {name} | " + " | ".join(f"{_score(dev, name)} | {_score(test, name)}"
                                         for _, dev, test in columns) + " |"
            for name in record["dev"]]
    return "\n".join([header, "|" + "---|" * (1 + 2 * len(columns)), *rows])


def _merged(record: dict) -> str:
    recipe = record["recipe"]
    models = ", ".join(f"`{name}`" for name in recipe["models"])
    return f"{models} on base `{recipe['base']}`" if recipe.get("base") else models


def _front_matter(record: dict) -> str:
    return yaml.safe_dump({"library_name": "transformers",
                           "base_model": [p["path"] for p in record["parents"].values()],
                           "tags": ["merge", "mergesearch", record["recipe"]["method"]]},
                          sort_keys=False)


def render(record: dict, mergekit_yaml: str | None) -> str:
    """README.md of an exported merge, from its provenance record."""
    parents = "\n".join(
        f"- `{name}`: `{p['path']}`\n" + "\n".join(f"  - `{file}` sha256 `{digest}`"
                                                   for file, digest in p["files"].items())
        for name, p in record["parents"].items())
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    ids = (f"Study `{record['study']}`, trial {record['trial']}; study seed {record['seed']}, "
           f"recipe seed {record['recipe']['seed']}.")
    weights = (f"Weights sha256 ({record['weights_dtype']}, merged on "
               f"{record['weights_device']}): `{record['weights_sha256']}` "
               f"({_verified(record['weights_verified'])}).")
    mergekit = (f"The same merge as a mergekit config (`mergekit_config.yml`):\n\n```yaml\n"
                f"{mergekit_yaml}```" if mergekit_yaml else
                "mergekit cannot express this recipe; `mergesearch_recipe.json` is its only "
                "form.")
    return f"""---
{_front_matter(record)}---

# Merged model: study `{record['study']}`, trial {record['trial']}

Made by mergesearch with a `{record['recipe']['method']}` merge of {_merged(record)}; config,
tokenizer and chat template from `{record['source_parent']}`. Chosen as {record['chosen_as']}.

## Scores

Dev scores chose the trial; test scores are held-out items the search never saw. The parents
and their uniform average were scored the same way in the same study.

{_scores_table(record)}

## Provenance

- {ids}
- {weights}
- Software: {versions}.

Parents and their files:

{parents}

## Recipe

```json
{json.dumps(record['recipe'], indent=2, sort_keys=True)}
```

{mergekit}
"""
