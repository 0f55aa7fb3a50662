"""Generation: the KV cache changes nothing (vs no cache, vs transformers), past block_size, sample.py."""
import os
import subprocess
import sys

import pytest
import torch

import sample
from conftest import ROOT
from export_hf import export
from checkpoints import load_model
from kronecker import KronLinear, frozen_kron_weights
from model import GPT


@pytest.fixture(scope="module")
def kron_model(tiny_hf_dir):
    return GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(32, 8), kron_factors=2,
                               kron_scalars=True).eval()


def hf_greedy(hf, idx, n):
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    return out


def test_greedy_kv_cache_equals_no_cache_and_transformers(tiny_hf_dir, tiny_hf, kron_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    kron_hf = transformers.GPT2LMHeadModel.from_pretrained(export(kron_model, str(tmp_path / "kron"))).eval()
    dense = load_model(tiny_hf_dir).eval()
    torch.manual_seed(0)
    idx = torch.randint(0, 50257, (2, 5))
    n = 24
    for model, hf in ((dense, tiny_hf), (kron_model, kron_hf)):
        cached = model.generate(idx, n, temperature=0, use_cache=True)
        plain = model.generate(idx, n, temperature=0, use_cache=False)
        assert cached.shape == (2, 5 + n)
        assert torch.equal(cached, plain)
        assert torch.equal(cached, hf_greedy(hf, idx, n))


def test_generation_past_block_size_slides_the_context(tiny_hf_dir):
    model = load_model(tiny_hf_dir).eval()
    block = model.config.block_size
    torch.manual_seed(1)
    idx = torch.randint(0, 50257, (1, 10))
    n = block + 30                                 # slides twice: after block - 10 and block // 2 more tokens
    cached = model.generate(idx, n, temperature=0, use_cache=True)
    assert cached.shape == (1, 10 + n)
    # reference without a cache, the documented window: the cache starts at the prompt; when it
    # is full it restarts from the last block_size // 2 tokens and grows again
    seq, start = idx, 0
    with torch.no_grad():
        for _ in range(n):
            if seq.size(1) - start > block:
                start = seq.size(1) - block // 2
            logits, _ = model(seq[:, start:])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)
    # without the cache the context is always the last block_size tokens: same until the first slide
    plain = model.generate(idx, n, temperature=0, use_cache=False)
    assert plain.shape == cached.shape
    assert torch.equal(plain[:, :block + 1], cached[:, :block + 1])


def test_generation_builds_a_materialised_weight_once(tiny_hf_dir, monkeypatch):
    model = GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(32, 8), kron_factors=2).eval()
    layers = [m for m in model.modules() if isinstance(m, KronLinear)]
    for m in layers:
        m.path = "materialised"                     # the path of Krony-92M (4 factors of (3, 3))
    torch.manual_seed(2)
    idx = torch.randint(0, 50257, (2, 6))
    n = 12
    seq = idx                                       # reference: full forwards, W rebuilt each time
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    calls = []
    build = KronLinear.materialize
    monkeypatch.setattr(KronLinear, "materialize", lambda self: calls.append(self) or build(self))
    out = model.generate(idx, n, temperature=0)
    assert torch.equal(out, seq)
    assert len(calls) == len(layers)                # once per layer, not once per token
    assert all(m.frozen_weight is None for m in layers)
    # a forward that needs gradients inside the block still trains the live factors; blocks nest
    with frozen_kron_weights(model):
        model.generate(idx, 2, temperature=0)
        assert all(m.frozen_weight is not None for m in layers)
        _, loss = model(idx, idx)
        loss.backward()
    assert all(m.frozen_weight is None for m in layers)
    assert all(m.A.grad is not None and m.A.grad.abs().sum() > 0 for m in layers)


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_hf_dir, tiktoken_gpt2):
    model = load_model(tiny_hf_dir).eval()
    gen = lambda seed, **kw: sample.sample(model, tiktoken_gpt2, "Hello", 2, 20, generator=torch.Generator().manual_seed(seed), **kw)[0]
    assert gen(5, temperature=1.0) == gen(5, temperature=1.0)
    assert gen(5, temperature=1.0) != gen(6, temperature=1.0)
    assert gen(5, temperature=0.7, top_k=1) == gen(9, temperature=0)
    texts, n_tokens, seconds = sample.sample(model, tiktoken_gpt2, "", 1, 5, temperature=0)
    assert n_tokens == 5 and seconds > 0 and len(texts) == 1


@pytest.mark.slow
def test_sample_cli(tiny_hf_dir, tmp_path, tiktoken_gpt2):
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--model", tiny_hf_dir, "--prompt", "To be",
           "--max_new_tokens", "12", "--temperature", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("To be") and "tokens/s" in proc.stderr
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "none.pt")] + cmd[4:], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "no such directory or checkpoint" in bad.stderr
