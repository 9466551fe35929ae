"""End-to-end decode on quantized weights: dense bf16 against int8 / int4, dense and sparse, one run.

A random-weight model of Llama-3-8B shape (``actsparse.models.shaped``; speed depends on shapes,
not values) in bf16, and two copies of it quantized by ``actsparse.quantize`` (int8 per output
channel; int4 in groups of 128 input channels). TEAL thresholds are calibrated once on the bf16
model and applied unchanged to the quantized copies (the plan's fingerprint allows it). Every
variant decodes in the same minimal loop (compiled step under CUDA graphs, static cache, greedy
argmax, no host sync per token):

* ``dense-bf16``: ``backend="inductor"`` with CUDA graphs: the baseline of ``vs_dense``;
* ``dense-int8`` / ``dense-int4``: the quantized model under Inductor (its dequantise-and-matmul
  compiled as Inductor compiles it; no special int kernel);
* ``sparse-int8`` / ``sparse-int4``: ``backend="sparse"`` with the plan at each sparsity: the
  quantized sparse GEMV (``kernels/triton/quant_gemv``) at every masked linear.

With torchao importable (``--torchao auto``, the default) three more variants, the same random
weights quantized by torchao (every decoder linear; the output head stays bf16, as above):

* ``dense-torchao-int8``: ``Int8WeightOnlyConfig()`` under Inductor with CUDA graphs;
* ``dense-torchao-int4``: ``Int4WeightOnlyConfig(group_size=128, int4_packing_format=
  "tile_packed_to_4d")`` (tinygemm's ``_weight_int4pack_mm``, bf16, CUDA only);
* ``sparse-torchao-int8``: the torchao int8 model through ``backend="sparse"``: our quantized
  GEMV over torchao's int8 data (converted once to input-major storage) at each sparsity;
* ``sparse-torchao-intx4``: ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=
  PerGroup(128))`` through ``backend="sparse"``, the int4 layout our kernel reads (tinygemm's
  packed layout is not). Like torchao int8, and unlike ``actsparse.quantize``'s storage, its
  q/k/v and gate/up run as one call each. Its dense row is torchao's own unpacked path.

A torchao config that fails to build or run is recorded under ``errors`` and the run goes on.

Rows are ordered so that the most telling ones (batch 1, 50%) come first, and written as they
finish; ``--budget-s`` stops starting new rows so that the run ends within the machine's limit.

    python -m benchmarks.e2e_quant --out $OUT/e2e_quant_h100.json
    # the GPU machine has no package index: carry the wheel (see the report / README)
    pip install --no-deps --no-index .wheels/torchao-0.18.0-*.whl && python -m benchmarks.e2e_quant ...
    python -m benchmarks.e2e_quant --tiny --device cpu --compiler eager --out q.json   # the CPU smoke path
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (the CPU test path)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compiler", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.0, 0.25, 0.4, 0.6])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--group-size", type=int, default=None, help="int4 group (default: the largest of 32/64/128 that fits: 128 on Llama-3)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=480, help="start no new row after this many seconds")
    p.add_argument("--torchao", choices=["auto", "off"], default="auto",
                   help="auto: add torchao's int8 / int4 rows when torchao imports")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if any(not 0 <= s < 1 for s in a.sparsity):
        p.error("--sparsity values must be in [0, 1)")
    if any(b not in (8, 4) for b in a.bits):
        p.error("--bits takes 8 and/or 4")
    return a


def build(args, seed: int = 0, *, dtype: torch.dtype = torch.bfloat16, layers: int | None = None):
    """The float model: a tiny Llama (fp32, CPU) or a shaped random Llama-3 (bf16 unless ``dtype``)."""
    from actsparse.models import shaped, tiny

    layers = layers or args.layers
    if args.tiny:
        return tiny("llama", intermediate_size=128, num_hidden_layers=layers or 2, seed=seed).to(args.device)
    return shaped(args.model, dtype=dtype, device=args.device, num_layers=layers, seed=seed)


def backend_for(plan, args):
    """The compiled step's backend: the sparse backend with ``plan``, else plain Inductor."""
    import actsparse

    cuda = args.device.startswith("cuda")
    if plan is not None:
        return actsparse.backend(plan, cudagraphs=cuda and args.compiler == "inductor", compiler=args.compiler)
    if args.compiler == "eager":
        return "eager"
    from torch._inductor.compile_fx import compile_fx

    def be(gm, example_inputs):
        return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": cuda})
    return be


def check_models(args) -> tuple[dict, object]:
    """Small fp32 copies for ``check``: 2 layers of the model's widths, each width quantized, and
    torchao int8 where it imports; a 50% plan calibrated on the float copy.

    fp32 and 2 layers because in bf16 the compiled and the eager step round some inputs to values
    on either side of a threshold; those flips grow through every layer and would hide a wrong
    mask or kernel (the bf16 check on the full model failed on that alone)."""
    import actsparse
    from benchmarks.e2e import calibrate_on_tokens

    base = build(args, seed=3, dtype=torch.float32, layers=2)
    g = torch.Generator(device=args.device).manual_seed(4)
    plan = calibrate_on_tokens(base, torch.randint(3, base.config.vocab_size, (1, 128), device=args.device,
                                                   generator=g), 0.5)
    models = {f"int{b}": actsparse.quantize(build(args, seed=3, dtype=torch.float32, layers=2), bits=b,
                                            group_size=args.group_size if b == 4 else None) for b in args.bits}
    if args.torchao != "off":
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            configs = {"torchao-int8": Int8WeightOnlyConfig(set_inductor_config=False)}
            if 4 in args.bits:
                configs["torchao-intx4"] = intx4_config(args)
            for key, config in configs.items():
                model = build(args, seed=3, dtype=torch.float32, layers=2)
                head = model.get_output_embeddings()
                quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m is not head)
                models[key] = model
        except Exception:  # noqa: BLE001 - torchao missing or failing: its rows record why
            pass
    return models, plan


def check(models: dict, plan, args) -> dict:
    """One decode step of each quantized model, compiled sparse, against the eager model masked
    by hooks; relative logit error, beside what the masks themselves change."""
    from transformers import StaticCache

    from actsparse.eval.masked import masked

    out = {}
    g = torch.Generator(device=args.device).manual_seed(2)
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(3, vocab, (1, 17), device=args.device, generator=g)

    def step(model, fwd, masked_prefill=True):
        """Prefill eagerly (masked by hooks, as the reference), then one step with ``fwd``."""
        cache = StaticCache(config=model.config, max_cache_len=20)
        with torch.no_grad():
            with (masked(model, plan) if masked_prefill else contextlib.nullcontext()):
                model(input_ids=ids[:, :16], past_key_values=cache, cache_position=torch.arange(16, device=args.device))
            return fwd(input_ids=ids[:, 16:], past_key_values=cache,
                       cache_position=torch.tensor([16], device=args.device)).logits.float().clone()

    for name, model in models.items():
        with masked(model, plan):
            ref = step(model, model.forward)
        dense = step(model, model.forward, masked_prefill=False)
        torch._dynamo.reset()
        got = step(model, torch.compile(model.forward, backend=backend_for(plan, args), fullgraph=True))
        rel = float((got - ref).norm() / ref.norm())
        rel_mask = float((dense - ref).norm() / ref.norm())
        out[name] = {"rel_err_vs_masked_eager": rel, "rel_diff_masked_vs_dense": rel_mask, "ok": rel < 0.25 * rel_mask}
    return out


def intx4_config(args):
    """torchao's unpacked int4 (the int4 layout our kernel reads), grouped as our own int4 rows."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(args.group_size or (32 if args.tiny else 128)))


TORCHAO = {"torchao-int8": 8, "torchao-int4": 4, "torchao-intx4": 4}  # model key -> bits
SPARSE_TORCHAO = ("torchao-int8", "torchao-intx4")  # the layouts our kernel reads
BASELINE_TORCHAO = ("torchao-int8", "torchao-int4")  # the dense rows the targets compare against


def row_order(args, torchao: tuple[str, ...] = ()) -> list[tuple[int, str, int | str | None, float | None]]:
    """(batch, kind, model key, sparsity) in the order they run, the comparison the targets name
    first, so that a run cut short by its budget still holds it: per batch the bf16 baseline,
    then for each width torchao's dense row (else Inductor's), then the sparse rows at the first
    sparsity (on torchao's data, then on ours),
    then the other dense rows, then the other sparsities. ``torchao``: the torchao models built
    (their dense rows; sparse rows for SPARSE_TORCHAO, the layouts our kernel reads)."""
    rows = []
    for batch in args.batches:
        first = [(batch, "dense", None, None)]
        for b in args.bits:
            ao = [key for key in torchao if TORCHAO[key] == b]
            first += [(batch, "dense", key, None) for key in ao if key in BASELINE_TORCHAO] \
                or [(batch, "dense", b, None)]
            first += [(batch, "sparse", key, args.sparsity[0]) for key in ao if key in SPARSE_TORCHAO]
            first.append((batch, "sparse", b, args.sparsity[0]))
        rest = [(batch, "dense", key, None) for key in (*args.bits, *torchao)]
        for s in args.sparsity[1:]:
            rest += [(batch, "sparse", b, s) for b in args.bits]
            rest += [(batch, "sparse", key, s) for key in torchao if key in SPARSE_TORCHAO]
        rows += first + [r for r in rest if r not in first]
    return rows


def torchao_models(args, res: dict) -> dict:
    """The torchao-quantized copies (see the module docstring); failures go to ``res``."""
    if args.torchao == "off":
        res["torchao"] = "off"
        return {}
    try:
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001 - not installed, or built for another torch
        res["torchao"] = f"not measured ({type(e).__name__}: {e})"
        return {}
    res["torchao"] = torchao.__version__
    tuned = not args.tiny  # torchao's Inductor options (process-wide: not in the test path)
    configs = {"torchao-int8": lambda: Int8WeightOnlyConfig(set_inductor_config=tuned)}
    if args.device.startswith("cuda") and not args.tiny:  # tinygemm: bf16 weights on CUDA
        configs["torchao-int4"] = lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    if 4 in args.bits:
        configs["torchao-intx4"] = lambda: intx4_config(args)
    out = {}
    for key, config in configs.items():
        try:
            model = build(args)
            head = model.get_output_embeddings()
            quantize_(model, config(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m is not head)
            out[key] = model
        except Exception as e:  # noqa: BLE001 - one config failing must not lose the others
            res.setdefault("errors", []).append(f"building {key}: {type(e).__name__}: {e}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    import actsparse
    from benchmarks.e2e import calibrate_on_tokens, lean_decode_rate
    from benchmarks.harness import cudagraph_skips

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    res = {"gpu" if cuda else "cpu": torch.cuda.get_device_name() if cuda else "cpu",
           "command": "python -m benchmarks.e2e_quant " + " ".join(argv if argv is not None else sys.argv[1:]),
           "torch": torch.__version__, "model": "tiny-llama" if args.tiny else args.model,
           "layers": args.layers, "compiler": args.compiler, "new_tokens": args.new_tokens,
           "group_size_int4": args.group_size, "rows": []}

    def save():
        out.write_text(json.dumps(res, indent=1))

    res["setup_s"] = {}

    @contextlib.contextmanager
    def stage(name):  # where the set-up time goes (it is spent before the first row)
        t0 = time.time()
        yield
        res["setup_s"][name] = round(time.time() - t0, 1)
        save()

    with stage("build bf16"):
        base = build(args)
    vocab = base.config.vocab_size
    g = torch.Generator(device=args.device).manual_seed(0)
    calib = torch.randint(3, vocab, (1, 512 if not args.tiny else 64), device=args.device, generator=g)
    plans = {s: calibrate_on_tokens(base, calib, s) for s in args.sparsity}  # made on the float model
    models = {None: base}
    for bits in args.bits:  # the same random weights (same seed), quantized
        with stage(f"build int{bits}"):
            models[bits] = actsparse.quantize(build(args), bits=bits, group_size=args.group_size if bits == 4 else None)
    if args.check:  # before torchao's models set their Inductor options process-wide
        with stage("check"):
            res["correctness"] = check(*check_models(args), args)
        print("correctness:", res["correctness"], flush=True)
    with stage("build torchao"):
        models.update(torchao_models(args, res))
    built_ao = tuple(k for k in TORCHAO if k in models)
    import torch._inductor.config as inductor_config

    # torchao's quantize_ sets its recommended Inductor options process-wide (before any row
    # compiles): every row of the run, the bf16 baseline included, is compiled with them
    res["inductor"] = {k: getattr(inductor_config, k) for k in ("coordinate_descent_tuning",
                                                                "coordinate_descent_check_all_directions")}
    if cuda:
        res["memory_gib"] = torch.cuda.memory_allocated() / 2**30
    dense_rate: dict[int, float] = {}
    for batch, kind, key, s in row_order(args, built_ao):
        bits = TORCHAO.get(key, key)
        variant = f"{kind}-{'bf16' if key is None else key if isinstance(key, str) else f'int{key}'}"
        if time.time() - t_start > args.budget_s:
            res.setdefault("skipped", []).append(f"{variant} batch {batch} sparsity {s}: out of time")
            continue
        if batch not in dense_rate and not (kind == "dense" and key is None):
            res.setdefault("skipped", []).append(f"{variant} batch {batch}: no dense baseline")
            continue
        ids = torch.randint(3, vocab, (batch, 32), device=args.device, generator=g)
        t0 = time.time()
        skips0 = cudagraph_skips()
        try:
            rate = lean_decode_rate(models[key], backend_for(plans[s] if kind == "sparse" else None, args), ids,
                               args.new_tokens, args.repeats)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            res.setdefault("errors", []).append(f"{variant} batch {batch} sparsity {s}: {type(e).__name__}: {e}")
            save()
            continue
        if kind == "dense" and key is None:
            dense_rate[batch] = rate
        row = {"variant": variant, "bits": bits or 16, "batch": batch, "sparsity": s or 0.0, "tok_s": rate,
               "vs_dense": rate / dense_rate[batch], "seconds": time.time() - t0,
               "cudagraph_skips": cudagraph_skips() - skips0}
        res["rows"].append(row)
        save()
        print(f"batch {batch} {variant:>20} {row['sparsity']:.0%}: {rate:9.1f} tok/s  x{row['vs_dense']:.2f}"
              f"  ({row['seconds']:.0f}s)", flush=True)
    res["seconds"] = time.time() - t_start
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
