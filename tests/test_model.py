"""model.py: GPT-2 parity with transformers, loading layouts, compression, checkpoints, errors."""
import json
import os

import pytest
import torch

from checkpoints import from_checkpoint, load_model, load_weights, save_checkpoint
from compress import compress, format_report, resolve, spec_of
from conftest import gpt, make_tiny_hf
from kronecker import KronLinear
from planning import gpt_param_count
from model import GPT, GPTConfig


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("layout", ["save_pretrained", "hub", "bin"])
@pytest.mark.parametrize("n_layer", [2, 3])
def test_logits_match_transformers(tmp_path, layout, n_layer):
    hf = make_tiny_hf(str(tmp_path), n_layer=n_layer, layout=layout, seed=n_layer)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (2, 33))
    with torch.no_grad():
        logits, loss = model(idx)
    assert logits.shape == (2, 33, 50257) and loss is None
    assert (logits - hf_logits(hf, idx)).abs().max().item() < 1e-4
    # the output matrix is the token embedding, one tensor
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_loss_matches_transformers_and_ignores_minus_one(tiny_hf_dir, tiny_hf):
    model = GPT.from_pretrained(tiny_hf_dir).eval()
    idx = torch.randint(0, 50257, (2, 16))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -1
    with torch.no_grad():
        _, loss = model(idx, targets)
        ref = tiny_hf(idx, labels=idx).loss  # transformers shifts labels itself
    assert abs(loss.item() - ref.item()) < 1e-5


def test_num_params_counts_the_tied_matrix_once():
    config = GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=64, vocab_size=1000)
    model = GPT(config)
    assert model.num_params() == gpt_param_count(32, 3, 1000, 64)
    assert model.num_params(include_wpe=False) == gpt_param_count(32, 3, 1000, 64, include_wpe=False)
    kron = gpt(n_layer=3, n_head=2, n_embd=32, block_size=64, vocab_size=1000,
                         mlp="kron", kron_shape=(16, 8), kron_factors=2)
    per_matrix = 2 * (16 * 8 + 8 * 4)
    assert kron.num_params() == gpt_param_count(32, 3, 1000, 64, per_matrix)


def test_gpt2_small_sizes_without_download():
    # model sizes of the paper's Table 1, from a real-size (random) model; no weights needed
    with torch.device("meta"):
        dense = gpt()
        k81 = gpt(mlp="kron", kron_shape=(1536, 384))
        k92 = gpt(mlp="kron", kron_shape=(1024, 256), kron_factors=4)
    assert dense.num_params() == 124_439_808
    assert k81.num_params() == 81_972_576
    assert (k92.num_params(), k92.num_params(include_wpe=False)) == (92_983_392, 92_196_960)


def test_full_size_kronecker_factor_is_lossless(tiny_hf_dir):
    dense = GPT.from_pretrained(tiny_hf_dir).eval()
    # A = (4*n_embd, n_embd): B is 1x1, so A (x) B is the matrix itself
    kron, report = compress(dense, kron_shape=(128, 32), kron_init="vl")
    kron.eval()
    assert isinstance(kron.transformer.h[0].mlp.c_fc, KronLinear)
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert (kron(idx)[0] - dense(idx)[0]).abs().max().item() < 1e-4
    assert all(r.rel_error < 1e-5 and abs(r.retained_norm - 100) < 1e-3 for r in report)
    assert len(report) == 2 * dense.config.n_layer


def test_compress_copies_everything_else_and_reports(tiny_hf_dir):
    dense = GPT.from_pretrained(tiny_hf_dir)
    kron = GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(16, 8), kron_factors=2,
                               kron_scalars=True, kron_init="vl-norm")
    assert spec_of(kron).keys["kron_factors"] == 2 and spec_of(kron).keys["kron_scalars"]
    dsd, ksd = dense.state_dict(), kron.state_dict()
    for name, t in dsd.items():
        if ".mlp.c_" in name and name.endswith("weight"):
            assert name not in ksd
        else:
            assert torch.equal(t, ksd[name]), name
    _, report = compress(dense, kron_shape=(16, 8), kron_factors=2, kron_init="vl")
    _, report_norm = compress(dense, kron_shape=(16, 8), kron_factors=2, kron_init="vl-norm")
    for r, rn in zip(report, report_norm):
        assert 0 < r.rel_error < 1 and r.retained_norm < 100
        assert rn.retained_norm == pytest.approx(100, abs=1e-3)
    table = format_report(report)
    assert table.count("c_fc") == 2 and table.count("c_proj") == 2


def test_checkpoint_round_trip(tmp_path, tiny_hf_dir):
    model = GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(16, 8), kron_scalars=True).eval()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(model, path, iter_num=7)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # atomic: no temp left
    loaded = from_checkpoint(path).eval()
    assert loaded.config == model.config and spec_of(loaded).keys == spec_of(model).keys
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert load_model(str(tmp_path / "ckpt.pt")).config == model.config


def test_wrong_checkpoint_is_a_clear_error(tmp_path, tiny_hf_dir):
    model = GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(16, 8))
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(model, path)
    other = gpt(**{**model.config.to_dict(), **spec_of(model).keys, "kron_shape": (32, 8)})
    ckpt = torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match=r"another model configuration: kron_shape: checkpoint \[16, 8\] "
                                         r"vs model \[32, 8\].*checkpoints.from_checkpoint"):
        load_weights(other, ckpt, source=path)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(RuntimeError, match="truncated or corrupt"):
        from_checkpoint(str(corrupt))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        from_checkpoint(str(tmp_path / "missing.pt"))


def test_bad_configs_and_paths(tmp_path):
    with pytest.raises(ValueError, match="needs kron_shape"):
        resolve(GPTConfig(), mlp="kron")
    with pytest.raises(ValueError, match="unknown mlp 'kronecker'"):
        resolve(GPTConfig(), mlp="kronecker")
    with pytest.raises(ValueError, match="unknown kron_init 'svd'"):
        resolve(GPTConfig(), mlp="kron", kron_shape=(16, 8), kron_init="svd")
    with pytest.raises(ValueError, match="Valid m1"):
        gpt(n_layer=1, n_head=2, n_embd=32, vocab_size=100, mlp="kron", kron_shape=(5, 8))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        GPT.from_pretrained(str(tmp_path / "nope" / "gpt2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(str(tmp_path / "empty"))


def test_offline_hub_error_names_the_local_alternative(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="local directory in Hugging Face layout"):
        GPT.from_pretrained("gpt2")


def test_non_gpt2_checkpoint_is_rejected(tmp_path):
    make_tiny_hf(str(tmp_path), layout="hub")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tanh GELU"):
        GPT.from_pretrained(str(tmp_path))


def test_kv_cache_generation_matches_full_recompute(tiny_hf_dir, tiny_hf):
    model = GPT.from_pretrained(tiny_hf_dir).eval()
    idx = torch.randint(0, 50257, (2, 7))
    cached = model.generate(idx, 25, temperature=0)
    plain = model.generate(idx, 25, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    ref = tiny_hf.generate(idx, max_new_tokens=25, do_sample=False, attention_mask=torch.ones_like(idx),
                           pad_token_id=0)
    assert torch.equal(cached, ref)
    # past block_size (64) the context slides instead of failing
    long = model.generate(idx, 80, temperature=1.0, top_k=20, top_p=0.9)
    assert long.shape == (2, 87)


def test_cache_prefill_in_chunks_matches_one_pass(tiny_hf_dir):
    from model import KVCache
    model = GPT.from_pretrained(tiny_hf_dir).eval()
    idx = torch.randint(0, 50257, (1, 30))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 1, "cpu", torch.float32)
        a, _ = model(idx[:, :12], cache=cache)
        b, _ = model(idx[:, 12:], cache=cache)  # several new tokens after a prefix
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-4, atol=1e-4)


def test_macs_per_token_counts_what_each_layer_runs():
    d, L, V, T = 768, 12, 50257, 1024
    with torch.device("meta"):
        dense = gpt()
        k81 = gpt(mlp="kron", kron_shape=(1536, 384))
        low = gpt(mlp="lowrank", lowrank_rank=100)
    attn_and_head = L * (4 * d * d + 2 * d * T) + V * d
    assert dense.macs_per_token(T) == attn_and_head + L * 8 * d * d
    # (1536, 384) (x) (2, 2), B first is cheaper: X B^T (384*2*2), then A V (1536*384*2); c_proj the same
    assert k81.macs_per_token(T) == attn_and_head + L * 2 * (384 * 2 * 2 + 1536 * 384 * 2)
    assert low.macs_per_token(T) == attn_and_head + L * 2 * 100 * (d + 4 * d)


def test_untied_head_is_counted_both_ways(tiny_hf_dir):
    tied = GPT.from_pretrained(tiny_hf_dir)
    untied = GPT.from_pretrained(tiny_hf_dir, untied_head=True)
    V, d = tied.config.vocab_size, tied.config.n_embd
    assert torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)      # a copy to start with
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() == tied.num_params() + V * d
    assert untied.num_params(include_head=False) == tied.num_params() == tied.num_params(include_head=False)
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(untied(idx)[0], tied(idx)[0])
    # GPT-2 small untied with the 81M class: KnGPT-2's "119M*" convention leaves the output matrix out
    with torch.device("meta"):
        k81 = gpt(mlp="kron", kron_shape=(1536, 384), untied_head=True)
    assert k81.num_params(include_head=False) == 81_972_576
    assert k81.num_params() == 81_972_576 + 50257 * 768


def test_scratch_init_gives_factored_layers_the_dense_spread():
    """A Kronecker, low-rank or shared-basis layer from scratch: its product has the std a dense layer
    of that place gets (0.02, and 0.02 / sqrt(2 n_layer) for the residual projections c_proj)."""
    import math
    torch.manual_seed(0)
    L = 3
    for kw in (dict(mlp="kron", kron_b_shape=(2, 2)), dict(mlp="kron", kron_b_shape=(4, 4), kron_factors=4,
                                                           kron_scalars=True),
               dict(mlp="kron", kron_shape=(16, 4), kron_factors=2), dict(mlp="lowrank", lowrank_rank=8)):
        model = gpt(n_layer=L, n_head=2, n_embd=32, vocab_size=100, block_size=16, **kw)
        for block in model.transformer.h:
            fc, proj = block.mlp.c_fc.materialize(), block.mlp.c_proj.materialize()
            assert fc.std().item() == pytest.approx(0.02, rel=0.02), kw
            assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.02), kw


def test_targets_of_any_layout(tiny_hf_dir):
    """model(x[:, :-1], x[:, 1:]): targets that are a strided view, not a contiguous tensor."""
    model = GPT.from_pretrained(tiny_hf_dir).eval()
    x = torch.randint(0, 50257, (3, 17))
    inputs, targets = x[:, :-1], x[:, 1:]
    assert not targets.is_contiguous()
    with torch.no_grad():
        _, loss = model(inputs, targets)
        _, ref = model(inputs.contiguous(), targets.contiguous())
    assert loss.item() == ref.item()
    _, loss_t = model(inputs, targets.t().contiguous().t())      # a transposed layout too
    assert loss_t.item() == ref.item()


def test_checkpoint_of_the_older_layout_still_loads(tmp_path, tiny_hf_dir):
    """Checkpoints written before compression had its own entry kept every key in model_config."""
    model = GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_b_shape=(2, 2), kron_factors=2, kron_scalars=True).eval()
    path = str(tmp_path / "new.pt")
    save_checkpoint(model, path)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["compression"]) >= {"mlp", "kron_b_shape", "compress_targets"}
    assert "mlp" not in ckpt["model_config"]
    old = {**ckpt, "model_config": {**ckpt["model_config"], **ckpt.pop("compression")}}
    torch.save(old, str(tmp_path / "old.pt"))
    loaded = from_checkpoint(str(tmp_path / "old.pt")).eval()
    assert loaded.config == model.config and spec_of(loaded).keys == spec_of(model).keys
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
