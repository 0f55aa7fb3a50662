"""eval_ppl.py: both protocols against transformers, token counts, LAMBADA accuracy, data files, errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import eval_ppl
from conftest import ROOT, SHARED
from checkpoints import load_model, save_checkpoint
from model import GPT

CONTEXT = 64
STRIDE = 24


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """~290 GPT-2 tokens of English in WikiText's one-row-per-line form (blank lines included)."""
    path = os.path.join(SHARED, "data", "tinyshakespeare.txt")
    if not os.path.isfile(path):
        pytest.skip("no shared/data/tinyshakespeare.txt")
    with open(path, encoding="utf-8") as f:
        text = f.read(1200)
    out = tmp_path_factory.mktemp("data") / "test.txt"
    out.write_text(text, encoding="utf-8")
    return str(out)


@pytest.fixture(scope="module")
def kron_pair(tmp_path_factory, tiny_hf_dir):
    """A Krony checkpoint (2 Kronecker factors with scalars) and the transformers model with its
    materialised weights, built here without export_hf.py."""
    transformers = pytest.importorskip("transformers")
    model = GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(32, 8), kron_factors=2, kron_scalars=True)
    with torch.no_grad():
        for blk in model.transformer.h:          # move the scalars away from 1 so that they matter
            for lin in (blk.mlp.c_fc, blk.mlp.c_proj):
                lin.scalars.mul_(torch.tensor([1.3, 0.7]))
    path = str(tmp_path_factory.mktemp("kron") / "ckpt.pt")
    save_checkpoint(model, path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    with torch.no_grad():
        for blk, hblk in zip(model.transformer.h, hf.transformer.h):
            hblk.mlp.c_fc.weight.copy_(blk.mlp.c_fc.materialize().t())      # Conv1D (in, out)
            hblk.mlp.c_proj.weight.copy_(blk.mlp.c_proj.materialize().t())
    return path, hf


def hf_reference(hf, tokens, protocol, context, stride):
    """The perplexity loops of the Krony-PT code / the transformers guide, written with GPT2LMHeadModel:
    labels=input_ids (transformers shifts them), -100 masks tokens an earlier window scored."""
    ids = torch.tensor(tokens)[None]
    n = ids.size(1)
    window_means, nll_sum, count, prev_end = [], 0.0, 0, 0
    step = context if protocol == "paper" else stride
    with torch.no_grad():
        for begin in range(0, n, step):
            end = min(begin + context, n)
            x = ids[:, begin:end]
            labels = x.clone()
            labels[:, :-(end - prev_end)] = -100
            valid = (labels[:, 1:] != -100).sum().item()
            if valid:
                loss = hf(x, labels=labels).loss.item()
                window_means.append(loss)
                nll_sum += loss * valid
                count += valid
            prev_end = end
            if end == n:
                break
    mean = sum(window_means) / len(window_means) if protocol == "paper" else nll_sum / count
    return math.exp(mean), count


@pytest.mark.parametrize("protocol", ["paper", "sliding"])
def test_ppl_matches_transformers_hf_dir_and_kron_checkpoint(tiny_hf_dir, tiny_hf, kron_pair, text_file,
                                                             tiktoken_gpt2, protocol):
    rows = eval_ppl.read_data_file(text_file)
    tokens = eval_ppl.tokenize_joined(rows, tiktoken_gpt2)
    assert len(tokens) % CONTEXT > 1      # a partial last window is part of the test
    kron_path, kron_hf = kron_pair
    for spec, hf in ((tiny_hf_dir, tiny_hf), (kron_path, kron_hf)):
        model = eval_ppl.load_model(spec)
        rec = eval_ppl.evaluate(model, spec, text_file, rows, tiktoken_gpt2, protocol, CONTEXT, STRIDE,
                                batch_size=3)
        ref_ppl, ref_count = hf_reference(hf, tokens, protocol, CONTEXT, STRIDE)
        assert abs(rec["ppl"] / ref_ppl - 1) < 1e-4, (spec, rec["ppl"], ref_ppl)
        assert rec["tokens"] == ref_count
        assert rec["protocol"] == protocol and rec["context_length"] == CONTEXT
        assert rec["num_params"] == model.num_params()


@pytest.mark.parametrize("n_tokens", [2, 63, 64, 65, 128, 129, 200, 1000])
def test_scored_token_counts(n_tokens):
    # paper: every window predicts all its tokens but its first; a 1-token tail predicts nothing
    full, rest = divmod(n_tokens, CONTEXT)
    expected_paper = full * (CONTEXT - 1) + max(rest - 1, 0)
    paper = eval_ppl.make_windows(n_tokens, CONTEXT, "paper")
    assert sum(w.n_score for w in paper) == expected_paper
    assert len(paper) == full + (rest > 1)
    # sliding: every token but the first is a target exactly once, with at most CONTEXT-1 of history
    for stride in (1, 7, STRIDE, 32, CONTEXT - 1):
        sliding = eval_ppl.make_windows(n_tokens, CONTEXT, "sliding", stride)
        targets = [t for w in sliding for t in range(w.end - w.n_score, w.end)]
        assert sorted(targets) == list(range(1, n_tokens))
        assert all(w.end - w.begin <= CONTEXT and w.begin + 1 <= w.end - w.n_score for w in sliding)
        if n_tokens > CONTEXT:   # every scored token after the first window sees >= CONTEXT - stride tokens
            assert all(w.end - w.n_score - w.begin >= CONTEXT - stride for w in sliding[1:])
    with pytest.raises(ValueError, match="stride"):
        eval_ppl.make_windows(n_tokens, CONTEXT, "sliding", CONTEXT)


class TrigramStub:
    """A 'model' over a periodic stream a b a c a d ...: after (x, a) comes the successor of x.
    With one token of context it knows nothing (uniform logits); with two it is nearly sure."""

    def __init__(self, vocab=50, block_size=CONTEXT, confidence=8.0):
        self.config = type("C", (), {"block_size": block_size})()
        self.vocab, self.confidence = vocab, confidence

    def __call__(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            for t in range(1, T):
                logits[b, t, successor(idx[b, t - 1].item(), idx[b, t].item())] = self.confidence
        return logits, None


def successor(prev, cur):
    return {(1, 0): 2, (2, 0): 3, (3, 0): 1}.get((prev, cur), 0)


def test_sliding_beats_paper_when_context_helps():
    tokens = [0, 1, 0, 2, 0, 3] * 50          # 300 tokens, longer than the context
    stub = TrigramStub()
    paper = eval_ppl.perplexity(stub, tokens, "paper", CONTEXT)
    sliding = eval_ppl.perplexity(stub, tokens, "sliding", CONTEXT, STRIDE)
    # exact values: a prediction with one token of context costs log(vocab); with more, `sure`
    V, c = stub.vocab, stub.confidence
    uniform, sure = math.log(V), math.log(1 + (V - 1) * math.exp(-c))
    lengths = [min(CONTEXT, 300 - b) for b in range(0, 300, CONTEXT)]
    paper_nll = sum((uniform + (L - 2) * sure) / (L - 1) for L in lengths) / len(lengths)
    sliding_nll = (uniform + 298 * sure) / 299
    assert paper["ppl"] == pytest.approx(math.exp(paper_nll), rel=1e-5)
    assert sliding["ppl"] == pytest.approx(math.exp(sliding_nll), rel=1e-5)
    assert sliding["ppl"] < paper["ppl"]
    assert (paper["tokens"], sliding["tokens"]) == (300 - len(lengths), 299)


class MemoryStub:
    """Greedy predictions we control: the next token of a memorised token sequence, else token 0."""

    def __init__(self, sequences, block_size=256):
        self.config = type("C", (), {"block_size": block_size})()
        self.next = {tuple(s[:i]): s[i] for s in sequences for i in range(1, len(s))}

    def __call__(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, 50257)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.next.get(tuple(idx[b, :t + 1].tolist()), 0)] = 1.0
        return logits, None


def test_lambada_accuracy_on_known_answers(tiktoken_gpt2):
    enc = tiktoken_gpt2
    a = "He looked at the matrix and said it was a sum of products, each one a"
    b = "The cat sat on the mat, and then the dog came in and sat on the"
    c = "Nobody in the village had ever heard of the"
    known = [(a, " Kronecker"), (b, " mat"), (c, " Kronecker")]
    stub = MemoryStub([enc.encode_ordinary(ctx) + enc.encode_ordinary(w) for ctx, w in known])
    # " Kronexx" shares the first two of the three tokens of " Kronecker": only the whole word counts
    assert enc.encode_ordinary(" Kronexx")[:2] == enc.encode_ordinary(" Kronecker")[:2]
    assert len(enc.encode_ordinary(" Kronecker")) == 3
    texts = [a + " Kronecker",        # right, 3 tokens
             b + " mat",              # right, 1 token
             c + " Kronexx",          # first tokens right, last wrong: wrong
             b + " sofa",             # wrong
             "Where is the mat"]      # not memorised: wrong
    res = eval_ppl.lambada_accuracy(stub, texts, enc, batch_size=2)
    assert (res["correct"], res["examples"]) == (2, 5)
    assert res["accuracy"] == pytest.approx(0.4)
    assert eval_ppl.split_last_word("a b  c\n") == ("a b ", " c")


def test_lambada_accuracy_agrees_with_transformers_greedy(tiny_hf_dir, tiny_hf, tiktoken_gpt2):
    """Passages whose last word is (or is not) the tiny model's own greedy continuation."""
    enc = tiktoken_gpt2
    model = eval_ppl.load_model(tiny_hf_dir)
    contexts = ["First Citizen: Before we proceed any further, hear me speak", "All: Speak, speak",
                "You are all resolved rather to die than to famish", "We know it, we know it",
                "Let us kill him, and we'll have corn at our own price", "Is it a verdict"]
    texts, expected = [], 0
    for i, ctx in enumerate(contexts):
        ids = torch.tensor([enc.encode_ordinary(ctx)])
        gen = tiny_hf.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1].item()
        word = enc.decode([gen])
        if not word.startswith(" ") or " " in word[1:] or not word.strip() or enc.encode_ordinary(word) != [gen]:
            word = " citizens"       # not the greedy token (checked below): a wrong example
        if i % 2 == 0 and word != " citizens":
            texts.append(ctx + word)
            expected += 1
        else:
            assert gen != enc.encode_ordinary(" citizens")[0]
            texts.append(ctx + " citizens")
    assert expected >= 1
    res = eval_ppl.lambada_accuracy(model, texts, enc, batch_size=4)
    assert res["correct"] == expected and res["examples"] == len(contexts)


def test_data_file_rows_are_wikitext_rows(tmp_path, tiktoken_gpt2):
    rows = ["", " = Title = \n", "", " Some text , with @-@ tokens . \n", " More . \n", ""]
    path = tmp_path / "wiki.test.txt"
    path.write_text("\n".join(r.rstrip("\n") for r in rows) + "\n", encoding="utf-8")
    assert eval_ppl.read_data_file(str(path)) == rows
    jsonl = tmp_path / "lambada.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a b c", "d e"]), encoding="utf-8")
    assert eval_ppl.read_data_file(str(jsonl)) == ["a b c", "d e"]
    assert eval_ppl.is_lambada(str(jsonl)) and not eval_ppl.is_lambada(str(path))


@pytest.mark.slow
def test_cli_writes_results_json(tiny_hf_dir, text_file, tmp_path, tiktoken_gpt2):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval_ppl.py"), "--model", tiny_hf_dir,
                           "--data_file", text_file, "--protocol", "sliding", "--stride", str(STRIDE),
                           "--block_size", str(CONTEXT), "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out.read_text())
    assert len(records) == 1
    r = records[0]
    assert {"model", "dataset", "protocol", "tokens", "ppl", "context_length", "stride", "num_params"} <= set(r)
    assert (r["protocol"], r["context_length"], r["stride"]) == ("sliding", CONTEXT, STRIDE)
    rows = eval_ppl.read_data_file(text_file)
    assert r["tokens"] == len(eval_ppl.tokenize_joined(rows, tiktoken_gpt2)) - 1
    model = eval_ppl.load_model(tiny_hf_dir)
    again = eval_ppl.perplexity(model, eval_ppl.tokenize_joined(rows, tiktoken_gpt2), "sliding", CONTEXT, STRIDE)
    assert r["ppl"] == pytest.approx(again["ppl"], rel=1e-6)
    assert "| sliding |" in proc.stdout and f"{r['tokens']:,}" in proc.stdout   # the markdown table


def test_bad_inputs_give_clear_errors(tmp_path, tiny_hf_dir, monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset 'wikitext-7'.*--data_file"):
        eval_ppl.main(["--model", tiny_hf_dir, "--datasets", "wikitext-7"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        eval_ppl.read_data_file(str(empty))
    with pytest.raises(FileNotFoundError, match="no such file"):
        eval_ppl.read_data_file(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="no such directory or checkpoint"):
        eval_ppl.load_model(str(tmp_path / "no" / "model.pt"))
    with pytest.raises(ValueError, match="block_size"):
        eval_ppl.perplexity(load_model(tiny_hf_dir), list(range(100)), "paper", context=128)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"passage": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="'text' field"):
        eval_ppl.read_data_file(str(bad))
    # hub failure (offline): retried at refs/convert/parquet, then an error naming --data_file
    import datasets
    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs.get("revision"))
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="--data_file"):
        eval_ppl.load_rows("wikitext-2")
    assert calls == [None, "refs/convert/parquet"]


@pytest.mark.slow
def test_cli_error_messages(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval_ppl.py"), "--model",
                           str(tmp_path / "nope.pt"), "--datasets", "lambada"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: no such directory or checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_materialised_kron_weight_is_built_once_per_evaluation(tiny_hf_dir, monkeypatch):
    from kronecker import KronLinear
    load = lambda: GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(32, 8), kron_factors=2).eval()
    tokens = list(range(1000, 1300))
    factored = eval_ppl.perplexity(load(), tokens, "sliding", CONTEXT, STRIDE, batch_size=2)
    model = load()
    layers = [m for m in model.modules() if isinstance(m, KronLinear)]
    for m in layers:
        m.path = "materialised"                     # the path of Krony-92M (4 factors of (3, 3))
    calls = []
    build = KronLinear.materialize
    monkeypatch.setattr(KronLinear, "materialize", lambda self: calls.append(self) or build(self))
    res = eval_ppl.perplexity(model, tokens, "sliding", CONTEXT, STRIDE, batch_size=2)
    assert res["windows"] > 2 * 2                   # several batches ...
    assert len(calls) == len(layers)                # ... and W built once per layer, not per batch
    assert res["ppl"] == pytest.approx(factored["ppl"], rel=1e-5)
    assert all(m.frozen_weight is None for m in layers)
