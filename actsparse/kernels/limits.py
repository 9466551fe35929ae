"""What the kernels can take, as plain numbers (importable without Triton).

The Triton sparse kernels are specialised for batch buckets of token rows up to
``TRITON_MAX_ROWS``; the dispatch policy in ``actsparse.ops.limits`` builds on this.
"""

#: Token rows are rounded up to one of these for specialisation and autotuning.
BATCH_BUCKETS = (1, 2, 4, 8, 16)
#: The most token rows one Triton sparse-kernel launch takes.
TRITON_MAX_ROWS = BATCH_BUCKETS[-1]
