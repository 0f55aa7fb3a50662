"""Every forward path of KronLinear against the dense reference x @ W^T + b, under
torch.compile and bf16 autocast; and bench.py end to end."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kron_kernels import FEW_ROWS, KRON_PATHS, gram_product, kron_path, summed_products, thin_group, thin_matmul
from kronecker import KronLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The B classes of Table 1, scaled down (same B, smaller A) so that the test is fast:
# (in, out, A shape) of a c_fc-like (in < out) layer; c_proj uses the transposed shapes.
SMALL = {
    (1, 1): (16, 64, (64, 16)),
    (2, 1): (16, 64, (32, 16)),
    (4, 1): (16, 64, (16, 16)),
    (2, 2): (16, 64, (32, 8)),
    (3, 3): (24, 96, (32, 8)),
    (48, 24): (48, 96, (2, 2)),
}


def reference(layer: KronLinear, x: torch.Tensor) -> torch.Tensor:
    W = layer.materialize()
    y = x @ W.t()
    return y + layer.bias if layer.bias is not None else y


def make_layer(in_f, out_f, a_shape, k, scalars, bias, seed=0) -> KronLinear:
    torch.manual_seed(seed)
    layer = KronLinear(in_f, out_f, a_shape, k, bias=bias, scalars=scalars)
    with torch.no_grad():                    # O(1) entries so that errors are visible
        layer.A.normal_()
        layer.B.normal_()
        if scalars:
            layer.scalars.uniform_(0.5, 2.0)
        if bias:
            layer.bias.normal_()
    return layer


def check_path(layer: KronLinear, path: str, lead=(3, 5), rtol=1e-4) -> None:
    """Forward and every gradient of `path` equal the dense reference's."""
    layer.path = path
    x = torch.randn(*lead, layer.in_features, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, layer.out_features)
    g = torch.randn_like(y)
    params = [p for p in (layer.A, layer.B, layer.scalars, layer.bias, x) if p is not None]
    grads = torch.autograd.grad(y, params, g)
    y_ref = reference(layer, x)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=rtol * scale)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("b_class", list(SMALL))
@pytest.mark.parametrize("transpose", [False, True], ids=["c_fc", "c_proj"])
@pytest.mark.parametrize("path", KRON_PATHS)
def test_paths_match_dense(b_class, transpose, path):
    in_f, out_f, a_shape = SMALL[b_class]
    if transpose:
        in_f, out_f, a_shape = out_f, in_f, a_shape[::-1]
    layer = make_layer(in_f, out_f, a_shape, 1, scalars=False, bias=True)
    assert layer.b_shape == (b_class if not transpose else b_class[::-1])
    check_path(layer, path)


@pytest.mark.parametrize("path", KRON_PATHS)
@pytest.mark.parametrize("k", [1, 2])
def test_paths_single_token(path, k):
    """One-token decoding: there the reshapes inside the factored paths are strided views
    rather than copies (made contiguous for speed), and a tiny B multiplies without the
    block-diagonal grouping (rows <= FEW_ROWS); the result and the gradients must not change."""
    assert 1 <= FEW_ROWS < 3 * 5                # this test and check_path's default cover both sides
    for b_class in [(2, 2), (4, 1), (48, 24)]:
        in_f, out_f, a_shape = SMALL[b_class]
        for i, o, a in [(in_f, out_f, a_shape), (out_f, in_f, a_shape[::-1])]:
            check_path(make_layer(i, o, a, k, scalars=k > 1, bias=True), path, lead=(1, 1))


@pytest.mark.parametrize("path", KRON_PATHS)
@pytest.mark.parametrize("k,scalars,bias", [(2, True, True), (3, False, False), (4, True, False)])
def test_paths_several_factors(path, k, scalars, bias):
    for in_f, out_f, a_shape in [(24, 96, (32, 8)), (96, 24, (8, 32)), (48, 96, (2, 2))]:
        check_path(make_layer(in_f, out_f, a_shape, k, scalars, bias), path)


@pytest.mark.parametrize("a_shape,path", [((1536, 384), "b_first"), ((384, 1536), "a_first"),
                                          ((768, 768), "a_first"), ((64, 32), "b_first"),
                                          ((64, 32), "a_first_bmm"), ((32, 64), "b_first_bmm"),
                                          ((128, 32), "b_first_bmm"), ((32, 128), "a_first_bmm")])
def test_real_gpt2_sizes(a_shape, path):
    """GPT-2 small sizes (768 <-> 3072), c_fc and c_proj."""
    in_f, out_f = (768, 3072) if a_shape[0] >= a_shape[1] else (3072, 768)
    layer = make_layer(in_f, out_f, a_shape, 1, scalars=True, bias=True)
    check_path(layer, path, lead=(4,), rtol=2e-4)


def test_path_choice_is_static_and_sensible():
    # big arithmetic savings: factored, in the cheaper order
    assert kron_path((768, 768), (4, 1)) == "a_first"
    assert kron_path((768, 768), (1, 4)) == "b_first"
    # a wide B (the 67M class): the batched-over-rows form of the cheaper order
    assert kron_path((64, 32), (48, 24)) == "a_first_bmm"
    assert kron_path((32, 64), (24, 48)) == "b_first_bmm"
    assert kron_path((128, 32), (24, 24)) == "b_first_bmm"
    assert kron_path((32, 128), (24, 24)) == "a_first_bmm"
    assert kron_path((96, 96), (32, 8)) == "a_first"          # one side of B too narrow
    # no saving (B 1x1), or more work than dense (4 factors of (3, 3)): one GEMM on W
    assert kron_path((3072, 768), (1, 1)) == "materialised"
    assert kron_path((1024, 256), (3, 3), k=4) == "materialised"
    layer = KronLinear(768, 3072, (3072, 768))
    assert layer.path == "materialised"


def test_summed_products_in_chunks_equals_one_sum():
    # (a, b) = (512, 1024): chunks of 2 rows, so 5 rows make two full chunks and a partial one
    torch.manual_seed(0)
    P, Q = torch.randn(5, 512, 3, dtype=torch.float64), torch.randn(5, 1024, 3, dtype=torch.float64)
    torch.testing.assert_close(summed_products(P, Q), torch.einsum("rac,rbc->ab", P, Q))
    assert summed_products(P[:0], Q[:0]).abs().sum() == 0          # no rows: a zero gradient


@pytest.mark.parametrize("widths", [(48, 24), (24, 48), (24, 24)])
def test_gram_product_either_order_equals_p_transpose_q(widths):
    # the narrower operand goes on the left (the first two cases take different branches)
    torch.manual_seed(0)
    P, Q = torch.randn(40, widths[0], dtype=torch.float64), torch.randn(40, widths[1], dtype=torch.float64)
    G = gram_product(P, Q)
    assert G.shape == (widths[0], widths[1])
    torch.testing.assert_close(G, P.t() @ Q)


def activation_copies(fn, min_numel: int) -> list[tuple]:
    """Shapes of the tensors of at least min_numel elements that fn copies (layout changes)."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return [tuple(e.input_shapes[0]) for e in prof.events() if e.name in ("aten::copy_", "aten::clone")
            and math.prod(e.input_shapes[0]) >= min_numel]


@pytest.mark.parametrize("path", ["a_first_bmm", "b_first_bmm"])
def test_bmm_paths_make_no_layout_copy(path):
    """The reason these paths exist: forward and backward read and write every activation in
    its natural layout. The stacked path of the same shape does copy them (so the probe sees
    copies where there are). Parameter gradients, far smaller here, are not counted."""
    layer = make_layer(48, 96, (2, 2), 1, scalars=False, bias=True)      # B (48, 24)
    x = torch.randn(64, 48, requires_grad=True)                         # 3072 elements
    grad = torch.randn(64, 96)

    def step():
        layer(x).backward(grad)
    layer.path = path
    assert activation_copies(step, x.numel()) == []
    layer.path = path.removesuffix("_bmm")
    assert len(activation_copies(step, x.numel())) >= 2


@pytest.mark.parametrize("path", ["a_first_bmm", "b_first_bmm"])
def test_bmm_paths_take_strided_input(path):
    layer = make_layer(48, 96, (2, 2), 2, scalars=True, bias=True)
    layer.path = path
    x = torch.randn(48, 10).t()[::2]                  # (5, 48), neither rows nor columns contiguous
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-4, atol=1e-4)


def test_thin_matmul_groups_rows_of_tiny_products():
    # B of 3x3 as c_fc's first step (row factor n1 = 256), 2x2 (n1 = 384), 4x1 as an outer product
    assert [thin_group(256, 3, 3), thin_group(384, 2, 2), thin_group(768, 1, 4)] == [4, 8, 4]
    # c_proj's B of 1x4 and 1x2: a matrix-vector product (M = 1), grouped as well
    assert [thin_group(768, 4, 1), thin_group(1536, 2, 1)] == [4, 8]
    # no grouping: wide factors, a row factor with no divisor
    assert [thin_group(32, 24, 48), thin_group(7, 3, 3)] == [1, 1]
    torch.manual_seed(0)
    for K, M in [(3, 3), (4, 1), (1, 4)]:
        x, w = torch.randn(24, K, requires_grad=True), torch.randn(K, M, requires_grad=True)
        for g in (1, 2, 4, 8):
            y = thin_matmul(x, w, g)
            torch.testing.assert_close(y, x @ w)
            gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
            torch.testing.assert_close(gx, torch.ones(24, M) @ w.t())
            torch.testing.assert_close(gw, x.t() @ torch.ones(24, M))


def compiler_available() -> str | None:
    """Why torch.compile cannot run here, or None."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch._dynamo is not supported on this platform"
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler on PATH (inductor needs one on CPU)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(compiler_available() is not None, reason=str(compiler_available()))
@pytest.mark.parametrize("path", KRON_PATHS)
@pytest.mark.parametrize("lead", [(2, 7), (1, 1)], ids=["batch", "one-token"])   # both sides of FEW_ROWS
def test_compile_fullgraph_matches_eager(path, lead):
    torch._dynamo.reset()
    layer = make_layer(24, 96, (32, 8), 2, scalars=True, bias=True)
    layer.path = path
    x = torch.randn(*lead, 24, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)       # fails on any graph break
    y = compiled(x)
    y_eager = layer(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_eager,) = torch.autograd.grad(y_eager.square().sum(), x)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("path", KRON_PATHS)
def test_bf16_autocast_close(path):
    layer = make_layer(96, 24, (8, 32), 2, scalars=True, bias=True)
    layer.path = path
    x = torch.randn(4, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16                       # runs in bf16, like nn.Linear under autocast
    ref = reference(layer, x)
    err = (y.float() - ref).norm() / ref.norm()
    assert err < 2e-2, err
    # the backward of a bf16 forward, as in training: float32 gradients close to float32's
    g = torch.randn_like(ref)
    params = [layer.A, layer.B, layer.scalars, layer.bias]
    grads = torch.autograd.grad(y.float(), params, g)
    grads_ref = torch.autograd.grad(ref, params, g)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == torch.float32
        assert (got - want).norm() / want.norm() < 5e-2


def weight_gradient_error(layer: KronLinear, reference64: KronLinear, x: torch.Tensor, g: torch.Tensor) -> float:
    """Relative error of dA under CPU bf16 autocast against the float64 layer's dA."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (dA,) = torch.autograd.grad(y.float(), [layer.A], g)
    (dA_ref,) = torch.autograd.grad(reference64(x.double()), [reference64.A], g.double())
    return ((dA.double() - dA_ref).norm() / dA_ref.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["a_first_bmm", "b_first_bmm"])
def test_bf16_weight_gradient_does_not_degrade_with_rows(path):
    """dA on the bmm paths sums one small product per input row (summed_products). Its running
    sum is kept in float32 and rounded to bf16 once, so the error does not grow with the rows; a
    bf16 running sum rounds again for every chunk of rows (512 rows here, A of 64x32)."""
    layer = make_layer(768, 1536, (64, 32), 1, scalars=False, bias=True)      # B (24, 24)
    assert layer.b_shape == (24, 24)
    layer.path = path
    reference64 = copy.deepcopy(layer).double()                                # the same path in float64
    rows = 512
    x, g = torch.randn(16 * rows, 768), torch.randn(16 * rows, 1536)
    err_1x = weight_gradient_error(layer, reference64, x[:rows], g[:rows])
    err_16x = weight_gradient_error(layer, reference64, x, g)
    assert err_1x < 1e-2 and err_16x < 1e-2, (err_1x, err_16x)
    assert err_16x <= 1.2 * err_1x + 1e-4, (err_1x, err_16x)


def test_summed_products_keeps_the_operand_dtype():
    P, Q = torch.randn(3, 4, 5, dtype=torch.bfloat16), torch.randn(3, 6, 5, dtype=torch.bfloat16)
    S = summed_products(P, Q)
    assert S.dtype == torch.bfloat16
    torch.testing.assert_close(S.float(), torch.einsum("rac,rbc->ab", P.float(), Q.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_bench_quick_end_to_end(tmp_path, tiktoken_gpt2, shakespeare):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(out), "--corpus", shakespeare],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res) == {"meta", "layer", "model", "generate", "data", "distill"}
    cases = [r["case"] for r in res["distill"]["rows"]]
    assert len(cases) == 3 and all(r["peak_memory_mb"] > 0 for r in res["distill"]["rows"])
    rows = res["layer"]["rows"]
    assert len(rows) == 6 and {r["matrix"] for r in rows} == {"c_fc", "c_proj"}
    for r in rows:
        assert r["limit"] > 1 and r["dense_ms"] > 0 and r["kron_ms"] > 0 and r["speedup"] > 0
        # the kernel rates count the same work as the limit: their ratio is the fraction of it
        assert r["kron_gflops"] / r["dense_gflops"] == pytest.approx(r["fraction_of_limit"], rel=1e-9)
        assert r["dense_gflops"] == pytest.approx(6 * r["tokens"] * 768 * 3072 / (r["dense_ms"] / 1e3) / 1e9)
        # B of 3x3 runs in the MLP's swapped hidden order, and is also timed in the standard one
        swapped = tuple(r["b_shape"]) == (3, 3)
        assert r["hidden_order"] == ("swapped" if swapped else "standard")
        assert (r["standard_order_speedup"] > 0) if swapped else r["standard_order_speedup"] is None
        if r["path"].endswith("_bmm"):                      # small factors (CPU float32 eager)
            assert r["gemm_ceiling"] > 0
            assert r["gemm_ceiling_of_limit"] == pytest.approx(r["gemm_ceiling"] / r["limit"])
        else:                                               # a factor too big to stay in cache
            assert r["gemm_ceiling"] is None and r["gemm_ceiling_of_limit"] is None
    assert [r["model"] for r in res["model"]["rows"]] == ["gpt2-124M", "krony-81M", "krony-96M", "krony-92M-4f",
                                                          "krony-67M"]
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in res["model"]["rows"])
    assert res["model"]["rows"][0]["arith_limit"] == 1.0
    assert [r["model"] for r in res["generate"]["rows"]] == ["gpt2-124M", "krony-81M", "krony-92M-4f", "krony-67M"]
    assert all(r["flatness"] > 0 for r in res["generate"]["rows"])
    assert res["data"]["tokens"] > 1000 and res["data"]["tokens_per_s"] > 0
    assert "| speed-up |" in proc.stdout and "wrote" in proc.stdout


class Scale(torch.nn.Module):
    """A layer with no matrix product."""

    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_bench_gemm_seconds_counts_only_matrix_products():
    import bench
    assert bench.gemm_seconds(Scale(48), 48, tokens=256, repeats=2) == 0
    assert bench.gemm_seconds(torch.nn.Linear(48, 96), 48, tokens=256, repeats=2) > 0
    layer = KronLinear(48, 96, (4, 4))
    assert layer.path == "a_first_bmm"                      # GEMMs and batched GEMMs both count
    assert bench.gemm_seconds(layer, 48, tokens=256, repeats=2) > 0


@pytest.mark.slow
def test_bench_bad_section_is_a_clear_error():
    proc = subprocess.run([sys.executable, "bench.py", "--sections", "layers"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown section" in proc.stderr
