"""train.py end to end on CPU with tiny models and tiny data: loss drops, checkpoints,
exact resume, gradient accumulation, DDP (gloo), configs, and clear errors for bad input."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import TokenData
import config
import recipe
import runtime
import train
from conftest import ROOT, VOCAB, argv, kron_run, run, scratch, sha   # and the fixtures data_dir, hf_dir
from checkpoints import from_checkpoint, load_checkpoint
from conftest import gpt, spec_keys


@pytest.mark.slow
def test_end_to_end_vl_norm(data_dir, hf_dir, tmp_path):
    out = tmp_path / "run"
    res = kron_run(data_dir, hf_dir, out, max_iters=40, eval_interval=20, eval_iters=4)
    assert len(res["losses"]) == 40 and res["iters"] == list(range(1, 41))
    first, last = np.mean(res["losses"][:5]), np.mean(res["losses"][-5:])
    assert last < first - 1.0, (first, last)
    assert res["evals"][-1]["val"] < res["evals"][0]["val"]
    for name in ("ckpt_best.pt", "ckpt_last.pt"):
        ckpt = load_checkpoint(str(out / name))
        assert ckpt["config"]["kron_shape"] == (64, 16) and ckpt["config"]["init_from"] == hf_dir
        assert ckpt["compression"]["mlp"] == "kron" and "mlp" not in ckpt["model_config"]
    model = from_checkpoint(str(out / "ckpt_last.pt"))
    assert torch.equal(model.transformer.h[0].mlp.c_fc.A, res["model"].transformer.h[0].mlp.c_fc.A)
    assert load_checkpoint(str(out / "ckpt_best.pt"))["best_val_loss"] == min(e["val"] for e in res["evals"])


def test_resume_continues_the_same_curve(data_dir, hf_dir, tmp_path):
    n = 6
    full = kron_run(data_dir, hf_dir, tmp_path / "full", max_iters=2 * n, eval_interval=n,
                    decay_lr=True, warmup_iters=3, lr_decay_iters=2 * n, min_lr=3e-4)
    half = kron_run(data_dir, hf_dir, tmp_path / "half", max_iters=n, eval_interval=n,
                    decay_lr=True, warmup_iters=3, lr_decay_iters=2 * n, min_lr=3e-4)
    assert half["losses"] == full["losses"][:n]
    resumed = kron_run(data_dir, hf_dir, tmp_path / "half", max_iters=2 * n, eval_interval=n,
                       decay_lr=True, warmup_iters=3, lr_decay_iters=2 * n, min_lr=3e-4, init_from="resume")
    assert resumed["iters"] == list(range(n + 1, 2 * n + 1))
    np.testing.assert_allclose(resumed["losses"], full["losses"][n:], rtol=1e-6, atol=0)
    # the logged curve of run.json: the resumed run's is the uninterrupted one's, both halves
    curves = [json.loads((tmp_path / d / "run.json").read_text())["curve"] for d in ("full", "half")]
    assert [(c["iter"], c["tokens"], c["lr"]) for c in curves[1]] == [(c["iter"], c["tokens"], c["lr"])
                                                                       for c in curves[0]]
    np.testing.assert_allclose([c["loss"] for c in curves[1]], [c["loss"] for c in curves[0]], rtol=1e-6, atol=0)
    for a, b in zip(resumed["model"].parameters(), full["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_finetune_from_checkpoint_is_weights_only(data_dir, hf_dir, tmp_path):
    pre = kron_run(data_dir, hf_dir, tmp_path / "pre", max_iters=10)
    fine = run(data_dir, tmp_path / "fine", init_from=str(tmp_path / "pre" / "ckpt_best.pt"), max_iters=3,
               eval_interval=3, learning_rate=1e-9)
    assert fine["iters"] == [1, 2, 3]                        # iteration 0, fresh optimizer
    assert spec_keys(fine["model"])["kron_shape"] == [64, 16]      # the architecture comes from the checkpoint
    # a learning rate of 1e-9 leaves the pre-trained weights (nearly) unchanged
    for a, b in zip(fine["model"].parameters(), pre["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_config_from_a_compressed_checkpoint_is_checked_as_that_model(data_dir, hf_dir, tmp_path):
    kron_run(data_dir, hf_dir, tmp_path / "pre", max_iters=2, eval_interval=2)
    ckpt = str(tmp_path / "pre" / "ckpt_best.pt")
    cfg = config.resolve_config(None, argv(init_from=ckpt, learning_rate=1e-4))
    keys = cfg.model_spec()[1].keys
    assert keys["mlp"] == "kron" and keys["kron_shape"] == [64, 16]
    # the checkpoint has kron_shape already: kron_b_shape too is refused up front, before out_dir
    with pytest.raises(config.ConfigError, match="kron_b_shape"):
        config.resolve_config(None, argv(init_from=ckpt, kron_b_shape=(2, 2)))
    with pytest.raises(config.ConfigError, match="kron_b_shape"):
        run(data_dir, tmp_path / "fine", init_from=ckpt, kron_b_shape=(2, 2))
    assert not (tmp_path / "fine").exists()


def test_gradient_accumulation_matches_one_big_batch(data_dir, tmp_path):
    kw = scratch(max_iters=1, eval_interval=1, learning_rate=1e-3, weight_decay=0.0, grad_clip=0.0)
    one = run(data_dir, tmp_path / "one", batch_size=8, gradient_accumulation_steps=1, **kw)
    four = run(data_dir, tmp_path / "four", batch_size=2, gradient_accumulation_steps=4, **kw)
    assert one["losses"][0] == pytest.approx(four["losses"][0], rel=1e-5)
    torch.manual_seed(1337)                                   # train.py's seed: the same initial weights
    init = gpt(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, block_size=32)
    moved = 0.0
    for (name, a), b in zip(one["model"].named_parameters(), four["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(one["model"].parameters(), init.parameters()):
        moved = max(moved, (a - b).abs().max().item())
    assert moved > 5e-4                                       # the step did change the weights


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(data_dir, tmp_path):
    kw = scratch(batch_size=2, gradient_accumulation_steps=4, max_iters=3, eval_interval=3,
                 learning_rate=1e-3, data_dir=data_dir, device="cpu", dtype="float32", block_size=32,
                 eval_iters=2, log_interval=1, decay_lr=False, eval_at_start=False)
    single = train.main(argv(**kw, out_dir=str(tmp_path / "single")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), *argv(**kw, out_dir=str(tmp_path / "ddp"))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    ddp = load_checkpoint(str(tmp_path / "ddp" / "ckpt_last.pt"))
    assert ddp["iter_num"] == 3 and ddp["config"]["world_size"] == 2
    ref = single["model"].state_dict()
    for k, v in ddp["model"].items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------- configs

EXPECTED_SIZES = {          # the paper's Table 1 (with position embeddings); 92M adds its 4*2*12 scalars
    "krony81m.py": 81_972_576, "krony96m_prune.py": 96_128_304,
    "krony96m_vl.py": 96_128_304, "krony92m_4factors.py": 92_983_392 + 96,
    "krony80m_2factors.py": 80_400_048, "krony67m.py": 67_893_504,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_paper_configs_resolve_to_their_sizes(name):
    cfg = train.resolve_config(os.path.join(ROOT, "configs", name), []).flat()
    mc = {k: cfg[k] for k in train.MODEL_KEYS}
    with torch.device("meta"):
        model = gpt(**mc, block_size=cfg["block_size"])
    assert model.num_params() == EXPECTED_SIZES[name]
    # the pre-training recipe of section 4.1: 120 sequences of 1024 tokens, cosine 6e-5 -> 6e-6
    assert cfg["batch_size"] * cfg["gradient_accumulation_steps"] == 120 and cfg["block_size"] == 1024
    assert (cfg["learning_rate"], cfg["min_lr"], cfg["decay_lr"]) == (6e-5, 6e-6, True)
    assert 500 <= cfg["warmup_iters"] <= 1500 and cfg["init_from"] == "gpt2"
    epochs = cfg["max_iters"] * 120 * 1024 / config.OWT_TOKENS
    assert round(epochs) == (4 if name in ("krony67m.py", "krony80m_2factors.py") else 3)


def test_finetune_config_is_the_big_batch_phase():
    cfg = train.resolve_config(os.path.join(ROOT, "configs", "krony81m_finetune.py"), []).flat()
    pre = train.resolve_config(os.path.join(ROOT, "configs", "krony81m.py"), []).flat()
    assert cfg["init_from"] == os.path.join(pre["out_dir"], "ckpt_best.pt")   # architecture from there
    assert cfg["batch_size"] * cfg["gradient_accumulation_steps"] == 320
    assert cfg["learning_rate"] == 6e-6 and cfg["decay_lr"] is False
    assert round(cfg["max_iters"] * 320 * 1024 / config.OWT_TOKENS) == 1


def test_every_config_file_resolves():
    files = [f for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
             if not os.path.basename(f).startswith("study_")]        # study files: tests/test_study.py
    assert len(files) >= 8
    for f in files:
        train.resolve_config(f, [])


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nbatch_size = 3\n_helper = 7 * batch_size\nkron_shape = (64, 16)\n")
    resolved = train.resolve_config(str(f), ["--batch_size=5", "--init_from=gpt2", "--decay_lr=False",
                                             "--learning_rate=1", "--kron_shape=(1536,384)"])
    cfg = resolved.flat()
    # the keys set explicitly: training keys that left their default, and the model keys given
    default = train.TrainConfig()
    explicit = {k for k in train.TRAIN_KEYS if getattr(resolved, k) != getattr(default, k)} | set(resolved.model)
    assert cfg["batch_size"] == 5 and cfg["init_from"] == "gpt2" and cfg["decay_lr"] is False
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["kron_shape"] == (1536, 384) and "_helper" not in cfg and "math" not in cfg
    assert {"batch_size", "init_from", "kron_shape"} <= explicit and "max_iters" not in explicit


# ----------------------------------------------------------------------------- bad input

def test_unknown_key_and_wrong_type_are_clear_errors(tmp_path):
    with pytest.raises(train.ConfigError, match="unknown config key 'batch_sise'.*batch_size"):
        train.main(["--batch_sise=4"])
    f = tmp_path / "c.py"
    f.write_text("learning_rat = 1e-3\n")
    with pytest.raises(train.ConfigError, match=r"learning_rat.*c\.py.*learning_rate"):
        train.main([str(f)])
    with pytest.raises(train.ConfigError, match="max_iters='abc' has type str, expected int"):
        train.main(["--max_iters=abc"])
    with pytest.raises(train.ConfigError, match="expected bool"):
        train.main(["--compile=1"])
    with pytest.raises(train.ConfigError, match="--key=value"):
        train.main(["--max_iters", "5"])
    # the CLI prints the message, not a traceback
    proc = subprocess.run([sys.executable, "train.py", "--batch_sise=4"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "Did you mean batch_size" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_train_bin_names_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_owt.py"):
        run(str(tmp_path / "nodata"), tmp_path / "out", **scratch())


def test_checkpoint_of_another_shape_and_nan_keep_checkpoints(data_dir, hf_dir, tmp_path):
    out = tmp_path / "run"
    kron_run(data_dir, hf_dir, out, max_iters=4, eval_interval=4)
    files = {n: sha(out / n) for n in ("ckpt_last.pt", "ckpt_best.pt")}
    # resume with another A shape: clear error from the shape check
    with pytest.raises(train.TrainError, match="another model configuration.*kron_shape"):
        kron_run(data_dir, hf_dir, out, max_iters=8, init_from="resume", kron_shape=(32, 16))
    # a diverging run stops with a clear message and does not overwrite the good checkpoints
    with pytest.raises(train.TrainingDiverged, match="loss became (nan|inf).*last good checkpoints"):
        kron_run(data_dir, hf_dir, out, max_iters=12, eval_interval=1, init_from="resume", learning_rate=1e30)
    assert {n: sha(out / n) for n in files} == files
    for n in files:
        assert spec_keys(from_checkpoint(str(out / n)))["kron_shape"] == [64, 16]
    with pytest.raises(train.TrainError, match="no .*ckpt_last.pt"):
        run(data_dir, tmp_path / "empty", init_from="resume")


def test_wandb_offline_logging(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(data_dir, tmp_path / "out", **scratch(max_iters=2, eval_interval=2, wandb_log=True, wandb_mode="offline",
                                              wandb_run_name="tiny"))
    runs = glob.glob(str(tmp_path / "out" / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.wandb"))


def test_run_json_curve_and_loss_png(data_dir, tmp_path):
    """The training loss and learning rate of every log step (and at each evaluation) in run.json,
    and out_dir/loss.png, a PNG rewritten at each evaluation."""
    out = tmp_path / "out"
    res = run(data_dir, out, **scratch(max_iters=20, eval_interval=10, log_interval=3, decay_lr=True, warmup_iters=4,
                                       lr_decay_iters=20, min_lr=3e-4))
    summary = json.loads((out / "run.json").read_text())
    cfg = train.TrainConfig(**{k: v for k, v in summary["config"].items() if k in train.TRAIN_KEYS})
    iters = [3, 6, 9, 10, 12, 15, 18, 20]                     # every third step, and the evaluations
    assert [c["iter"] for c in summary["curve"]] == iters
    assert [c["tokens"] for c in summary["curve"]] == [i * 4 * 32 for i in iters]
    # lr of the step that ended there (step i runs at get_lr(i - 1)); the loss is that step's
    assert [c["lr"] for c in summary["curve"]] == [recipe.get_lr(i - 1, cfg) for i in iters]
    assert [c["loss"] for c in summary["curve"]] == [res["losses"][i - 1] for i in iters]
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


class FakeWandb:
    """A stand-in for the wandb module: records every log call."""

    def __init__(self):
        self.calls = []

    def init(self, **kw):
        return self

    def log(self, data, step=None):
        self.calls.append((data, step))

    def finish(self):
        pass


def test_wandb_logs_with_the_iteration_as_step(data_dir, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(data_dir, tmp_path / "out", **scratch(max_iters=4, eval_interval=2, log_interval=1, wandb_log=True,
                                              eval_at_start=True))
    assert {"train/loss", "val/loss"} <= {k for data, _ in fake.calls for k in data}
    assert all(step is not None and step == data["iter"] for data, step in fake.calls)
    steps = [step for _, step in fake.calls]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 4    # wandb needs them non-decreasing


def test_format_duration():
    assert [runtime.format_duration(s) for s in (0, 9.4, 59.6, 61, 3599, 3600, 11_100, 200_000)] == \
        ["0s", "9s", "1m00s", "1m01s", "59m59s", "1h00m", "3h05m", "55h33m"]


def test_flops_per_token_counts_factored_macs():
    with torch.device("meta"):
        dense = gpt()
        krony = gpt(mlp="kron", kron_shape=(1536, 384))
    fd, fk = recipe.flops_per_token(dense, 1024), recipe.flops_per_token(krony, 1024)
    # dense MLP: 2 * 3072 * 768 multiply-adds per layer; Kronecker (1536,384)x(2,2): factored_macs of c_fc + c_proj
    from kron_kernels import factored_macs
    kron_mlp = factored_macs((1536, 384), (2, 2))[0] + factored_macs((384, 1536), (2, 2))[0]
    assert fd - fk == pytest.approx(6 * 12 * (2 * 3072 * 768 - kron_mlp))
    assert fk < fd


def test_quickstart_prepares_its_own_data(tmp_path, tiktoken_gpt2):
    """configs/quickstart.py on a fresh checkout: no data, no network; it tokenises tinyshakespeare itself."""
    source = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")
    if not os.path.isfile(source):
        pytest.skip("no ../shared/data/tinyshakespeare.txt")
    data = tmp_path / "shakespeare"
    res = train.main([os.path.join(ROOT, "configs", "quickstart.py"), f"--data_dir={str(data)!r}",
                      f"--out_dir={str(tmp_path / 'out')!r}", "--max_iters=3", "--eval_interval=3",
                      "--eval_iters=1", "--batch_size=2", "--eval_at_start=False"])
    assert res["iters"] == [1, 2, 3] and os.path.isfile(tmp_path / "out" / "ckpt_best.pt")
    meta = TokenData(str(data)).meta
    assert meta["source"].endswith("tinyshakespeare.txt") and meta["train_tokens"] > 300_000


def test_missing_local_source_is_downloaded_from_its_url(tmp_path, tiktoken_gpt2):
    """A user without ../shared: data_prepare's url is fetched once (here a file:// URL, no network)."""
    text = "First paragraph of a tiny corpus.\n\nSecond paragraph, a little longer than the first.\n" * 40
    (tmp_path / "remote.txt").write_text(text)
    data = tmp_path / "data"
    prep = {"dataset": "no/such/local/copy.txt", "val_fraction": 0.1,
            "url": (tmp_path / "remote.txt").as_uri()}
    res = train.main([os.path.join(ROOT, "configs", "quickstart.py"), f"--data_dir={str(data)!r}",
                      f"--out_dir={str(tmp_path / 'out')!r}", f"--data_prepare={prep!r}", "--max_iters=2",
                      "--eval_interval=2", "--eval_iters=1", "--batch_size=2", "--block_size=16",
                      "--eval_at_start=False"])
    assert res["iters"] == [1, 2]
    assert (data / "copy.txt").read_text() == text
    meta = TokenData(str(data)).meta
    assert meta["documents"] == len([p for p in text.split("\n\n") if p.strip()])  # 41 paragraphs
    assert meta["source"].endswith("copy.txt")


def test_a_bad_shape_for_a_hub_model_fails_first(tmp_path):
    """GPT-2's dimensions are known without downloading it: an impossible kron_shape is refused when
    the config is read, before out_dir is locked, data prepared or anything downloaded."""
    out, data = tmp_path / "out", tmp_path / "data"
    with pytest.raises(config.ConfigError, match=r"A shape \(5, 5\) does not tile .*\(out=3072, in=768\)"):
        train.main(argv(init_from="gpt2", mlp="kron", kron_shape=(5, 5), out_dir=str(out), data_dir=str(data)))
    assert not out.exists() and not data.exists()
    with pytest.raises(config.ConfigError, match=r"\(out=4096, in=1024\)"):       # gpt2-medium's width
        config.resolve_config(None, argv(init_from="gpt2-medium", mlp="kron", kron_shape=(1536, 384)))
