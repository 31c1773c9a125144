"""Files written whole or not at all, and read back only after a check.

Every file vqt-cache writes outside a Zarr store goes through `write_bytes`: the bytes go to a temporary file in
the same folder, are flushed to the disk (fsync), and the temporary file is renamed over the target, which POSIX
makes atomic; the folder is synced too, so a finished result survives a power cut. A kill, Ctrl-C or full disk at
any moment leaves the old file or the new one, never half of one (at worst a stray `.*.tmp-*` file, which nothing
reads).

Readers (`read_json`, `load_tensors`, `load_torch`) turn anything unreadable into `DamagedFile`, a one-sentence
error naming the file, which callers either report or treat as "not done yet" and redo.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from vqt_cache.errors import Damaged, first_line


class DamagedFile(Damaged):
    """A file that exists but cannot be trusted: truncated, not the expected format, or the wrong shape."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(str(path), problem)
        self.path = Path(path)


_UMASK_LOCK = threading.Lock()


def _file_mode() -> int:
    """The mode a new file gets under the user's umask (0644 under 022), as open() would give it; mkstemp's
    temporary files are 0600, which would keep results from colleagues."""
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (temporary file, fsync, rename, fsync of the folder),
    readable as the user's umask allows."""
    path = Path(path)
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:  # name the file the user knows, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        os.fchmod(handle, _file_mode())
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:  # a full disk or a read-only remount mid-write: the old file (if any) is untouched
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, value: Any) -> None:
    """JSON with NaN and Infinity refused: a number that is not a number is never written as a result."""
    write_text(path, json.dumps(value, indent=1, allow_nan=False) + "\n")


def read_json(path: str | Path, kind: type = dict) -> Any:
    """A JSON file's value, which must be of `kind`; DamagedFile when it is unreadable, invalid or another type."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedFile(path, f"not valid JSON: {exc}") from exc
    except IsADirectoryError as exc:
        raise DamagedFile(path, "a folder, not a file") from exc
    if not isinstance(value, kind):
        raise DamagedFile(path, f"a JSON {type(value).__name__}, expected a JSON {kind.__name__}")
    return value


def digest(data: bytes) -> str:
    """The checksum files are recorded with (blake2b-256, hex)."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def save_tensors(path: str | Path, tensors: dict) -> str:
    """Write tensors as a safetensors file; returns the file's checksum (`digest`) to record elsewhere."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    write_bytes(path, data)
    return digest(data)


def read_checked(path: str | Path, checksum: str | None = None, recorded_in: str = "metrics.json") -> bytes:
    """A file's bytes; with `checksum`, DamagedFile unless they have the checksum `recorded_in` (a file name) records
    for them, or the file is missing though recorded."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if checksum is None:
            raise
        raise DamagedFile(path, f"missing, though {recorded_in} records it") from None
    except IsADirectoryError as exc:
        raise DamagedFile(path, "a folder, not a file") from exc
    if checksum is not None and digest(data) != checksum:
        raise DamagedFile(path, f"its bytes differ from the checksum {recorded_in} records for it")
    return data


def check_digest(path: str | Path, recorded: str, where: str) -> None:
    """DamagedFile unless the file's bytes have the checksum `where` (a file name) records for them."""
    read_checked(path, recorded, where)


def load_tensors(
    path: str | Path,
    shapes: dict[str, tuple[int, ...]] | None = None,
    finite: bool = False,
    checksum: str | None = None,
    recorded_in: str = "metrics.json",
) -> dict:
    """A safetensors file's tensors; with `shapes`, exactly those names with those shapes; with `finite`, those
    tensors hold no NaN or Inf (a model that would give non-finite logits is no model); with `checksum`, the bytes
    read have the checksum `recorded_in` records for them (`read_checked`): the read that loads them checks them."""
    from safetensors.torch import load

    path = Path(path)
    data = read_checked(path, checksum, recorded_in)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors reports truncation and bad headers as its own error type
        raise DamagedFile(path, f"not a readable safetensors file: {first_line(exc)}") from exc
    if shapes is not None:
        for name, shape in shapes.items():
            if name not in tensors:
                raise DamagedFile(path, f"no tensor {name!r}")
            if tuple(tensors[name].shape) != tuple(shape):
                raise DamagedFile(path, f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
            if finite and not all_finite(tensors[name]):
                raise DamagedFile(path, f"tensor {name!r} holds NaN or Inf")
    return tensors


def all_finite(tensor: Any) -> bool:
    """No NaN or Inf in a tensor. A finite sum proves it in one pass (a NaN or an Inf makes any sum non-finite);
    a sum that is not finite is checked element by element (large finite values can overflow a sum)."""
    import torch

    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def save_torch(path: str | Path, value: Any) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_bytes(path, buffer.getvalue())


def load_torch(path: str | Path, map_location: Any = "cpu") -> dict:
    import torch

    path = Path(path)
    try:
        value = torch.load(io.BytesIO(path.read_bytes()), map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # truncated zip, foreign pickle: torch raises many types
        raise DamagedFile(path, f"not a readable checkpoint: {first_line(exc)}") from exc
    if not isinstance(value, dict):
        raise DamagedFile(path, f"holds a {type(value).__name__}, not a checkpoint")
    return value


def folder_entries(path: Path) -> list[str]:
    """The names in a folder, sorted ([] when it does not exist)."""
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def describe_entries(path: Path) -> str:
    """'3 entries (a, b, c)' for a refusal message about a local folder."""
    return describe_names(folder_entries(path))


def describe_names(names: list[str]) -> str:
    """'3 entries (a, b, c)', the first three in name order, for a refusal message."""
    names = sorted(names)
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"
