"""Kernel implementations only: Triton (``triton/``), native CPU (``cpu/``), the weight-row cache.

Which implementation runs is decided by the ops (``actsparse.ops``); the kernels declare what
they can take (``limits``, ``triton.runs_on``).
"""
