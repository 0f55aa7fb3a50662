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
weights; a tied lm_head is wte and not stored, as save_pretrained does; an untied one, as in
KnGPT-2 and TQCompressedGPT2, is stored as lm_head.weight with tie_word_embeddings false).

The directory is written whole: built beside --out and renamed into place at the end,
so an interrupted export leaves no half directory, and --overwrite leaves no file of
the previous export behind. A non-empty --out is refused without --overwrite.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from checkpoints import load_model, resolve_model
from compress import dense_weight, spec_of
from model import LINEAR_NAMES
from runtime import ArgumentParser, run_cli
from storage import atomic_directory, write_json


@torch.no_grad()
def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """GPT-2 weights in Hugging Face naming: 'transformer.' keys, Conv1D (in, out) layout,
    biases everywhere (zeros where the model has none), lm_head only when it is untied."""
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
    if model.config.untied_head:
        sd["lm_head.weight"] = model.lm_head.weight
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
        "tie_word_embeddings": not c.untied_head,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "use_cache": True,
        # provenance: what the dense file was materialised from
        "krony_source_config": {**c.to_dict(), **spec_of(model).keys},
    }


def check_out(out_dir: str, overwrite: bool = False) -> None:
    """Refuse an --out that is a file, or a directory with files in it unless overwrite."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file; give a directory to write config.json and "
                         "model.safetensors into")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"--out {out_dir} is not empty; add --overwrite to replace the whole directory, or "
                         "choose a new one")


def export(model, out_dir: str, overwrite: bool = False) -> str:
    """Write config.json and model.safetensors for `model` as the directory out_dir, replacing it
    whole (only with overwrite when it holds files); returns out_dir."""
    from safetensors.torch import save_file
    check_out(out_dir, overwrite)
    # a symlinked --out stays a link: the directory it points to is replaced
    with atomic_directory(os.path.realpath(out_dir)) as tmp:
        save_file(hf_state_dict(model.cpu()), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(hf_config(model), os.path.join(tmp, "config.json"))
    return out_dir


def main(argv=None) -> None:
    p = ArgumentParser(description="Export a Krony checkpoint as a dense GPT-2 in Hugging Face layout "
                                            "(config.json + model.safetensors).")
    p.add_argument("--model", required=True, help="checkpoint file (.pt), run directory, or any model checkpoints.load_model takes")
    p.add_argument("--out", required=True, help="output directory (new or empty; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out whole (none of its files survive)")
    args = p.parse_args(argv)
    check_out(args.out, args.overwrite)     # before the (slow) load
    resolve_model(args.model)
    model = load_model(args.model).eval()
    export(model, args.out, args.overwrite)
    dense = sum(t.numel() for t in hf_state_dict(model).values())
    print(f"wrote {args.out} (config.json, model.safetensors): {model.num_params():,} parameters materialised "
          f"into a dense GPT-2 of {dense:,} stored values")


if __name__ == "__main__":
    run_cli(main, interrupted="interrupted: --out is as it was before this run")
