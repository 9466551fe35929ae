"""A whole evaluation run: its metrics, the settings that produced them, and versions.

Kept as plain data so a JSON file written on one machine can be read, compared
and tabulated on another without the model.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .data import check_task
from .tasks import evaluate_task

_STDERR = "_stderr"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import torch
    import transformers

    try:
        from importlib.metadata import version

        actsparse = version("actsparse")
    except Exception:  # not installed (running from a checkout)
        actsparse = "unknown"
    return {
        "actsparse": actsparse,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


@dataclass
class EvalResult:
    """Metrics per task (``metrics[task][name]``), sample sizes (``n[task]``) and context."""

    model: str | None
    metrics: dict[str, dict[str, float]]
    n: dict[str, int]
    settings: dict = field(default_factory=dict)
    plan: dict | None = None
    started: str = ""
    finished: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """Plain-text table, one row per task and metric (stderr shown beside its metric)."""
        head = f"model: {self.model or '-'}"
        if self.plan:
            head += "   plan: " + ", ".join(f"{k}={v}" for k, v in self.plan.items())
        if self.settings:
            head += "\n" + "  ".join(f"{k}={v}" for k, v in self.settings.items())
        rows = [("task", "metric", "value", "stderr", "n")]
        for task, ms in self.metrics.items():
            for name, value in ms.items():
                if name.endswith(_STDERR):
                    continue
                rows.append((task, name, _fmt(value), _fmt(ms.get(name + _STDERR)), str(self.n.get(task, "-"))))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for j, r in enumerate(rows):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
            lines.append("  ".join(cells).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return head + "\n" + "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self, path) -> Path:
        """Write the result (inf/nan as JSON's usual Infinity/NaN extension)."""
        path = Path(path)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path) -> "EvalResult":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def run_eval(
    model,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | None = None,
    seed: int = 0,
    ppl_window: int = 512,
    ppl_stride: int | None = None,
    ppl_tokens: int | None = None,
    batch_size: int = 8,
    data_dir=None,
    model_name: str | None = None,
    plan_info: dict | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on ``tasks`` (names from ``TASKS``) and collect an EvalResult.

    All task names are checked before any work, so a typo fails at once.
    """
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("no tasks given")
    for t in tasks:
        check_task(t)
    started = _now()
    metrics, n, seconds = {}, {}, {}
    for t in tasks:
        r = evaluate_task(
            model, tokenizer, t, limit=limit, seed=seed, batch_size=batch_size, data_dir=data_dir,
            progress=progress, ppl_window=ppl_window, ppl_stride=ppl_stride, ppl_tokens=ppl_tokens,
        )
        metrics[t], n[t], seconds[t] = r.metrics, r.n, round(r.seconds, 3)
    try:
        param = next(model.parameters())
        dtype, device = str(param.dtype).removeprefix("torch."), str(param.device)
    except (AttributeError, StopIteration):
        dtype = device = None
    settings = {
        "limit": limit,
        "seed": seed,
        "ppl_window": ppl_window,
        "ppl_stride": ppl_stride if ppl_stride is not None else ppl_window,
        "ppl_tokens": ppl_tokens,
        "batch_size": batch_size,
        "dtype": dtype,
        "device": device,
    }
    return EvalResult(
        model=model_name,
        metrics=metrics,
        n=n,
        settings=settings,
        plan=plan_info,
        started=started,
        finished=_now(),
        seconds=seconds,
        versions=_versions(),
    )

