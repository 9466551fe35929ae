"""The native-extension builder: one build per process, named by its source, None where it cannot build."""

import warnings

import pytest

from actsparse.kernels import cpu
from actsparse.kernels.cpu._extension import NativeExtension


def test_unbuildable_extension_warns_once_and_gives_none():
    ext = NativeExtension("actsparse_test_missing", "no_such_source.cpp", "the test kernel", "the torch path is used")
    with pytest.warns(UserWarning, match="the test kernel could not be built.*the torch path is used"):
        assert ext.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext.load() is None  # remembered: no second build, no second warning


@pytest.mark.skipif(cpu.load() is None, reason="native CPU kernel could not be built")
def test_built_module_name_carries_the_source_hash():
    name = cpu.load().__name__
    assert name.startswith("actsparse_cpu_input_sparse_") and len(name.rsplit("_", 1)[1]) == 12
