"""calib_tokens: compress() fits every method to the teacher's activations, reports the output
error beside the weight error, composes with permutations, sparse residuals, scalars and k
factors, and is one switch in train.py and compare_init.py; its mistakes are one-line errors."""
import numpy as np
import pytest
import torch

import calibrate
import compare_init
from checkpoints import load_checkpoint
from compress import compress, compression_report, format_report, resolve, spec_of
from conftest import VOCAB, run
from data import TokenData
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def teacher():
    """A small dense GPT whose MLP inputs are far from isotropic (as a trained one's are): random
    LayerNorm gains spread over two orders of magnitude."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, block_size=32)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.ln_2.weight.copy_(torch.logspace(-1, 1, 32)[torch.randperm(32)])
    return model


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, 20_000).astype(np.uint16)


def moments_of(model, tokens, calib_tokens=2048):
    names = [f"transformer.h.{i}.mlp.{n}" for i in range(model.config.n_layer) for n in ("c_fc", "c_proj")]
    windows = calibrate.calibration_windows(tokens, calib_tokens, model.config.block_size, 8, progress=False)
    return {n: m.second_moment() for n, m in calibrate.collect_moments(model, names, windows).items()}


CASES = [dict(mlp="kron", kron_b_shape=(2, 2), kron_init="vl"),
         dict(mlp="kron", kron_b_shape=(4, 4), kron_init="vl", kron_factors=2, kron_scalars=True),
         dict(mlp="kron", kron_b_shape=(2, 2), kron_init="vl", kron_sparse=0.05),
         dict(mlp="kron", kron_b_shape=(2, 2), kron_init="vl", kron_permute="hidden"),
         dict(mlp="lowrank", lowrank_rank=6),
         dict(mlp="shared", lowrank_rank=8, share_group=2)]


@pytest.mark.parametrize("keys", CASES, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_calibrated_fit_lowers_every_output_error(teacher, tokens, keys):
    moments = moments_of(teacher, tokens)
    plain, _ = compress(teacher, **keys)
    fitted, report = compress(teacher, **keys, calib_tokens=2048, calib_data=tokens, progress=False)
    source = teacher
    if keys.get("kron_permute"):       # the fit and its report are on the permuted teacher
        from compress import searched_matrices
        from permute import permuted
        source = permuted(teacher, searched_matrices(resolve(teacher.config, **keys), teacher.config), residual=False)
        moments = moments_of(source, tokens)
    before = compression_report(source, plain, moments) if not keys.get("kron_permute") else None
    assert all(r.output_error is not None for r in report)
    assert "rel. output error" in format_report(report)
    if before is not None:
        for b, a in zip(before, report):
            assert a.output_error < b.output_error - 1e-3, (b, a)
    # the report's output errors are those of the moments the fit used
    again = compression_report(source, fitted, moments)
    assert [r.output_error for r in again] == pytest.approx([r.output_error for r in report], rel=1e-6)
    assert spec_of(fitted).calib_tokens == 2048
    # everything but the compressed layers is the teacher's (or its permutation's), bit for bit
    idx = torch.from_numpy(tokens[:64].astype(np.int64)).view(2, 32)
    with torch.no_grad():
        assert torch.isfinite(fitted(idx)[0]).all()


def test_calibrated_model_computes_closer_to_its_teacher(teacher, tokens):
    """The logits, not only each layer: calibrated vl-norm B 2x2 is closer to the dense model than vl-norm."""
    idx = torch.from_numpy(tokens[-2 * 32:].astype(np.int64)).view(2, 32)
    with torch.no_grad():
        dense = teacher(idx)[0]
        plain = compress(teacher, kron_b_shape=(2, 2))[0](idx)[0]
        fitted = compress(teacher, kron_b_shape=(2, 2), calib_tokens=4096, calib_data=tokens, progress=False)[0](idx)[0]
    assert (fitted - dense).norm() < 0.8 * (plain - dense).norm()


def test_sequential_calibration_sees_the_compressed_inputs(teacher, tokens):
    fitted, report = compress(teacher, kron_b_shape=(2, 2), calib_tokens=2048, calib_sequential=True,
                              calib_data=tokens, progress=False)
    # block 0's c_fc reads the teacher's own inputs, so its fit is the one-pass fit's
    one_pass, _ = compress(teacher, kron_b_shape=(2, 2), calib_tokens=2048, calib_data=tokens, progress=False)
    h0, p0 = fitted.transformer.h[0].mlp.c_fc, one_pass.transformer.h[0].mlp.c_fc
    torch.testing.assert_close(h0.materialize(), p0.materialize())
    # c_proj of block 0 reads what the compressed c_fc computes: another moment, another fit
    assert not torch.allclose(fitted.transformer.h[0].mlp.c_proj.materialize(),
                              one_pass.transformer.h[0].mlp.c_proj.materialize())
    # and the hidden order is swapped again for speed afterwards, as in an uncalibrated model
    assert fitted.transformer.h[0].mlp.c_fc.swap_out == compress(teacher, kron_b_shape=(2, 2))[0].transformer.h[0].mlp.c_fc.swap_out


@pytest.mark.parametrize("keys,kwargs,match", [
    (dict(calib_tokens=100), dict(), "needs calibration data"),
    (dict(calib_tokens=10**6), dict(calib_data="tokens"), "more than the 20000 tokens"),
    (dict(calib_tokens=-1), dict(), "calib_tokens=-1 must be a whole number"),
    (dict(calib_tokens=100, kron_b_shape=(2, 1), kron_init="prune"), dict(calib_data="tokens"), "kron_init 'vl' or 'vl-norm'"),
    (dict(calib_tokens=100, mlp="shared", lowrank_rank=4, calib_sequential=True), dict(calib_data="tokens"),
     "calib_sequential=False with 'shared'"),
    (dict(calib_damping=-1.0), dict(), "calib_damping"),
    (dict(calib_tokens=100), dict(calib_data="other tokenizer"), "beyond the teacher's vocabulary"),
])
def test_calibration_mistakes_are_clear_errors(teacher, tokens, keys, kwargs, match):
    keys = {"kron_b_shape": (2, 2), **keys}
    other = np.full(1000, VOCAB, dtype=np.uint16)          # ids of a larger vocabulary than the teacher's
    kwargs = {k: tokens if v == "tokens" else other if v == "other tokenizer" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        compress(teacher, **keys, **kwargs, progress=False)


def test_train_calibrates_from_its_data(data_dir, hf_dir, tmp_path, capsys):
    res = run(data_dir, tmp_path / "out", init_from=hf_dir, mlp="kron", kron_b_shape=(2, 2), calib_tokens=512,
              max_iters=2, eval_interval=2)
    out = capsys.readouterr().out
    assert f"calibrating on 512 tokens of {data_dir}/train.bin" in out and "rel. output error" in out
    assert load_checkpoint(str(tmp_path / "out" / "ckpt_last.pt"))["compression"]["calib_tokens"] == 512
    assert res["iter_num"] == 2
    # the same command finds the run finished; a resume keeps the architecture
    again = run(data_dir, tmp_path / "out", init_from=hf_dir, mlp="kron", kron_b_shape=(2, 2), calib_tokens=512,
                max_iters=2, eval_interval=2)
    assert again["iter_num"] == 2


def test_train_refuses_more_calibration_tokens_than_the_data_has(data_dir, hf_dir, tmp_path):
    import config
    n = TokenData(data_dir).num_tokens("train")
    with pytest.raises(config.ConfigError, match=f"calib_tokens={n + 1} .* {n:,} tokens"):
        run(data_dir, tmp_path / "out", init_from=hf_dir, mlp="kron", kron_b_shape=(2, 2), calib_tokens=n + 1)
    assert not (tmp_path / "out").exists()


def test_compare_init_adds_the_calibrated_rows(tmp_path, hf_dir, data_dir, capsys):
    compare_init.main(["--model", hf_dir, "--data", f"{data_dir}/val.bin", "--kron_shape", "64", "16",
                       "--block_size", "32", "--batches", "1", "--batch_size", "2", "--device", "cpu",
                       "--calib_tokens", "512", "--calib_data", f"{data_dir}/train.bin"])
    out = capsys.readouterr().out
    lines = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0]]
    rows = {r[0].strip(): dict(zip(head, (c.strip() for c in r))) for r in lines[1:]}
    plain = [name for name in rows if f"{name}, calibrated" in rows]
    assert {"vl-norm", "vl + sparse p=0.01"} <= set(plain) and any(n.startswith("lowrank r=") for n in plain)
    assert "vl, calibrated" not in rows and "prune, calibrated" not in rows and "random, calibrated" not in rows
    for name in plain:      # each calibrated row has a lower output error than its plain twin, at the same size
        fitted = rows[f"{name}, calibrated"]
        assert float(fitted["mean output error"]) < float(rows[name]["mean output error"]), out
        assert fitted["params"] == rows[name]["params"]
