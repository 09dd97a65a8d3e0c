"""Files: atomic writes with the folder's normal permissions, and reading .safetensors with errors that name the
file. Shared by every stage that saves or loads (lora.py, saliency.py, timesteps.py), so stages need not import each
other for it."""
from __future__ import annotations

import os
import uuid
from typing import Optional

from safetensors import safe_open

from .errors import SpareInputError


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path) then rename over `path`: readers never see a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".spare-{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        # the folder's normal permissions (0666 minus the umask), like every other file ComfyUI writes: writers such
        # as safetensors' may create the file 0600
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask(x) sets it process-wide, a race
    with the server's other threads); elsewhere set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_safetensors(path: str, what: str = "LoRA file", name: Optional[str] = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors file; a truncated, corrupt or non-safetensors file (e.g. a .ckpt renamed)
    is a SpareInputError naming the file (`name`, default its base name), not safetensors' raw "header too large"."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # SafetensorError, OSError, ...: the message says which
        raise SpareInputError(f"{what} '{name or os.path.basename(path)}' is not a readable .safetensors file "
                              f"({e}); it may be truncated, still being copied, or in another format (.ckpt/.pt): "
                              "give a .safetensors file") from e
