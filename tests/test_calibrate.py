"""Calibrated compression (calibrate.py): the moments collected by hooks, the calibration windows,
and the output-error fits (Kronecker ALS, whitened low rank and shared basis) against Van Loan,
plain SVD, dense least squares and a brute-force optimiser."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import calibrate
from calibrate import (calibrated_residual_scores, calibration_windows, collect_moments, kron_fit, lowrank_fit,
                       output_error, shared_basis_fit)
from kronecker import kron_decompose, kron_sum
from lowrank import SharedBasisLinear, init_shared_group, svd_factors, tie_bases


def gen(seed):
    return torch.Generator().manual_seed(seed)


def spd(n, seed, low=1e-3):
    """A random symmetric positive definite matrix with eigenvalues spread from `low` to 1."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=torch.float64))
    return Q @ torch.diag(torch.logspace(np.log10(low), 0, n, dtype=torch.float64)) @ Q.t()


def sqrtm(C):
    lam, V = torch.linalg.eigh(C)
    return V @ torch.diag(lam.sqrt()) @ V.t()


def nearly_kron(a_shape, b_shape, terms, seed, noise=0.01):
    """sum_s 2^-s A_s (x) B_s plus a little noise: a weight whose rearranged matrix has clear
    gaps between its singular values, so alternating steps converge quickly."""
    g = gen(seed)
    W = sum(0.5 ** s * torch.kron(torch.randn(*a_shape, generator=g, dtype=torch.float64),
                                  torch.randn(*b_shape, generator=g, dtype=torch.float64)) for s in range(terms))
    return W + noise * torch.randn(W.shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- output error

def test_output_error_is_the_relative_error_of_the_outputs():
    g = gen(0)
    X = torch.randn(50, 8, generator=g, dtype=torch.float64) * torch.logspace(-2, 0, 8, dtype=torch.float64)
    W, W_hat = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    C = X.t() @ X / len(X)
    expected = ((W - W_hat) @ X.t()).norm() / (W @ X.t()).norm()
    assert output_error(W, W_hat, C) == pytest.approx(expected.item(), rel=1e-12)
    assert output_error(W, W, C) == 0.0
    # in float64 whatever the inputs' dtypes
    assert output_error(W.float(), W_hat.float(), C) == pytest.approx(
        output_error(W.float().double(), W_hat.float().double(), C), rel=1e-12)


# ----------------------------------------------------------------------------- kron_fit

@pytest.mark.parametrize("k", [1, 2])
def test_identity_moment_gives_van_loan(k):
    W = torch.randn(24, 16, generator=gen(k), dtype=torch.float64)
    A, B, history = kron_fit(W, torch.eye(16, dtype=torch.float64), (6, 4), k, iters=10)
    vl = kron_sum(*kron_decompose(W, (6, 4), k))
    assert ((kron_sum(A, B) - vl).norm() / vl.norm()).item() < 1e-6
    # from a random start too: the fixed point of the steps is Van Loan's optimum
    g = gen(10 + k)
    start = (torch.randn(k, 6, 4, generator=g, dtype=torch.float64), torch.randn(k, 4, 4, generator=g, dtype=torch.float64))
    A, B, _ = kron_fit(W, torch.eye(16, dtype=torch.float64), (6, 4), k, iters=500, tol=1e-15, init=start)
    assert ((kron_sum(A, B) - vl).norm() / vl.norm()).item() < 1e-6


def dense_als(W, C, A, B, iters):
    """Alternating least squares written the slow, obvious way: for fixed B, vec(A) -> vec(W_hat S)
    (C = S S^T) is a linear map, built column by column and solved with lstsq; likewise for B."""
    S = torch.linalg.cholesky(C)
    target = (W @ S).reshape(-1)

    def solve(shape, build):
        cols = []
        for e in torch.eye(int(np.prod(shape)), dtype=torch.float64):
            cols.append((build(e.view(shape)) @ S).reshape(-1))
        x = torch.linalg.lstsq(torch.stack(cols, 1), target[:, None]).solution
        return x.view(shape)

    for _ in range(iters):
        A = solve(A.shape, lambda a: kron_sum(a, B))
        B = solve(B.shape, lambda b: kron_sum(A, b))
    return A, B


@pytest.mark.parametrize("k", [1, 2])
def test_steps_are_the_dense_least_squares_steps(k):
    W, C = torch.randn(12, 8, generator=gen(3), dtype=torch.float64), spd(8, seed=4, low=1e-2)
    A0, B0 = kron_decompose(W, (3, 4), k)
    A, B, history = kron_fit(W, C, (3, 4), k, iters=4, damping=0.0, tol=0.0)
    A_ref, B_ref = dense_als(W, C, A0, B0, iters=len(history) - 1)
    ref = kron_sum(A_ref, B_ref)
    assert ((kron_sum(A, B) - ref).norm() / ref.norm()).item() < 1e-8
    assert history[-1] == pytest.approx(output_error(W, ref, C), rel=1e-8)


def brute_force(W, C, a_shape, b_shape, restarts=30):
    """The lowest output error BFGS finds over the flattened (A, B) from many random starts."""
    S = torch.linalg.cholesky(C)
    WS = W @ S
    na = int(np.prod(a_shape))

    def f(x):
        x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        loss = (WS - torch.kron(x[:na].view(a_shape), x[na:].view(b_shape)) @ S).square().sum()
        loss.backward()
        return loss.item(), x.grad.numpy()

    rng = np.random.default_rng(0)
    best = min(minimize(f, rng.standard_normal(na + int(np.prod(b_shape))), jac=True, method="BFGS",
                        options={"gtol": 1e-12, "maxiter": 5000}).fun for _ in range(restarts))
    return float(np.sqrt(max(best, 0.0) / (WS.square().sum().item())))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_point_is_the_brute_force_optimum(seed):
    W, C = torch.randn(6, 4, generator=gen(seed), dtype=torch.float64), spd(4, seed=100 + seed, low=1e-2)
    _, _, history = kron_fit(W, C, (3, 2), 1, iters=2000, damping=0.0, tol=1e-15)
    assert history[-1] <= brute_force(W, C, (3, 2), (2, 2)) + 1e-6


@pytest.mark.parametrize("k", [1, 2])
def test_kronecker_moment_gives_whitened_van_loan(k):
    # C = C1 (x) C2 has the square root S1 (x) S2, and (A (x) B)(S1 (x) S2) = A S1 (x) B S2, so the best
    # fit is Van Loan of W (S1 (x) S2), its factors mapped back by S1^-1 and S2^-1
    a_shape, b_shape = (4, 4), (3, 2)
    W = nearly_kron(a_shape, b_shape, terms=3, seed=k)
    C1, C2 = spd(4, seed=5, low=1e-2), spd(2, seed=6, low=1e-1)
    S1, S2 = sqrtm(C1), sqrtm(C2)
    A_w, B_w = kron_decompose(W @ torch.kron(S1, S2), a_shape, k)
    whitened = kron_sum(A_w @ torch.linalg.inv(S1), B_w @ torch.linalg.inv(S2))
    C = torch.kron(C1, C2)
    _, _, history = kron_fit(W, C, a_shape, k, iters=2000, damping=0.0, tol=1e-15)
    assert history[-1] == pytest.approx(output_error(W, whitened, C), abs=1e-6)
    assert history[-1] < history[0] - 1e-3                    # and Van Loan of W itself was not it


@pytest.mark.parametrize("k,damping", [(1, 0.0), (2, 0.0), (3, 1e-2), (2, 1.0)])
def test_history_never_rises_and_is_the_returned_error(k, damping):
    W, C = torch.randn(24, 16, generator=gen(k), dtype=torch.float64), spd(16, seed=7, low=1e-4)
    A, B, history = kron_fit(W, C, (6, 4), k, iters=30, damping=damping, tol=0.0)
    assert len(history) > 1
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert history[-1] == pytest.approx(output_error(W, kron_sum(A, B), C), rel=1e-8)
    vl = kron_sum(*kron_decompose(W, (6, 4), k))
    assert history[0] == pytest.approx(output_error(W, vl, C), rel=1e-8)


def test_never_worse_than_the_start():
    """Heavy damping pulls the fit towards Van Loan: from the undamped optimum every step raises
    the true output error, so kron_fit keeps its start."""
    W, C = torch.randn(24, 16, generator=gen(4), dtype=torch.float64), spd(16, seed=5, low=1e-4)
    A0, B0, _ = kron_fit(W, C, (6, 4), 1, iters=300, damping=0.0, tol=1e-14)
    A, B, history = kron_fit(W, C, (6, 4), 1, iters=5, damping=10.0, init=(A0, B0), tol=0.0)
    assert len(history) == 6 and len(set(history)) == 1
    assert torch.allclose(kron_sum(A, B), kron_sum(A0, B0), atol=1e-12)
    # the damped steps did move: the same fit without a good start ends elsewhere, and worse
    _, _, damped_history = kron_fit(W, C, (6, 4), 1, iters=5, damping=10.0, tol=0.0)
    assert damped_history[-1] > history[-1] + 1e-3


def test_damped_objective_never_rises():
    """Each exact step minimises tr(E C_d E^T): after every iteration it is no larger."""
    W, C = torch.randn(24, 16, generator=gen(8), dtype=torch.float64), spd(16, seed=9, low=1e-4)
    Cd = calibrate.damped(C, 1e-2)
    objectives = []
    for iters in range(6):
        A, B, _ = kron_fit(W, C, (6, 4), 2, iters=iters, damping=1e-2, tol=0.0)
        E = W - kron_sum(A, B)
        objectives.append(((E @ Cd) * E).sum().item())
    assert all(b <= a * (1 + 1e-12) for a, b in zip(objectives, objectives[1:]))
    assert objectives[-1] < objectives[0]


def test_many_factors_beat_van_loan_on_an_unequal_moment():
    W, C = torch.randn(96, 64, generator=gen(11), dtype=torch.float64), spd(64, seed=12, low=1e-5)
    A, B, history = kron_fit(W.float(), C, (24, 16), 4, iters=30)
    assert A.shape == (4, 24, 16) and B.shape == (4, 4, 4) and A.dtype == B.dtype == torch.float32
    vl = output_error(W, kron_sum(*kron_decompose(W, (24, 16), 4)), C)
    assert history[0] == pytest.approx(vl, rel=1e-5)
    assert history[-1] < 0.8 * vl
    # pairs balanced like Van Loan's sqrt(singular value) split
    assert torch.allclose(A.flatten(1).norm(dim=1), B.flatten(1).norm(dim=1), rtol=1e-4)


def test_kron_fit_refuses_bad_arguments():
    W = torch.randn(24, 16)
    with pytest.raises(ValueError, match="moment C"):
        kron_fit(W, torch.eye(12), (6, 4))
    with pytest.raises(ValueError, match="kron_shape|tile"):
        kron_fit(W, torch.eye(16), (5, 4))
    with pytest.raises(ValueError, match="init"):
        kron_fit(W, torch.eye(16), (6, 4), init=(torch.zeros(1, 4, 6), torch.zeros(1, 4, 4)))
    with pytest.raises(ValueError, match="damping"):
        kron_fit(W, torch.eye(16), (6, 4), damping=-1.0)


# ----------------------------------------------------------------------------- low rank

def test_lowrank_identity_moment_is_plain_svd():
    W = torch.randn(20, 12, generator=gen(0), dtype=torch.float64)
    for rank in (1, 5, 12, 15):
        U, V = lowrank_fit(W, torch.eye(12, dtype=torch.float64), rank, damping=0.0)
        U0, V0 = svd_factors(W, rank)
        assert U.shape == (20, rank) and V.shape == (rank, 12)
        assert torch.allclose(U @ V, U0 @ V0, atol=1e-10)
        # the same split of the singular values (up to the sign of each pair)
        assert torch.allclose(U.norm(dim=0), U0.norm(dim=0), atol=1e-10)
        assert torch.allclose(V.norm(dim=1), V0.norm(dim=1), atol=1e-10)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_lowrank_beats_plain_svd_and_its_error_is_the_whitened_tail(damping):
    W, C = torch.randn(20, 12, generator=gen(1), dtype=torch.float64), spd(12, seed=2, low=1e-4)
    Cd = calibrate.damped(C, damping)
    s = torch.linalg.svdvals(W @ torch.linalg.cholesky(Cd))
    for rank in (1, 4, 8):
        U, V = lowrank_fit(W.float(), C, rank, damping=damping)
        assert U.dtype == V.dtype == torch.float32
        U, V = lowrank_fit(W, C, rank, damping=damping)
        plain = output_error(W, torch.matmul(*svd_factors(W, rank)), Cd)
        err = output_error(W, U @ V, Cd)
        assert err == pytest.approx((s[rank:].norm() / s.norm()).item(), rel=1e-8)
        assert err <= plain + 1e-12
        if damping == 0:
            assert err < 0.9 * plain


def test_lowrank_singular_moment_needs_damping():
    C = torch.zeros(12, 12, dtype=torch.float64)
    C[:6, :6] = spd(6, seed=3)
    W = torch.randn(20, 12, generator=gen(3), dtype=torch.float64)
    with pytest.raises(ValueError, match="damping"):
        lowrank_fit(W, C, 4, damping=0.0)
    U, V = lowrank_fit(W, C, 4, damping=1e-2)
    assert torch.isfinite(U @ V).all()


def test_shared_basis_identity_moments_is_init_shared_group():
    Ws = [torch.randn(16, 12, generator=gen(i), dtype=torch.float64) for i in range(3)]
    coefficients, basis = shared_basis_fit(Ws, [torch.eye(12, dtype=torch.float64)] * 3, 5, damping=0.0)
    layers = [SharedBasisLinear(12, 16, 5).double() for _ in Ws]
    tie_bases(layers)
    init_shared_group(layers, Ws)
    assert basis.shape == (5, 12) and [K.shape for K in coefficients] == [(16, 5)] * 3
    for K, layer in zip(coefficients, layers):
        assert torch.allclose(K @ basis, layer.materialize(), atol=1e-10)


def test_shared_basis_equal_moments_is_the_whitened_stack_optimum():
    Ws = [torch.randn(16, 12, generator=gen(i), dtype=torch.float64) for i in range(2)]
    C = spd(12, seed=4, low=1e-4)
    coefficients, basis = shared_basis_fit(Ws, [C, C], 4, damping=0.0)
    stack, fit = torch.cat(Ws), torch.cat([K @ basis for K in coefficients])
    s = torch.linalg.svdvals(stack @ torch.linalg.cholesky(C))
    assert output_error(stack, fit, C) == pytest.approx((s[4:].norm() / s.norm()).item(), rel=1e-8)
    plain_C, plain_B = svd_factors(stack, 4)
    assert output_error(stack, fit, C) < 0.9 * output_error(stack, plain_C @ plain_B, C)


def test_shared_basis_coefficients_are_each_members_least_squares_fit():
    Ws = [torch.randn(16, 12, generator=gen(i), dtype=torch.float64) for i in range(3)]
    Cs = [spd(12, seed=20 + i, low=1e-3) for i in range(3)]
    coefficients, basis = shared_basis_fit(Ws, Cs, 5, damping=1e-2)
    for W, C, K in zip(Ws, Cs, coefficients):
        Cd = calibrate.damped(C, 1e-2)
        gradient = (W - K @ basis) @ Cd @ basis.t()          # zero at the least-squares K
        assert gradient.norm().item() < 1e-10 * (W @ Cd @ basis.t()).norm().item()
    # full rank: every member exact
    coefficients, basis = shared_basis_fit(Ws, Cs, 12, damping=1e-2)
    for W, K in zip(Ws, coefficients):
        assert torch.allclose(K @ basis, W, atol=1e-8)


def test_residual_scores_add_up_to_the_error_for_uncorrelated_inputs():
    g = gen(5)
    E = torch.randn(6, 8, generator=g, dtype=torch.float64)
    C = torch.diag(torch.logspace(-3, 0, 8, dtype=torch.float64))
    scores = calibrated_residual_scores(E, C)
    assert scores.shape == E.shape
    assert scores.double().square().sum().item() == pytest.approx(((E @ C) * E).sum().item(), rel=1e-6)
    # the largest entries, on the weakest input, are not the ones that matter most
    E[:, 0] = 10 * E.abs().max()
    column = lambda flat: flat % E.shape[1]
    assert column(E.abs().argmax()) == 0
    assert column(calibrated_residual_scores(E, C).argmax()) != 0


# ----------------------------------------------------------------------------- the data

def tiny_gpt():
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))


NAMES = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc"]


def test_hooked_moments_are_the_moments_of_the_inputs():
    model = tiny_gpt().train()
    tokens = np.random.default_rng(0).integers(0, 64, size=500).astype(np.uint16)
    captured = {name: [] for name in NAMES}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: captured[n].append(args[0]))
               for n in NAMES]
    with torch.no_grad():
        model.eval()
        for idx in calibration_windows(tokens, 100, 16, 3, progress=False):
            model(idx)
    for h in handles:
        h.remove()
    model.train()
    moments = collect_moments(model, NAMES, calibration_windows(tokens, 100, 16, 3, progress=False))
    assert model.training                                           # mode restored
    assert all(not model.get_submodule(n)._forward_pre_hooks for n in NAMES)     # hooks removed
    for name in NAMES:
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured[name]]).double()
        assert moments[name].count == 100 == len(X)
        C = moments[name].second_moment()
        assert C.dtype == torch.float64
        assert torch.allclose(C, X.t() @ X / len(X), rtol=1e-10, atol=1e-12)
    # the output error over these inputs is what output_error says with the collected C
    W = model.get_submodule(NAMES[0]).weight.detach()
    A, B, history = kron_fit(W, moments[NAMES[0]].second_moment(), (8, 4), 1, iters=5)
    X = torch.cat([x.reshape(-1, 16) for x in captured[NAMES[0]]]).double()
    measured = ((W.double() - kron_sum(A, B).double()) @ X.t()).norm() / (W.double() @ X.t()).norm()
    assert history[-1] == pytest.approx(measured.item(), rel=1e-4)


def test_stop_early_gives_the_same_moments_and_hooks_go_on_error():
    model = tiny_gpt()
    tokens = np.random.default_rng(1).integers(0, 64, size=300).astype(np.uint16)

    def windows():
        return calibration_windows(tokens, 64, 16, 2, progress=False)
    full = collect_moments(model, NAMES[:1], windows(), stop_early=False)
    early = collect_moments(model, NAMES[:1], windows(), stop_early=True)
    assert torch.equal(full[NAMES[0]].sum, early[NAMES[0]].sum)
    ran = []
    model.lm_head.register_forward_pre_hook(lambda m, a: ran.append(1))
    collect_moments(model, NAMES[:1], windows())
    assert not ran                                                   # nothing after layer 0's c_fc ran

    def broken(m, idx):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        collect_moments(model, NAMES, windows(), forward=broken)
    assert all(not model.get_submodule(n)._forward_pre_hooks for n in NAMES)
    with pytest.raises(ValueError, match="no inputs"):
        collect_moments(model, NAMES, [])


def test_calibration_windows_are_deterministic_and_cover_calib_tokens():
    tokens = np.arange(1000, dtype=np.uint16)
    for calib, block, batch in [(160, 16, 4), (170, 16, 4), (1000, 16, 3), (7, 16, 2), (1, 1, 1)]:
        batches = list(calibration_windows(tokens, calib, block, batch, progress=False))
        again = list(calibration_windows(tokens, calib, block, batch, progress=False))
        assert all(torch.equal(a, b) for a, b in zip(batches, again)) and len(batches) == len(again)
        assert all(x.dtype == torch.int64 and x.shape[0] <= batch and x.shape[1] <= block for x in batches)
        windows = [row for x in batches for row in x.tolist()]
        assert sum(map(len, windows)) == calib
        assert all(len(w) == block for w in windows[:calib // block])
        # contiguous slices of the data, in order, disjoint
        starts = [w[0] for w in windows]
        assert all(w == list(range(w[0], w[0] + len(w))) for w in windows)
        assert all(a + len(w) <= b for a, w, b in zip(starts, windows, starts[1:]))
        # spread over the whole array: the first starts at 0, the last ends at the end
        assert starts[0] == 0
        if len(windows) > 1:
            assert windows[-1][-1] == len(tokens) - 1


@pytest.mark.parametrize("calib", [0, -5, 1001])
def test_calib_tokens_out_of_range_is_a_clear_error(calib):
    with pytest.raises(ValueError, match="calib_tokens"):
        calibration_windows(np.arange(1000, dtype=np.uint16), calib, 16, 4, progress=False)


def test_a_layer_reading_a_swapped_order_is_refused():
    from conftest import gpt
    model = gpt(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16, mlp="kron", kron_b_shape=(2, 2))
    assert model.transformer.h[0].mlp.c_proj.swap_in            # B 2x2: the MLP passes its hidden swapped
    with pytest.raises(ValueError, match="swap"):
        collect_moments(model, ["transformer.h.0.mlp.c_proj"], [torch.zeros(1, 4, dtype=torch.long)])
    moments = collect_moments(model, ["transformer.h.0.mlp.c_fc"], [torch.zeros(1, 4, dtype=torch.long)])
    assert moments["transformer.h.0.mlp.c_fc"].count == 4


def test_teacher_target_is_the_least_squares_fit_to_the_teachers_outputs():
    """min ||W_hat x~ - W x||^2 + mu ||W_hat - W||^2 over dense W_hat is W' = W (X + mu I) C_d^-1; where the
    student sees the teacher's inputs (x~ = x) W' is W itself."""
    g = gen(5)
    W = torch.randn(6, 8, generator=g, dtype=torch.float64)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64) * torch.logspace(-1, 0.5, 8, dtype=torch.float64)
    x_student = x + 0.3 * torch.randn(500, 8, generator=g, dtype=torch.float64)
    C, X = x_student.t() @ x_student / 500, x.t() @ x_student / 500
    target = calibrate.teacher_target(W, C, X, damping=1e-2)
    mu = 1e-2 * C.diagonal().mean()
    # the same problem as one stacked least-squares system: [x~; sqrt(mu) I] W_hat^T = [x W^T; sqrt(mu) W^T]
    lhs = torch.cat([x_student / 500 ** 0.5, mu.sqrt() * torch.eye(8, dtype=torch.float64)])
    rhs = torch.cat([x @ W.t() / 500 ** 0.5, mu.sqrt() * W.t()])
    torch.testing.assert_close(target, torch.linalg.lstsq(lhs, rhs).solution.t(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(calibrate.teacher_target(W, x.t() @ x / 500, x.t() @ x / 500), W, rtol=1e-8, atol=1e-10)


def test_cross_moments_are_those_of_the_two_models_inputs():
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    student = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 64, (3, 16), generator=gen(1))
    inputs = {}
    for who, model in (("t", teacher), ("s", student)):
        h = model.transformer.h[1].mlp.c_proj.register_forward_pre_hook(
            lambda m, a, who=who: inputs.__setitem__(who, a[0].reshape(-1, 64).double()))
        with torch.no_grad():
            model(idx)
        h.remove()
    C, X = calibrate.collect_cross_moments(teacher, student, "transformer.h.1.mlp.c_proj", [idx[:2], idx[2:]])
    torch.testing.assert_close(C, inputs["s"].t() @ inputs["s"] / 48, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(X, inputs["t"].t() @ inputs["s"] / 48, rtol=1e-10, atol=1e-12)
    assert not teacher.transformer.h[1].mlp.c_proj._forward_pre_hooks      # the hooks are gone
