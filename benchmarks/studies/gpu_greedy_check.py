"""Why is actsparse.greedy_decode slower than the minimal loop? Times both on the same compiled
backend, and greedy_decode's calls back to back at one length (no other length in between).

    PYTHONPATH=. python3 benchmarks/studies/gpu_greedy_check.py --out $OUT/greedy_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=None)
    args = p.parse_args()
    import actsparse
    from benchmarks.e2e import calibrate_on_tokens, lean_decode_rate
    from actsparse.models import shaped
    from torch._dynamo.utils import counters

    model = shaped("llama3-8b", dtype=torch.bfloat16, device="cuda", num_layers=args.layers)
    g = torch.Generator(device="cuda").manual_seed(0)
    plan = calibrate_on_tokens(model, torch.randint(0, 128000, (1, 512), device="cuda", generator=g), 0.5)
    ids = torch.randint(0, 128000, (1, 32), device="cuda", generator=g)
    actsparse.prepare(model, plan)
    be = actsparse.backend(plan, cudagraphs=True)
    res = {"lean_tok_s": lean_decode_rate(model, be, ids, 128)}
    counters.clear()

    def timed(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        actsparse.greedy_decode(model, ids, n, backend=be, ignore_eos=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    torch._dynamo.reset()
    res["first_129_s"] = timed(129)
    res["same_length_129_s"] = [timed(129) for _ in range(4)]
    res["cudagraph_counters_same_length"] = {k: dict(v) for k, v in counters.items() if v}
    counters.clear()
    res["one_token_s"] = [timed(1) for _ in range(3)]
    res["after_one_129_s"] = [timed(129) for _ in range(2)]
    res["cudagraph_counters_after_one"] = {k: dict(v) for k, v in counters.items() if v}
    t129 = sorted(res["same_length_129_s"])[2]
    t1 = sorted(res["one_token_s"])[1]
    res["greedy_decode_tok_s"] = 128 / (t129 - t1)
    print(json.dumps(res, indent=1)[:3000])
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
