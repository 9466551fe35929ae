"""GPU smoke test of the actsparse ops on CUDA tensors: eager, then compiled with CUDA graphs."""
import sys, torch, faulthandler
faulthandler.enable()
from actsparse.kernels import ops
from actsparse.ops.reference import sparse_linear_reference, gated_mlp_reference
from actsparse.compiler.layout import to_input_major
torch.manual_seed(0)
dev = "cuda"
for (n, k) in [(1024, 4096), (14336, 4096)]:
    w = torch.nn.Parameter(torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5, requires_grad=False)
    to_input_major(w)
    x = torch.randn(1, 1, k, device=dev, dtype=torch.bfloat16)
    t = float(x.abs().float().median())
    print("eager", n, k, flush=True)
    got = ops.sparse_linear(x, [w], [None], [t], False, 0.5)[0]
    ref = sparse_linear_reference(x, [w], [None], [t])[0]
    print("  rel", ((got.float() - ref.float()).norm() / ref.float().norm()).item(), flush=True)
    f = torch.compile(lambda x: ops.sparse_linear(x, [w], [None], [t], False, 0.5)[0], mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        got = f(x)
    print("  compiled rel", ((got.float() - ref.float()).norm() / ref.float().norm()).item(), flush=True)
print("ok", flush=True)
