"""The decode profile's bookkeeping: kernel kinds by name and per-token sums (the GPU run itself
is the benchmark; here only what it computes from the kernel records)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import e2e_profile as ep


@pytest.mark.parametrize("name,kind", [
    ("_predicated_kernel", "sparse"), ("_sparse_linear_kernel", "sparse"), ("_quant_gemv_kernel", "sparse"),
    ("_gate_up_kernel", "sparse"), ("_expert_down_kernel", "sparse"), ("_finish_kernel", "sparse_finish"),
    ("_finish_gated_kernel", "sparse_finish"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "matmul"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16>", "matmul"),
    ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits>", "attention"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "inductor"),
    ("triton_poi_fused_cat_index_copy_1", "inductor"),
    ("Memset (Device)", "copy_fill"), ("Memcpy DtoD (Device -> Device)", "copy_fill"),
    ("void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>", "copy_fill"),
    ("some_unknown_kernel", "other"),
])
def test_kind_of(name, kind):
    assert ep.kind_of(name) == kind


def test_summarize_per_token():
    kernels = [("_predicated_kernel", 20.0), ("_finish_kernel", 2.0), ("triton_poi_fused_add_0", 3.0)] * 4
    row = ep.summarize(kernels, tokens=2, wall_us_per_token=60.0)
    assert row["busy_us"] == pytest.approx(50.0)
    assert row["idle_us"] == pytest.approx(10.0)
    assert row["kernels"] == pytest.approx(6.0)
    assert row["by_kind"]["sparse"] == {"us": pytest.approx(40.0), "count": pytest.approx(2.0)}
    assert list(row["by_kind"])[0] == "sparse"  # largest first
    with pytest.raises(ValueError, match="tokens must be positive"):
        ep.summarize(kernels, tokens=0, wall_us_per_token=1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_needs_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ep.main(["--out", str(tmp_path / "p.json")])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_top_kernels_by_name():
    kernels = [("_predicated_kernel", 20.0), ("_finish_kernel", 2.0), ("_predicated_kernel", 10.0)] * 2
    top = ep.summarize(kernels, tokens=2, wall_us_per_token=40.0)["top"]
    assert [t["name"] for t in top] == ["_predicated_kernel", "_finish_kernel"]
    assert top[0]["us"] == pytest.approx(30.0) and top[0]["count"] == pytest.approx(2.0)
    assert top[0]["mean_us"] == pytest.approx(15.0) and top[0]["kind"] == "sparse"
    assert len(ep.top_kernels(kernels, tokens=1, n=1)) == 1


def test_ablation_variants_keep_the_main_rows_first():
    from benchmarks.e2e import ablation_variants

    rows = ablation_variants([0.5, 0.4], ["gqa", "fuse"])
    assert [r[0] for r in rows] == ["dense", "sparse-50%", "sparse-40%", "dense-gqa", "sparse-50%-repeat_kv",
                                    "sparse-40%-repeat_kv", "sparse-50%-unfused", "sparse-40%-unfused"]
    assert rows[0][1] is None and rows[3][1] == 0.0
    assert rows[4][2] == {"gqa_attention": False} and rows[6][2] == {"fuse_gated_product": False}
    assert [r[0] for r in ablation_variants([0.5], [])] == ["dense", "sparse-50%"]


def test_quant_variants_put_the_baselines_first():
    rows = ep.quant_variants([0.5, 0.4], "torchao-int8")
    assert rows == [("dense", None, False), ("dense-torchao-int8", None, True),
                    ("sparse-torchao-int8-50%", 0.5, True), ("sparse-torchao-int8-40%", 0.4, True)]


def test_quant_choice_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ep.main(["--quant", "int3", "--out", str(tmp_path / "p.json")])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
