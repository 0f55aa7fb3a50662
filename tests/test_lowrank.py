"""Low-rank and shared-basis layers, and their sizes next to Kronecker ones (sizes.py, `python lowrank.py`)."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from lowrank import LowRankLinear, SharedBasisLinear, init_shared_group, tie_bases
from checkpoints import from_checkpoint, save_checkpoint
from compress import compress
from conftest import gpt
from model import GPT
from runtime import run_cli
from planning import match_mlp_ranks, plan_rank
from sizes import main


def linear(W, bias=True):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def test_lowrank_full_rank_reproduces_and_truncation_is_eckart_young():
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    full = LowRankLinear.from_linear(linear(W), rank=16)
    assert torch.allclose(full.materialize(), W, atol=1e-5)
    S = torch.linalg.svdvals(W.double())
    for r in (1, 5, 11):
        layer = LowRankLinear.from_linear(linear(W), rank=r)
        err = (W - layer.materialize()).double().norm()
        assert err.item() == pytest.approx(S[r:].norm().item(), rel=1e-4)   # the discarded singular values
    x = torch.randn(2, 3, 16)
    layer = LowRankLinear.from_linear(linear(W), rank=5)
    assert torch.allclose(layer(x), x @ layer.materialize().t() + layer.bias, atol=1e-5)


@pytest.mark.parametrize("out_f,in_f,members", [(24, 16, 3), (16, 48, 2)])
def test_shared_basis_full_rank_reproduces_every_member(out_f, in_f, members):
    g = torch.Generator().manual_seed(1)
    Ws = [torch.randn(out_f, in_f, generator=g) for _ in range(members)]
    rank = min(members * out_f, in_f)          # the rank of the stack (members * out, in)
    layers = [SharedBasisLinear(in_f, out_f, rank) for _ in Ws]
    tie_bases(layers)
    assert all(m.basis is layers[0].basis for m in layers)
    init_shared_group(layers, Ws)
    for m, W in zip(layers, Ws):
        assert torch.allclose(m.materialize(), W, atol=1e-4)
    # below full rank: the best rank-r approximation of the stack, so no member is exact
    small = [SharedBasisLinear(in_f, out_f, rank // 2) for _ in Ws]
    tie_bases(small)
    init_shared_group(small, Ws)
    stack_err = torch.cat([W - m.materialize() for m, W in zip(small, Ws)]).double().norm()
    S = torch.linalg.svdvals(torch.cat(Ws).double())
    assert stack_err.item() == pytest.approx(S[rank // 2:].norm().item(), rel=1e-4)


def test_full_rank_models_reproduce_gpt2(tiny_hf_dir):
    dense = GPT.from_pretrained(tiny_hf_dir).eval()
    low = GPT.from_pretrained(tiny_hf_dir, mlp="lowrank", lowrank_rank=32).eval()     # n_embd = 32
    shared = GPT.from_pretrained(tiny_hf_dir, mlp="shared", lowrank_rank=64, share_group=2).eval()
    fc = [b.mlp.c_fc for b in shared.transformer.h]
    assert fc[0].basis is fc[1].basis                                   # layers 0 and 1 share one basis
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        ref = dense(idx)[0]
        assert (low(idx)[0] - ref).abs().max() < 1e-3
        assert (shared(idx)[0] - ref).abs().max() < 1e-3


def test_shared_checkpoint_round_trip_keeps_the_tie(tmp_path, tiny_hf_dir):
    model = GPT.from_pretrained(tiny_hf_dir, mlp="shared", lowrank_rank=8, share_group=2).eval()
    path = str(tmp_path / "shared.pt")
    save_checkpoint(model, path)
    back = from_checkpoint(path).eval()
    assert back.transformer.h[0].mlp.c_proj.basis is back.transformer.h[1].mlp.c_proj.basis
    assert back.num_params() == model.num_params()
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], back(idx)[0])


@pytest.mark.parametrize("kron_shape,k,sparse,group", [((16, 8), 1, 0.0, 2), ((32, 4), 2, 0.0, 3),
                                                       ((16, 8), 1, 0.05, 2)])
def test_equal_parameter_rank_agrees_with_built_models(kron_shape, k, sparse, group):
    base = dict(n_layer=4, n_embd=32, n_head=2, block_size=16, vocab_size=64)
    kron = gpt(**base, mlp="kron", kron_shape=kron_shape, kron_factors=k, kron_sparse=sparse)
    m = match_mlp_ranks(kron_shape, k, False, sparse, group, n_embd=32, n_layer=4)
    low = lambda r: gpt(**base, mlp="lowrank", lowrank_rank=r).num_params()
    shared = lambda r: gpt(**base, mlp="shared", lowrank_rank=r, share_group=group).num_params()
    # the largest rank that fits: r fits, r + 1 does not
    assert low(m.lowrank_rank) <= kron.num_params() < low(m.lowrank_rank + 1)
    assert shared(m.shared_rank) <= kron.num_params() < shared(m.shared_rank + 1)
    rows = {r["method"].split()[0]: r for r in plan_rank(kron_shape, k, False, sparse, group, 32, 4, 64, 16)}
    assert rows["kron"]["model_size"] == kron.num_params()
    assert rows["lowrank"]["model_size"] == low(m.lowrank_rank)
    assert rows["shared"]["model_size"] == shared(m.shared_rank)
    assert rows["dense"]["model_size"] == gpt(**base).num_params()
    assert rows["kron"]["model_size_no_wpe"] == kron.num_params(include_wpe=False)


def test_compress_report_for_lowrank(tiny_hf_dir):
    dense = GPT.from_pretrained(tiny_hf_dir)
    _, r4 = compress(dense, mlp="lowrank", lowrank_rank=4)
    _, r16 = compress(dense, mlp="lowrank", lowrank_rank=16)
    assert len(r4) == 2 * dense.config.n_layer
    assert all(a.rel_error > b.rel_error for a, b in zip(r4, r16))


def test_plan_rank_cli(capsys):
    main(["plan-rank", "--kron_shape", "1536", "384"])
    out = capsys.readouterr().out
    m = match_mlp_ranks((1536, 384))
    assert f"lowrank_rank={m.lowrank_rank}" in out and "81,972,576" in out   # Table 1's 81M model
    with pytest.raises(SystemExit):
        run_cli(lambda: main(["plan-rank", "--kron_shape", "1536", "385"]))
    assert "does not tile" in capsys.readouterr().err


@pytest.mark.slow
def test_lowrank_commands_run_from_any_directory(tmp_path):
    """`python lowrank.py plan-rank|count` hand over to sizes.py (which imports lowrank.py)."""
    lowrank_py = f"{ROOT}/lowrank.py"      # run from tmp_path, not the repository: the CLI finds sizes.py itself
    run = lambda *a: subprocess.run([sys.executable, lowrank_py, *a], cwd=tmp_path, capture_output=True, text=True)
    proc = run("plan-rank", "--kron_shape", "1536", "384")
    assert proc.returncode == 0 and "81,972,576" in proc.stdout, proc.stderr
    proc = run("plan-rank", "--kron_shape", "1536", "384", "--group", "0")      # the earlier spellings still work
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "error: --share_group must be a positive integer, got 0\n")
