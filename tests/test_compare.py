"""compare_init.py: the loss right after initialisation, one row per method."""
import json
import math

import numpy as np
import pytest
import torch

import compare_init
from conftest import make_tiny_hf
from model import GPT


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    make_tiny_hf(str(d / "hf"), n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=256)
    rng = np.random.default_rng(0)
    # a learnable-ish stream: a repeating pattern with noise, so losses differ between methods
    tokens = (np.tile(np.arange(50), 60) + rng.integers(0, 3, 3000)).astype(np.uint16)
    tokens.tofile(d / "val.bin")
    return d


def run(setup, capsys, *extra):
    compare_init.main(["--model", str(setup / "hf"), "--data", str(setup / "val.bin"), "--block_size", "32",
                       "--batches", "2", "--batch_size", "2", "--device", "cpu", *extra])
    return capsys.readouterr().out


def test_one_row_per_method_and_json(setup, capsys, tmp_path):
    out_json = str(tmp_path / "r.json")
    out = run(setup, capsys, "--kron_shape", "64", "32", "--sparse", "0.05", "--out", out_json)
    records = json.load(open(out_json))
    names = [r["method"] for r in records]
    assert names[:5] == ["dense (reference)", "vl", "vl-norm", "prune", "random"]
    assert [n.split()[0] for n in names[5:]] == ["vl", "lowrank", "shared", "lowrank"]
    table_rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| method")]
    assert [l.split(" | ")[0][2:] for l in table_rows] == names
    by = {r["method"]: r for r in records}
    kron = by["vl"]["params"]
    assert by["prune"]["params"] == kron and by["random"]["params"] == kron
    assert by[names[6]]["params"] <= kron and by[names[7]]["params"] <= kron      # matched to the Kronecker size
    assert by[names[5]]["params"] > kron                                         # + sparse values
    assert by[names[8]]["params"] <= by[names[5]]["params"]
    # the dense row's loss is the model's own loss on the same windows
    dense = GPT.from_pretrained(str(setup / "hf")).eval()
    windows = compare_init.eval_windows(compare_init.load_tokens(str(setup / "val.bin")), 4, 32)
    with torch.no_grad():
        ref = torch.stack([dense(w[None, :-1], w[None, 1:])[1] for w in windows]).mean()
    assert by["dense (reference)"]["loss"] == pytest.approx(ref.item(), rel=1e-5)
    assert all(math.isclose(r["ppl"], math.exp(r["loss"]), rel_tol=1e-9) for r in records)
    assert by["vl + sparse p=0.05"]["rel_error"] < by["vl"]["rel_error"] < by["random"]["rel_error"]


def test_prune_row_says_why_when_the_shape_does_not_allow_it(setup, capsys):
    out = run(setup, capsys, "--kron_shape", "64", "16")
    prune = [l for l in out.splitlines() if l.startswith("| prune")]
    assert len(prune) == 1 and "n/a" in prune[0] and "(2, 2)" in prune[0]


def test_bad_input_is_a_clear_error(setup, capsys):
    with pytest.raises(ValueError, match="does not tile"):
        run(setup, capsys, "--kron_shape", "64", "15")
    with pytest.raises(FileNotFoundError, match="no data file"):
        compare_init.main(["--model", str(setup / "hf"), "--data", str(setup / "missing.bin"), "--kron_shape", "64", "32"])


def test_token_file_is_read_with_the_dtype_its_meta_records(tmp_path):
    import data
    ids = np.array([1, 70000, 50256, 3])
    data.write_token_files(str(tmp_path), {"train": ids, "val": ids}, vocab_size=100000, dtype="uint32")
    assert compare_init.load_tokens(str(tmp_path / "val.bin")).tolist() == ids.tolist()


def test_text_file_is_tokenised_with_gpt2_bpe(setup, capsys, tiktoken_gpt2, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    tokens = compare_init.load_tokens(str(text))
    assert list(tokens[:4]) == tiktoken_gpt2.encode_ordinary("The quick brown fox")
    # this tiny model has 256 tokens: GPT-2 ids beyond it are refused with a clear message
    with pytest.raises(ValueError, match="beyond the model's vocabulary"):
        compare_init.main(["--model", str(setup / "hf"), "--data", str(text), "--kron_shape", "64", "32",
                           "--block_size", "32", "--batches", "1", "--batch_size", "2"])


def test_plot_writes_a_png(setup, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "r.png"
    run(setup, capsys, "--kron_shape", "64", "32", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
