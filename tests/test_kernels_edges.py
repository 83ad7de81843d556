"""Kernel details of issue 22 item 4, in Triton's interpreter: int64 offsets, the peeled K tail,
M / N not multiples of the tile, the tie limit read from device memory, the autotune switch and
batch buckets, the fused / cuBLAS choice, and the fp32 precision following torch."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from supermask import mask  # noqa: E402
import importlib  # noqa: E402

from supermask.kernels import _common  # noqa: E402
from supermask.kernels import masked_matmul, tie_limit, topk_threshold_device  # noqa: E402

ML = importlib.import_module("supermask.kernels.masked_linear")  # (the package exports a function of that name)
_tile_offsets = ML._tile_offsets

if not _common.interpreting():  # pragma: no cover
    pytest.skip("interpreter tests", allow_module_level=True)


@triton.jit
def _offsets_probe(out_ptr, M, N, stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # the very expressions of the kernels' output store (and dS epilogue): _tile_offsets' int64 offsets
    offs_m, offs_n, _, _, _, m_in, n_in = _tile_offsets(M, N, BLOCK_M, BLOCK_N, 16, 1)
    off = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(out_ptr + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], off)


def test_output_offsets_past_2_31_do_not_wrap():
    """A (32, 32) tile of an output whose column stride is 2**28 elements (byte offsets near 2**35):
    the offsets are computed with the kernels' own helper and must be the exact int64 products."""
    out = torch.empty(32, 32, dtype=torch.int64)
    stride_cm, stride_cn = 3, 1 << 28
    _offsets_probe[(1,)](out, 32, 32, stride_cm, stride_cn, BLOCK_M=32, BLOCK_N=32)
    m, n = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    want = m * stride_cm + n * stride_cn
    assert int(want.max()) > 2**31
    assert torch.equal(out, want)


@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (31, 33, 15), (33, 1, 32), (65, 40, 71), (7, 96, 100)])
@pytest.mark.parametrize("ties", [False, True])
def test_masked_matmul_k_tail_and_edges_match_the_reference(M, N, K, ties):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    w, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    s = torch.randn(M, K, generator=g)
    if ties:
        s[:, : max(1, K // 2)] = 0.5
    n_keep = max(1, (M * K) // 3)
    th = mask.topk_threshold(s.abs(), n_keep)
    value, _, limit = topk_threshold_device(s, n_keep)
    got = masked_matmul(w, s, value, b, limit=limit)
    keep = mask.mask_from_threshold(s.abs(), th)
    assert int(keep.sum()) == n_keep
    torch.testing.assert_close(got, (w * keep) @ b, rtol=1e-5, atol=1e-5)
    # transposed (the dX call): flat index of w.t()[m, k] = k * M + m
    got_t = masked_matmul(w.t(), s.t(), value, torch.randn(M, 3, generator=g), limit=limit, transposed=True)
    assert got_t.shape == (K, 3)


def test_tie_limit_is_the_flat_index_past_the_last_kept_tie():
    s = torch.tensor([0.5, 2.0, -0.5, 0.5, 1.0, 0.5])
    v = torch.tensor(0.5)
    assert int(tie_limit(s, v, 2)) == 3  # ties at 0, 2 kept; 3 and 5 dropped
    assert int(tie_limit(s, v, torch.tensor(4))) == 6  # all four: the whole tensor
    assert int(tie_limit(s, v, 0)) == 0


def test_autotune_switch_and_batch_buckets(monkeypatch):
    monkeypatch.setenv("SUPERMASK_AUTOTUNE", "0")
    assert not ML.autotune_enabled()
    monkeypatch.setenv("SUPERMASK_AUTOTUNE", "1")
    assert ML.autotune_enabled()
    assert [ML.size_bucket(n) for n in (1, 16, 17, 96, 128, 129)] == [16, 16, 32, 128, 128, 256]
    assert "N_BUCKET" in ML._masked_matmul_tuned.keys and "N" not in ML._masked_matmul_tuned.keys
    assert "K_BUCKET" in ML._matmul_ste_tuned.keys and "K" not in ML._matmul_ste_tuned.keys
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128 for c in ML.STE_CONFIGS)
    assert any(c.kwargs["BLOCK_K"] == 64 for c in ML.MATMUL_CONFIGS)


@pytest.mark.parametrize("ties", [False, True])
def test_fused_and_masked_weight_plus_mm_give_the_same_answer(monkeypatch, ties):
    g = torch.Generator().manual_seed(3)
    w, s, x, gy = (torch.randn(20, 30, generator=g), torch.randn(20, 30, generator=g),
                   torch.randn(5, 30, generator=g), torch.randn(5, 20, generator=g))
    if ties:
        s[:4] = 1.0
    value, _, limit = topk_threshold_device(s, 200)
    results = {}
    for choice in ("fused", "cublas"):
        monkeypatch.setenv("SUPERMASK_LINEAR", choice)
        assert ML.linear_choice(5, 20, 30, torch.float32) == choice
        y = ML.masked_linear_forward(x, w, s, value, limit)
        gx, gs = ML.masked_linear_backward(gy, x, w, s, value, limit=limit)
        results[choice] = (y, gx, gs)
    for a, b in zip(*results.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("SUPERMASK_LINEAR")
    assert ML.linear_choice(8, 20, 30, torch.float32) == "fused"
    ML.LINEAR_CHOICE[ML.linear_choice_key(8, 20, 30, torch.float32)] = "cublas"
    try:
        assert ML.linear_choice(8, 20, 30, torch.float32) == "cublas"
    finally:
        ML.LINEAR_CHOICE.clear()


def test_linear_choice_key_holds_the_fp32_matmul_precision():
    """TF32 on or off changes which of fused / masked weight + cuBLAS wins: a choice measured under
    one precision is not applied under the other (fp32); fp16/bf16 keys do not depend on it."""
    old = torch.get_float32_matmul_precision()
    try:
        _common.set_fp32_precision(None)
        torch.set_float32_matmul_precision("high")
        tf32_key = ML.linear_choice_key(8, 20, 30, torch.float32)
        assert tf32_key == (ML.size_bucket(8), 20, 30, torch.float32, ("tf32", "high"))
        bf16_key = ML.linear_choice_key(8, 20, 30, torch.bfloat16)
        ML.LINEAR_CHOICE[tf32_key] = "cublas"
        ML.LINEAR_CHOICE[bf16_key] = "cublas"
        assert ML.linear_choice(8, 20, 30, torch.float32) == "cublas"
        torch.set_float32_matmul_precision("highest")  # IEEE fp32: the TF32 measurement does not apply
        assert ML.linear_choice_key(8, 20, 30, torch.float32)[-1] == ("ieee", "highest")
        assert ML.linear_choice(8, 20, 30, torch.float32) == "fused"
        assert ML.linear_choice_key(8, 20, 30, torch.bfloat16) == bf16_key
        assert ML.linear_choice(8, 20, 30, torch.bfloat16) == "cublas"
        _common.set_fp32_precision("tf32x3")  # the fused kernels' own precision asked for: another key
        assert ML.linear_choice_key(8, 20, 30, torch.float32)[-1] == ("tf32x3", "highest")
    finally:
        ML.LINEAR_CHOICE.clear()
        _common.set_fp32_precision(None)
        torch.set_float32_matmul_precision(old)


def test_fp32_precision_follows_torch_unless_asked():
    old = torch.get_float32_matmul_precision()
    try:
        _common.set_fp32_precision(None)
        torch.set_float32_matmul_precision("highest")
        assert _common.get_fp32_precision() == "ieee"
        torch.set_float32_matmul_precision("high")
        assert _common.get_fp32_precision() == "tf32"
        _common.set_fp32_precision("tf32x3")
        assert _common.dot_precision(torch.float32) == "tf32x3"
        assert _common.dot_precision(torch.bfloat16) == "ieee"
        with pytest.raises(ValueError, match="precision"):
            _common.set_fp32_precision("fast")
    finally:
        _common.set_fp32_precision(None)
        torch.set_float32_matmul_precision(old)
