"""
Export a Krony checkpoint (Kronecker, low-rank, shared-basis or dense) as a Hugging Face model
directory that transformers, its pipelines and lm-evaluation-harness load offline, tokenizer
included:

    python export_hf.py --model out-krony81m-finetune --out krony81m-hf
    python export_hf.py --model out-krony81m-finetune --out krony81m-hf-compact --compact

The default (dense) export is a standard GPT-2: every compressed weight is materialised
(sum_i s_i A_i (x) B_i + sparse residual, U V, C B) into a dense Conv1D matrix. It trades the
compression for compatibility: any GPT-2 tool reads it, no custom code runs, and a Krony-81M
checkpoint becomes a 124M-parameter file with the same outputs.

--compact keeps the compression: the file stores the factors (its size follows the compressed
parameter count) and the directory holds modeling_krony.py, which transformers runs with
trust_remote_code=True to rebuild GPT-2 with factored linears (see that file).

Both write config.json, model.safetensors, the GPT-2 tokenizer (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json, derived offline from tiktoken's BPE),
generation_config.json, and krony_export.json, the list of the files an export wrote.

The directory is written whole: built beside --out and renamed into place at the end, so an
interrupted export leaves --out as it was. An export never deletes what it did not write:
--overwrite replaces only a previous export whose files are all its own, and an --out that is,
contains or lies inside the source run, a checkpoint's directory or a prepared data set is
refused, --overwrite or not.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import shutil
import sys

import torch
import torch.nn as nn

from kronecker import KronLinear
from lowrank import LowRankLinear, SharedBasisLinear
from checkpoints import load_model, resolve_model
from compress import dense_weight, spec_of
from model import LINEAR_NAMES
from runtime import ArgumentParser, run_cli
from storage import DiskFull, atomic_directory, write_json

EOT = 50256                        # GPT-2's <|endoftext|>, its bos, eos (and our pad) token
EOT_TEXT = "<|endoftext|>"
MARKER = "krony_export.json"       # what every export writes: recognises a previous export
MODELING_FILE = "modeling_krony.py"
MODELING_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), MODELING_FILE)


# -----------------------------------------------------------------------------
# The tokenizer: GPT-2's byte-level BPE files, rebuilt from tiktoken's ranks

def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (vocab.json and merges.txt are text): the printable
    Latin-1 bytes stand for themselves, the others (controls, space, ...) take chr(256 + n) in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def merge_pair(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: BPE on its bytes with every merge ranked
    before it, which stops at exactly two pieces (the merge of rank ranks[token] joins them)."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], limit)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"the BPE token {token!r} is not the merge of two earlier tokens")
    return parts[0], parts[1]


def gpt2_bpe_files(enc) -> tuple[dict[str, int], list[str]]:
    """vocab.json's {token text: id} and merges.txt's lines (rank order) of a tiktoken encoding."""
    ranks: dict[bytes, int] = enc._mergeable_ranks
    sym = byte_symbols()

    def text(b: bytes) -> str:
        return "".join(sym[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab.update(enc._special_tokens)
    merges = [" ".join(text(p) for p in merge_pair(ranks, token))
              for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    return vocab, merges


@functools.lru_cache(maxsize=1)
def gpt2_bpe() -> tuple[dict[str, int], list[str]]:
    """gpt2_bpe_files of data.gpt2_encoding(), computed once per process (a BPE run per token)."""
    import data
    return gpt2_bpe_files(data.gpt2_encoding())


def tokenizer_files(block_size: int) -> dict[str, object]:
    """{file name: JSON object or text} of the GPT-2 tokenizer (DataError when the BPE is unavailable)."""
    vocab, merges = gpt2_bpe()
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
              "add_bos_token": False, **special,
              "added_tokens_decoder": {str(EOT): {"content": EOT_TEXT, "lstrip": False, "rstrip": False,
                                                  "normalized": True, "single_word": False, "special": True}}}
    return {"vocab.json": vocab, "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
            "tokenizer_config.json": config, "special_tokens_map.json": special}


def generation_config() -> dict:
    # pad_token_id: GPT-2 has no pad token; naming EOT spares generate() its warning
    return {"bos_token_id": EOT, "eos_token_id": EOT, "pad_token_id": EOT}


# -----------------------------------------------------------------------------
# Dense export: a standard GPT-2

@torch.no_grad()
def hf_state_dict(model, materialise: bool = True) -> dict[str, torch.Tensor]:
    """GPT-2 weights in Hugging Face naming: 'transformer.' keys, Conv1D (in, out) layout,
    biases everywhere (zeros where the model has none), lm_head only when it is untied.
    materialise=False leaves out the compressed linears (the compact export stores their factors)."""
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
            if not materialise and not isinstance(layer, nn.Linear):
                continue
            W = dense_weight(layer)                                    # (out, in)
            sd[f"transformer.h.{i}.{name}.weight"] = W.t()            # Conv1D (in, out)
            sd[f"transformer.h.{i}.{name}.bias"] = bias_of(layer, W.shape[0])
    layer_norm("transformer.ln_f", t.ln_f)
    if model.config.untied_head:
        sd["lm_head.weight"] = model.lm_head.weight
    return contiguous(sd)


def bias_of(layer: nn.Module, out_features: int) -> torch.Tensor:
    return layer.bias if layer.bias is not None else torch.zeros(out_features)


def contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous float32 tensors that share no memory
    return {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.contiguous().clone()
            for k, v in sd.items()}


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
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "use_cache": True,
        # provenance: what the file was exported from
        "krony_source_config": {**c.to_dict(), **spec_of(model).keys},
    }


# -----------------------------------------------------------------------------
# Compact export: the factors, and modeling_krony.py to run them

@torch.no_grad()
def compact_state_dict(model) -> tuple[dict[str, torch.Tensor], dict, list]:
    """(tensors, krony_layers, krony_bases) of a compact export: dense linears as GPT-2's Conv1D
    weights, each compressed one as its factors (the layout modeling_krony.py reads)."""
    sd, layers, bases, basis_ids = hf_state_dict(model, materialise=False), {}, [], {}
    for i, block in enumerate(model.transformer.h):
        for name in LINEAR_NAMES:
            layer = block.get_submodule(name)
            if isinstance(layer, nn.Linear):
                continue
            prefix = f"transformer.h.{i}.{name}"
            spec, tensors = factored_layer(layer)
            if spec["method"] == "shared":
                key = id(layer.basis)             # a tied basis is one tensor in several layers
                if key not in basis_ids:
                    basis_ids[key] = len(bases)
                    bases.append([layer.rank, layer.in_features])
                    sd[f"krony_bases.{basis_ids[key]}"] = layer.basis
                spec["basis"] = basis_ids[key]
            layers.setdefault(str(i), {})[name] = spec
            sd.update({f"{prefix}.{k}": v for k, v in tensors.items()})
            sd[f"{prefix}.bias"] = bias_of(layer, layer.out_features)
    return contiguous(sd), layers, bases


def factored_layer(layer: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(spec, tensors) of one compressed linear, by its class's fields (the bias is added by the
    caller; a shared basis too, stored once)."""
    if isinstance(layer, KronLinear):
        # the factors keep the standard feature order whatever swap_in / swap_out say (those only
        # reorder activations inside our MLP), so they are written as they are
        spec = {"method": "kron", "a_shape": list(layer.a_shape), "b_shape": list(layer.b_shape),
                "k": layer.k, "scalars": layer.scalars is not None,
                "sparse_nnz": layer.sparse.values.numel() if layer.sparse is not None else 0}
        tensors = {"A": layer.A, "B": layer.B}
        if layer.scalars is not None:
            tensors["scalars"] = layer.scalars
        if layer.sparse is not None:
            if layer.in_features * layer.out_features >= 2 ** 31:     # int32 positions: any GPT-2 matrix fits
                raise ValueError("a sparse residual of more than 2^31 positions does not fit the compact format")
            row, col = layer.sparse.index
            flat = row * layer.in_features + col
            order = flat.argsort()                           # row-major: a coalesced COO tensor
            tensors["sparse_values"] = layer.sparse.values[order]
            tensors["sparse_index"] = flat[order].to(torch.int32)
        return spec, tensors
    if isinstance(layer, LowRankLinear):
        return {"method": "lowrank", "rank": layer.rank}, {"U": layer.U, "V": layer.V}
    if isinstance(layer, SharedBasisLinear):
        return {"method": "shared", "rank": layer.rank}, {"coefficient": layer.coefficient}
    raise ValueError(f"--compact does not know the layer type {type(layer).__name__}; export it dense "
                     "(without --compact)")


def compact_config(model, layers: dict, bases: list) -> dict:
    cfg = hf_config(model)
    cfg.update({"architectures": ["KronyGPT2LMHeadModel"], "model_type": "krony_gpt2",
                "auto_map": {"AutoConfig": "modeling_krony.KronyGPT2Config",
                             "AutoModelForCausalLM": "modeling_krony.KronyGPT2LMHeadModel"},
                "krony_layers": layers, "krony_bases": bases})
    return cfg


# -----------------------------------------------------------------------------
# Where an export may write

def protected_files(directory: str) -> list[str]:
    """What marks `directory` as holding a checkpoint or a run (*.pt, run.json) or a prepared data
    set (meta.json with *.bin files): files an export must never replace."""
    found = sorted(glob.glob(os.path.join(glob.escape(directory), "*.pt")))
    if os.path.isfile(os.path.join(directory, "run.json")):
        found.append(os.path.join(directory, "run.json"))
    if os.path.isfile(os.path.join(directory, "meta.json")) and glob.glob(os.path.join(glob.escape(directory), "*.bin")):
        found.append(os.path.join(directory, "meta.json"))
    return found


def previous_export(out_dir: str) -> dict | None:
    """The marker of an export in out_dir, or None."""
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None
    except (OSError, ValueError):
        return None


def source_dir(model_spec: str | None) -> str | None:
    """The directory the model comes from: a checkpoint's run directory, or a local HF directory."""
    if model_spec is None:
        return None
    source = resolve_model(model_spec)
    if source.kind == "checkpoint":
        return os.path.dirname(os.path.abspath(source.path))
    return os.path.abspath(source.path) if source.kind == "hf_dir" else None


def inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def check_out(out_dir: str, overwrite: bool = False, model_spec: str | None = None) -> None:
    """Refuse an --out the export could not write without deleting what it did not write."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file; give a directory to write the export into")
    out = os.path.realpath(out_dir)
    src = source_dir(model_spec)
    if src is not None:
        src = os.path.realpath(src)
        if out == src or inside(out, src) or inside(src, out):
            where = "is" if out == src else "lies inside" if inside(out, src) else "contains"
            raise ValueError(f"--out {out_dir} {where} the directory of the model it exports ({src}); "
                             "an export never writes there (even with --overwrite): choose a directory of its own")
    # a checkpoint, run or data set in --out, or beside it: the export is built in a temp directory
    # beside --out, where a run's or a data set's clean-up of temp files would meet it
    for d, where in ((out, "holds"), (os.path.dirname(out), "lies in a directory holding")):
        found = protected_files(d)
        if found:
            raise ValueError(f"--out {out_dir} {where} a checkpoint, run or data set ({found[0]}); an export never "
                             "writes there (even with --overwrite): choose a directory of its own")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    marker = previous_export(out)
    if marker is None:
        raise ValueError(f"--out {out_dir} is not empty and is not an earlier export (no {MARKER}); an export "
                         "never replaces files it did not write (even with --overwrite): choose a new directory")
    if not overwrite:
        raise ValueError(f"--out {out_dir} is not empty (an earlier export); add --overwrite to replace it, "
                         "or choose a new directory")
    own = set(marker["files"]) | {MARKER}
    foreign = sorted(os.path.relpath(os.path.join(root, n), out) for root, dirs, files in os.walk(out)
                     for n in files + [d for d in dirs if not os.listdir(os.path.join(root, d))])
    foreign = [f for f in foreign if f not in own]
    if foreign:
        raise ValueError(f"--out {out_dir} is an earlier export with files it did not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); --overwrite would delete them: move them "
                         "away or choose a new directory")


# -----------------------------------------------------------------------------
# Writing

def write_safetensors(sd: dict[str, torch.Tensor], path: str) -> None:
    # serialised in memory and written by Python, so that a full disk is an OSError (ENOSPC),
    # which atomic_directory turns into DiskFull, rather than an error of safetensors' own
    from safetensors.torch import save
    blob = save(sd, metadata={"format": "pt"})
    with open(path, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def export(model, out_dir: str, overwrite: bool = False, compact: bool = False,
           model_spec: str | None = None, tokenizer: bool | None = None) -> str:
    """Write the export of `model` as the directory out_dir (see the module docstring; model_spec:
    where the model came from, which the export never replaces); returns out_dir.
    tokenizer: write GPT-2's tokenizer files (None: when the model has GPT-2's vocabulary, not for
    a toy model of fewer tokens)."""
    check_out(out_dir, overwrite, model_spec)
    model = model.cpu()
    if tokenizer is None:
        tokenizer = model.config.vocab_size >= EOT + 1
    files: dict[str, object] = tokenizer_files(model.config.block_size) if tokenizer else {}
    files["generation_config.json"] = generation_config()
    if compact:
        sd, layers, bases = compact_state_dict(model)
        files["config.json"] = compact_config(model, layers, bases)
    else:
        sd = hf_state_dict(model)
        files["config.json"] = hf_config(model)
    names = sorted([*files, "model.safetensors"] + ([MODELING_FILE] if compact else []))
    files[MARKER] = {"format": "compact" if compact else "dense", "files": names,
                     "source": model_spec, "written_by": "export_hf.py"}
    # a symlinked --out stays a link: the directory it points to is replaced
    with atomic_directory(os.path.realpath(out_dir)) as tmp:
        write_safetensors(sd, os.path.join(tmp, "model.safetensors"))
        if compact:
            shutil.copyfile(MODELING_TEMPLATE, os.path.join(tmp, MODELING_FILE))
        for name, content in files.items():
            if isinstance(content, str):
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(content)
            else:
                write_json(content, os.path.join(tmp, name))
    return out_dir


def parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Export a Krony checkpoint as a Hugging Face model directory (weights, config, GPT-2 "
                    "tokenizer, generation config) that transformers and lm-evaluation-harness load offline.",
        epilog="examples:\n"
               "  python export_hf.py --model out-krony81m-finetune --out krony81m-hf\n"
               "  python export_hf.py --model out-krony81m-finetune --out krony81m-hf-compact --compact\n"
               "  lm_eval --model hf --model_args pretrained=krony81m-hf --tasks lambada_openai\n"
               "  lm_eval --model hf --model_args pretrained=krony81m-hf-compact,trust_remote_code=True "
               "--tasks lambada_openai",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint file (.pt), run directory, or any model checkpoints.load_model takes")
    p.add_argument("--out", required=True,
                   help="output directory: new, empty, or an earlier export (with --overwrite); never the "
                        "model's own directory or one holding a checkpoint or data set")
    p.add_argument("--compact", action="store_true",
                   help="store the factors, not dense weights: a file the size of the compressed model, loaded "
                        "with trust_remote_code=True (default: a plain GPT-2 any tool loads)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out whole (only one whose files are all its own)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    resolve_model(args.model)                            # one clear error for a model that is not there
    check_out(args.out, args.overwrite, args.model)      # before the (slow) load
    model = load_model(args.model).eval()
    export(model, args.out, args.overwrite, compact=args.compact, model_spec=args.model)
    from safetensors import safe_open
    with safe_open(os.path.join(args.out, "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    kind = "factors (--compact; load with trust_remote_code=True)" if args.compact else "a dense GPT-2"
    tokenizer = "with the GPT-2 tokenizer" if os.path.isfile(os.path.join(args.out, "vocab.json")) else \
        f"without a tokenizer (vocab_size={model.config.vocab_size} is not GPT-2's)"
    print(f"wrote {args.out}: {model.num_params():,} parameters as {kind} of {stored:,} stored values, {tokenizer}")


def cli(argv=None) -> None:
    """main() as a script: a full disk is one line and exit code 1 (nothing was wrong with the
    command), any other mistake one line and exit code 2 (run_cli)."""
    def guarded() -> None:
        try:
            main(argv)
        except DiskFull as e:
            sys.exit(f"error: {e}")
    run_cli(guarded, interrupted="interrupted: --out is as it was before this run")


if __name__ == "__main__":
    cli()
