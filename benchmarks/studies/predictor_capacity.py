"""Does more text, more rank or a nonlinearity make the MLP-neuron predictors better?

Held-out recall of predictors for a few SmolLM2 MLPs, against the labels of
``actsparse.calibration.predictor`` at 50% (top-k of |act(gate) * up|, and the CATS mask),
for: the library's low-rank linear predictor trained on the calibration text, the same with
65k more tokens of LAMBADA passages (text no evaluation here uses), higher rank, and a hidden
ReLU layer. Training recall is reported too: when it equals held-out recall, more data cannot
help and the predictor class is the limit.

    python benchmarks/studies/predictor_capacity.py --out benchmarks/results/predictor_capacity_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from actsparse.calibration.data import token_batches
from actsparse.calibration.predictor import (_metrics, collect_mlp_inputs, gated_mlps, reference_labels,
                                             trace_sites)
from actsparse.eval.data import load_wikitext2, wikitext2_articles
from actsparse.models import load


def fit(xtr, ytr, hidden: int, relu: bool, epochs: int = 8, lr: float = 3e-3, bs: int = 1024, seed: int = 0):
    """Class-weighted BCE, as the library's trainer; Linear(d, h) [-> ReLU] -> Linear(h, n)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d, n = xtr.shape[1], ytr.shape[1]
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden, bias=False),
                              torch.nn.ReLU() if relu else torch.nn.Identity(), torch.nn.Linear(hidden, n))
    frac = ytr.float().mean()
    pw = (1 - frac) / frac
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xs, yf = (xtr - mean) / std, ytr.float()
    total = epochs * math.ceil(len(xs) / bs)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), bs):
            idx = perm[i:i + bs]
            loss = F.binary_cross_entropy_with_logits(net(xs[idx]), yf[idx], pos_weight=pw)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sch.step()
    return lambda x: net((x - mean) / std)


def select(logits, labels, label: str):
    """Top-k per token (top-k labels) or one global cutoff at the labels' density (CATS)."""
    if label == "topk":
        k = int(labels.sum(1)[0])
        return logits >= torch.topk(logits, k, dim=-1).values[:, -1:]
    t = torch.quantile(logits.flatten()[:2_000_000], 1 - labels.float().mean().item())
    return logits > t


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 12])
    p.add_argument("--extra-tokens", type=int, default=65536)
    args = p.parse_args()
    torch.set_num_threads(2)
    model, tok = load("smollm2-135m")
    mlps = [m for i, m in enumerate(gated_mlps(trace_sites(model))) if i in args.layers]
    wiki, _ = token_batches(wikitext2_articles(load_wikitext2(args.data))[:10], tok, token_budget=16384,
                            batch_size=4, seq_len=512)
    with open(f"{args.data}/lambada_openai.jsonl") as f:
        lam = [(r["context"] + " " + r["continuation"]) for r in map(json.loads, f)]
    extra, _ = token_batches(lam, tok, token_budget=args.extra_tokens, batch_size=4, seq_len=512)
    xw = collect_mlp_inputs(model, mlps, wiki, False)
    xl = collect_mlp_inputs(model, mlps, extra, False)
    mods = dict(model.named_modules())
    rows = []
    for s in mlps:
        x, n_held = xw[s.module], 1536
        d = x.shape[1]
        wg, wu = mods[s.gate].weight.detach().float(), mods[s.up].weight.detach().float()
        variants = [("linear, rank 8%, calibration text", x[:-n_held], round(0.08 * d), False),
                    ("linear, rank 8%, + LAMBADA", torch.cat([x[:-n_held], xl[s.module]]), round(0.08 * d), False),
                    ("linear, rank 25%, + LAMBADA", torch.cat([x[:-n_held], xl[s.module]]), round(0.25 * d), False),
                    ("ReLU hidden d, + LAMBADA", torch.cat([x[:-n_held], xl[s.module]]), d, True)]
        for label in ("topk", "cats"):
            yh, sh = reference_labels(x[-n_held:], wg, wu, s.act, 0.5, label)
            for name, xtr, hidden, relu in variants:
                t0 = time.time()
                ytr, str_ = reference_labels(xtr, wg, wu, s.act, 0.5, label)
                f = fit(xtr, ytr, hidden, relu)
                with torch.no_grad():
                    held = _metrics(select(f(x[-n_held:]), yh, label), yh, sh)
                    tr = _metrics(select(f(xtr[:4096]), ytr[:4096], label), ytr[:4096], str_[:4096])
                row = {"mlp": s.module, "label": label, "predictor": name, "hidden": hidden,
                       "train_tokens": len(xtr), "held_recall": held["recall"], "held_precision": held["precision"],
                       "held_mass_recall": held["mass_recall"], "label_mass_recall": held["label_mass_recall"],
                       "train_recall": tr["recall"], "seconds": round(time.time() - t0, 1)}
                rows.append(row)
                print(f"{s.module} {label:4s} {name:36s} held recall {row['held_recall']:.3f} "
                      f"train {row['train_recall']:.3f} mass {row['held_mass_recall']:.3f}", flush=True)
    res = {"command": "python benchmarks/studies/predictor_capacity.py " + " ".join(sys.argv[1:]),
           "model": "smollm2-135m", "sparsity": 0.5, "held_out": "last 1536 tokens of WikiText-2 test articles 0-9",
           "rows": rows}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
