"""
Export a Krony (Kronecker or dense) checkpoint as a standard GPT-2 directory in
Hugging Face layout, so that transformers, lm-evaluation-harness and any GPT-2
tool load it:

    python export_hf.py --model out/krony81/ckpt_best.pt --out hf/krony81
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('hf/krony81')"

The Kronecker MLP weights are materialised (sum_i s_i A_i (x) B_i) into dense
Conv1D matrices: the export trades the compression for compatibility (a
Krony-81M checkpoint becomes a 124M-parameter GPT-2 file with the same outputs).
Writes config.json and model.safetensors (keys 'transformer.*', Conv1D (in, out)
weights; lm_head is tied to wte and not stored, as save_pretrained does).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

from model import LINEAR_NAMES, dense_weight


@torch.no_grad()
def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """GPT-2 weights in Hugging Face naming: 'transformer.' keys, Conv1D (in, out) layout,
    biases everywhere (zeros where the model has none), no lm_head (tied to wte)."""
    t = model.transformer
    sd = {"transformer.wte.weight": t.wte.weight, "transformer.wpe.weight": t.wpe.weight}

    def layer_norm(prefix: str, ln: nn.LayerNorm) -> None:
        sd[prefix + ".weight"] = ln.weight
        sd[prefix + ".bias"] = ln.bias if ln.bias is not None else torch.zeros_like(ln.weight)

    for i, block in enumerate(t.h):
        layer_norm(f"transformer.h.{i}.ln_1", block.ln_1)
        layer_norm(f"transformer.h.{i}.ln_2", block.ln_2)
        for name in LINEAR_NAMES:
            layer = block.get_submodule(name)
            W = dense_weight(layer)                                    # (out, in)
            sd[f"transformer.h.{i}.{name}.weight"] = W.t()            # Conv1D (in, out)
            sd[f"transformer.h.{i}.{name}.bias"] = layer.bias if layer.bias is not None \
                else torch.zeros(W.shape[0], device=W.device)
    layer_norm("transformer.ln_f", t.ln_f)
    # safetensors wants contiguous tensors that share no memory
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


def hf_config(model) -> dict:
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "use_cache": True,
        # provenance: what the dense file was materialised from
        "krony_source_config": c.to_dict(),
    }


def export(model, out_dir: str) -> str:
    """Write config.json and model.safetensors for `model` into out_dir; returns out_dir."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    save_file(hf_state_dict(model.cpu()), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(model), f, indent=2)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Export a Krony checkpoint as a dense GPT-2 in Hugging Face layout "
                                            "(config.json + model.safetensors).")
    p.add_argument("--model", required=True, help="checkpoint file (.pt), run directory, or any model GPT.load takes")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    from model import GPT
    model = GPT.load(args.model).eval()
    export(model, args.out)
    dense = sum(t.numel() for t in hf_state_dict(model).values())
    print(f"wrote {args.out} (config.json, model.safetensors): {model.num_params():,} parameters materialised "
          f"into a dense GPT-2 of {dense:,} stored values")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
