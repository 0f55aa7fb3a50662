"""Free permutations before Van Loan: permuting a dense GPT keeps its function, the search never
loses against the identity order and recovers planted Kronecker structure, and compress /
export / train.py carry kron_permute through."""
from dataclasses import replace

import pytest
import torch

from conftest import run          # and the fixtures data_dir, hf_dir
from checkpoints import load_checkpoint
from compress import compress, resolve, searched_matrices, spec_of
from kronecker import a_shape_for, b_shape_for, kron_sum, relative_error
from model import GPT, GPTConfig
from permute import (PermutationTerm, _assignment_cost, permutation_search, permutation_terms, permute_hidden_,
                     permute_residual_, permuted, search_permutations)

D = 32          # n_embd: c_fc (128, 32), c_proj (32, 128)
H = 4 * D
NOISE = 0.01    # planted structure: relative Frobenius size of the noise


# -----------------------------------------------------------------------------
# helpers

def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    """A tiny dense GPT with random LayerNorm weights and biases and random linear biases
    (GPT-2's init leaves them at 1 and 0, which a wrong permutation would not disturb)."""
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=2, n_embd=D, n_head=2, vocab_size=100, block_size=16, **overrides)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
        if model.config.untied_head:        # apart from wte, as after training
            model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    return model


def tokens(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 100, (batch, 16), generator=torch.Generator().manual_seed(seed))


def logits_of(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def planted_mlp(a_shape, k, seed=0, noise=NOISE, d=D):
    """c_fc (4d, d) = sum of k A (x) B + noise and c_proj = sum of k A' (x) B' + noise (A' of the
    shape c_proj uses: A transposed), in the order that shows the structure."""
    g = torch.Generator().manual_seed(seed)
    (m1, n1), (m2, n2) = a_shape, b_shape_for((4 * d, d), a_shape, k)
    fc = kron_sum(torch.randn(k, m1, n1, generator=g), torch.randn(k, m2, n2, generator=g))
    proj = kron_sum(torch.randn(k, n1, m1, generator=g), torch.randn(k, n2, m2, generator=g))
    fc = fc + noise * fc.norm() / fc.numel() ** 0.5 * torch.randn(fc.shape, generator=g)
    proj = proj + noise * proj.norm() / proj.numel() ** 0.5 * torch.randn(proj.shape, generator=g)
    return fc, proj


def shuffled(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def gaussian_mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, D, generator=g), torch.randn(D, H, generator=g)


def hidden_terms(W_fc, W_proj, a_shape, k=1, objective="vl-norm"):
    """One MLP's hidden units: c_fc's rows, c_proj's columns (c_proj uses A and B transposed)."""
    b_shape = b_shape_for(tuple(W_fc.shape), a_shape, k)
    return [PermutationTerm(W_fc, a_shape, b_shape, 0, k, objective),
            PermutationTerm(W_proj, a_shape[::-1], b_shape[::-1], 1, k, objective)]


def residual_terms(mlps, a_shape, k=1, objective="vl-norm"):
    """The residual stream: every layer's c_fc columns and c_proj rows."""
    b_shape = b_shape_for((H, D), a_shape, k)
    return [term for fc, proj in mlps for term in (PermutationTerm(fc, a_shape, b_shape, 1, k, objective),
                                                   PermutationTerm(proj, a_shape[::-1], b_shape[::-1], 0, k,
                                                                   objective))]


def planted_gpt(b_shape, k, hidden=True, residual=False, noise=NOISE, seed=0, **overrides) -> GPT:
    """tiny_gpt with Kronecker-structured MLPs (+ noise), then scrambled with free permutations:
    every MLP's hidden units, and/or the residual stream."""
    model = tiny_gpt(seed, **overrides)
    a_shape = a_shape_for((H, D), b_shape, k)
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            fc, proj = planted_mlp(a_shape, k, seed=10 * seed + layer, noise=noise)
            block.mlp.c_fc.weight.copy_(0.1 * fc / fc.square().mean().sqrt())          # GPT-2-like scale
            block.mlp.c_proj.weight.copy_(0.1 * proj / proj.square().mean().sqrt())
    if hidden:
        for layer in range(model.config.n_layer):
            permute_hidden_(model, layer, shuffled(H, 100 + 10 * seed + layer))
    if residual:
        permute_residual_(model, shuffled(D, 200 + seed))
    return model


def searched(model: GPT, keys: dict) -> list:
    """The matrices a search over `model` lowers the error of, for the compression `keys`."""
    return searched_matrices(resolve(model.config, **keys), model.config)


def permuted_for(model: GPT, keys: dict) -> GPT:
    return permuted(model, searched(model, keys), residual=keys["kron_permute"] == "hidden+residual")


def summed_error(model: GPT, keys: dict) -> float:
    """The summed Van Loan error of the MLP matrices `keys` compresses, at the model's order."""
    return sum(relative_error(t.W, t.a_shape, t.k, t.objective)
               for t in permutation_terms(model, searched(model, keys), None))


# -----------------------------------------------------------------------------
# permuting a dense GPT keeps its function

@pytest.mark.parametrize("untied_head", [False, True])
def test_permute_hidden_keeps_logits(untied_head):
    model = tiny_gpt(untied_head=untied_head)
    idx = tokens(1, batch=3)
    before = logits_of(model, idx)
    fc_before = model.transformer.h[1].mlp.c_fc.weight.clone()
    perms = [shuffled(H, 10), shuffled(H, 11)]
    for layer, perm in enumerate(perms):
        permute_hidden_(model, layer, perm)
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, fc_before[perms[1]])   # really moved
    torch.testing.assert_close(logits_of(model, idx), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("untied_head", [False, True])
def test_permute_residual_keeps_logits(untied_head):
    model = tiny_gpt(seed=1, untied_head=untied_head)
    idx = tokens(2, batch=3)
    before = logits_of(model, idx)
    ln_before = model.transformer.h[0].ln_1.weight.clone()
    perm = shuffled(D, 3)
    permute_residual_(model, perm)
    assert torch.equal(model.transformer.h[0].ln_1.weight, ln_before[perm])
    assert (model.lm_head.weight is model.transformer.wte.weight) == (not untied_head)   # the tie kept
    torch.testing.assert_close(logits_of(model, idx), before, atol=1e-5, rtol=0)


def test_a_wrong_residual_permutation_changes_the_logits():
    """The logits tests can fail: reordering the stream in all but one place breaks the model."""
    model = tiny_gpt(seed=2)
    idx = tokens(3)
    before = logits_of(model, idx)
    perm = shuffled(D, 4)
    ln = model.transformer.h[1].ln_2
    permute_residual_(model, perm)
    with torch.no_grad():
        ln.weight.copy_(ln.weight[torch.argsort(perm)])                    # undo it for one LayerNorm
    assert (logits_of(model, idx) - before).abs().max() > 1e-3


@pytest.mark.parametrize("kron_permute,untied_head", [("hidden", False), ("hidden+residual", False),
                                                      ("hidden+residual", True)])
def test_permuted_copy_keeps_logits_and_lowers_the_error(kron_permute, untied_head):
    """Random weights for "hidden"; for "hidden+residual" planted structure behind a scrambled
    residual stream, so that the residual order must move too."""
    if kron_permute == "hidden":
        model = tiny_gpt(seed=3, untied_head=untied_head)
    else:
        model = planted_gpt((2, 2), 1, hidden=True, residual=True, seed=3, untied_head=untied_head)
    config = dict(mlp="kron", kron_b_shape=(2, 2), kron_permute=kron_permute)
    idx = tokens(4)
    before = logits_of(model, idx)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new = permuted_for(model, config)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())       # the original untouched
    assert not torch.equal(new.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    assert torch.equal(new.transformer.wte.weight, model.transformer.wte.weight) == (kron_permute == "hidden")
    assert (new.lm_head.weight is new.transformer.wte.weight) == (not untied_head)
    torch.testing.assert_close(logits_of(new, idx), before, atol=1e-5, rtol=0)
    assert summed_error(new, config) < summed_error(model, config) - 1e-3


def test_search_permutations_returns_orders_that_reproduce_the_permuted_copy():
    model = planted_gpt((2, 2), 1, hidden=True, residual=True, seed=4)
    config = dict(mlp="kron", kron_b_shape=(2, 2), kron_permute="hidden+residual")
    found = search_permutations(model, searched(model, config), residual=True)
    assert len(found.hidden) == 2
    assert sorted(found.residual.tolist()) == list(range(D))
    assert not torch.equal(found.residual, torch.arange(D))
    by_hand = planted_gpt((2, 2), 1, hidden=True, residual=True, seed=4)
    for layer, perm in enumerate(found.hidden):
        assert sorted(perm.tolist()) == list(range(H))
        permute_hidden_(by_hand, layer, perm)
    permute_residual_(by_hand, found.residual)
    copy = permuted_for(model, config)
    assert all(torch.equal(v, copy.state_dict()[k]) for k, v in by_hand.state_dict().items())


def test_bad_permutations_are_rejected():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="each of 0..127 once"):
        permute_hidden_(model, 0, torch.zeros(H, dtype=torch.long))
    with pytest.raises(ValueError, match="each of 0..31 once"):
        permute_residual_(model, torch.arange(31))
    with pytest.raises(ValueError, match="layers 0..1"):
        permute_hidden_(model, 2, torch.arange(H))
    compressed, _ = compress(model, mlp="kron", kron_b_shape=(2, 2))
    with pytest.raises(ValueError, match="dense GPT, before compressing"):
        permute_residual_(compressed, torch.arange(D))


# -----------------------------------------------------------------------------
# the search (permute.py)

def test_assignment_cost_is_the_squared_distance_up_to_constants():
    """cost[u, p] + ||X[u]||^2 + ||X_hat[p]||^2 = sum_matrices ||X[u] - X_hat[p]||^2, checked by loops."""
    W_fc, W_proj = gaussian_mlp()
    g = torch.Generator().manual_seed(1)
    fc_hat, proj_hat = torch.randn(H, D, generator=g), torch.randn(D, H, generator=g)
    cost = _assignment_cost(hidden_terms(W_fc, W_proj, (64, 16)), [fc_hat, proj_hat])
    for u, p in [(0, 0), (3, 7), (127, 5), (64, 127)]:
        exact = (W_fc[u] - fc_hat[p]).square().sum() + (W_proj[:, u] - proj_hat[:, p]).square().sum()
        norms = W_fc[u].square().sum() + W_proj[:, u].square().sum() + fc_hat[p].square().sum() \
            + proj_hat[:, p].square().sum()
        assert cost[u, p].item() + norms.item() == pytest.approx(exact.item(), rel=1e-5)


@pytest.mark.parametrize("objective", ["vl", "vl-norm"])
@pytest.mark.parametrize("a_shape,k", [((64, 16), 1), ((64, 16), 2), ((32, 8), 4), ((16, 4), 1)])
def test_hidden_search_never_worse_than_identity_on_random_weights(a_shape, k, objective):
    W_fc, W_proj = gaussian_mlp(seed=k)
    found = permutation_search(hidden_terms(W_fc, W_proj, a_shape, k, objective))
    assert sorted(found.perm.tolist()) == list(range(H))
    assert found.errors_before == pytest.approx([relative_error(W_fc, a_shape, k, objective),
                                                 relative_error(W_proj, a_shape[::-1], k, objective)], abs=1e-6)
    assert found.total_after <= found.total_before + 1e-6
    # the reported errors are those of the reordered weights
    after = [relative_error(W_fc[found.perm], a_shape, k, objective),
             relative_error(W_proj[:, found.perm], a_shape[::-1], k, objective)]
    assert after == pytest.approx(found.errors_after, abs=1e-5)


def test_each_term_is_measured_with_its_own_objective():
    """vl and vl-norm give different errors for the same matrix; a search over mixed terms
    reports each with its own."""
    W_fc, W_proj = gaussian_mlp(seed=5)
    fc, proj = hidden_terms(W_fc, W_proj, (64, 16))
    found = permutation_search([replace(fc, objective="vl"), proj])
    assert relative_error(W_fc, (64, 16), 1, "vl") != pytest.approx(relative_error(W_fc, (64, 16), 1, "vl-norm"),
                                                                    abs=1e-3)
    assert found.errors_before == pytest.approx([relative_error(W_fc, (64, 16), 1, "vl"),
                                                 relative_error(W_proj, (16, 64), 1, "vl-norm")], abs=1e-6)
    assert found.total_after <= found.total_before + 1e-6


# A (m1, n1) for c_fc (128, 32) -> B; where each unit's slice shows its group's k-dim spaces
PLANTED_HIDDEN = [((64, 32), 1),      # B (2, 1): pairs of proportional rows
                  ((64, 16), 1),      # B (2, 2)
                  ((64, 16), 2),
                  ((32, 8), 1),       # B (4, 4)
                  ((16, 4), 2)]       # B (8, 8)


@pytest.mark.parametrize("a_shape,k", PLANTED_HIDDEN)
@pytest.mark.parametrize("objective", ["vl", "vl-norm"])
def test_hidden_search_recovers_planted_structure(a_shape, k, objective):
    fc, proj = planted_mlp(a_shape, k)
    P = shuffled(H, 5)
    found = permutation_search(hidden_terms(fc[P], proj[:, P], a_shape, k, objective))
    assert min(found.errors_before) > 10 * NOISE                # the shuffle hides the structure...
    assert max(found.errors_after) < 1.5 * NOISE                # ...and the search finds it back


def test_hidden_search_with_four_factors_recovers_planted_structure():
    fc, proj = planted_mlp((64, 16), 4, seed=1, d=64)          # c_fc (256, 64), B (4, 4), k = 4
    P = shuffled(4 * 64, 6)
    found = permutation_search(hidden_terms(fc[P], proj[:, P], (64, 16), 4))
    assert min(found.errors_before) > 10 * NOISE
    assert max(found.errors_after) < 1.5 * NOISE


def test_plain_alternation_is_the_search_without_the_structured_start():
    """structured=False runs the alternation from the identity only: never worse than the
    identity, and here stuck far above the noise that the structured start reaches."""
    fc, proj = planted_mlp((64, 16), 1)
    P = shuffled(H, 7)
    terms = hidden_terms(fc[P], proj[:, P], (64, 16), 1)
    plain = permutation_search(terms, structured=False)
    full = permutation_search(terms)
    assert plain.start == "identity" and full.start == "structured"
    assert plain.total_after <= plain.total_before
    assert full.total_after < 0.1 * plain.total_after


def test_hidden_search_returns_identity_when_the_order_cannot_matter():
    """B (1, 2) on c_fc: m2 = 1, a hidden permutation only permutes the rows of A."""
    fc, proj = planted_mlp((128, 16), 1)
    P = shuffled(H, 8)
    found = permutation_search(hidden_terms(fc[P], proj[:, P], (128, 16), 1))
    assert torch.equal(found.perm, torch.arange(H))
    assert found.iterations == 0 and found.errors_after == found.errors_before
    assert max(found.errors_before) < 1.5 * NOISE               # the shuffle did not hurt


@pytest.mark.parametrize("a_shape,k", [((64, 16), 1), ((32, 8), 2), ((128, 16), 1)])
def test_residual_search_recovers_planted_structure(a_shape, k):
    """Three layers, each A (x) B + noise, behind one shared residual permutation."""
    Q = shuffled(D, 9)
    layers = [planted_mlp(a_shape, k, seed=s) for s in range(3)]
    found = permutation_search(residual_terms([(fc[:, Q], proj[Q]) for fc, proj in layers], a_shape, k))
    assert len(found.errors_after) == 6
    assert min(found.errors_before) > 10 * NOISE
    assert max(found.errors_after) < 1.5 * NOISE


def test_residual_search_returns_identity_when_the_order_cannot_matter():
    """B (2, 1) on c_fc: n2 = 1, a residual permutation only permutes the columns of A."""
    found = permutation_search(residual_terms([gaussian_mlp()], (64, 32), 1))
    assert torch.equal(found.perm, torch.arange(D)) and found.iterations == 0


def test_residual_search_never_worse_than_identity_on_random_weights():
    mlps = [gaussian_mlp(seed=s) for s in range(3)]
    found = permutation_search(residual_terms(mlps, (32, 8), 2, "vl"))
    assert found.total_after <= found.total_before + 1e-6
    after = [e for fc, proj in mlps for e in (relative_error(fc[:, found.perm], (32, 8), 2, "vl"),
                                              relative_error(proj[found.perm], (8, 32), 2, "vl"))]
    assert after == pytest.approx(found.errors_after, abs=1e-5)


def test_bad_search_arguments_are_rejected():
    W_fc, W_proj = gaussian_mlp()
    fc, proj = hidden_terms(W_fc, W_proj, (64, 16))
    with pytest.raises(ValueError, match="unknown permutation objective 'svd'"):
        permutation_search([replace(fc, objective="svd")])
    with pytest.raises(ValueError, match=r"does not tile"):
        hidden_terms(W_fc, W_proj, (48, 16))
    with pytest.raises(ValueError, match=r"A \(48, 16\) \(x\) B \(2, 2\) is \(96, 32\), but W is \(128, 32\)"):
        permutation_search([replace(fc, a_shape=(48, 16))])
    with pytest.raises(ValueError, match="rank bound"):
        permutation_search([replace(fc, k=5)])                          # B (2, 2): at most 4 factors
    with pytest.raises(ValueError, match="axis=2"):
        permutation_search([replace(fc, axis=2)])
    with pytest.raises(ValueError, match="same block positions"):       # c_proj read along the wrong axis
        permutation_search([fc, replace(proj, axis=0)])
    with pytest.raises(ValueError, match="at least one"):
        permutation_search([])


# -----------------------------------------------------------------------------
# the search over a whole GPT

@pytest.mark.parametrize("scramble", ["hidden", "residual"])
def test_model_search_recovers_planted_orders(scramble):
    """A GPT whose MLPs are Kronecker products behind random hidden orders (one per layer) or
    one residual order: the joint search brings every MLP down to the noise."""
    model = planted_gpt((4, 4), 1, hidden=scramble == "hidden", residual=scramble == "residual", seed=4)
    config = dict(mlp="kron", kron_b_shape=(4, 4), kron_permute="hidden+residual")
    terms = permutation_terms(model, searched(model, config), None)
    assert len(terms) == 4 and min(relative_error(t.W, t.a_shape) for t in terms) > 10 * NOISE
    new = permuted_for(model, config)
    assert max(relative_error(t.W, t.a_shape) for t in permutation_terms(new, searched(new, config), None)) < 1.5 * NOISE


def test_hidden_only_model_search_leaves_the_residual_alone():
    model = tiny_gpt(seed=5)
    config = dict(mlp="kron", kron_b_shape=(1, 2), kron_permute="hidden")  # hidden order free
    found = search_permutations(model, searched(model, config), residual=False)
    assert torch.equal(found.residual, torch.arange(D))
    assert all(torch.equal(p, torch.arange(H)) for p in found.hidden)
    hidden = search_permutations(model, searched(model, {**config, "kron_b_shape": (2, 2)}), residual=False)
    assert torch.equal(hidden.residual, torch.arange(D))
    assert not any(torch.equal(p, torch.arange(H)) for p in hidden.hidden)


# -----------------------------------------------------------------------------
# compress(..., kron_permute=...)

COMPRESSIONS = [  # (kron_permute, changes, what planted_gpt scrambles)
    ("hidden", dict(kron_b_shape=(4, 4), kron_init="vl"), dict(hidden=True)),
    ("hidden", dict(kron_b_shape=(4, 4), kron_init="vl-norm", kron_factors=2), dict(hidden=True)),
    ("hidden", dict(kron_b_shape=(8, 8), kron_factors=2, kron_sparse=0.05), dict(hidden=True)),
    ("hidden+residual", dict(kron_b_shape=(2, 2), kron_init="vl"), dict(hidden=True, residual=True)),
    ("hidden+residual", dict(kron_b_shape=(2, 2), kron_scalars=True), dict(hidden=True, residual=True)),
    ("hidden+residual", dict(kron_b_shape=(2, 2), kron_sparse=0.1), dict(hidden=True, residual=True)),
    ("hidden+residual", dict(kron_b_shape=(4, 4), kron_init="vl", kron_factors=2), dict(hidden=False, residual=True)),
]


@pytest.mark.parametrize("kron_permute,changes,scramble", COMPRESSIONS)
def test_compress_with_permutation_is_never_worse_and_recovers_planted_structure(kron_permute, changes, scramble):
    k = changes.get("kron_factors", 1)
    for model, planted in [(tiny_gpt(seed=6), False), (planted_gpt(changes["kron_b_shape"], k, **scramble), True)]:
        compressed, report = compress(model, mlp="kron", kron_permute=kron_permute, **changes)
        assert [r.name for r in report] == ["mlp.c_fc", "mlp.c_proj"] * 2
        assert spec_of(compressed).permute == kron_permute
        after, before = sum(r.rel_error for r in report), sum(r.rel_error_unpermuted for r in report)
        assert all(r.rel_error_unpermuted is not None and r.retained_norm_unpermuted is not None for r in report)
        assert after <= before + 1e-6
        # the unpermuted column is what compress without kron_permute reports
        _, plain = compress(model, mlp="kron", **changes)
        assert [r.rel_error for r in plain] == pytest.approx([r.rel_error_unpermuted for r in report], abs=1e-6)
        assert [r.retained_norm for r in plain] == pytest.approx([r.retained_norm_unpermuted for r in report],
                                                                 abs=1e-4)
        if planted:
            assert before > 20 * after                            # much lower: down to the noise
            assert max(r.rel_error for r in report) < 1.5 * NOISE


def test_compressed_permuted_model_is_the_dense_function_on_exact_structure():
    """MLPs that are exactly sums of Kronecker products behind scrambled orders: the compressed
    model matches the dense one only if compress reordered every other tensor (embeddings,
    LayerNorms, attention, biases) with the MLPs."""
    model = planted_gpt((2, 2), 1, hidden=True, residual=True, noise=0.0)
    idx = tokens(7)
    dense = logits_of(model, idx)
    with_perm, report = compress(model, mlp="kron", kron_b_shape=(2, 2), kron_permute="hidden+residual")
    without, _ = compress(model, mlp="kron", kron_b_shape=(2, 2))
    assert max(r.rel_error for r in report) < 1e-4
    torch.testing.assert_close(logits_of(with_perm.eval(), idx), dense, atol=1e-3, rtol=0)
    assert (logits_of(without.eval(), idx) - dense).abs().max() > 0.1


@pytest.mark.parametrize("untied_head", [False, True])
def test_compressed_permuted_model_exports_to_hf(untied_head, tmp_path):
    transformers = pytest.importorskip("transformers")
    import export_hf
    model = tiny_gpt(seed=8, untied_head=untied_head)
    compressed, _ = compress(model, mlp="kron", kron_b_shape=(2, 2), kron_factors=2, kron_sparse=0.05,
                             kron_permute="hidden+residual")
    compressed.eval()
    idx = tokens(9)
    ours = logits_of(compressed, idx)
    out = export_hf.export(compressed, str(tmp_path / "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) == (not untied_head)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours, atol=1e-5, rtol=0)


def test_kron_permute_config_errors():
    base = dict(n_layer=2, n_embd=D, n_head=2, vocab_size=100, block_size=16)
    for bad in (dict(mlp="kron", kron_b_shape=(2, 1), kron_init="prune"),
                dict(mlp="kron", kron_b_shape=(2, 2), kron_init="random"), dict(mlp="dense"),
                dict(mlp="lowrank", lowrank_rank=4)):
        with pytest.raises(ValueError, match="kron_permute='hidden' reorders the MLPs for a Van Loan init: "
                                             "it needs Kronecker MLPs with kron_init 'vl' or 'vl-norm'"):
            resolve(GPTConfig(**base), **bad, kron_permute="hidden")
    with pytest.raises(ValueError, match=r"kron_permute='all'; choose None, 'hidden' or 'hidden\+residual'"):
        resolve(GPTConfig(**base), mlp="kron", kron_b_shape=(2, 2), kron_permute="all")
    with pytest.raises(ValueError, match="kron_permute='hidden\\+residual'.*kron_init 'vl' or 'vl-norm'"):
        compress(tiny_gpt(), mlp="kron", kron_b_shape=(2, 1), kron_init="prune", kron_permute="hidden+residual")
    for good in ("vl", "vl-norm"):
        assert resolve(GPTConfig(**base), mlp="kron", kron_b_shape=(2, 2), kron_init=good,
                       kron_permute="hidden").permute == "hidden"


# -----------------------------------------------------------------------------
# train.py

def test_train_prints_the_report_with_and_without_permutation(data_dir, hf_dir, tmp_path, capsys):
    res = run(data_dir, tmp_path / "out", init_from=hf_dir, mlp="kron", kron_b_shape=(2, 2),
              kron_permute="hidden", max_iters=2, eval_interval=2)
    out = capsys.readouterr().out
    assert "error without permutation" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "mlp.c_" in line]
    assert len(rows) == 4 and all(len(r) == 6 for r in rows)
    assert sum(float(r[2]) for r in rows) <= sum(float(r[4]) for r in rows)
    assert res["iter_num"] == 2 and spec_of(res["model"]).permute == "hidden"
    assert load_checkpoint(str(tmp_path / "out" / "ckpt_last.pt"))["compression"]["kron_permute"] == "hidden"
