"""
Where and in what precision the scripts run: the device, the dtype, the autocast context, the
processes of a torchrun job and what they peak at; and how a script reads its options and reports
a user's mistake. One place, so train.py, eval_ppl.py, sample.py, study.py and
bench.py agree.

dtype names: "auto" (bfloat16 on a CUDA GPU that has it, else float32), "float32",
"bfloat16", "float16". A non-float32 dtype means autocast with float32 parameters, as in
training; on the CPU it is replaced by float32 (CPU autocast is slow and not what the
recipes mean), with a note.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Optional
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
# bf16 dense peak FLOP/s by GPU name, for the MFU a training log shows
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12,
              "V100": 125e12, "4090": 165e12, "3090": 71e12}


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch.device for a name (ValueError for a name that is none, or a GPU that is not
    there); under torchrun, local_rank picks the process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r} is not a device; use {DEVICE_HELP}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name!r} is not supported; use {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but torch sees no CUDA GPU; use device='cpu' or 'auto'")
        if local_rank is not None:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}: there are only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' but this machine has no Apple GPU; use device='cpu' or 'auto'")
    return device


def pick_dtype(name: str, device: torch.device, log=print) -> torch.dtype:
    """The compute dtype for a name on a device (see the module docstring)."""
    if name != "auto" and name not in DTYPES:
        raise ValueError(f"dtype={name!r}; choose auto, {', '.join(DTYPES)}")
    if device.type != "cuda":
        if name not in ("auto", "float32"):
            log(f"note: dtype={name} is for CUDA GPUs; running float32 on {device.type}")
        return torch.float32
    bf16 = torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float32
    if name == "bfloat16" and not bf16:
        log("note: this GPU has no bfloat16; using float16 (training adds a GradScaler)")
        return torch.float16
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def autocast(device: torch.device | str, dtype: torch.dtype):
    """Autocast to `dtype` (parameters stay float32), or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def keep_freed_memory() -> bool:
    """On Linux with glibc, keep freed memory in the heap for reuse (no mmap, no trimming).

    glibc serves every allocation above 32 MB with its own mmap and returns it on free, so a CPU
    training step that allocates its logits, their softmax and their gradients (hundreds of MB)
    faults in fresh pages for each of them, every step: the kernel's time, not the math. Returns
    whether it applied (False elsewhere: other allocators, or no glibc)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30 - 1))
    except (OSError, AttributeError):
        return False


def sync(device: torch.device | str) -> None:
    """Wait for the device (timing)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every script: an option is spelled as its config key (--batch_size,
    --kron_shape), and the dashed spelling earlier versions used (--batch_size, --kron_shape) is
    still read as it, without appearing in --help, so that old commands keep working."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self.spelled(a) for a in args], namespace)

    def add_renamed(self, old: str, key: str, **kwargs) -> None:
        """An earlier name of the option --key (--factors for --kron_factors): still read, not shown."""
        self.add_argument(old, dest=key, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def spelled(self, arg: str) -> str:
        name, eq, value = arg.partition("=")
        if not name.startswith("--") or name in self._option_string_actions:
            return arg
        key = "--" + name[2:].replace("-", "_")
        return key + eq + value if key in self._option_string_actions else arg


@dataclass
class Distributed:
    """This process's place in a torchrun job; one process alone is rank 0 of 1."""
    ddp: bool = False
    rank: int = 0
    local_rank: Optional[int] = None
    world: int = 1

    @classmethod
    def from_env(cls) -> "Distributed":
        if int(os.environ.get("RANK", -1)) == -1:
            return cls()
        return cls(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.ddp:
            torch.distributed.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.ddp:
            torch.distributed.all_reduce(t)
            t /= self.world
        return t


def peak_flops(given: float, device: torch.device) -> float | None:
    """The accelerator's peak FLOP/s for MFU: `given` when > 0, else looked up by the GPU's name
    (an A100's bf16 peak when unknown); None on a CPU."""
    if given > 0:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 312e12)



def peak_memory() -> dict:
    """This process's peak memory so far: what the GPU allocated (torch.cuda.max_memory_allocated),
    else the peak resident set size (ru_maxrss, the Python and torch runtime included)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "peak_memory_of": "cuda allocated"}
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return {"peak_memory_mb": kb / 1024, "peak_memory_of": "process rss"}


def format_duration(seconds: float) -> str:
    """3h05m, 12m40s, 9s: a duration as a person reads it in a log line."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def run_cli(main: Callable, errors: tuple = (ValueError, OSError, RuntimeError),
            interrupted: str = "interrupted") -> None:
    """Run a script's main(): a mistake the user can fix (one of `errors`: a bad value, a missing
    file, a full disk) is one line on stderr and exit code 2, as argparse does; Ctrl-C is exit 130."""
    import storage
    storage.restore_ctrl_c()            # the script's start-up handler (storage.exit_quietly_on_ctrl_c)
    try:
        main()
    except errors as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
