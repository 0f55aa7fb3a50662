"""
Where and in what precision the scripts run: the device, the dtype, the autocast context; and how a
script reports a user's mistake. One place, so train.py, eval_ppl.py, sample.py, study.py and
bench.py agree.

dtype names: "auto" (bfloat16 on a CUDA GPU that has it, else float32), "float32",
"bfloat16", "float16". A non-float32 dtype means autocast with float32 parameters, as in
training; on the CPU it is replaced by float32 (CPU autocast is slow and not what the
recipes mean), with a note.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


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
