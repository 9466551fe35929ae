"""Learned activation predictors (Deja Vu): guess each MLP's active neurons from its input.

    plan = train_predictor_plan(model, texts, sparsity=0.5, tokenizer=tok)

Threshold methods must run the whole gate projection (CATS) or read every MLP input (TEAL)
before they know which neurons are active. A predictor, per gated MLP, is a low-rank
``Linear(d, r) -> Linear(r, n)`` on the MLP input whose logits rank the n neurons; the
backend keeps the ``keep`` best of each token (or the logits above a calibrated threshold)
and runs gate, up and down on those rows only.

Training, per MLP, on calibration text run through the dense model:

* inputs: the MLP input x (the gate's input), standardised per channel for training (the
  scaling is folded into W1 afterwards, so it costs nothing at run time);
* labels: the neurons a reference rule marks active: ``"topk"`` (default) the largest
  ``(1 - s) n`` of ``|act(gate x) * up x|`` per token (what the down projection really gets),
  or ``"cats"`` the CATS mask ``|act(gate x)| > t`` with t the quantile at s;
* loss: class-weighted BCE (positives weighted by negatives/positives), Adam, cosine decay;
* selection: ``"topk"`` keeps ``round((1 - s) n)`` neurons per token (exact sparsity);
  ``"threshold"`` keeps logits above the training logits' quantile at s (sparsity on average).

A held-out tail of the calibration sequences measures each predictor's recall and precision
against its labels; they and the losses go into ``plan.info["predictor"]``. Everything is
seeded; the work is a few CPU minutes for SmolLM2-135M and Gemma-3-270M.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tqdm.auto import tqdm

from ..ops.reference import activation
from ..ops.reference import select as select_mask
from ..plan import SELECTIONS, Predictors, SparsityPlan, fingerprint
from .data import token_batches
from .method import CalibrationError, Method, check_sparsity, register_method
from .sites import SiteRecord, masked_sites, mlp_downs, overall_sparsity, trace_sites
from .training import train_minibatches

LABELS = ("topk", "cats")


class PredictorError(ValueError):
    """Bad predictor-training arguments."""


@dataclass
class PredictorConfig:
    """How predictors are trained; ``rank`` < 1 is a fraction of the MLP input width d."""

    rank: float = 0.08
    label: str = "topk"
    selection: str = "topk"
    epochs: int = 8
    batch_size: int = 1024
    lr: float = 3e-3
    holdout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise PredictorError(f"label must be one of {', '.join(LABELS)}, got {self.label!r}")
        if self.selection not in SELECTIONS:
            raise PredictorError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if not self.rank > 0:
            raise PredictorError(f"rank must be > 0 (an integer, or a fraction of d below 1), got {self.rank}")
        if not 0.0 < self.holdout < 1.0:
            raise PredictorError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise PredictorError("epochs and batch_size must be >= 1 and lr > 0")

    def rank_for(self, d: int) -> int:
        return max(1, int(round(self.rank * d))) if self.rank < 1 else int(self.rank)


def gated_mlps(sites: list[SiteRecord]) -> list[SiteRecord]:
    """The gated MLPs' down projections (the predictors' keys), in graph order."""
    return [s for s in mlp_downs(sites) if s.gate is not None and s.up is not None and s.act is not None]


def collect_mlp_inputs(model: torch.nn.Module, mlps: list[SiteRecord], batches: Sequence[torch.Tensor],
                       progress: bool = True) -> dict[str, torch.Tensor]:
    """Each gated MLP's input over the batches, ``{down module: [tokens, d]}`` in fp32 on the CPU."""
    mods = dict(model.named_modules())
    store: dict[str, list[torch.Tensor]] = {s.module: [] for s in mlps}
    handles = []

    def hook(key):
        def fn(mod, args):
            x = args[0]
            store[key].append(x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32))
        return fn

    for s in mlps:
        handles.append(mods[s.gate].register_forward_pre_hook(hook(s.module)))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc="predictor: MLP inputs", disable=not progress, unit="batch"):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def _keep_count(sparsity: float, n: int) -> int:
    return min(n, max(1, int(round((1.0 - sparsity) * n))))


def reference_labels(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, act: str, sparsity: float,
                     label: str, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [T, n] bool, |act(gate) * up| [T, n]) for ``x`` under the reference rule."""
    n = w_gate.shape[0]
    keep = _keep_count(sparsity, n)
    labels, scores, gates = [], [], []
    wg, wu = w_gate.float(), w_up.float()
    for i in range(0, len(x), chunk):
        xc = x[i:i + chunk]
        g = activation(act, F.linear(xc, wg))
        h = (g * F.linear(xc, wu)).abs()
        scores.append(h)
        if label == "topk":
            kth = torch.topk(h, keep, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
            labels.append(h >= kth)
        else:
            gates.append(g.abs())
    if label == "cats":
        ga = torch.cat(gates)
        t = _quantile(ga, sparsity)
        return ga > t, torch.cat(scores)
    return torch.cat(labels), torch.cat(scores)


def _quantile(v: torch.Tensor, q: float) -> float:
    """The q-quantile of all entries of v (exact, by kthvalue; torch.quantile caps its input size)."""
    flat = v.reshape(-1)
    k = min(flat.numel(), max(1, int(math.ceil(q * flat.numel()))))
    return float(flat.kthvalue(k).values)


@dataclass
class Fitted:
    """One MLP's trained predictor (input scaling folded in) and its training losses."""

    w1: torch.Tensor  # [r, d]
    w2: torch.Tensor  # [n, r]
    b2: torch.Tensor  # [n]
    losses: dict[str, float]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.w1), self.w2, self.b2)


def _metrics(pred: torch.Tensor, label: torch.Tensor, score: torch.Tensor) -> dict[str, float]:
    tp = (pred & label).sum().item()
    return {
        "recall": tp / max(1, label.sum().item()),
        "precision": tp / max(1, pred.sum().item()),
        "sparsity": 1.0 - pred.float().mean().item(),
        # share of sum |act(gate) * up| that the predicted neurons carry, and the labels' share
        "mass_recall": (score * pred).sum().item() / max(1e-30, score.sum().item()),
        "label_mass_recall": (score * label).sum().item() / max(1e-30, score.sum().item()),
    }


def fit_predictor(x_train: torch.Tensor, y_train: torch.Tensor, x_held: torch.Tensor, y_held: torch.Tensor,
                  cfg: PredictorConfig, seed: int) -> Fitted:
    """Class-weighted BCE training of one low-rank predictor on (MLP inputs, labels)."""
    d, n = x_train.shape[1], y_train.shape[1]
    r = cfg.rank_for(d)
    g = torch.Generator().manual_seed(seed)
    mean = x_train.mean(0)
    std = x_train.std(0).clamp_min(1e-6)
    xs = (x_train - mean) / std
    w1 = (torch.randn(r, d, generator=g) / math.sqrt(d)).requires_grad_()
    w2 = (torch.randn(n, r, generator=g) / math.sqrt(r)).requires_grad_()
    pos = y_train.float().mean(0).clamp(1e-4, 1 - 1e-4)
    b2 = torch.log(pos / (1 - pos)).clone().requires_grad_()  # start at each neuron's base rate
    frac = y_train.float().mean().clamp(1e-4, 1 - 1e-4)
    pos_weight = (1 - frac) / frac  # class-weighted BCE: both classes weigh the same in total
    yf = y_train.float()

    def loss_on(xb, yb):
        return F.binary_cross_entropy_with_logits(F.linear(F.linear(xb, w1), w2, b2), yb, pos_weight=pos_weight)

    held_x, held_y = (x_held - mean) / std, y_held.float()
    with torch.no_grad():
        loss0 = loss_on(held_x, held_y).item()
    first, last = train_minibatches([w1, w2, b2], lambda idx: loss_on(xs[idx], yf[idx]), len(xs), epochs=cfg.epochs,
                                    batch_size=cfg.batch_size, lr=cfg.lr, generator=g)
    with torch.no_grad():
        held_loss = loss_on(held_x, held_y).item()
        w1f = (w1 / std).detach()  # x -> (x - mean) / std folded into W1 and b2
        b2f = (b2 - F.linear(F.linear(mean, w1f), w2)).detach()
    losses = {"held_loss_init": loss0, "held_loss": held_loss, "train_loss_first_epoch": first,
              "train_loss_last_epoch": last}
    return Fitted(w1f.contiguous(), w2.detach().contiguous(), b2f.contiguous(), losses)


class PredictorTrainer:
    """MLP inputs of one calibration pass, from which predictor plans at any sparsity are made.

    ``plan(s)`` trains on labels at s; ``plan(s, label_sparsity=s0)`` reuses the predictors
    trained at s0 (trained once, cached) and only sets the selection for s: one training run
    serves several targets.
    """

    def __init__(self, model: torch.nn.Module, tokens_or_texts, tokenizer=None, *,
                 config: PredictorConfig | None = None, token_budget: int = 32768, batch_size: int = 4,
                 seq_len: int = 512, progress: bool = True, source: str | None = None) -> None:
        self.model, self.cfg, self.progress = model, config or PredictorConfig(), progress
        batches, self.data_info = token_batches(tokens_or_texts, tokenizer, token_budget=token_budget,
                                                batch_size=batch_size, seq_len=seq_len, seed=self.cfg.seed)
        self.source = source or f"caller-provided {self.data_info['data']}"
        self.sites = trace_sites(model)
        self.mlps = gated_mlps(self.sites)
        if not self.mlps:
            raise PredictorError("no gated MLP (down(act(gate x) * up x)) found in the model's traced graph")
        seqs = torch.cat(batches)
        held = max(1, int(round(len(seqs) * self.cfg.holdout)))
        if held >= len(seqs):
            raise PredictorError(f"{len(seqs)} calibration sequence(s) cannot be split into training and "
                                 "held-out parts: give more text or a shorter seq_len")
        t0 = time.perf_counter()
        self.inputs = collect_mlp_inputs(model, self.mlps, [seqs[i:i + batch_size] for i in
                                                            range(0, len(seqs), batch_size)], progress)
        self.collect_seconds = round(time.perf_counter() - t0, 1)
        self.split = (len(seqs) - held) * seqs.shape[1]  # rows: training first, held-out after
        self.fingerprint = fingerprint(model)
        self._fitted: dict[float, tuple[dict[str, Fitted], float]] = {}

    def _weights(self, s: SiteRecord) -> tuple[torch.Tensor, torch.Tensor]:
        mods = dict(self.model.named_modules())
        return mods[s.gate].weight.detach().cpu().float(), mods[s.up].weight.detach().cpu().float()

    def fit(self, label_sparsity: float) -> dict[str, Fitted]:
        """Predictors trained on labels at ``label_sparsity`` (cached)."""
        key = round(float(label_sparsity), 6)
        if key not in self._fitted:
            t0 = time.perf_counter()
            out = {}
            for i, s in enumerate(tqdm(self.mlps, desc=f"predictor: train @ {key:.2f}",
                                       disable=not self.progress, unit="mlp")):
                x = self.inputs[s.module]
                y, _ = reference_labels(x, *self._weights(s), s.act, key, self.cfg.label)
                k = self.split
                out[s.module] = fit_predictor(x[:k], y[:k], x[k:], y[k:], self.cfg, seed=self.cfg.seed * 1000 + i)
            self._fitted[key] = (out, round(time.perf_counter() - t0, 1))
        return self._fitted[key][0]

    def plan(self, sparsity: float, label_sparsity: float | None = None) -> SparsityPlan:
        """A predictor plan at ``sparsity`` (fraction of MLP neurons skipped: gate, up, down)."""
        sparsity = check_sparsity(sparsity)
        label_s = sparsity if label_sparsity is None else check_sparsity(label_sparsity, "label_sparsity")
        cfg = self.cfg
        fitted = self.fit(label_s)
        preds: dict[str, dict[str, Any]] = {}
        tensors: dict[str, torch.Tensor] = {}
        measured: dict[str, float] = {}
        layers: dict[str, dict[str, float]] = {}
        k = self.split
        for s in self.mlps:
            f = fitted[s.module]
            x = self.inputs[s.module]
            n = f.w2.shape[0]
            keep = _keep_count(sparsity, n)
            with torch.no_grad():
                threshold = _quantile(f.logits(x[:k]), sparsity)
                held = f.logits(x[k:])
                pred = select_mask(held, keep, threshold, cfg.selection == "topk")
                y, score = reference_labels(x[k:], *self._weights(s), s.act, sparsity, cfg.label)
            m = _metrics(pred, y, score)
            m.update(f.losses)
            layers[s.module] = {key: round(float(v), 5) for key, v in m.items()}
            preds[s.module] = {"gate": s.gate, "up": s.up, "act": s.act, "rank": int(f.w1.shape[0]),
                               "in_features": int(f.w1.shape[1]), "neurons": int(n), "selection": cfg.selection,
                               "keep": int(keep), "threshold": float(threshold)}
            tensors.update({f"{s.module}.w1": f.w1, f"{s.module}.w2": f.w2, f"{s.module}.b2": f.b2})
            for mod in (s.gate, s.up, s.module):
                measured[mod] = round(m["sparsity"], 6)
        plan = SparsityPlan(method="predictor", target=sparsity, rules=[Predictors(preds, tensors)])
        plan.model = self.fingerprint
        plan.roles = {s.module: s.role for s in masked_sites(self.sites)}
        plan.measured = measured
        plan.overall_sparsity = round(overall_sparsity(self.sites, measured), 6)
        mean = lambda key: round(sum(v[key] for v in layers.values()) / len(layers), 5)  # noqa: E731
        plan.info = {"source": self.source, **self.data_info, "seed": cfg.seed,
                     "target_scope": "MLP neurons (gate/up rows and down columns)",
                     "measured_on": "held-out calibration tokens (predictor selection on dense-model inputs)",
                     "predictor": {"config": asdict(cfg), "label_sparsity": label_s, "train_tokens": k,
                                   "held_out_tokens": int(len(next(iter(self.inputs.values()))) - k),
                                   "collect_seconds": self.collect_seconds,
                                   "train_seconds": self._fitted[round(label_s, 6)][1],
                                   "mean_recall": mean("recall"), "mean_precision": mean("precision"),
                                   "mean_mass_recall": mean("mass_recall"), "layers": layers}}
        plan.validate(self.model)
        return plan


def train_predictor_plan(model: torch.nn.Module, tokens_or_texts, sparsity: float = 0.5, tokenizer=None, *,
                         rank: float = 0.08, label: str = "topk", selection: str = "topk", epochs: int = 8,
                         lr: float = 3e-3, batch_size: int = 1024, holdout: float = 0.1, seed: int = 0,
                         token_budget: int = 32768, seq_len: int = 512, progress: bool = True,
                         source: str | None = None, label_sparsity: float | None = None) -> SparsityPlan:
    """Train predictors for every gated MLP of ``model`` and return them as a SparsityPlan.

    ``sparsity``: fraction of each MLP's neurons skipped (gate, up and down alike).
    ``rank``: predictor rank, an integer or a fraction of the MLP input width (default 8%).
    ``label``: reference rule the predictor learns, ``"topk"`` of |act(gate) * up| or ``"cats"``.
    ``selection``: ``"topk"`` (exact sparsity per token) or ``"threshold"`` (calibrated logit
    cutoff). ``token_budget`` calibration tokens (``seq_len`` each sequence); the last
    ``holdout`` of the sequences measures recall and precision. Seeded by ``seed``.
    Save with ``plan.save("plan.json")``: the weights go to ``plan.json.safetensors``.
    """
    cfg = PredictorConfig(rank=rank, label=label, selection=selection, epochs=epochs, batch_size=batch_size,
                          lr=lr, holdout=holdout, seed=seed)
    trainer = PredictorTrainer(model, tokens_or_texts, tokenizer, config=cfg, token_budget=token_budget,
                               seq_len=seq_len, progress=progress, source=source)
    return trainer.plan(sparsity, label_sparsity)


@register_method
class PredictorMethod(Method):
    """Learned predictors: trained on their own pass over the calibration data, not on histograms."""

    name = "predictor"
    options = {"rank": "predictor rank: an integer, or a fraction of the MLP input width",
               "label": f"the rule the predictors learn: one of {', '.join(LABELS)}",
               "selection": f"how neurons are kept: one of {', '.join(SELECTIONS)}",
               "epochs": "training epochs", "label_sparsity": "train on labels at this sparsity"}
    target_scope = "MLP neurons (gate/up rows and down columns)"
    from_statistics = False

    def calibrate(self, model, tokens_or_texts, sparsity, tokenizer=None, *, calibrator_args, options):
        args = {k: calibrator_args[k] for k in ("seq_len", "seed", "progress", "source") if k in calibrator_args}
        args["token_budget"] = calibrator_args.get("token_budget", 32768)
        return train_predictor_plan(model, tokens_or_texts, sparsity, tokenizer, **args, **options)

    def make(self, cal, sparsity, **options):
        raise CalibrationError("method 'predictor' trains on its own pass over the data: use "
                               "actsparse.calibrate(model, data, method='predictor', ...)")


__all__ = ["LABELS", "Fitted", "PredictorConfig", "PredictorError", "PredictorTrainer", "collect_mlp_inputs",
           "fit_predictor", "gated_mlps", "reference_labels", "train_predictor_plan"]
