"""Note which graph inputs are weights the inserted ops read input-sparse.

The ops declare those arguments themselves (``actsparse.ops.input_sparse_weights``); the
backend re-stores the matching parameters input-major after the graph's first call.

Not the shards of DTensor parameters (tensor parallelism: the ops read ``p.to_local()``, which
is no placeholder): Dynamo does not guard on a shard's strides, so a shard re-stored after a
graph was compiled would not recompile it; ``actsparse.distributed.shard`` stores them
input-major before compiling.
"""

from __future__ import annotations

import torch.fx as fx

from ..ops import input_sparse_weights
from .context import PassContext


def mark_layouts(gm: fx.GraphModule, ctx: PassContext) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pos = {n: i for i, n in enumerate(placeholders)}
    wanted = {w for node in gm.graph.nodes for w in input_sparse_weights(node)}
    ctx.input_major_inputs = sorted(pos[w] for w in wanted if w in pos)
