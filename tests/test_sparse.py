"""The sparse residual correction W_hat + S."""
import pytest
import torch
import torch.nn as nn

from kronecker import KronLinear, SparseResidual, sparse_count
from checkpoints import from_checkpoint, save_checkpoint
from compress import compress, resolve, spec_of
from conftest import gpt
from model import GPT, GPTConfig


def kron_with_outliers(seed=0, n_outliers=6):
    """A Kronecker-structured weight (96, 64) plus small noise plus planted large outliers."""
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(12, 8, generator=g), torch.randn(8, 8, generator=g)
    W = torch.kron(A, B) + 0.01 * torch.randn(96, 64, generator=g)
    pos = torch.randperm(W.numel(), generator=g)[:n_outliers]
    W.view(-1)[pos] += 10.0 * torch.sign(torch.randn(n_outliers, generator=g))
    return W, set(pos.tolist())


def layer_for(W, p, a_shape=(6, 4), init="vl", bias=False):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(W)
    return KronLinear.from_linear(lin, a_shape, k=1, init=init, sparse=p)


def test_planted_outliers_error_drops_by_their_residual_energy():
    W, planted = kron_with_outliers()
    p = len(planted) / W.numel()
    layer = layer_for(W, p, a_shape=(12, 8))
    assert layer.sparse.values.numel() == len(planted)
    R = (W - layer.materialize()).double()                 # what the Kronecker factor misses
    kept = {int(r) * W.shape[1] + int(c) for r, c in layer.sparse.index.t()}
    assert kept == planted                                 # the outliers are the largest residual entries
    S = layer.sparse.to_dense().double()
    new_err2 = (R - S).pow(2).sum()
    assert new_err2.item() == pytest.approx((R.pow(2).sum() - S.pow(2).sum()).item(), rel=1e-9)
    share = sum(R.view(-1)[i] ** 2 for i in planted) / R.pow(2).sum()
    assert share > 0.5                                     # the outliers dominated the error ...
    drop = 1 - new_err2 / R.pow(2).sum()
    assert drop.item() == pytest.approx(share.item(), rel=1e-9)  # ... and exactly their share is gone


def test_error_falls_monotonically_with_p_and_p1_is_exact():
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    errors = []
    for p in (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.99):
        layer = layer_for(W, p, init="vl-norm")
        W_hat = layer.materialize() + (layer.sparse.to_dense() if layer.sparse is not None else 0)
        errors.append((W - W_hat).norm().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    full = layer_for(W, 1.0)
    assert torch.allclose(full.materialize() + full.sparse.to_dense(), W, atol=1e-6)


def test_random_init_keeps_the_residual_of_its_random_factors():
    """compress with kron_init="random" and kron_sparse: the sparse term holds the largest entries
    of W minus the random product, as for every other init (and KronLinear.from_linear)."""
    torch.manual_seed(0)
    dense = gpt(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    model, _ = compress(dense, mlp="kron", kron_shape=(32, 8), kron_init="random", kron_sparse=0.05)
    for name in ("c_fc", "c_proj"):
        W = getattr(dense.transformer.h[0].mlp, name).weight.detach()
        layer = getattr(model.transformer.h[0].mlp, name)
        R = W - layer.materialize().detach()
        S = layer.sparse.to_dense()
        nnz = layer.sparse.values.numel()
        kept = S.reshape(-1).nonzero().squeeze(1)
        assert kept.numel() == nnz
        assert torch.equal(S.reshape(-1)[kept], R.reshape(-1)[kept])
        assert R.reshape(-1)[kept].abs().min() >= R.abs().reshape(-1).kthvalue(R.numel() - nnz).values
        assert layer.materialize().std().item() == pytest.approx(W.std().item(), rel=1e-4)


@pytest.mark.parametrize("a_shape", [(6, 4), (24, 16)])   # factored path, and B = 1x1 (materialised path)
def test_forward_and_gradients_match_the_dense_reference(a_shape):
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(2))
    layer = layer_for(W, 0.2, a_shape=a_shape, bias=True)
    with torch.no_grad():
        layer.sparse.values.add_(0.3 * torch.randn_like(layer.sparse.values))   # not just the residual
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    rows, cols = layer.sparse.index
    S_ref = layer.sparse.to_dense().detach().requires_grad_(True)
    y_ref = x @ (layer.materialize().detach() + S_ref).t() + layer.bias.detach()
    assert torch.allclose(y, y_ref, atol=1e-5)
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad((y * g).sum(), (x, layer.sparse.values))
    gx_ref, gS_ref = torch.autograd.grad((y_ref * g).sum(), (x, S_ref))
    assert torch.allclose(gx, gx_ref, atol=1e-5)
    assert torch.allclose(gv, gS_ref[rows, cols], atol=1e-5)


def test_num_params_counts_values_and_index_memory_is_separate():
    kw = dict(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=64, mlp="kron", kron_shape=(16, 8))
    plain, sparse = gpt(**kw), gpt(**kw, kron_sparse=0.05)
    nnz = sparse_count((128, 32), 0.05)
    assert nnz == round(0.05 * 128 * 32)
    assert sparse.num_params() - plain.num_params() == 2 * 2 * nnz      # c_fc + c_proj in 2 layers
    residuals = [m for m in sparse.modules() if isinstance(m, SparseResidual)]
    assert len(residuals) == 4
    assert all(m.index_bytes() == 2 * nnz * 8 for m in residuals)       # int64 (row, col) pairs
    assert not any(p is m.index for m in residuals for p in sparse.parameters())


def test_sparse_checkpoint_round_trip(tmp_path, tiny_hf_dir):
    dense = GPT.from_pretrained(tiny_hf_dir).eval()
    model = GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(16, 8), kron_init="vl", kron_sparse=0.05).eval()
    plain = GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(16, 8), kron_init="vl").eval()
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        err_sparse = (model(idx)[0] - dense(idx)[0]).abs().mean()
        err_plain = (plain(idx)[0] - dense(idx)[0]).abs().mean()
    assert err_sparse < err_plain                # the residual brings the output closer to GPT-2's
    path = str(tmp_path / "sparse.pt")
    save_checkpoint(model, path)
    back = from_checkpoint(path).eval()
    assert spec_of(back).keys["kron_sparse"] == 0.05
    blk, blk2 = model.transformer.h[1].mlp.c_proj, back.transformer.h[1].mlp.c_proj
    assert torch.equal(blk.sparse.index, blk2.sparse.index) and torch.equal(blk.sparse.values, blk2.sparse.values)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], back(idx)[0])


def test_bad_fraction_is_a_clear_error():
    with pytest.raises(ValueError, match="kron_sparse"):
        resolve(GPTConfig(), mlp="kron", kron_shape=(1536, 384), kron_sparse=1.5)
