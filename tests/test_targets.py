"""Choosing which linear layers to compress, and how (the compress_targets key)."""
import os

import pytest
import torch
import torch.nn as nn

from checkpoints import from_checkpoint, save_checkpoint
from compress import build, compress, resolve, spec_of
from conftest import ROOT, gpt, make_tiny_hf
from kronecker import KronLinear
from lowrank import LowRankLinear, SharedBasisLinear
from model import GPT, GPTConfig, LINEAR_NAMES
from planning import size_report
from sizes import main as sizes_main


@pytest.fixture(scope="module")
def dense12(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny12"))
    make_tiny_hf(d, n_layer=12, n_embd=32, n_head=2, n_positions=32, vocab_size=256)
    return GPT.from_pretrained(d).eval()


def compressed_names(model):
    return [(i, n) for i, b in enumerate(model.transformer.h) for n in LINEAR_NAMES
            if not isinstance(b.get_submodule(n), nn.Linear)]


def test_odd_layers_only_leaves_even_layers_bit_identical(dense12):
    targets = [{"pattern": "mlp.*", "layers": "odd", "method": "kron", "kron_shape": [16, 8]}]
    model, report = compress(dense12, compress_targets=targets)
    assert compressed_names(model) == [(i, n) for i in range(1, 12, 2) for n in ("mlp.c_fc", "mlp.c_proj")]
    assert len(report) == 12 and {r.layer for r in report} == set(range(1, 12, 2))
    dsd, csd = dense12.state_dict(), model.state_dict()
    for name, t in dsd.items():
        layer = int(name.split(".")[2]) if name.startswith("transformer.h.") else None
        if layer is not None and layer % 2 == 1 and ".mlp.c_" in name and name.endswith("weight"):
            assert name not in csd                          # replaced by Kronecker factors
        else:
            assert torch.equal(t, csd[name]), name          # untouched: bit-identical
    assert isinstance(model.transformer.h[3].mlp.c_proj, KronLinear)
    assert model.transformer.h[3].mlp.c_proj.a_shape == (8, 16)   # c_proj uses A transposed


def test_attn_c_proj_compresses_exactly_the_12_attention_projections(dense12):
    targets = [{"pattern": "attn.c_proj", "layers": "all", "method": "lowrank", "lowrank_rank": 8}]
    model, _ = compress(dense12, compress_targets=targets)
    assert compressed_names(model) == [(i, "attn.c_proj") for i in range(12)]
    assert all(isinstance(b.attn.c_proj, LowRankLinear) for b in model.transformer.h)
    for b_old, b_new in zip(dense12.transformer.h, model.transformer.h):
        for n in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"):
            assert torch.equal(b_old.get_submodule(n).weight, b_new.get_submodule(n).weight)
    d = 32
    assert dense12.num_params() - model.num_params() == 12 * (d * d - 8 * 2 * d)


def test_mixed_targets_first_match_wins_and_round_trip(dense12, tmp_path):
    targets = [
        {"pattern": "mlp.c_fc", "layers": [0, 2], "method": "lowrank", "lowrank_rank": 8},
        {"pattern": "mlp.*", "layers": "even", "method": "shared", "lowrank_rank": 8, "share_group": 3},
        {"pattern": "attn.c_attn", "layers": "odd", "method": "kron", "kron_shape": [24, 8], "kron_sparse": 0.01},
        {"pattern": "mlp.c_proj", "layers": [11], "method": "dense"},
    ]
    model, _ = compress(dense12, compress_targets=targets, mlp="kron", kron_shape=(16, 8))
    h = model.transformer.h
    assert isinstance(h[0].mlp.c_fc, LowRankLinear) and isinstance(h[2].mlp.c_fc, LowRankLinear)
    assert isinstance(h[4].mlp.c_fc, SharedBasisLinear) and isinstance(h[0].mlp.c_proj, SharedBasisLinear)
    # the shared c_fc group: the even layers 'mlp.*' selects that the first target did not take
    assert h[4].mlp.c_fc.basis is h[6].mlp.c_fc.basis is h[8].mlp.c_fc.basis
    assert h[10].mlp.c_fc.basis is not h[8].mlp.c_fc.basis
    assert h[0].mlp.c_proj.basis is h[2].mlp.c_proj.basis is h[4].mlp.c_proj.basis
    assert isinstance(h[1].attn.c_attn, KronLinear) and h[1].attn.c_attn.sparse is not None
    assert isinstance(h[0].attn.c_attn, nn.Linear)
    # layers no target selects: the MLPs follow mlp="kron", except what the dense target keeps
    assert isinstance(h[1].mlp.c_fc, KronLinear) and isinstance(h[11].mlp.c_proj, nn.Linear)
    assert torch.equal(h[11].mlp.c_proj.weight, dense12.transformer.h[11].mlp.c_proj.weight)
    path = str(tmp_path / "mixed.pt")
    save_checkpoint(model, path)
    back = from_checkpoint(path).eval()
    assert spec_of(back).keys["compress_targets"] == spec_of(model).keys["compress_targets"]
    idx = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], back(idx)[0])


def test_targets_from_json_string_and_paper_default():
    js = '[{"pattern": "mlp.c_fc", "layers": "odd", "method": "kron", "kron_shape": [16, 8]}]'
    config = GPTConfig(n_layer=4, n_embd=32, n_head=2, vocab_size=64, block_size=16)
    c = resolve(config, compress_targets=js)
    assert c.targets[0].options.kron_shape == (16, 8) and c.targets[0].options.kron_factors == 1
    assert resolve(config, **c.keys).keys == c.keys and resolve(config, **c.keys).targets == c.targets
    paper = gpt(n_layer=2, n_embd=32, n_head=2, vocab_size=64, block_size=16, mlp="kron", kron_shape=(16, 8))
    assert compressed_names(paper) == [(i, n) for i in range(2) for n in ("mlp.c_fc", "mlp.c_proj")]


@pytest.mark.parametrize("target,match", [
    ({"pattern": "mlp.c_gate", "method": "kron", "kron_shape": [16, 8]}, "selects none"),
    ({"pattern": "mlp.c_fc", "layers": "prime", "method": "kron", "kron_shape": [16, 8]}, "odd"),
    ({"pattern": "mlp.c_fc", "layers": [7], "method": "kron", "kron_shape": [16, 8]}, "0..3"),
    ({"pattern": "mlp.c_fc", "method": "kron"}, "kron_shape"),
    ({"pattern": "mlp.c_fc", "method": "lowrank"}, "lowrank_rank"),
    ({"pattern": "mlp.c_fc", "method": "svd"}, "choose one of"),
    ({"pattern": "mlp.c_fc", "method": "kron", "kron_shape": [16, 8], "rank": 3}, "unknown compress target keys"),
])
def test_bad_targets_are_clear_errors(target, match):
    with pytest.raises(ValueError, match=match):
        resolve(GPTConfig(n_layer=4, n_embd=32, n_head=2), compress_targets=[target])


def test_size_report_counts(capsys):
    targets = [{"pattern": "mlp.*", "layers": "odd", "method": "kron", "kron_shape": [1536, 384]}]
    config = GPTConfig()                                        # GPT-2 small, built on the meta device
    text = size_report(config, resolve(config, compress_targets=targets))
    # 6 odd layers x 2 MLP matrices go from 2,359,296 + 3,072 or 768 to 589,828 + the same biases
    expected = 124_439_808 - 12 * (2_359_296 - 589_828)
    assert f"{expected:,}" in text and f"{expected - 1024 * 768:,}" in text
    assert f"{expected + 50257 * 768:,}" in text                # as an untied model
    assert "KronLinear: 12 layers" in text
    sizes_main(["count", "--compress_targets", '[{"pattern": "attn.c_proj", "method": "lowrank", "lowrank_rank": 64}]'])
    assert f"{124_439_808 - 12 * (768 * 768 - 64 * 2 * 768):,}" in capsys.readouterr().out


def test_kron_b_shape_means_the_same_at_any_width():
    with torch.device("meta"):
        by_a = gpt(mlp="kron", kron_shape=(1536, 384))
        by_b = gpt(mlp="kron", kron_b_shape=(2, 2))
        narrow = gpt(n_layer=2, n_head=4, n_embd=256, mlp="kron", kron_b_shape=(2, 2))
        tall = gpt(n_layer=2, n_head=4, n_embd=256, mlp="kron", kron_b_shape=(2, 1))
    assert by_b.num_params() == by_a.num_params() == 81_972_576
    fc, proj = by_b.transformer.h[0].mlp.c_fc, by_b.transformer.h[0].mlp.c_proj
    assert (fc.a_shape, fc.b_shape, proj.a_shape, proj.b_shape) == ((1536, 384), (2, 2), (384, 1536), (2, 2))
    fc = narrow.transformer.h[1].mlp.c_fc
    assert (fc.a_shape, fc.b_shape) == ((512, 128), (2, 2))
    fc, proj = tall.transformer.h[0].mlp.c_fc, tall.transformer.h[0].mlp.c_proj
    assert (fc.a_shape, fc.b_shape, proj.a_shape, proj.b_shape) == ((512, 256), (2, 1), (256, 512), (1, 2))
    # in a compress target too, and a target's own shape key is not mixed with the config's other one
    config = GPTConfig(n_layer=2, n_embd=32, n_head=2)
    c = resolve(config, mlp="kron", kron_shape=(64, 16),
                compress_targets=[{"pattern": "attn.c_proj", "method": "kron", "kron_b_shape": [4, 4]}])
    assert c.targets[0].options.kron_b_shape == (4, 4) and c.targets[0].options.kron_shape is None
    assert build(config, c).transformer.h[0].attn.c_proj.a_shape == (8, 8)


@pytest.mark.parametrize("kw,match", [
    (dict(kron_shape=(64, 16), kron_b_shape=(2, 2)), "only one of kron_shape"),
    (dict(kron_b_shape=(3, 3)), r"B shape \(3, 3\) does not tile.*Valid m2: 1, 2, 4"),
    (dict(kron_b_shape=(2, 2, 2)), "must be a pair"),
    (dict(kron_shape=(64, 16, 1)), "must be a pair"),
    (dict(kron_b_shape=(0, 2)), "positive integers"),
    (dict(kron_b_shape=(2, 2), kron_init="prune"), r"prune.*\(2, 1\) or \(1, 2\)"),
])
def test_bad_kron_shapes_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        resolve(GPTConfig(n_layer=2, n_embd=32, n_head=2), mlp="kron", **kw)


def test_prune_follows_the_b_shape(dense12):
    """B (1, 2) for c_fc (the published 96M setup) keeps every other residual input of c_fc and every
    other residual output of c_proj; B (2, 1) keeps every other hidden unit. prune_b_second sets B's
    second entry (the original code's 0 here)."""
    model, _ = compress(dense12, mlp="kron", kron_b_shape=(1, 2), kron_init="prune", prune_b_second=0.0)
    for old, new in zip(dense12.transformer.h, model.transformer.h):
        W_fc, W_proj = old.mlp.c_fc.weight, old.mlp.c_proj.weight
        fc, proj = new.mlp.c_fc.materialize(), new.mlp.c_proj.materialize()
        assert torch.equal(fc[:, 0::2], W_fc[:, 0::2]) and not fc[:, 1::2].any()
        assert torch.equal(proj[0::2], W_proj[0::2]) and not proj[1::2].any()
    hidden, _ = compress(dense12, mlp="kron", kron_b_shape=(2, 1), kron_init="prune")
    fc = hidden.transformer.h[0].mlp.c_fc.materialize()
    W = dense12.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(fc[0::2], W[0::2]) and torch.allclose(fc[1::2], 0.1 * W[0::2])


def test_adding_a_method_is_one_registry_entry(dense12):
    """The example of docs/model.md, run as written: a method is its options, check, build and init."""
    import re
    from compress import METHODS
    with open(os.path.join(ROOT, "docs", "model.md"), encoding="utf-8") as f:
        doc = f.read()
    example = re.search(r"```python\n(import torch\nfrom compress import METHODS.*?)```", doc, re.S).group(1)
    try:
        exec(example, {})
        model, report = compress(dense12, mlp="lowrank-rsvd", lowrank_rank=8)
        assert isinstance(model.transformer.h[0].mlp.c_fc, LowRankLinear) and len(report) == 24
        plain, plain_report = compress(dense12, mlp="lowrank", lowrank_rank=8)
        assert [r.rel_error for r in report] == pytest.approx([r.rel_error for r in plain_report], abs=0.05)
        with pytest.raises(ValueError, match="needs lowrank_rank"):
            compress(dense12, mlp="lowrank-rsvd")
    finally:
        METHODS.pop("lowrank-rsvd", None)
