"""
Config-driven training of (Kronecker-compressed) GPT-2, one process or torchrun, optionally
distilled from a teacher.

    python train.py configs/quickstart.py                     # laptop CPU, minutes
    python train.py configs/krony81m.py                       # one GPU
    python train.py configs/krony81m.py --batch_size=12 --max_iters=1000
    torchrun --standalone --nproc_per_node=8 train.py configs/krony81m.py \\
        --gradient_accumulation_steps=8 --batch_size=15

A config file is plain Python assignments (`batch_size = 24`); names starting with "_" are helpers
and ignored. `--key=value` overrides a key; values are parsed with ast.literal_eval
(`--kron_shape="(1536,384)"`, `--decay_lr=False`) and fall back to a string (`--init_from=gpt2`).
Unknown keys, values of the wrong type and impossible values are errors, found before anything is
locked, prepared or downloaded. The model keys are GPTConfig's (n_layer, n_embd, untied_head, ...)
and compress.py's (mlp, kron_shape, kron_b_shape, kron_factors, kron_init, calib_tokens, ...).

init_from:
  scratch                      a new model built from the config's model keys
  gpt2, gpt2-medium, ..., DIR  a Hugging Face GPT-2 (hub name or local directory), then compressed
                               as mlp / kron_* say (the per-layer approximation error is printed)
  resume                       continue out_dir's run: model, optimizer, iteration, data RNG
  PATH.pt or a run directory   weights only (e.g. the best checkpoint of a pre-training run, for the
                               big-batch phase): fresh optimizer, iteration 0

Your runs are safe:
  one run per out_dir      a lock held for the life of a run makes a second one an error at once
  out_dir holds a run      the same command resumes it; a run of another config is refused unless
                           --init_from=resume (continue it; what changed is listed, and only the
                           architecture and the optimizer's structure cannot change) or
                           --overwrite=True (start over); a finished run says so and exits 0
  checkpoints              written atomically (unique temp file, fsync, rename), ckpt_best.pt before
                           ckpt_last.pt, so a kill at any moment leaves both loadable and the same
                           command resumes from the newer; temp files of a killed run are removed on
                           the next start; each ends with a sha256 of its bytes, verified on load (a
                           damaged one is skipped for the other, with a warning)

Distillation (distill_from=MODEL, any model a script can load): the loss becomes
  (1 - distill_alpha) * cross-entropy + distill_alpha * T^2 * KL(teacher || student, at temperature T)
  + distill_hidden * mean over blocks of the mean squared error between the two hidden states.
The teacher is frozen, in eval mode, on the same device under the same autocast, and never wrapped
by DDP; the KL is computed a chunk of positions at a time (distill_chunk) to bound its memory.
"""
from __future__ import annotations

import storage  # first: stdlib only, so that Ctrl-C while torch loads is one line

if __name__ == "__main__":
    storage.exit_quietly_on_ctrl_c(code=1)          # the exit code of its Ctrl-C during the run

import argparse
import gc
import math
import os
import sys
import time
from dataclasses import fields

import torch

import corpus
import data
import runtime
from checkpoints import (CKPT_BEST, CKPT_LAST, RUN_JSON, load_checkpoint, model_from_checkpoint, resolve_model,
                         save_checkpoint)
from compress import spec_of
from config import (FIXED_ON_RESUME, MODEL_DEFAULTS, MODEL_HELP, MODEL_KEYS, TRAIN_KEYS, ConfigError, TrainConfig,
                    TrainError, config_diff, format_diff, resolve_config)
from distill import distill_kl, hidden_mse
from plots import write_loss_plot
from recipe import build_model, configure_optimizer, flops_per_token, get_lr, load_teacher

REPO = os.path.dirname(os.path.abspath(__file__))
EVAL_SEED = 1338                # the evaluation batches' own seed


class TrainingDiverged(TrainError):
    """The loss became NaN or infinite."""


# -----------------------------------------------------------------------------
# The run

class Trainer:
    """One training run: setup, restore (or start), then the loop with evaluation and checkpoints."""

    def __init__(self, cfg: TrainConfig, dist: runtime.Distributed):
        self.cfg, self.dist = cfg, dist
        self.log = print if dist.master else (lambda *a, **k: None)
        self.ckpt_last = os.path.join(cfg.out_dir, CKPT_LAST)
        self.ckpt_best = os.path.join(cfg.out_dir, CKPT_BEST)
        self.iter_num, self.best_val_loss, self.train_seconds = 0, float("inf"), 0.0
        self.best_lost = False                          # ckpt_best.pt was damaged and moved aside
        self.resume_path: str | None = None             # the checkpoint the run resumed from
        self.history: list[dict] = []                   # every evaluation: iter, tokens, train, val, seconds
        self.curve: list[dict] = []                     # every log step: iter, tokens, loss, lr
        self.result = {"losses": [], "iters": [], "evals": []}

    # ---------------------------------------------------------------- setup

    def setup(self) -> dict | None:
        """Device, data, model, optimizer, teacher. Returns the checkpoint to resume from (or None)."""
        cfg, dist = self.cfg, self.dist
        if cfg.gradient_accumulation_steps % dist.world:
            raise ConfigError(
                f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be divisible by the {dist.world} "
                f"processes; keep the sequences per step ({cfg.gradient_accumulation_steps * cfg.batch_size}) with e.g. "
                f"--gradient_accumulation_steps={dist.world} "
                f"--batch_size={max(1, cfg.gradient_accumulation_steps * cfg.batch_size // dist.world)}")
        self.accum = cfg.gradient_accumulation_steps // dist.world        # micro-steps of this process
        # what init_from and distill_from name (and the factor shapes on init_from's matrices), before
        # any work and before out_dir is touched
        for key in ("init_from", "distill_from"):
            spec = getattr(cfg, key)
            if spec not in ("", "scratch", "resume"):
                try:
                    resolve_model(spec)
                except FileNotFoundError as e:
                    raise ConfigError(f"{key}={spec!r}: {e}") from None
        calib = cfg.model.get("calib_tokens", 0)       # calibration data: enough of it, before anything is written
        if calib and os.path.isfile(os.path.join(cfg.data_dir, "train.bin")):
            n = data.TokenData(cfg.data_dir).num_tokens("train")
            if calib > n:
                raise ConfigError(f"calib_tokens={calib} is more than the {n:,} tokens of {cfg.data_dir}/train.bin; "
                                  "use fewer calibration tokens or more data")
        try:
            self.device = runtime.pick_device(cfg.device, dist.local_rank)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if dist.ddp:
            torch.distributed.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self.dtype = runtime.pick_dtype(cfg.dtype, self.device, self.log)
        if self.device.type == "cpu":
            runtime.keep_freed_memory()         # the CPU step's big tensors: no fresh pages every step
        self.stored = {**cfg.flat(), "dtype_used": runtime.dtype_name(self.dtype), "world_size": dist.world}
        ckpt = self.claim_out_dir()
        self.log("resolved config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in self.stored.items()))
        torch.manual_seed(cfg.seed + dist.rank)             # model init (scratch) and dropout
        self.data_gen = torch.Generator().manual_seed(cfg.seed)   # batch sampling, the same on every rank
        self.data = prepare_data(cfg, dist, self.log)
        try:
            self.data.check_block_size(cfg.block_size)
        except data.DataError as e:
            raise ConfigError(str(e)) from None
        # resumed: exactly as the run built it (its stored architecture, whatever the config says)
        self.model = model_from_checkpoint(ckpt, source=self.resume_path) if ckpt else build_model(cfg, self.log, self.data, self.device)
        if cfg.block_size > self.model.config.block_size:
            raise ConfigError(f"block_size={cfg.block_size} is longer than the model's context "
                              f"{self.model.config.block_size}")
        try:
            self.data.check_vocab(self.model.config.vocab_size)
        except data.DataError as e:
            raise ConfigError(str(e)) from None
        self.model.to(self.device)
        m = self.model
        self.log(f"model: {m.num_params():,} parameters ({m.num_params(include_wpe=False):,} without position "
                 f"embeddings{', ' + format(m.num_params(include_head=False), ',') + ' without the untied output matrix' if m.config.untied_head else ''}), "
                 + ", ".join(f"{k}={spec_of(m).keys[k]!r}" for k in ("mlp", "kron_shape", "kron_b_shape")))
        self.teacher = load_teacher(cfg, self.model, self.device, self.log)
        self.optimizer = configure_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.ctx = runtime.autocast(self.device, self.dtype)
        return ckpt

    def claim_out_dir(self) -> dict | None:
        """Lock out_dir for this run, clean what killed writes left, and decide: a fresh start (None)
        or the checkpoint to resume from. Refuses to touch another run's checkpoints."""
        cfg, dist = self.cfg, self.dist
        if dist.master:
            if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
                raise ConfigError(f"out_dir={cfg.out_dir!r} is a file, not a directory; choose another out_dir")
            try:
                self.lock = storage.RunLock(cfg.out_dir).acquire()
            except storage.DirectoryLocked as e:
                raise TrainError(str(e)) from None
            except OSError as e:
                raise storage.unusable_directory(e, cfg.out_dir, "out_dir") from None
            removed = storage.clean_temp_files(cfg.out_dir)
            if removed:
                self.log(f"removed {len(removed)} temp file(s) a killed run left in {cfg.out_dir}")
            if cfg.overwrite and cfg.init_from != "resume":
                for path in (self.ckpt_last, self.ckpt_best, os.path.join(cfg.out_dir, RUN_JSON)):
                    if os.path.exists(path):
                        os.remove(path)
                        self.log(f"overwrite=True: removed {path}")
        dist.barrier()
        if not any(os.path.isfile(p) for p in (self.ckpt_last, self.ckpt_best)):
            if cfg.init_from == "resume":
                raise ConfigError(f"init_from='resume' but there is no {self.ckpt_last}; start the run with "
                                  "another init_from")
            return None
        self.resume_path = self.newest_checkpoint()
        ckpt = self.read_run_checkpoint(self.resume_path)
        diff = config_diff(ckpt["config"], self.stored)
        if cfg.init_from == "resume":
            fixed = {k: v for k, v in diff.items() if k in FIXED_ON_RESUME}
            if fixed:
                raise ConfigError(f"cannot resume {cfg.out_dir} with another model configuration or optimizer structure "
                                  f"({format_diff(fixed)}): they are fixed for a run. Start a new run "
                                  f"from its weights with --init_from={self.ckpt_last} and a new out_dir")
            if diff:
                self.log(f"resuming with changed settings: {format_diff(diff)}")
        elif not diff:
            self.log(f"{cfg.out_dir} holds this run at iteration {ckpt['iter_num']}: resuming it "
                     "(--overwrite=True starts over)")
        else:
            old = ckpt["config"]
            raise TrainError(
                f"{cfg.out_dir} holds another run (init_from={old.get('init_from')!r}, iteration {ckpt['iter_num']} of "
                f"{old.get('max_iters')}, best val loss {ckpt.get('best_val_loss', float('nan')):.4f}); its config "
                f"differs: {format_diff(diff)}. To continue that run: --init_from=resume; to keep it: another "
                "--out_dir; to replace it: --overwrite=True")
        if self.best_lost and dist.master:      # out of the way (kept for a look); a new one comes
            os.replace(self.ckpt_best, self.ckpt_best + ".corrupt")
            self.log(f"moved the damaged {self.ckpt_best} to {os.path.basename(self.ckpt_best)}.corrupt; the run's "
                     "next evaluation, if any, writes a new one")
        return ckpt

    def newest_checkpoint(self) -> str:
        """The checkpoint holding the run's latest state: normally ckpt_last.pt, but ckpt_best.pt when
        a kill came between it and its copy ckpt_last.pt (it is then newer), and the other one when
        one is damaged (noted in best_lost for ckpt_best.pt, which the resume then moves aside)."""
        iters, damaged = {}, {}
        for path in (self.ckpt_last, self.ckpt_best):
            if os.path.isfile(path):
                try:       # mmap: only the metadata is read here (the checksum covers the whole file)
                    iters[path] = load_checkpoint(path, mmap=True).get("iter_num", -1)
                except (ValueError, OSError, RuntimeError) as e:
                    damaged[path] = e
        if not iters:
            e = next(iter(damaged.values()))
            raise ConfigError(f"{' '.join(str(e).split())}. No intact checkpoint is left in {self.cfg.out_dir}: "
                              "move it away (or use --overwrite=True) to start over")
        newest = max(iters, key=lambda p: (iters[p], p == self.ckpt_last))
        for path, e in damaged.items():
            self.log(f"warning: {' '.join(str(e).split())}. Resuming from {os.path.basename(newest)} instead "
                     f"(iteration {iters[newest]})")
            self.best_lost = self.best_lost or path == self.ckpt_best
        return newest

    def read_run_checkpoint(self, path: str) -> dict:
        try:
            ckpt = load_checkpoint(path)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"{e}. Move it away (or use --overwrite=True) to start over") from None
        if "optimizer" not in ckpt or "iter_num" not in ckpt or "config" not in ckpt:
            raise ConfigError(f"{path} holds weights only (no optimizer state or iteration), so it cannot be "
                              f"resumed; start a new run from it with --init_from={path} and another out_dir")
        return ckpt

    def restore(self, ckpt: dict) -> None:
        """Optimizer, scaler, iteration, best loss, history and RNGs of a saved run."""
        cfg = self.cfg
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise TrainError(f"the optimizer state of {self.resume_path} does not fit this run ({e}); start a new "
                             f"run from its weights with --init_from={self.resume_path}") from None
        for group, wd in zip(self.optimizer.param_groups, (cfg.weight_decay, 0.0)):   # settings may change
            group.update(betas=(cfg.beta1, cfg.beta2), weight_decay=wd)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iter_num, self.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        if self.best_lost:          # the next evaluation writes a new ckpt_best.pt, whatever its loss
            self.best_val_loss = float("inf")
        self.history, self.train_seconds = list(ckpt.get("history", [])), ckpt.get("train_seconds", 0.0)
        self.curve = list(ckpt.get("curve", []))
        self.data_gen.set_state(ckpt["data_rng"])
        if self.dist.world == 1 and "torch_rng" in ckpt:
            torch.set_rng_state(ckpt["torch_rng"])
            if self.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"])
        else:
            torch.manual_seed(cfg.seed + self.dist.rank + self.iter_num)
        self.log(f"resuming at iteration {self.iter_num}, best val loss {self.best_val_loss:.4f}")

    # ------------------------------------------------------- evaluation, checkpoints

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split; the same batches at every evaluation and in
        every run (their own generator, whatever the seed), so evaluations compare like with like, also
        across runs of a study, and never touch the training RNG."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(EVAL_SEED)
        self.model_run.eval()
        out = {}
        for split in ("train", "val"):
            offsets = self.data.sample_offsets(split, cfg.block_size, (cfg.eval_iters, cfg.batch_size), gen)
            total = torch.zeros((), device=self.device)
            for k in range(cfg.eval_iters):
                X, Y = self.data.batch(split, offsets[k], cfg.block_size, self.device)
                with self.ctx:
                    _, loss = self.model_run(X, Y)
                total += loss.float()
            out[split] = (total / cfg.eval_iters).item()
        self.model_run.train()
        return out

    def evaluate(self) -> dict[str, float] | None:
        if self.cfg.eval_iters == 0:
            return None
        losses = self.estimate_loss()
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingDiverged(
                f"the evaluation loss became {losses['val']} (val) / {losses['train']} (train) at iteration "
                f"{self.iter_num}; stopping without saving. The last good checkpoints in {self.cfg.out_dir} are kept. "
                f"Lower learning_rate (now {self.cfg.learning_rate:g}) and resume with --init_from=resume.")
        self.log(f"eval iter {self.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        record = {"iter": self.iter_num, "tokens": self.iter_num * self.tokens_per_iter, **losses,
                  "seconds": round(self.train_seconds, 3)}
        if not self.history or self.history[-1]["iter"] != self.iter_num:
            self.history.append(record)
        self.result["evals"].append({"iter": self.iter_num, **losses})
        if self.wandb_run:
            self.wandb_run.log({"iter": self.iter_num, "train/eval_loss": losses["train"], "val/loss": losses["val"]},
                               step=self.iter_num)
        return losses

    def plot_losses(self) -> None:
        """out_dir/loss.png: the training loss of every log step and the evaluations' train and val
        losses against tokens, rewritten at each evaluation (atomically: a viewer never sees half)."""
        try:
            write_loss_plot(self.curve, self.history, os.path.join(self.cfg.out_dir, "loss.png"),
                            f"{self.cfg.out_dir}: iteration {self.iter_num} of {self.cfg.max_iters}")
        except ImportError:             # matplotlib is optional for training
            if not getattr(self, "warned_plot", False):
                self.log("note: no matplotlib, so no loss.png (pip install matplotlib)")
                self.warned_plot = True

    def save(self, losses: dict | None, improved: bool, rng_state: torch.Tensor) -> None:
        """ckpt_best.pt first (when the val loss improved), then ckpt_last.pt: the best checkpoint is
        never older than the run believes, whenever a kill comes."""
        extra = dict(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), iter_num=self.iter_num,
                     best_val_loss=self.best_val_loss, val_loss=losses["val"] if losses else None,
                     train_loss=losses["train"] if losses else None, config=self.stored, data_rng=rng_state,
                     torch_rng=torch.get_rng_state(), history=self.history, curve=self.curve,
                     train_seconds=self.train_seconds,
                     cuda_rng=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        if improved:
            save_checkpoint(self.model, self.ckpt_best, **extra)
            self.log(f"saved {self.ckpt_best} (val loss {self.best_val_loss:.4f})")
        if improved or self.cfg.always_save_checkpoint:
            if improved:
                storage.atomic_copy(self.ckpt_best, self.ckpt_last)
            else:
                save_checkpoint(self.model, self.ckpt_last, **extra)
            self.log(f"saved {self.ckpt_last}")

    def flush(self, pending: list[torch.Tensor]) -> list[float]:
        """The pending step losses as floats (one host sync), averaged over processes; stop on NaN/inf."""
        values = self.dist.mean(torch.stack(pending).float()).tolist()
        pending.clear()
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise TrainingDiverged(
                    f"the training loss became {v} at iteration {self.iter_num - len(values) + i + 1}; stopping. "
                    f"The last good checkpoints in {self.cfg.out_dir} are kept (this state is not saved). "
                    f"Lower learning_rate (now {self.cfg.learning_rate:g}), check grad_clip, or use dtype=bfloat16 "
                    "instead of float16, then resume with --init_from=resume.")
        return values

    # ---------------------------------------------------------------- the loop

    def loss(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """The training objective of one micro-batch: cross-entropy, plus the distillation terms."""
        cfg, teacher = self.cfg, self.teacher
        distilling = teacher is not None and (cfg.distill_alpha > 0 or cfg.distill_hidden > 0)
        if not distilling:
            return self.model_run(X, Y)[1]
        logits, ce, hidden = self.model_run(X, Y, return_hidden=True)
        with torch.no_grad():
            t_hidden = teacher.hidden_states(X, every_block=cfg.distill_hidden > 0)
        loss = (1 - cfg.distill_alpha) * ce
        if cfg.distill_alpha > 0:
            loss = loss + cfg.distill_alpha * distill_kl(logits, teacher, t_hidden[-1], cfg.distill_temperature,
                                                         cfg.distill_chunk)
        if cfg.distill_hidden > 0:
            loss = loss + cfg.distill_hidden * hidden_mse(hidden, t_hidden)
        return loss

    def draw_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next step's batch: the data RNG state before drawing it (what a checkpoint stores), the
        offsets of this rank's micro-steps, and the first micro-batch X, Y."""
        cfg, rank = self.cfg, self.dist.rank
        rng_state = self.data_gen.get_state()
        # the whole step's batch is drawn on every rank; each rank takes its own micro-steps
        offs = self.data.sample_offsets("train", cfg.block_size, (cfg.gradient_accumulation_steps, cfg.batch_size),
                                        self.data_gen)                               # (accum_total, B)
        offsets = offs[rank * self.accum:(rank + 1) * self.accum]                    # (accum, B)
        return rng_state, offsets, *self.data.batch("train", offsets[0], cfg.block_size, self.device)

    def run(self) -> dict:
        cfg, dist = self.cfg, self.dist
        ckpt = self.setup()
        if ckpt is not None:
            self.restore(ckpt)
            del ckpt
        B, T = cfg.batch_size, cfg.block_size
        self.tokens_per_iter = cfg.gradient_accumulation_steps * B * T
        if self.iter_num >= cfg.max_iters and self.iter_num > 0:
            if self.resume_path == self.ckpt_best and os.path.isfile(self.ckpt_last) and dist.master:
                # killed between the final ckpt_best.pt and its copy: finish that copy, as no later
                # evaluation will (a continuing run rewrites ckpt_last.pt at its next evaluation)
                storage.atomic_copy(self.ckpt_best, self.ckpt_last)
                self.log(f"{self.ckpt_last} was older than {os.path.basename(self.ckpt_best)} (a run killed between "
                         "the two): copied the newer one over it")
            self.log(f"the run in {cfg.out_dir} is finished (iteration {self.iter_num} of {cfg.max_iters}, best val loss "
                     f"{self.best_val_loss:.4f}); nothing to do")
            return self.finish()
        self.model_run = self.model
        if cfg.compile:
            self.log("compiling the model (torch.compile)...")
            self.model_run = torch.compile(self.model_run)
        if dist.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model_run = DDP(self.model_run, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.wandb_run = None
        if cfg.wandb_log and dist.master:
            import wandb
            self.wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                        config=self.stored, dir=cfg.out_dir, mode=cfg.wandb_mode or None)
        flops_tok, peak = flops_per_token(self.model, T), runtime.peak_flops(cfg.peak_flops, self.device)
        self.log(f"tokens per iteration: {self.tokens_per_iter:,} ({cfg.gradient_accumulation_steps} micro-steps x {B} "
                 f"x {T}, {dist.world} process(es)); {flops_tok / 1e9:.3f} GFLOPs per token")

        if cfg.eval_at_start and self.iter_num == 0:
            self.evaluate()
        rng_state, offsets, X, Y = self.draw_step()
        pending: list[torch.Tensor] = []
        t_last, it_last = time.time(), self.iter_num
        t_loop, it_loop = t_last, self.iter_num     # the ETA: mean wall time per step of this process so far
        while self.iter_num < cfg.max_iters:
            t_step = time.time()
            lr = get_lr(self.iter_num, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=self.device)
            for micro in range(self.accum):
                if dist.ddp:  # all-reduce the gradients only after the last micro-step
                    self.model_run.require_backward_grad_sync = micro == self.accum - 1
                with self.ctx:
                    loss = self.loss(X, Y) / self.accum
                # prefetch the next micro-batch while the device works on this one
                if micro + 1 < self.accum:
                    X, Y = self.data.batch("train", offsets[micro + 1], T, self.device)
                else:
                    rng_state, offsets, X, Y = self.draw_step()
                loss_sum += loss.detach().float()
                self.scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.iter_num += 1
            pending.append(loss_sum)
            self.train_seconds += time.time() - t_step

            is_eval = self.iter_num % cfg.eval_interval == 0 or self.iter_num == cfg.max_iters
            if self.iter_num % cfg.log_interval == 0 or is_eval:
                first = self.iter_num - len(pending) + 1
                losses = self.flush(pending)                    # the only host sync of the training steps
                self.result["losses"] += losses
                self.result["iters"] += list(range(first, self.iter_num + 1))
                now = time.time()
                dt = (now - t_last) / max(1, self.iter_num - it_last)
                t_last, it_last = now, self.iter_num
                tok_s = self.tokens_per_iter / dt
                mfu = f"{100 * flops_tok * tok_s / peak:.1f}%" if peak else "n/a"
                # evaluations and checkpoints included: the ETA is when the run really ends
                eta = (now - t_loop) / (self.iter_num - it_loop) * (cfg.max_iters - self.iter_num)
                self.log(f"iter {self.iter_num}: loss {losses[-1]:.4f}, lr {lr:.3e}, {dt * 1000:.0f} ms/step, "
                         f"{tok_s:,.0f} tok/s, MFU {mfu}, ETA {runtime.format_duration(eta)}")
                self.curve.append({"iter": self.iter_num, "tokens": self.iter_num * self.tokens_per_iter,
                                   "loss": losses[-1], "lr": lr})
                if self.wandb_run:
                    self.wandb_run.log({"iter": self.iter_num, "train/loss": losses[-1], "lr": lr,
                                        "tok_per_s": tok_s, "step_ms": dt * 1000}, step=self.iter_num)
            if is_eval:
                losses = self.evaluate()
                improved = losses is not None and losses["val"] < self.best_val_loss
                if improved:
                    self.best_val_loss = losses["val"]
                if dist.master:
                    self.save(losses, improved, rng_state)
                    self.plot_losses()
                t_last = time.time()                          # do not count evaluation as step time
        if self.wandb_run:
            self.wandb_run.finish()
        return self.finish()

    def finish(self) -> dict:
        """The run's summary: returned, and written to out_dir/run.json (what study.py reads)."""
        cfg, m = self.cfg, self.model
        summary = {"out_dir": cfg.out_dir, "iter_num": self.iter_num, "max_iters": cfg.max_iters,
                   "finished": self.iter_num >= cfg.max_iters, "best_val_loss": self.best_val_loss,
                   "history": self.history, "curve": self.curve, "tokens": self.iter_num * self.tokens_per_iter,
                   "train_seconds": self.train_seconds,
                   "num_params": m.num_params(), "num_params_no_wpe": m.num_params(include_wpe=False),
                   "num_params_no_head": m.num_params(include_head=False), "config": self.stored}
        summary["tokens_per_s"] = summary["tokens"] / self.train_seconds if self.train_seconds else None
        summary.update(runtime.peak_memory())
        if self.dist.master:
            storage.write_json(summary, os.path.join(cfg.out_dir, RUN_JSON))
        self.result.update(best_val_loss=self.best_val_loss, iter_num=self.iter_num, model=m, summary=summary)
        return self.result


def prepare_data(cfg: TrainConfig, dist: runtime.Distributed, log) -> data.TokenData:
    """TokenData of data_dir; prepares it first (on rank 0) when data_prepare says how and it is missing."""
    data_dir = cfg.data_dir
    if cfg.data_prepare and not os.path.isfile(os.path.join(data_dir, "meta.json")):
        if dist.master:
            kwargs = dict(cfg.data_prepare)
            url = kwargs.pop("url", None)                          # where to fetch a missing local source
            source = kwargs.get("dataset", data.OWT)
            if not os.path.exists(source) and os.path.exists(os.path.join(REPO, source)):
                kwargs["dataset"] = os.path.join(REPO, source)     # paths in configs are relative to the repo
            elif not os.path.exists(source) and url:
                try:
                    kwargs["dataset"] = corpus.download(url, os.path.join(data_dir, os.path.basename(source)), log)
                except data.DataError as e:
                    raise TrainError(str(e)) from None
            log(f"{data_dir} is not prepared yet; preparing it from {kwargs.get('dataset')}")
            try:
                corpus.prepare(out=data_dir, **kwargs)
            except data.DataError as e:
                raise TrainError(str(e)) from e
            except TypeError as e:                                # a wrong key in data_prepare
                raise ConfigError(f"data_prepare={cfg.data_prepare!r}: {e}") from e
        dist.barrier()
    try:
        return data.TokenData(data_dir)
    except data.DataError as e:
        raise ConfigError(str(e)) from None


def train(cfg: TrainConfig) -> dict:
    """Run training as `cfg` says. Returns {"losses": train loss of each step run (global mean over
    processes), "iters": their iteration numbers, "evals": [{"iter", "train", "val"}],
    "best_val_loss", "iter_num", "model": the trained (unwrapped) model, "summary": run.json}."""
    dist = runtime.Distributed.from_env()
    trainer = Trainer(cfg, dist)
    try:
        result = trainer.run()
        if dist.ddp:
            # free the DDP wrapper while the interpreter is whole (its reducer holds gloo work objects
            # whose destruction at exit can abort a rank), then wait for every rank (rank 0 may still
            # be writing its checkpoint) before the teardown
            trainer.model_run = None
            gc.collect()
            dist.barrier()
        return result
    finally:
        if getattr(trainer, "lock", None):
            trainer.lock.release()
        if dist.ddp and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    """`python train.py CONFIG [--key=value ...]` in-process; returns train()'s result."""
    width = max(map(len, TRAIN_KEYS))
    helps = {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}
    keys = "\n".join(f"  {k:<{width}} = {getattr(TrainConfig(), k)!r:<20} {helps[k]}" for k in TRAIN_KEYS)
    model_keys = "\n".join(f"  {k:<{width}} = {MODEL_DEFAULTS[k]!r:<20} {MODEL_HELP.get(k, '')}" for k in MODEL_KEYS)
    p = argparse.ArgumentParser(prog="train.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__, epilog=f"training keys and their defaults:\n{keys}\n\nmodel keys "
                                f"(GPTConfig's and compress.py's; block_size is above):\n{model_keys}")
    p.add_argument("config", nargs="?", help="config file (Python assignments), e.g. configs/krony81m.py")
    p.add_argument("overrides", nargs="*", metavar="--key=value", help="override a config key")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        p.parse_args(["--help"])
    config = argv.pop(0) if argv and not argv[0].startswith("-") else None
    return train(resolve_config(config, argv))


if __name__ == "__main__":
    storage.restore_ctrl_c()
    try:
        main(sys.argv[1:])
    except storage.DiskFull as e:
        sys.exit(f"error: {e}")
    except storage.UnusableDirectory as e:
        if e.machine:                                 # a read-only mount: the machine's fault, exit 1
            sys.exit(f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ConfigError, FileNotFoundError, data.DataError) as e:   # a wrong key or value, a missing or
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # damaged file: exit 2, as argparse
        sys.exit(2)
    except TrainError as e:
        sys.exit(f"error: {e}")
    except OSError as e:                              # the machine (an I/O error, a mount gone read-only)
        sys.exit(f"error: {' '.join(str(e).split())}")
    except KeyboardInterrupt:
        sys.exit("interrupted; the checkpoints are intact: run the same command to resume")
