"""Shared fixtures: tiny GPT-2 checkpoints built with transformers, in both on-disk layouts; tiny
token data and the tiny train.py runs of tests/test_train.py and tests/test_faults.py."""
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
# Tiny models gain nothing from intra-op threads; on a busy 2-core machine they make tests far slower.
torch.set_num_threads(1)
VOCAB = 64       # tiny data uses token ids < 64 (the tiny GPT-2 still has the full 50257 vocabulary)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


def make_tiny_hf(directory, n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257,
                 layout="save_pretrained", seed=0):
    """Save a random GPT2LMHeadModel to `directory` and return it (eval mode, float32).

    layout="save_pretrained": transformers' own files ('transformer.h.N...' keys).
    layout="hub": the hub's gpt2 layout: keys without the 'transformer.' prefix,
    'h.N.attn.bias' causal-mask buffers, no lm_head.weight.
    layout="bin": save_pretrained's keys in a pytorch_model.bin only."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                                  vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    # random LayerNorm and bias values too, so that a wrongly-loaded one shows up
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    os.makedirs(directory, exist_ok=True)
    if layout == "save_pretrained":
        hf.save_pretrained(directory)
    else:
        cfg.save_pretrained(directory)
        sd = {k: v.contiguous().clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        if layout == "hub":
            from safetensors.torch import save_file
            sd = {k[len("transformer."):]: v for k, v in sd.items()}
            for i in range(n_layer):
                sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_positions, n_positions)).view(
                    1, 1, n_positions, n_positions)
            save_file(sd, os.path.join(directory, "model.safetensors"))
        elif layout == "bin":
            torch.save(sd, os.path.join(directory, "pytorch_model.bin"))
        else:
            raise ValueError(layout)
    return hf


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_gpt2"))
    make_tiny_hf(d)
    return d


@pytest.fixture(scope="session")
def tiny_hf(tiny_hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()


@pytest.fixture
def tiktoken_gpt2():
    """The real GPT-2 BPE as the scripts load it (data.gpt2_encoding: TIKTOKEN_CACHE_DIR, else the
    offline cache in ../shared where it exists, else tiktoken's download); skip where none works."""
    import data
    try:
        return data.gpt2_encoding()
    except data.DataError as e:
        pytest.skip(f"the GPT-2 BPE is not available here (no tiktoken cache in ../shared/tiktoken_cache or "
                    f"TIKTOKEN_CACHE_DIR, and no network): {str(e)[:200]}")


@pytest.fixture
def shakespeare():
    """../shared/data/tinyshakespeare.txt, the small real corpus; skip where absent."""
    path = os.path.join(SHARED, "data", "tinyshakespeare.txt")
    if not os.path.isfile(path):
        pytest.skip(f"no {path} (the offline copy of tinyshakespeare)")
    return path


# ----------------------------------------------------------------------------- tiny training runs

def write_tiny_tokens(directory, train: int = 600, val: int = 100, seed: int = 0) -> str:
    """train.bin / val.bin (+ the meta.json TokenData checks) of a learnable sequence: a few
    'sentences' of token ids below VOCAB, repeated in random order."""
    import data
    rng = np.random.default_rng(seed)
    sentences = [rng.integers(0, VOCAB, size=rng.integers(5, 12)) for _ in range(8)]
    splits = {split: np.concatenate([sentences[i] for i in rng.integers(0, len(sentences), size=n)])
              for split, n in (("train", train), ("val", val))}
    data.write_token_files(str(directory), splits, vocab_size=VOCAB)
    return str(directory)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_tiny_tokens(tmp_path_factory.mktemp("tinydata"))


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_hf"))
    make_tiny_hf(d, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    return d


def argv(**kw) -> list[str]:
    return [f"--{k}={v!r}" for k, v in kw.items()]


# a tiny, fast, deterministic base config of train.py
BASE = dict(device="cpu", dtype="float32", batch_size=4, gradient_accumulation_steps=1, block_size=32,
            max_iters=20, eval_interval=10, eval_iters=2, log_interval=1, learning_rate=3e-3, decay_lr=False,
            warmup_iters=0, eval_at_start=False)


def run_argv(data_dir, out_dir, **kw) -> list[str]:
    """The --key=value arguments of run()."""
    return argv(**{"data_dir": data_dir, "out_dir": str(out_dir), **BASE, **kw})


def run(data_dir, out_dir, **kw):
    """train.main with the tiny base config."""
    import train
    return train.main(run_argv(data_dir, out_dir, **kw))


def kron_run(data_dir, hf_dir, out_dir, **kw):
    return run(data_dir, out_dir, **{"init_from": hf_dir, "mlp": "kron", "kron_shape": (64, 16),
                                     "kron_init": "vl-norm", **kw})


def scratch(**kw) -> dict:
    return dict(init_from="scratch", n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, **kw)


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def gpt(**kw):
    """A fresh GPT from GPTConfig fields and compression keys given together, e.g.
    gpt(n_layer=2, n_embd=32, mlp="kron", kron_shape=(64, 16)): compress.build on model.GPTConfig."""
    from dataclasses import fields
    from compress import build
    from model import GPTConfig
    dims = {f.name for f in fields(GPTConfig)}
    return build(GPTConfig(**{k: v for k, v in kw.items() if k in dims}),
                 **{k: v for k, v in kw.items() if k not in dims})


def spec_keys(model) -> dict:
    """The compression keys a model was built or compressed with."""
    from compress import spec_of
    return spec_of(model).keys


@contextlib.contextmanager
def tmpfs(directory, options: str):
    """`directory` (created here) as a tmpfs mounted with `options` (e.g. "size=1m", "ro,size=1m"), unmounted
    afterwards: a real small or read-only disk. Needs root and a mount that works; skips elsewhere."""
    directory.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)
