"""export_hf.py: a Krony checkpoint written as a Hugging Face directory (dense GPT-2, or --compact factors
with modeling_krony.py) that transformers, its tokenizer and its pipelines load offline."""
import errno
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import export_hf
from conftest import ROOT
from checkpoints import load_model, save_checkpoint
from conftest import gpt
from model import GPT, GPTConfig, LINEAR_NAMES


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
    os.makedirs(tmp_path / "run")
    ckpt = str(tmp_path / "run" / "ckpt.pt")
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


# ----------------------------------------------------------------------------- helpers

def perturbed(model: GPT) -> GPT:
    """The model with every parameter moved a little: a checkpoint that differs from its init."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def save_run(model: GPT, run_dir) -> str:
    """A run directory holding the model as ckpt_best.pt (what train.py leaves)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(str(run_dir), "ckpt_best.pt")
    save_checkpoint(model, path)
    return path


def snapshot(directory) -> dict:
    """{relative path: sha256} of every file under a directory."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return found


def load_compact(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def gpt2_bpe():
    """The GPT-2 BPE (as tests/conftest.py's tiktoken_gpt2, once per module); skip where it is unavailable."""
    import data
    try:
        return data.gpt2_encoding()
    except data.DataError as e:
        pytest.skip(f"the GPT-2 BPE is not available here: {str(e)[:200]}")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_hf_dir, gpt2_bpe):
    """A tiny Kronecker run (k=2 with scalars) and its dense and compact exports, tokenizer included."""
    root = tmp_path_factory.mktemp("exports")
    model = perturbed(GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(32, 8), kron_factors=2,
                                          kron_scalars=True))
    ckpt = save_run(model, root / "run")
    dense, compact = str(root / "dense"), str(root / "compact")
    export_hf.main(["--model", ckpt, "--out", dense])
    export_hf.main(["--model", ckpt, "--out", compact, "--compact"])
    return {"model": model, "ckpt": ckpt, "run": str(root / "run"), "dense": dense, "compact": compact}


# ----------------------------------------------------------------------------- the tokenizer

EDGE_CASES = ["", " ", "  leading and trailing  ", "tabs\tand\nnewlines\n\n\nand \r\n CRLF", "don't we'll I'd THEY'RE",
              "naïve café, Zürich; Ελληνικά, русский, 日本語, 한국어", "emoji 🤖🚀 and zwj 👩‍💻", "\u00a0nbsp\u2009thin",
              "numbers 1234567890 3.14 1e-5", "<|endoftext|>", "a<|endoftext|>b", "x" * 300,
              "    indented code:\n        return f(x) + 1\n", "\x00\x01 control \x7f bytes"]


def test_tokenizer_files_give_tiktoken_ids(exports, gpt2_bpe, shakespeare):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(exports["dense"])
    with open(shakespeare, encoding="utf-8") as f:
        text = f.read()[:20000]
    texts = [text] + text.split("\n\n")[:50] + EDGE_CASES
    for t in texts:
        ids = gpt2_bpe.encode(t, allowed_special="all")      # <|endoftext|> is the special token, as in HF
        assert tok(t)["input_ids"] == ids, t[:80]
        assert tok.decode(ids) == t
    assert (tok.eos_token_id, tok.bos_token_id, len(tok)) == (50256, 50256, 50257)
    merges = open(os.path.join(exports["dense"], "merges.txt"), encoding="utf-8").read().splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 50000 and merges[1] == "\u0120 t"


def test_byte_symbols_are_gpt2s_printable_mapping():
    symbols = export_hf.byte_symbols()
    assert len(set(symbols)) == 256
    assert symbols[ord("A")] == "A" and symbols[ord(" ")] == "\u0120" and symbols[ord("\n")] == "\u010a"
    assert all(not s.isspace() and s.isprintable() for s in symbols)


def test_generation_config_and_marker(exports):
    for kind in ("dense", "compact"):
        d = exports[kind]
        gen = json.load(open(os.path.join(d, "generation_config.json")))
        assert (gen["eos_token_id"], gen["bos_token_id"]) == (50256, 50256)
        marker = json.load(open(os.path.join(d, export_hf.MARKER)))
        assert marker["format"] == kind and sorted(marker["files"]) == sorted(set(os.listdir(d)) - {export_hf.MARKER})


@pytest.mark.parametrize("kind", ["dense", "compact"])
def test_pipeline_generates_offline(exports, kind, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra = {"trust_remote_code": True} if kind == "compact" else {}
    generate = transformers.pipeline("text-generation", model=exports[kind], device="cpu", **extra)
    out = generate("To be, or not to be", max_new_tokens=6, min_new_tokens=6, do_sample=False,
                   return_full_text=False)[0]["generated_text"]
    assert len(generate.tokenizer(out)["input_ids"]) >= 3       # new tokens (a re-tokenisation may merge some)
    # greedy decoding of the export is ours
    prompt = torch.tensor([generate.tokenizer("To be, or not to be")["input_ids"]])
    hf = generate.model.eval()
    ours = exports["model"].generate(prompt, 6, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(theirs, ours)


# ----------------------------------------------------------------------------- --compact

@pytest.mark.parametrize("overrides", [
    dict(mlp="kron", kron_shape=(32, 8)),                                            # k = 1
    dict(mlp="kron", kron_shape=(32, 8), kron_factors=2, kron_scalars=True),          # k = 2, scalars
    dict(mlp="kron", kron_b_shape=(2, 2), kron_factors=2, kron_sparse=0.05),           # + sparse residual
    dict(mlp="lowrank", lowrank_rank=4),
    dict(mlp="kron", kron_b_shape=(2, 2), untied_head=True),
    dict(mlp="dense", compress_targets=[                                               # attention compressed too
        {"pattern": "attn.*", "layers": "odd", "method": "kron", "kron_shape": [16, 8]},
        {"pattern": "attn.c_attn", "layers": "even", "method": "lowrank", "lowrank_rank": 3},
        {"pattern": "mlp.*", "method": "shared", "lowrank_rank": 4}]),
])
def test_compact_logits_equal_the_checkpoints(tiny_hf_dir, tmp_path, overrides):
    model = perturbed(GPT.from_pretrained(tiny_hf_dir, **overrides))
    ckpt = save_run(model, tmp_path / "run")
    out = export_hf.export(load_model(ckpt), str(tmp_path / "hf"), compact=True, model_spec=ckpt, tokenizer=False)
    hf = load_compact(out)
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "krony_gpt2" and cfg["tie_word_embeddings"] == (not model.config.untied_head)
    if not model.config.untied_head:
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    sd = load_file(os.path.join(out, "model.safetensors"))
    for i, block in enumerate(model.transformer.h):       # a compressed linear is stored as factors only
        for name in LINEAR_NAMES:
            dense = isinstance(block.get_submodule(name), torch.nn.Linear)
            assert (f"transformer.h.{i}.{name}.weight" in sd) == dense
    if overrides.get("compress_targets"):                  # a shared basis is stored once per group:
        assert sum(k.startswith("krony_bases.") for k in sd) == 2      # c_fc's and c_proj's of layers 0-1


def test_compact_file_size_follows_the_compressed_parameters(tmp_path):
    """The compact file holds the compressed parameter count in float32 (plus a small header);
    the dense export the materialised GPT-2."""
    model = perturbed(gpt(n_layer=2, n_head=2, n_embd=128, block_size=32, vocab_size=64, mlp="kron", kron_shape=(64, 32)))
    ckpt = save_run(model, tmp_path / "run")
    export_hf.main(["--model", ckpt, "--out", str(tmp_path / "compact"), "--compact"])
    export_hf.main(["--model", ckpt, "--out", str(tmp_path / "dense")])
    compact = os.path.getsize(tmp_path / "compact" / "model.safetensors")
    dense = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    n = model.num_params()
    assert abs(compact / (4 * n) - 1) < 0.03
    dense_params = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=32, vocab_size=64)).num_params()
    assert abs(dense / (4 * dense_params) - 1) < 0.03 and dense > 2 * compact
    assert not os.path.exists(tmp_path / "compact" / "vocab.json")     # a toy vocabulary gets no GPT-2 tokenizer
    torch.testing.assert_close(load_compact(str(tmp_path / "compact"))(torch.arange(20)[None] % 64).logits,
                               model(torch.arange(20)[None] % 64)[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- where an export may write

def test_export_never_writes_into_the_source_run(exports, tmp_path):
    run, ckpt = exports["run"], exports["ckpt"]
    before = snapshot(run)
    cases = [(["--model", run, "--out", run, "--overwrite"], "is the directory of the model"),
             (["--model", ckpt, "--out", os.path.dirname(run), "--overwrite"], "contains the directory of the model"),
             (["--model", ckpt, "--out", os.path.join(run, "hf")], "lies inside the directory of the model"),
             (["--model", exports["dense"], "--out", exports["dense"], "--overwrite"], "is the directory of the model")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            export_hf.main(args)
    assert snapshot(run) == before and sorted(os.listdir(run)) == ["ckpt_best.pt"]


def test_export_never_replaces_what_it_did_not_write(exports, tmp_path):
    ckpt = exports["ckpt"]
    other_run = tmp_path / "other"                      # someone else's run, not the exported one
    save_run(exports["model"], other_run)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "meta.json").write_text("{}")
    (data_dir / "train.bin").write_bytes(b"\0" * 8)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    before = {d: snapshot(d) for d in (other_run, data_dir, notes)}
    cases = [(other_run, "holds a checkpoint, run or data set"), (data_dir, "holds a checkpoint, run or data set"),
             (other_run / "hf", "lies in a directory holding a checkpoint"),
             (data_dir / "hf", "lies in a directory holding a checkpoint"),
             (notes, "is not an earlier export"), (tmp_path, "is not an earlier export")]
    for out, message in cases:
        with pytest.raises(ValueError, match=message):
            export_hf.main(["--model", ckpt, "--out", str(out), "--overwrite"])
    assert {d: snapshot(d) for d in before} == before


def test_overwrite_replaces_a_previous_export(exports, tmp_path):
    ckpt, out = exports["ckpt"], tmp_path / "hf"
    export_hf.main(["--model", ckpt, "--out", str(out), "--compact"])
    with pytest.raises(ValueError, match="an earlier export.*add --overwrite"):
        export_hf.main(["--model", ckpt, "--out", str(out)])
    export_hf.main(["--model", ckpt, "--out", str(out), "--overwrite"])          # compact -> dense
    assert sorted(os.listdir(out)) == sorted(os.listdir(exports["dense"]))     # no file of the compact one left
    assert snapshot(out)["model.safetensors"] == snapshot(exports["dense"])["model.safetensors"]
    (out / "README.md").write_text("my notes")                                 # a file the export did not write
    with pytest.raises(ValueError, match="files it did not write \\(README.md\\)"):
        export_hf.main(["--model", ckpt, "--out", str(out), "--overwrite"])
    assert (out / "README.md").read_text() == "my notes"


def test_full_disk_is_one_line_and_exit_1(exports, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    export_hf.main(["--model", exports["ckpt"], "--out", str(out)])
    before = snapshot(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SystemExit) as e:
        export_hf.cli(["--model", exports["ckpt"], "--out", str(out), "--overwrite"])
    monkeypatch.undo()
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: no space left on the device")
    assert "\n" not in e.value.code                    # sys.exit(message): one line on stderr, exit code 1
    assert snapshot(out) == before and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


@pytest.mark.slow
def test_refusals_are_one_line_with_exit_2(exports):
    """As a script: a refused --out is one line on stderr, exit code 2, nothing written."""
    run = exports["run"]
    before = snapshot(run)
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "export_hf.py"), "--model", run, "--out", out,
                               "--overwrite"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out in (run, os.path.dirname(run))]
    for proc, message in zip(procs, ("is the directory of the model", "contains the directory of the model")):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr
        assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- --help

def test_every_option_has_help_and_the_examples_parse(capsys):
    with pytest.raises(SystemExit):
        export_hf.main(["--help"])
    text = capsys.readouterr().out
    options = re.findall(r"^  (--[a-z_]+)(?: [A-Z_]+)?\s*(.*)$", text, flags=re.M)
    assert {o for o, _ in options} >= {"--model", "--out", "--compact", "--overwrite"}
    assert all(help_text.strip() for _, help_text in options), options
    # every `python export_hf.py ...` example (help and module docstring) uses real options
    examples = [shlex.split(line.split("python export_hf.py", 1)[1])
                for line in (text + export_hf.__doc__).splitlines() if "python export_hf.py" in line]
    assert len(examples) >= 3
    for args in examples:
        parsed = export_hf.parser().parse_args(args)
        assert parsed.model and parsed.out
