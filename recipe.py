"""
What a training run starts from and how it steps: the model init_from names (a new one, or a
trained one compressed as the config's model keys say, calibrated on the run's own data), the
frozen teacher of distillation, AdamW with its parameter groups, the learning-rate schedule and
the FLOPs a step costs. train.py runs the loop; this file decides what goes into it.
"""
from __future__ import annotations

import math

import torch

import data
from checkpoints import from_pretrained, load_checkpoint, load_model, model_from_checkpoint, rebuilt, resolve_model
from compress import architecture, build, compress, format_report, spec_of
from config import DIMENSIONS, ConfigError, TrainConfig, TrainError
from kronecker import KronLinear
from model import GPT


def build_model(cfg: TrainConfig, log, tokens: data.TokenData | None = None, device: torch.device | str = "cpu") -> GPT:
    """The model a new run starts from, as init_from says (resume is handled by Trainer.restore):
    a new one, or a trained one (a Hugging Face GPT-2 or our checkpoint) compressed as the config's
    model keys say where they differ from it (the paper's path: a dense teacher, compressed; with
    calib_tokens, fitted to the teacher's activations on the training split of `tokens`, on `device`)."""
    init = cfg.init_from
    try:
        if init == "scratch":
            return build(*cfg.model_spec())
        found = resolve_model(init)
        if found.kind == "checkpoint":      # weights only: fresh optimizer, iteration 0
            ckpt = load_checkpoint(found.path)
            model = model_from_checkpoint(ckpt, source=found.path)
            log(f"loaded the weights of {found.path} (iteration {ckpt.get('iter_num', '?')})")
            changed = sorted(k for k in DIMENSIONS if k in cfg.model and cfg.model[k] != getattr(model.config, k))
            if changed:
                raise ConfigError(f"init_from={init!r} has another model configuration: " + ", ".join(
                    f"{k}: checkpoint {getattr(model.config, k)!r} vs config {cfg.model[k]!r}" for k in changed))
        else:                               # a Hugging Face GPT-2, dense
            ignored = sorted(k for k in DIMENSIONS if k in cfg.model)
            if ignored:
                log(f"note: init_from={init!r} fixes {', '.join(ignored)}; the config's values are ignored")
            model = from_pretrained(init)
        config, spec = cfg.model_spec((model.config, spec_of(model).keys))
        if config != model.config:          # dropout or untied_head: the same tensors
            model = rebuilt(model, dropout=config.dropout, untied_head=config.untied_head)
        if architecture(config, spec) == architecture(model):
            return model
        if spec.calib_tokens:
            log(f"calibrating on {spec.calib_tokens:,} tokens of {cfg.data_dir}/train.bin")
            model.to(device)
        model, report = compress(model, spec, calib_data=tokens.splits["train"] if tokens else None)
        log(f"compressed {init}: " + ", ".join(f"{k}={v!r}" for k, v in cfg.model.items() if k not in DIMENSIONS))
        log(format_report(report))
        return model
    except TrainError:
        raise
    except (ValueError, OSError, RuntimeError) as e:     # a model that cannot be read or fetched: as if missing
        raise ConfigError(f"could not build the model for init_from={init!r}: {e}") from e


def load_teacher(cfg: TrainConfig, student: GPT, device: torch.device, log) -> GPT | None:
    """The frozen teacher of distillation, or None."""
    if not cfg.distill_from:
        return None
    try:
        teacher = load_model(cfg.distill_from)
    except (ValueError, OSError, RuntimeError) as e:
        raise ConfigError(f"could not load the teacher distill_from={cfg.distill_from!r}: {e}") from e
    t, s = teacher.config, student.config
    if t.vocab_size != s.vocab_size:
        raise ConfigError(f"distillation needs one vocabulary: the teacher {cfg.distill_from} has {t.vocab_size} "
                          f"tokens, the student {s.vocab_size}")
    if cfg.distill_hidden > 0 and (t.n_layer, t.n_embd) != (s.n_layer, s.n_embd):
        raise ConfigError(f"distill_hidden compares the hidden states block by block: the teacher has {t.n_layer} "
                          f"layers of width {t.n_embd}, the student {s.n_layer} of width {s.n_embd}; "
                          "use distill_hidden=0")
    teacher.to(device).eval().requires_grad_(False)
    log(f"distilling from {cfg.distill_from} ({teacher.num_params():,} parameters): alpha {cfg.distill_alpha}, "
        f"temperature {cfg.distill_temperature}, hidden {cfg.distill_hidden}")
    return teacher


def configure_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on 2-D weights (and Kronecker factors unless decay_factors=False),
    none on biases, LayerNorms and Kronecker scalars."""
    factors = {id(p) for m in model.modules() if isinstance(m, KronLinear) for p in (m.A, m.B)}
    decay, no_decay = [], []
    for p in model.parameters():                           # a tied tensor is yielded once
        if not p.requires_grad:
            continue
        if id(p) in factors:
            (decay if cfg.decay_factors else no_decay).append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_iters, then cosine from learning_rate to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token: 2 per multiply-add forward, 4 backward (nanoGPT's 6N + 12LdT),
    Kronecker and low-rank layers counted by the multiply-adds they really run."""
    return 6.0 * model.macs_per_token(seq_len)
