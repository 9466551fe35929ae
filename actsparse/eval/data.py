"""Evaluation data: WikiText-2 text and four zero-shot sets as plain records.

The data lives outside the project (a directory given explicitly, else the
``ACTSPARSE_DATA`` environment variable). Without either, and with the
``datasets`` package installed, the same sets are read from the Hugging Face
hub and mapped to the same record format, so the scoring code never knows
where the data came from.

Record formats (those of llm-foundry's local copies):

* piqa, arc_easy: ``{"query": str, "choices": [str, ...], "gold": int}``
* winogrande: ``{"context_options": [str, str], "continuation": str, "gold": int}``
* lambada: ``{"context": str, "continuation": str}``

Every loaded record also gets ``"idx"``, its position in the full set, so a
subsample can be traced back.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

TASKS = ("wikitext2", "piqa", "arc_easy", "winogrande", "lambada")
ENV_VAR = "ACTSPARSE_DATA"
FILES = {
    "wikitext2": "wikitext2_test.raw",
    "piqa": "piqa.jsonl",
    "arc_easy": "arc_easy.jsonl",
    "winogrande": "winogrande.jsonl",
    "lambada": "lambada_openai.jsonl",
}
_KEYS = {
    "piqa": ("query", "choices", "gold"),
    "arc_easy": ("query", "choices", "gold"),
    "winogrande": ("context_options", "continuation", "gold"),
    "lambada": ("context", "continuation"),
}
# ` = Title = ` starts an article; ` = = Section = = ` does not.
_ARTICLE_TITLE = re.compile(r"^ = [^=].*[^=] = $|^ = [^=] = $")


class MissingDataError(FileNotFoundError):
    """Evaluation data cannot be found; the message says how to point at it."""


def check_task(task: str) -> str:
    """Return ``task`` if known, else raise a ValueError listing the allowed names."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed tasks: {', '.join(TASKS)}")
    return task


def data_dir_from_env(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The explicit directory if given, else ``$ACTSPARSE_DATA``, else None (hub)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else None


def _have_datasets() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def data_path(task: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Path of the task's local file, checked to exist; None means "use the hub".

    Checked up front so that a command can fail before loading a model.
    """
    check_task(task)
    root = data_dir_from_env(data_dir)
    if root is None:
        if _have_datasets():
            return None
        raise MissingDataError(
            f"no evaluation data directory: set {ENV_VAR}=DIR or pass data_dir "
            f"(--data DIR on the command line), or install `datasets` to load "
            f"{task} from the Hugging Face hub"
        )
    path = (root / FILES[task]).resolve()
    if not path.is_file():
        raise MissingDataError(
            f"{task} data file not found: {path} (the data directory comes from "
            f"data_dir / --data, else the {ENV_VAR} environment variable)"
        )
    return path


# --- WikiText-2 -----------------------------------------------------------------


def _normalise_lines(lines) -> str:
    """Non-blank lines joined by "\\n": the local file's and the hub's common form."""
    kept = [ln.rstrip("\r\n") for ln in lines]
    kept = [ln for ln in kept if ln.strip()]
    return "".join(ln + "\n" for ln in kept)


def load_wikitext2(data_dir: str | os.PathLike | None = None) -> str:
    """The raw WikiText-2 test split as one string: non-blank lines, each ending in "\\n"."""
    path = data_path("wikitext2", data_dir)
    if path is None:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return _normalise_lines(ds["text"])
    with open(path, encoding="utf-8", newline="") as f:
        return _normalise_lines(f.read().split("\n"))


def wikitext2_articles(text: str) -> list[str]:
    """Split WikiText-2 text into articles at ` = Title = ` lines.

    Lets calibration take whole articles that are disjoint from those evaluated.
    Text before the first title (none in the real set) becomes its own article.
    """
    articles: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _ARTICLE_TITLE.match(line.rstrip("\r\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a) for a in articles if "".join(a).strip()]


# --- zero-shot sets -------------------------------------------------------------


def _read_jsonl(path: Path, task: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            missing = [k for k in _KEYS[task] if k not in rec]
            if missing:
                raise ValueError(
                    f"{path}:{lineno}: {task} record lacks {', '.join(missing)} "
                    f"(expected keys: {', '.join(_KEYS[task])})"
                )
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _from_hub(task: str) -> list[dict]:
    """The hub versions, mapped to llm-foundry's record format (not exercised by tests)."""
    import datasets

    if task == "piqa":
        ds = datasets.load_dataset("piqa", split="validation")
        return [
            {"query": f"Question: {d['goal']}\n", "choices": [d["sol1"], d["sol2"]], "gold": int(d["label"])}
            for d in ds
        ]
    if task == "arc_easy":
        ds = datasets.load_dataset("allenai/ai2_arc", "ARC-Easy", split="test")
        out = []
        for d in ds:
            labels = list(d["choices"]["label"])
            out.append(
                {
                    "query": f"Question: {d['question']}",
                    "choices": list(d["choices"]["text"]),
                    "gold": labels.index(d["answerKey"]),
                }
            )
        return out
    if task == "winogrande":
        ds = datasets.load_dataset("winogrande", "winogrande_xl", split="validation")
        out = []
        for d in ds:
            cut = d["sentence"].index("_")
            prefix = d["sentence"][:cut]
            out.append(
                {
                    "context_options": [prefix + d["option1"], prefix + d["option2"]],
                    "continuation": d["sentence"][cut + 1 :].strip(),
                    "gold": int(d["answer"]) - 1,
                }
            )
        return out
    if task == "lambada":
        ds = datasets.load_dataset("EleutherAI/lambada_openai", "default", split="test")
        out = []
        for d in ds:
            context, _, word = d["text"].rpartition(" ")
            out.append({"context": context, "continuation": word})
        return out
    raise AssertionError(task)


def subsample(records: list, limit: int | None, seed: int = 0) -> list:
    """A seeded random subset of ``limit`` records, kept in their original order.

    The subset for a smaller limit is contained in that for a larger one with the
    same seed (a prefix of one seeded permutation), so runs with growing limits
    extend each other.
    """
    if limit is None or limit >= len(records):
        return list(records)
    if limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:limit])]


def load_task(
    task: str,
    data_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Records of a zero-shot task (see module docstring), optionally subsampled."""
    check_task(task)
    if task == "wikitext2":
        raise ValueError("wikitext2 is a text for perplexity, not a set of records: use load_wikitext2()")
    path = data_path(task, data_dir)
    records = _from_hub(task) if path is None else _read_jsonl(path, task)
    records = [dict(r, idx=i) for i, r in enumerate(records)]
    return subsample(records, limit, seed)
