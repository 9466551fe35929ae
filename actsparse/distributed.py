"""Tensor-parallel decoding with the sparse backend, on PyTorch's own tensor parallelism.

    mesh = actsparse.distributed.init()              # under torchrun: NCCL on GPUs, gloo on the CPU
    actsparse.distributed.shard(model, mesh, plan)   # ColwiseParallel / RowwiseParallel per the model's tp_plan
    model.forward = torch.compile(model.forward, backend="sparse", options={"plan": plan})

The plan is made once on the unsharded model (``actsparse.calibrate``, or a saved plan) and
applies at any degree that divides the sharded shapes; ``check_degree`` says which degrees do,
before anything is sharded. The sharding is ``torch.distributed.tensor.parallel``'s, with the
layout Hugging Face's ``tp_plan`` gives the model (q/k/v and gate/up column-parallel, o_proj and
down_proj row-parallel, ``use_local_output=True`` as in HF); a model loaded by transformers with
``tp_plan="auto"`` compiles with the backend as well. The backend finds the sites on the local
shards and keeps the collectives where they are (``actsparse.passes.localize_dtensor``); what
each rule becomes per shard is in ``actsparse.plan.sharding``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from .plan import PlanError, SparsityPlan, linear_weights
from .plan.sharding import check_plan_for_degree

STYLES = ("colwise", "rowwise")


def tp_styles(model: torch.nn.Module) -> dict[str, str]:
    """Module name -> "colwise" / "rowwise" for the model's linears, from its Hugging Face
    ``tp_plan`` (layer wildcards expanded); other styles (embeddings, the LM head's gather) are
    left out: those modules stay whole on every rank."""
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {}
    cfg = getattr(model, "config", None)
    base = getattr(cfg, "base_model_tp_plan", None) if cfg is not None else None
    if not plan and base:  # older transformers: the config's plan, relative to the base model
        prefix = getattr(model, "base_model_prefix", "")
        plan = {(f"{prefix}." if prefix and hasattr(model, prefix) else "") + k: v for k, v in base.items()}
    if not plan:
        raise PlanError(f"{type(model).__name__} has no tensor-parallel plan (Hugging Face's tp_plan); pass "
                        "styles={module name: 'colwise' | 'rowwise'} to shard it")
    patterns = [(re.compile("^" + re.escape(k).replace(r"\*", r"\d+") + "$"), v) for k, v in plan.items()
                if v in STYLES]
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        for pat, style in patterns:
            if pat.match(name):
                out[name] = style
                break
    return out


def check_degree(model: torch.nn.Module, degree: int, plan: SparsityPlan | None = None,
                 styles: Mapping[str, str] | None = None) -> None:
    """Raise PlanError unless ``model`` (unsharded) can be sharded ``degree`` ways, with ``plan``
    applying to every shard: the degree divides every sharded dimension and the attention heads,
    and the plan has no rule that cannot be sliced (see ``actsparse.plan.sharding``)."""
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        raise PlanError(f"tensor-parallel degree must be an integer >= 1, got {degree!r}")
    styles = dict(styles) if styles is not None else tp_styles(model)
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n % degree:
            raise PlanError(f"tensor-parallel degree {degree} does not divide the model's {key} ({n}): "
                            "attention is split by whole heads")
    plan = plan if plan is not None else SparsityPlan()
    roles = None
    if degree > 1 and plan.stat_topk is not None and plan.stat_topk.sparsity > 0:
        from .calibration.sites import trace_sites  # which sites statistical top-k reaches: traced once

        roles = {s.module: s.role for s in trace_sites(model)}
    check_plan_for_degree(plan, degree, {k: tuple(v) for k, v in linear_weights(model).items()}, styles, roles)


def shard(model: torch.nn.Module, mesh, plan: SparsityPlan | None = None,
          styles: Mapping[str, str] | None = None, relayout: bool = True) -> torch.nn.Module:
    """Shard ``model`` in place over the 1-D device mesh ``mesh`` with PyTorch's tensor parallelism.

    ``styles`` defaults to the model's Hugging Face tp_plan (``tp_styles``). With ``plan``, the
    plan is checked against the model (global shapes) and the degree first, and the shards of the
    weights the plan reads input-sparse are stored input-major (the backend does it lazily for
    unsharded models, but a DTensor's shard cannot change under a compiled graph).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if mesh.ndim != 1:
        raise ValueError(f"shard takes a 1-D tensor-parallel mesh, got {mesh.ndim} dimensions")
    styles = dict(styles) if styles is not None else tp_styles(model)
    degree = mesh.size()
    if plan is not None:
        plan.validate(model)
    check_degree(model, degree, plan, styles)
    if degree == 1:
        return model
    layout = {name: (ColwiseParallel if style == "colwise" else RowwiseParallel)(use_local_output=True)
              for name, style in styles.items()}
    parallelize_module(model, mesh, layout)
    if plan is not None and relayout:
        from .compiler.layout import to_input_major

        mods = dict(model.named_modules())
        for name in plan.input_major_modules(model):
            to_input_major(mods[name].weight)
    return model


def init(backend: str | None = None, timeout_s: float | None = None):
    """Start the process group from torchrun's environment and return the 1-D tensor-parallel mesh
    over all ranks: NCCL on GPUs (each rank on the GPU of its LOCAL_RANK), gloo on the CPU.
    ``timeout_s`` bounds each collective (a rank that never arrives fails the others)."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    cuda = torch.cuda.is_available() and backend != "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), **kwargs)
    return init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
