"""Knowledge distillation in train.py: the chunked KL against a full-vocabulary reference, a student
equal to its teacher, alpha = hidden = 0 as plain training bit for bit, resume and torchrun with a
teacher, and clear errors for teachers that cannot work."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from conftest import ROOT, VOCAB, run, run_argv, write_tiny_tokens
from checkpoints import load_checkpoint, load_model, save_checkpoint
from conftest import gpt
from distill import ChunkedKL, distill_kl, hidden_mse


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_tokens(tmp_path_factory.mktemp("distill_data"), seed=1)


# conftest's tiny run, with a shorter context and the model of a tiny dense teacher
TINY = dict(block_size=16, eval_interval=4, init_from="scratch", n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
    """A small dense model trained for a few steps: the teacher."""
    out = tmp_path_factory.mktemp("teacher")
    run(data_dir, out, **TINY, max_iters=12)
    return str(out)


def student_run(data_dir, out, teacher_dir, **kw):
    return run(data_dir, out, **{**TINY, "init_from": teacher_dir, "mlp": "kron", "kron_b_shape": (2, 2),
                                 "max_iters": 8, **kw})


def reference_kl(s_logits, t_logits, T):
    """T^2 KL(p_t || p_s), mean over positions, with the whole vocabulary at once."""
    log_ps = F.log_softmax(s_logits.double() / T, -1)
    log_pt = F.log_softmax(t_logits.double() / T, -1)
    return T * T * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_kl_matches_the_full_vocabulary_reference(chunk):
    torch.manual_seed(0)
    N, d, V, T = 50, 16, 300, 2.5
    logits = torch.randn(N, V, requires_grad=True)
    hidden, head = torch.randn(N, d), torch.randn(V, d)
    kl = ChunkedKL.apply(logits, hidden, head, T, chunk)             # float32, as in training
    ref = reference_kl(logits, hidden.double() @ head.double().t(), T)       # float64, all at once
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-7)
    g, = torch.autograd.grad(3.0 * kl, logits)
    g_ref, = torch.autograd.grad(3.0 * ref, logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-8)


def test_student_equal_to_its_teacher_has_zero_distillation_loss_and_gradient(teacher_dir):
    teacher = load_model(teacher_dir).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    x = torch.randint(0, VOCAB, (3, 16))
    logits, _, hidden = student(x, x, return_hidden=True)
    t_hidden = teacher.hidden_states(x, every_block=True)
    kl = distill_kl(logits, teacher, t_hidden[-1], T=2.0, chunk=5)
    mse = hidden_mse(hidden, t_hidden)
    assert abs(kl.item()) < 1e-6 and mse.item() == 0.0
    (kl + mse).backward()
    worst = max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None)
    assert worst < 1e-6
    # and a student that differs has a positive loss and gradient
    other = copy.deepcopy(student)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight.mul_(0.5)
    logits, _, hidden = other(x, x, return_hidden=True)
    assert distill_kl(logits, teacher, t_hidden[-1], 2.0, 5).item() > 1e-4
    assert hidden_mse(hidden, t_hidden).item() > 1e-6


def test_zero_weights_give_plain_training_bit_for_bit(data_dir, teacher_dir, tmp_path):
    plain = student_run(data_dir, tmp_path / "plain", teacher_dir)
    zero = student_run(data_dir, tmp_path / "zero", teacher_dir, distill_from=teacher_dir, distill_alpha=0.0,
                       distill_hidden=0.0)
    assert plain["losses"] == zero["losses"] and plain["evals"] == zero["evals"]
    for a, b in zip(plain["model"].parameters(), zero["model"].parameters()):
        assert torch.equal(a, b)
    # with weight, the objective (and so the training) differs
    kd = student_run(data_dir, tmp_path / "kd", teacher_dir, distill_from=teacher_dir, distill_alpha=0.5,
                     distill_hidden=0.1)
    assert kd["losses"] != plain["losses"]


def test_resume_with_a_teacher_continues_the_same_curve(data_dir, teacher_dir, tmp_path):
    kw = dict(distill_from=teacher_dir, distill_alpha=0.7, distill_temperature=1.5, distill_hidden=0.2)
    full = student_run(data_dir, tmp_path / "full", teacher_dir, max_iters=8, **kw)
    student_run(data_dir, tmp_path / "half", teacher_dir, max_iters=4, **kw)
    resumed = student_run(data_dir, tmp_path / "half", teacher_dir, max_iters=8, init_from="resume", **kw)
    assert resumed["iters"] == [5, 6, 7, 8]
    np.testing.assert_allclose(resumed["losses"], full["losses"][4:], rtol=1e-6)


@pytest.mark.slow
def test_two_process_torchrun_with_a_teacher(data_dir, teacher_dir, tmp_path):
    kw = {**TINY, "init_from": teacher_dir, "mlp": "kron", "kron_b_shape": (2, 2),
          "max_iters": 3, "eval_interval": 3, "gradient_accumulation_steps": 4, "batch_size": 2,
          "distill_from": teacher_dir, "distill_alpha": 0.5, "distill_hidden": 0.1}
    single = run(data_dir, tmp_path / "single", **kw)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), *run_argv(data_dir, tmp_path / "ddp", **kw)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = load_checkpoint(str(tmp_path / "ddp" / "ckpt_last.pt"))
    assert ddp["iter_num"] == 3 and ddp["config"]["world_size"] == 2
    ref = single["model"].state_dict()
    for k, v in ddp["model"].items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_teachers_that_cannot_work_are_clear_errors(data_dir, teacher_dir, tmp_path):
    other_vocab = tmp_path / "vocab100.pt"
    save_checkpoint(gpt(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16), str(other_vocab))
    with pytest.raises(train.ConfigError, match="one vocabulary.*100.*64"):
        student_run(data_dir, tmp_path / "a", teacher_dir, distill_from=str(other_vocab))
    shallow = tmp_path / "shallow.pt"
    save_checkpoint(gpt(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, block_size=16), str(shallow))
    with pytest.raises(train.ConfigError, match="distill_hidden.*1 layers.*2"):
        student_run(data_dir, tmp_path / "b", teacher_dir, distill_from=str(shallow), distill_hidden=1.0)
    student_run(data_dir, tmp_path / "c", teacher_dir, distill_from=str(shallow), max_iters=2)   # KL alone: fine
    with pytest.raises(train.ConfigError, match="distill_from=.*no such file or directory"):
        student_run(data_dir, tmp_path / "d", teacher_dir, distill_from=str(tmp_path / "nope" / "ckpt.pt"))
    for bad, match in (("distill_alpha=1.5", "distill_alpha"), ("distill_temperature=0", "distill_temperature"),
                       ("distill_hidden=-1", "distill_hidden")):
        with pytest.raises(train.ConfigError, match=match):
            train.main([f"--{bad}"])
