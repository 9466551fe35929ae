"""On the CPU, the quantized linears no plan masks (``actsparse.quantize``, GGUF ``keep_quantized``,
torchao weights this backend reads) run the native quantized kernel with nothing masked.

Left to Inductor, ``actsparse::quant_linear`` decomposes into dequantise-then-matmul, which on
the CPU is slower than the float matmul (one thread, SmolLM2's 49152 x 576 output head in Q8_0
layout, compiled alone: about 280 ms against 34 ms in fp32 and 10 ms on the native kernel;
end to end, SmolLM2 ``keep_quantized`` with a 50% plan ran at 0.58x of dense fp32 with its head
left to Inductor, 1.7x with it on the native kernel: ``benchmarks/results/
cpu_decode_quant_gguf_inductor_head_smollm2-135m.json`` and ``..._gguf_smollm2-135m.json``).
torchao's CPU weight-only int8 path is slow in the same way (SmolLM2 with every linear in
torchao int8 decodes at about 0.55x of fp32: ``cpu_decode_quant_dense_smollm2-135m.json``).
So a CPU graph calls ``quant_sparse_linear`` (torchao: ``held_quant_sparse_linear`` over the
cached input-major copy) with a threshold below every |x| instead: decode rows take the native
kernel, prefill rows the op's dense form. A torchao layout this backend cannot read stays as
it is. CUDA graphs are left to Inductor, which fuses the dequantisation into its GEMV.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ops.quant_linear import quant_linear as _QUANT_LINEAR
from ..ops.quant_sparse_linear import quant_sparse_linear as quant_sparse_linear_op
from ..quant.torchao_weights import UnsupportedTorchaoWeight
from .context import PassContext
from .graph import example_value
from .quant_masks import held_call

#: |x| > ALL keeps every finite input: the op's masked form of the plain linear.
ALL = -1.0


def lower_dense_quant_cpu(gm: fx.GraphModule, ctx: PassContext) -> None:
    changed = False
    for s in ctx.sites:
        q = s.quant
        if s.rewritten or q is None or not (q.get("torchao") or s.node.target is _QUANT_LINEAR):
            continue
        v = example_value(s.input)
        if not isinstance(v, torch.Tensor) or v.device.type != "cpu":
            continue
        with gm.graph.inserting_before(s.node):
            if q.get("torchao"):
                try:
                    call = held_call(gm, ctx, s.input, s, ALL, False, 0.0)
                except UnsupportedTorchaoWeight:
                    continue  # not ours to read: torchao runs it
            else:
                call = gm.graph.call_function(quant_sparse_linear_op, (
                    s.input, s.weight, q["scales"], q["offsets"], s.bias, ALL, False, q["bits"], q["group_size"], 0.0))
        call.meta.update(s.node.meta)
        s.node.replace_all_uses_with(call)
        gm.graph.erase_node(s.node)
        s.rewritten = True
        if s.rule == "-":
            s.rule = "dense (native quantized kernel)"
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
