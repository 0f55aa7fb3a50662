"""export_hf.py: a Krony checkpoint written as a dense GPT-2 directory that transformers loads."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import export_hf
from checkpoints import load_model, save_checkpoint
from model import GPT, LINEAR_NAMES


@pytest.mark.parametrize("overrides", [dict(kron_shape=(32, 8), kron_factors=2, kron_scalars=True),
                                  dict(kron_shape=(64, 32), kron_factors=1, kron_init="prune"),
                                  dict(kron_shape=(16, 4), kron_sparse=0.05),       # + sparse residual
                                  dict(mlp="lowrank", lowrank_rank=4),
                                  dict(mlp="dense", compress_targets=[                # attention compressed too
                                      {"pattern": "attn.*", "layers": "odd", "method": "kron",
                                       "kron_shape": [16, 8]},
                                      {"pattern": "mlp.*", "method": "shared", "lowrank_rank": 4}]),
                                  None])
def test_export_round_trip(tiny_hf_dir, tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    overrides = {"mlp": "kron", **overrides} if overrides else {}     # None: a dense checkpoint
    model = GPT.from_pretrained(tiny_hf_dir, **overrides)
    compressed = [n for n, m in model.named_modules() if n.endswith(LINEAR_NAMES) and not isinstance(m, torch.nn.Linear)]
    assert bool(compressed) == bool(overrides)
    with torch.no_grad():     # make the checkpoint differ from the dense model it came from
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint(model, ckpt)
    out = str(tmp_path / "hf")
    export_hf.main(["--model", ckpt, "--out", out])

    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["model_type"], cfg["activation_function"], cfg["n_positions"]) == ("gpt2", "gelu_new", 64)
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert all(k.startswith("transformer.") for k in sd) and "lm_head.weight" not in sd
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)       # Conv1D (in, out)
    assert sd["transformer.h.1.mlp.c_proj.weight"].shape == (128, 32)

    model = load_model(ckpt).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ours = GPT.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        ref = model(idx)[0]
        assert (hf(idx).logits - ref).abs().max().item() < 1e-4
        assert (ours(idx)[0] - ref).abs().max().item() < 1e-4
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()     # tied, as GPT-2


def test_export_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such directory or checkpoint"):
        export_hf.main(["--model", str(tmp_path / "missing" / "ckpt.pt"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        export_hf.main(["--model", "x"])        # --out is required
    assert "--out" in capsys.readouterr().err


def test_untied_head_exports_with_its_own_output_matrix(tiny_hf_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_b_shape=(2, 2), untied_head=True)
    assert model.lm_head.weight is not model.transformer.wte.weight
    with torch.no_grad():              # train the two apart, as a run would
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    out = str(tmp_path / "hf")
    export_hf.export(model, out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in sd
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model.eval()(idx)[0], rtol=1e-4, atol=1e-4)
    back = GPT.from_pretrained(out)              # and our loader reads it back untied
    assert back.config.untied_head and torch.equal(back.lm_head.weight, model.lm_head.weight)
