"""kronecker.py: shapes, Van Loan optimality, initialisations, KronLinear vs its dense weight; the planner
(sizes.py) and its command `python kronecker.py plan`."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from kronecker import (KronLinear, a_shape_for, b_shape_for, kron_decompose, kron_sum, prune_factors, rank_bound,
                       vl_rearrange)
from runtime import run_cli
from planning import gpt_param_count, plan
from sizes import main as sizes_main


def discarded_norm(W, a_shape, k):
    S = torch.linalg.svdvals(vl_rearrange(W.double(), a_shape))
    return S[k:].norm().item()


@pytest.mark.parametrize("shape,a_shape", [((24, 12), (4, 3)), ((12, 24), (6, 4)), ((32, 8), (8, 2)),
                                           ((48, 12), (8, 4)), ((64, 16), (2, 4))])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_van_loan_is_frobenius_optimal(shape, a_shape, k):
    torch.manual_seed(k)
    W = torch.randn(*shape, dtype=torch.float64)
    A, B = kron_decompose(W, a_shape, k)
    m2, n2 = shape[0] // a_shape[0], shape[1] // a_shape[1]
    assert A.shape == (k, *a_shape) and B.shape == (k, m2, n2)
    err = (W - kron_sum(A, B)).norm().item()
    assert err == pytest.approx(discarded_norm(W, a_shape, k), rel=1e-9, abs=1e-9)
    # and it matches torch.kron, the textbook definition
    ref = sum(torch.kron(A[i], B[i]) for i in range(k))
    torch.testing.assert_close(kron_sum(A, B), ref)


def test_exact_kronecker_product_is_recovered():
    torch.manual_seed(0)
    A, B = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    W = torch.kron(A, B)
    A1, B1 = kron_decompose(W, (6, 4), 1)
    torch.testing.assert_close(torch.kron(A1[0], B1[0]), W)


def test_batched_decompose_matches_one_by_one():
    W = torch.randn(3, 24, 12, dtype=torch.float64)
    A, B = kron_decompose(W, (4, 3), 2)
    assert A.shape == (3, 2, 4, 3) and B.shape == (3, 2, 6, 4)
    for i in range(3):
        torch.testing.assert_close(kron_sum(A[i], B[i]), kron_sum(*kron_decompose(W[i], (4, 3), 2)))


def test_randomized_svd_is_close_to_exact():
    torch.manual_seed(0)
    # a matrix that is nearly a sum of 2 Kronecker products, so low-rank SVD is accurate
    W = sum(torch.kron(torch.randn(16, 8), torch.randn(4, 6)) for _ in range(2)) + 1e-3 * torch.randn(64, 48)
    exact = kron_sum(*kron_decompose(W, (16, 8), 2))
    approx = kron_sum(*kron_decompose(W, (16, 8), 2, method="randomized"))
    assert (exact - approx).norm() / exact.norm() < 1e-3


@pytest.mark.parametrize("scalars", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_vl_norm_matches_the_norm(k, scalars):
    torch.manual_seed(0)
    lin = nn.Linear(16, 64)
    kl = KronLinear.from_linear(lin, (16, 4), k=k, init="vl-norm", scalars=scalars)
    assert kl.materialize().norm().item() == pytest.approx(lin.weight.norm().item(), rel=1e-5)
    plain = KronLinear.from_linear(lin, (16, 4), k=k, init="vl")
    assert plain.materialize().norm() < lin.weight.norm()  # the norm loss vl-norm corrects
    # vl-norm is vl scaled by alpha: same direction
    alpha = lin.weight.norm() / plain.materialize().norm()
    torch.testing.assert_close(kl.materialize(), alpha * plain.materialize(), rtol=1e-4, atol=1e-6)
    if scalars:
        torch.testing.assert_close(kl.scalars.detach(), torch.full((k,), alpha.item()))
    torch.testing.assert_close(kl.bias, lin.bias)


def test_prune_keeps_every_other_row_and_column():
    torch.manual_seed(0)
    fc = nn.Linear(8, 32)  # c_fc: W (32, 8), A (16, 8), B (2, 1)
    k = KronLinear.from_linear(fc, (16, 8), init="prune")
    W, W_hat = fc.weight.detach(), k.materialize().detach()
    torch.testing.assert_close(W_hat[0::2], W[0::2], rtol=0, atol=0)
    torch.testing.assert_close(W_hat[1::2], 0.1 * W[0::2])
    proj = nn.Linear(32, 8)  # c_proj: W (8, 32), A (8, 16), B (1, 2)
    k = KronLinear.from_linear(proj, (8, 16), init="prune")
    W, W_hat = proj.weight.detach(), k.materialize().detach()
    torch.testing.assert_close(W_hat[:, 0::2], W[:, 0::2], rtol=0, atol=0)
    torch.testing.assert_close(W_hat[:, 1::2], 0.1 * W[:, 0::2])


def test_prune_with_a_zero_second_entry_keeps_rows_and_columns_and_zeros_the_rest():
    torch.manual_seed(0)
    W = torch.randn(32, 8)
    A, B = prune_factors(W, (16, 8), (2, 1), b_second=0.0)
    W_hat = torch.kron(A, B)
    assert torch.equal(W_hat[0::2], W[0::2]) and torch.equal(W_hat[1::2], torch.zeros(16, 8))
    A, B = prune_factors(W.t(), (8, 16), (1, 2), b_second=0.0)
    W_hat = torch.kron(A, B)
    assert torch.equal(W_hat[:, 0::2], W.t()[:, 0::2]) and torch.equal(W_hat[:, 1::2], torch.zeros(8, 16))
    # through the layer: init_from_weight's prune_b_second
    layer = KronLinear(8, 32, (16, 8), bias=False)
    layer.init_from_weight(W, "prune", prune_b_second=0.0)
    assert torch.equal(layer.materialize()[0::2], W[0::2]) and not layer.materialize()[1::2].any()
    layer.init_from_weight(W, "prune", prune_b_second=0.25)
    torch.testing.assert_close(layer.materialize()[1::2], 0.25 * W[0::2])


# (in, out, A shape): A and B both have hundreds of entries, so the sample std is close to the true one
RANDOM_SHAPES = [(768, 3072, (64, 32)), (3072, 768, (32, 128)), (1024, 1024, (32, 32)), (256, 1024, (32, 8))]


@pytest.mark.parametrize("in_f,out_f,a_shape", RANDOM_SHAPES)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("std", [0.02, 0.5])
def test_init_random_gives_the_dense_weight_the_requested_std(in_f, out_f, a_shape, k, std):
    torch.manual_seed(k)
    layer = KronLinear(in_f, out_f, a_shape, k=k, scalars=True, sparse=0.01)
    with torch.no_grad():
        layer.scalars.fill_(3.0)
        layer.sparse.values.fill_(1.0)
    layer.init_random(std)
    got = layer.materialize().std().item()
    assert abs(got - std) < 0.1 * std, (got, std)
    assert torch.equal(layer.scalars.detach(), torch.ones(k)) and not layer.sparse.values.any()
    # A and B at the same scale
    assert layer.A.std().item() == pytest.approx(layer.B.std().item(), rel=0.2)


def test_random_init_has_the_right_scale():
    # init="random": the scale of a dense layer's init (std 0.02) on the materialised weight
    for k in (1, 4):
        torch.manual_seed(k)
        layer = KronLinear.from_linear(nn.Linear(768, 3072), (64, 32), k=k, init="random")
        assert 0.018 < layer.materialize().std().item() < 0.022
    with pytest.raises(ValueError, match="std"):
        layer.init_random(-1.0)


# Every B-shape class of Table 1, at the real GPT-2 sizes where cheap and scaled down otherwise.
TABLE1_CLASSES = [
    ((768, 3072), (3072, 768)),   # B (1, 1), c_fc
    ((3072, 768), (768, 3072)),   # B (1, 1), c_proj
    ((768, 3072), (1536, 768)),   # B (2, 1)
    ((3072, 768), (768, 1536)),   # B (1, 2)
    ((768, 3072), (768, 768)),    # B (4, 1)
    ((768, 3072), (1536, 384)),   # B (2, 2)
    ((768, 3072), (1024, 256)),   # B (3, 3)
    ((768, 3072), (64, 32)),      # B (48, 24)
    ((3072, 768), (32, 64)),      # B (24, 48)
    ((768, 3072), (128, 32)),     # B (24, 24)
]


@pytest.mark.parametrize("io,a_shape", TABLE1_CLASSES)
@pytest.mark.parametrize("k,scalars", [(1, False), (2, True)])
def test_kronlinear_matches_dense_weight(io, a_shape, k, scalars):
    torch.manual_seed(0)
    in_f, out_f = io
    k = min(k, rank_bound(a_shape, b_shape_for((out_f, in_f), a_shape)))  # B (1, 1) allows one factor
    layer = KronLinear(in_f, out_f, a_shape, k=k, scalars=scalars)
    with torch.no_grad():
        layer.bias.normal_()
        if scalars:
            layer.scalars.copy_(torch.tensor([1.5, -0.5][:k]))
    x = torch.randn(3, 5, in_f, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, out_f)
    # reference: a fresh copy of the parameters through the dense weight
    ref = KronLinear(in_f, out_f, a_shape, k=k, scalars=scalars)
    ref.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = x2 @ ref.materialize().T + ref.bias
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    for name in ("A", "B", "bias") + (("scalars",) if scalars else ()):
        got, want = getattr(layer, name).grad, getattr(ref, name).grad
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_bad_shapes_say_what_to_do():
    with pytest.raises(ValueError, match=r"Valid m1: .*1536.*kronecker.py plan"):
        KronLinear(768, 3072, (1000, 768))
    with pytest.raises(ValueError, match=r"rank bound .* choose k in 1\.\.1"):
        KronLinear(768, 3072, (3072, 768), k=2)
    with pytest.raises(ValueError, match="pair"):
        KronLinear(768, 3072, (3072,))
    lin = nn.Linear(8, 32)
    with pytest.raises(ValueError, match="unknown Kronecker init 'svd'.*vl-norm"):
        KronLinear.from_linear(lin, (16, 8), init="svd")
    with pytest.raises(ValueError, match=r"prune.*\(2, 1\) or \(1, 2\).*vl-norm"):
        KronLinear.from_linear(lin, (8, 4), init="prune")
    with pytest.raises(ValueError, match="k=1"):
        KronLinear.from_linear(lin, (16, 8), k=2, init="prune")


@pytest.mark.parametrize("shape", [(3072, 768, 1), (16,), 5, "ab"])
def test_a_kron_shape_that_is_not_a_pair_is_a_clear_error(shape):
    pair = r"kron_shape=.* must be a pair of positive integers \(m1, n1\)"
    with pytest.raises(ValueError, match=pair):
        KronLinear(768, 3072, shape)
    with pytest.raises(ValueError, match=pair):
        b_shape_for((3072, 768), shape)
    with pytest.raises(ValueError, match=pair):
        kron_decompose(torch.randn(32, 8), shape)
    with pytest.raises(ValueError, match=pair):
        vl_rearrange(torch.randn(32, 8), shape)
    with pytest.raises(ValueError, match=r"B shape=.* must be a pair of positive integers \(m2, n2\)"):
        a_shape_for((3072, 768), shape)


def test_a_shape_for_is_the_inverse_of_b_shape_for():
    for a in [(64, 32), (1536, 384), (3072, 768), (1, 1), (3, 256)]:
        b = b_shape_for((3072, 768), a)
        assert a_shape_for((3072, 768), b) == a
    assert a_shape_for((3072, 768), (3, 3), k=9) == (1024, 256)
    with pytest.raises(ValueError, match=r"B shape \(5, 2\) does not tile .*Valid m2: 1, 2, 3, 4, 6, .*3072\. "
                                         r"Valid n2: 1, 2, .*768\..*kronecker.py plan"):
        a_shape_for((3072, 768), (5, 2))
    with pytest.raises(ValueError, match="does not tile"):
        a_shape_for((3072, 768), (0, 2))
    with pytest.raises(ValueError, match=r"rank bound .* choose k in 1\.\.9"):
        a_shape_for((3072, 768), (3, 3), k=10)


# Table 1 of the Krony-PT paper (A shape for c_fc, params per matrix, model size with position embeddings)
TABLE1 = [((64, 32), (48, 24), 3_200, 67_893_504), ((128, 32), (24, 24), 4_672, 67_928_832),
          ((1024, 256), (3, 3), 262_153, 74_108_376), ((768, 768), (4, 1), 589_828, 81_972_576),
          ((1536, 384), (2, 2), 589_828, 81_972_576), ((1536, 768), (2, 1), 1_179_650, 96_128_304),
          ((3072, 768), (1, 1), 2_359_297, 124_439_832)]


def test_plan_reproduces_table_1():
    rows = {r.a_shape: r for r in plan(max_rank_only=True)}
    for a, b, per_matrix, size in TABLE1:
        r = rows[a]
        assert (r.b_shape, r.matrix_params, r.model_size) == (b, per_matrix, size)
        assert r.kron_rank == 768
    many = {k: {r.a_shape: r for r in plan(factors=k)}[(1024, 256)] for k in (2, 3, 4)}
    assert [many[k].model_size for k in (2, 3, 4)] == [80_400_048, 86_691_720, 92_983_392]
    assert many[4].model_size_no_wpe == 92_196_960
    assert gpt_param_count() == 124_439_808  # dense GPT-2 small
    # every listed shape tiles the matrix, and --max_rank_only keeps exactly the full-rank ones
    all_rows = plan()
    assert all(r.a_shape[0] * r.b_shape[0] == 3072 and r.a_shape[1] * r.b_shape[1] == 768 for r in all_rows)
    assert {r.a_shape for r in all_rows if r.kron_rank == 768} == set(rows)


@pytest.mark.slow
def test_plan_cli_prints_both_sizes():
    out = subprocess.run([sys.executable, "kronecker.py", "plan", "--kron_factors", "4", "--max_rank_only"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("| (1024, 256)"))
    assert "92,983,392" in line and "92,196,960" in line
    assert "without wpe" in out


@pytest.mark.slow
def test_plan_cli_refuses_non_positive_sizes_in_one_line(capsys):
    proc = subprocess.run([sys.executable, "kronecker.py", "plan", "--n_embd", "0"], cwd=ROOT,
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "error: --n_embd must be a positive integer, got 0\n")
    # each option under its config-key name, and under the names earlier versions used
    for flag, key, value in [("--n_layer", "n_layer", "-1"), ("--vocab", "vocab_size", "0"),
                             ("--block_size", "block_size", "0"), ("--factors", "kron_factors", "0"),
                             ("--kron_factors", "kron_factors", "0")]:
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: sizes_main(["plan", flag, value]))
        assert exit_.value.code == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: --{key} must be a positive integer, got {value}\n"
