"""Op definitions (torch.library), their pure-torch references, Triton kernels, weight cache."""

from . import ops, reference  # noqa: F401  (importing ops registers actsparse::*)
