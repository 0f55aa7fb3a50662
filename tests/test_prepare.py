"""corpus.prepare and its CLI prepare_owt.py on local files (offline): counts, round trip through the BPE,
end-of-text, re-runs, hub fallbacks."""
import json
import os

import numpy as np
import pytest

import corpus
import data
import prepare_owt

PARAGRAPHS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "The quick brown fox jumps over the lazy dog. Ünïcödé too: 東京 and emoji \U0001F600.",
    "  indented line\nsecond line of the same paragraph",
    "Last one.",
]


def read_bin(out, split):
    return np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16)


def split_docs(ids, enc):
    """Decode a token array into documents at the end-of-text tokens (which must end it)."""
    assert ids[-1] == data.EOT
    cuts = np.flatnonzero(ids == data.EOT)
    docs, start = [], 0
    for c in cuts:
        docs.append(enc.decode(ids[start:c].tolist()))
        start = c + 1
    return docs


def test_txt_paragraphs_round_trip(tmp_path, tiktoken_gpt2):
    src = tmp_path / "corpus.txt"
    docs = [f"{i}. {p}" for i, p in enumerate(PARAGRAPHS * 4)]      # 20 distinct documents
    src.write_text("\n\n".join(docs[:10]) + "\n \n\n" + "\n\n".join(docs[10:]) + "\n", encoding="utf-8")
    out = str(tmp_path / "out")
    meta = corpus.prepare(str(src), out, val_fraction=0.2, seed=0)
    train, val = read_bin(out, "train"), read_bin(out, "val")
    with open(os.path.join(out, "meta.json")) as f:
        assert json.load(f) == meta
    # counts in meta.json agree with the files
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["documents"] == 20 and meta["train_documents"] + meta["val_documents"] == 20
    assert meta["val_documents"] == 4 and meta["dtype"] == "uint16" and meta["tokenizer"] == "gpt2"
    # one end-of-text after every document
    assert (train == data.EOT).sum() == meta["train_documents"]
    assert (val == data.EOT).sum() == meta["val_documents"]
    # decoding gives back the source documents, in source order within each split
    got_train, got_val = split_docs(train, tiktoken_gpt2), split_docs(val, tiktoken_gpt2)
    assert sorted(got_train + got_val) == sorted(docs)
    assert got_train == [d for d in docs if d in got_train]
    # total tokens: every document encoded on its own, plus its end-of-text
    assert len(train) + len(val) == sum(len(tiktoken_gpt2.encode_ordinary(d)) + 1 for d in docs)
    assert not any(n.endswith(".tmp") for n in os.listdir(out))


def test_jsonl_text_column_and_rerun(tmp_path, tiktoken_gpt2, capsys):
    src = tmp_path / "docs.jsonl"
    rows = [{"id": i, "body": f"document number {i}: " + PARAGRAPHS[i % len(PARAGRAPHS)]} for i in range(30)]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = str(tmp_path / "out")
    prepare_owt.main(["--dataset", str(src), "--out", out, "--text_column", "body", "--val_fraction", "0.1",
                      "--num_proc", "1"])
    train = read_bin(out, "train")
    got = split_docs(train, tiktoken_gpt2) + split_docs(read_bin(out, "val"), tiktoken_gpt2)
    assert sorted(got) == sorted(r["body"] for r in rows)
    # the slice of train.bin holding the first training document decodes to its text
    first = np.flatnonzero(train == data.EOT)[0]
    assert tiktoken_gpt2.decode(train[:first].tolist()) in [r["body"] for r in rows]

    # a finished output is recognised and left alone; --overwrite redoes it
    mtime = os.path.getmtime(os.path.join(out, "train.bin"))
    capsys.readouterr()
    prepare_owt.main(["--dataset", str(src), "--out", out, "--text_column", "body"])
    assert "already holds a finished dataset" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "train.bin")) == mtime
    prepare_owt.main(["--dataset", str(src), "--out", out, "--text_column", "body", "--val_fraction", "0.5",
                      "--overwrite"])
    with open(os.path.join(out, "meta.json")) as f:
        assert json.load(f)["val_documents"] == 15

    # a wrong column is a clear error naming the columns
    with pytest.raises(SystemExit, match="no column 'text'.*body"):
        prepare_owt.main(["--dataset", str(src), "--out", str(tmp_path / "o2")])


def test_txt_docs_modes_and_interrupted_output(tmp_path, tiktoken_gpt2):
    a, b = tmp_path / "in" / "a.txt", tmp_path / "in" / "b.txt"
    a.parent.mkdir()
    a.write_text("line one\nline two\n\nline three\n")
    b.write_text("other file\n")
    out = str(tmp_path / "files")
    meta = corpus.prepare(str(a.parent), out, txt_docs="file", val_fraction=0.5)
    assert meta["documents"] == 2
    meta = corpus.prepare(str(a.parent), str(tmp_path / "lines"), txt_docs="line", val_fraction=0.25)
    assert meta["documents"] == 4
    # an interrupted run (bins without meta.json) is not mistaken for a finished one
    os.remove(os.path.join(out, "meta.json"))
    assert data.finished(out) is None
    assert corpus.prepare(str(a.parent), out, txt_docs="file", val_fraction=0.5)["documents"] == 2


def test_hub_script_fallback_and_offline_message(tmp_path, monkeypatch, tiktoken_gpt2):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config=None, split=None, num_proc=None, revision=None):
        calls.append(revision)
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")
        return datasets.Dataset.from_dict({"text": [f"web page {i}" for i in range(10)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    meta = corpus.prepare(data.OWT, str(tmp_path / "owt"), val_fraction=0.2)
    assert calls == [None, "refs/convert/parquet"] and meta["documents"] == 10

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Skylion007/openwebtext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match=r"(?s)Offline.*--dataset PATH\.txt"):
        corpus.prepare(data.OWT, str(tmp_path / "owt2"))
    with pytest.raises(data.DataError, match="no such file"):
        corpus.prepare(str(tmp_path / "missing.txt"), str(tmp_path / "x"))
