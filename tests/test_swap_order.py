"""The swapped feature order of Kronecker layers (kronecker.swap_order): every path computes the
same function in it, and an MLP whose c_fc and c_proj pass the hidden features in it computes
exactly what the standard order computes, without the strided copies of the hidden activation."""
import pytest
import torch

from conftest import gpt
from kron_kernels import KRON_PATHS, kron_path, swap_order, thin_matmul
from kronecker import KronLinear, swap_hidden_order
from test_kron_paths import SMALL, activation_copies, compiler_available, make_layer, reference


def test_swap_order_is_the_index_formula_and_its_own_inverse():
    m1, m2 = 5, 3
    t = torch.arange(2 * m1 * m2).view(2, m1 * m2)
    s = swap_order(t, m1, m2)
    for i1 in range(m1):
        for i2 in range(m2):
            assert torch.equal(s[:, i2 * m1 + i1], t[:, i1 * m2 + i2])
    assert torch.equal(swap_order(s, m2, m1), t)


def swapped_reference(layer: KronLinear, xs: torch.Tensor) -> torch.Tensor:
    """The dense reference, with input and output in the layer's feature orders."""
    (m1, n1), (m2, n2) = layer.a_shape, layer.b_shape
    x = swap_order(xs, n2, n1) if layer.swap_in else xs
    y = reference(layer, x)
    if layer.sparse is not None:
        y = y + layer.sparse(x)
    return swap_order(y, m1, m2) if layer.swap_out else y


@pytest.mark.parametrize("b_class", list(SMALL))
@pytest.mark.parametrize("transpose", [False, True], ids=["c_fc", "c_proj"])
@pytest.mark.parametrize("path", KRON_PATHS)
@pytest.mark.parametrize("swaps", [(True, False), (False, True), (True, True)], ids=["in", "out", "both"])
@pytest.mark.parametrize("lead", [(3, 5), (1, 1)], ids=["batch", "one-token"])   # b_first's bias: in the GEMM or not
def test_swapped_orders_on_every_path(b_class, transpose, path, swaps, lead):
    in_f, out_f, a_shape = SMALL[b_class]
    if transpose:
        in_f, out_f, a_shape = out_f, in_f, a_shape[::-1]
    k = 1 if b_class == (1, 1) else 2                # B of 1x1 has rank 1
    layer = make_layer(in_f, out_f, a_shape, k, scalars=True, bias=True)
    layer.path, (layer.swap_in, layer.swap_out) = path, swaps
    xs = torch.randn(*lead, in_f, requires_grad=True)
    y = layer(xs)
    y_ref = swapped_reference(layer, xs)
    g = torch.randn_like(y)
    params = [layer.A, layer.B, layer.scalars, layer.bias, xs]
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5 * scale)
    for got, want in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("path", ["a_first", "b_first", "materialised"])
def test_swapped_orders_with_a_sparse_residual(path):
    torch.manual_seed(0)
    layer = KronLinear(24, 96, (32, 8), bias=True, sparse=0.05)
    layer.init_from_weight(torch.randn(96, 24))
    layer.path, layer.swap_in, layer.swap_out = path, True, True
    xs = torch.randn(7, 24)
    torch.testing.assert_close(layer(xs), swapped_reference(layer, xs), rtol=1e-4, atol=1e-5)


def gpt2_mlp_pair(b_shape: tuple[int, int], k: int = 1) -> tuple[KronLinear, KronLinear]:
    """c_fc and c_proj of a GPT-2-small MLP with B of b_shape (cheap: only the factors exist)."""
    a_fc = (3072 // b_shape[0], 768 // b_shape[1])
    return KronLinear(768, 3072, a_fc, k), KronLinear(3072, 768, a_fc[::-1], k)


@pytest.mark.parametrize("b_shape,k,swapped", [
    ((3, 3), 1, True), ((2, 2), 1, True),            # c_fc b_first, c_proj a_first: both save a copy
    ((4, 1), 1, False), ((2, 1), 1, False),          # c_fc a_first: nothing to save
    ((48, 24), 1, False), ((24, 24), 1, False),      # bmm paths: no copies to start with
    ((3, 3), 4, False), ((1, 1), 1, False),          # materialised
])
def test_mlp_swaps_the_hidden_order_only_where_it_saves_copies(b_shape, k, swapped):
    fc, proj = gpt2_mlp_pair(b_shape, k)
    assert swap_hidden_order(fc, proj) is swapped
    assert (fc.swap_in, fc.swap_out, proj.swap_in, proj.swap_out) == (False, swapped, swapped, False)
    if swapped:
        assert (fc.path, proj.path) == ("b_first", "a_first") == (kron_path(fc.a_shape, fc.b_shape),
                                                                  kron_path(proj.a_shape, proj.b_shape))
        assert "swap_out=True" in repr(fc) and "swap_in=True" in repr(proj)
    assert swap_hidden_order(torch.nn.Linear(768, 3072), proj) is False
    if swapped:                                      # a sparse residual would copy again: no swap
        sparse_fc = KronLinear(768, 3072, fc.a_shape, k, sparse=0.001)
        assert swap_hidden_order(sparse_fc, proj) is False and not proj.swap_in


def tiny_kron_gpt(**kw):
    # n_embd 24: c_fc (96, 24) with A (32, 8), B (3, 3): b_first, and c_proj a_first
    return gpt(n_layer=2, n_head=2, n_embd=24, block_size=16, vocab_size=64, bias=True, dropout=0.0,
               mlp="kron", kron_shape=(32, 8), **kw)


def tiny_kron_mlp():
    return tiny_kron_gpt().transformer.h[0].mlp


def test_gpt_with_swapped_hidden_order_computes_the_same_function():
    torch.manual_seed(0)
    model = tiny_kron_gpt()
    mlps = [b.mlp for b in model.transformer.h]
    assert all(m.c_fc.swap_out and m.c_proj.swap_in for m in mlps)
    with torch.no_grad():
        for p in model.parameters():                # O(1) factors so that differences show
            p.normal_(std=0.3)
    idx = torch.randint(0, 64, (2, 16))

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    loss, grads = loss_and_grads()
    for m in mlps:
        m.c_fc.swap_out = m.c_proj.swap_in = False
    loss_std, grads_std = loss_and_grads()
    torch.testing.assert_close(loss, loss_std, rtol=1e-5, atol=1e-6)
    for g, g_std in zip(grads, grads_std):
        torch.testing.assert_close(g, g_std, rtol=1e-4, atol=1e-6)
    # the parameters (state dict, exports) are in the standard order either way
    assert torch.equal(mlps[0].c_fc.materialize(), torch.kron(mlps[0].c_fc.A[0], mlps[0].c_fc.B[0]))


def test_swapped_mlp_makes_no_copy_of_the_hidden_activation():
    """Why the swap exists: in the standard order c_fc's b_first output and c_proj's a_first
    input go through a strided copy each, forward and backward; in the swapped order none does."""
    torch.manual_seed(0)
    mlp = tiny_kron_mlp()
    x = torch.randn(64, 24, requires_grad=True)
    grad = torch.randn(64, 24)
    hidden = 64 * 96

    def step():
        mlp(x).backward(grad)
    assert mlp.c_fc.swap_out and mlp.c_proj.swap_in
    assert activation_copies(step, hidden) == []
    mlp.c_fc.swap_out = mlp.c_proj.swap_in = False
    assert len(activation_copies(step, hidden)) >= 2


@pytest.mark.slow
@pytest.mark.skipif(compiler_available() is not None, reason=str(compiler_available()))
def test_swapped_mlp_compiles_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = tiny_kron_mlp()
    x = torch.randn(2, 7, 24)
    compiled = torch.compile(mlp, fullgraph=True)
    torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-4, atol=1e-5)


def test_thin_matmul_adds_a_repeating_bias_in_place():
    torch.manual_seed(0)
    for K, M, P in [(3, 3, 8), (1, 4, 16), (4, 1, 8)]:
        x = torch.randn(4 * P, K, requires_grad=True)
        w, b = torch.randn(K, M, requires_grad=True), torch.randn(P * M, requires_grad=True)
        want = (x @ w).view(4, P * M) + b
        g = torch.randn_like(want)
        grads_ref = torch.autograd.grad(want, (x, w, b), g)
        for group in (1, 2, 4):
            y = thin_matmul(x, w, group, b)
            torch.testing.assert_close(y.view(4, P * M), want)
            for got, ref in zip(torch.autograd.grad(y.view(4, P * M), (x, w, b), g), grads_ref):
                torch.testing.assert_close(got, ref)


def test_decoding_one_token_copies_no_factor():
    """At one row, folding the bias into c_fc's GEMM would copy A^T (larger than the output):
    the fold applies only where the output has more rows than A^T (decoding would get slower)."""
    torch.manual_seed(0)
    mlp = tiny_kron_mlp()
    x = torch.randn(1, 24)
    assert mlp.c_fc.swap_out and mlp.c_proj.swap_in
    with torch.no_grad():
        assert activation_copies(lambda: mlp(x), mlp.c_fc.A.numel()) == []
        assert activation_copies(lambda: mlp(x.expand(64, 24).contiguous()), mlp.c_fc.A.numel()) != []


@pytest.mark.parametrize("rows", [64, 1], ids=["batch", "one-token"])
def test_swapped_mlp_under_bf16_autocast(rows):
    torch.manual_seed(0)
    mlp = tiny_kron_mlp()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(std=0.3)
    x = torch.randn(rows, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
    assert y.dtype == torch.bfloat16
    ref = mlp(x)                                           # float32, same swapped order
    assert (y.float() - ref).norm() / ref.norm() < 3e-2
    g = torch.randn_like(ref)
    params = list(mlp.parameters())
    for got, want in zip(torch.autograd.grad(y.float(), params, g), torch.autograd.grad(ref, params, g)):
        assert got.dtype == torch.float32 and (got - want).norm() / want.norm() < 6e-2
