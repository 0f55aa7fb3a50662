"""
Knowledge distillation: the losses that compare a student GPT with a frozen teacher.

- ChunkedKL: T^2 KL(teacher || student) at temperature T over the vocabulary, a chunk of
  positions at a time, with the teacher's logits recomputed from its last hidden state, so that
  neither model's full softmax ever exists (peak memory stays near plain training's),
- distill_kl: that term for a student's logits and a teacher GPT,
- hidden_mse: the mean squared error between the two models' hidden states after each block.

train.py combines them with the cross-entropy (distill_alpha, distill_temperature, distill_hidden).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model import GPT



class ChunkedKL(torch.autograd.Function):
    """T^2 * KL(p_teacher || p_student) at temperature T, averaged over N positions, where the
    teacher's logits are its final hidden states (N, d) times its output matrix (V, d).

    Both softmaxes over the vocabulary are taken `chunk` positions at a time and the teacher's
    logits are recomputed per chunk, forward and backward: no (N, V) tensor of the teacher's, or
    of either softmax, ever exists. What stays is the gradient for the student's logits
    (T (p_s - p_t) / N per chunk), one tensor the size of the logits, as plain training has."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, t_hidden: torch.Tensor, t_head: torch.Tensor, T: float,
                chunk: int) -> torch.Tensor:
        N = logits.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, N, chunk):
            log_ps, log_pt = ChunkedKL.log_probs(logits, t_hidden, t_head, T, s, chunk)
            total += (log_pt.exp() * (log_pt - log_ps)).sum()
        ctx.save_for_backward(logits, t_hidden, t_head)
        ctx.T, ctx.chunk = T, chunk
        return total * (T * T / N)

    @staticmethod
    def log_probs(logits, t_hidden, t_head, T, s, chunk):
        """log-softmaxes (float32) of student and teacher at temperature T, positions s..s+chunk."""
        t_logits = t_hidden[s:s + chunk] @ t_head.t()                       # (chunk, V)
        return (F.log_softmax(logits[s:s + chunk].float() / T, dim=-1),
                F.log_softmax(t_logits.float() / T, dim=-1))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, t_hidden, t_head = ctx.saved_tensors
        T, chunk, N = ctx.T, ctx.chunk, logits.shape[0]
        grad = torch.empty_like(logits)
        scale = grad_out * (T / N)                  # d(T^2 KL / N) / d logits = T (p_s - p_t) / N
        for s in range(0, N, chunk):
            log_ps, log_pt = ChunkedKL.log_probs(logits, t_hidden, t_head, T, s, chunk)
            grad[s:s + chunk] = ((log_ps.exp() - log_pt.exp()) * scale).to(grad.dtype)
        return grad, None, None, None, None


def distill_kl(logits: torch.Tensor, teacher: GPT, t_last: torch.Tensor, T: float, chunk: int) -> torch.Tensor:
    """The soft-target term for student logits (B, L, V) and the teacher's last hidden state (B, L, d)."""
    t_final = teacher.transformer.ln_f(t_last)
    V = logits.size(-1)
    return ChunkedKL.apply(logits.reshape(-1, V), t_final.reshape(-1, t_final.size(-1)).to(logits.dtype),
                           teacher.lm_head.weight.to(logits.dtype), T, chunk)


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the mean squared error between the hidden states after each block."""
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean()
