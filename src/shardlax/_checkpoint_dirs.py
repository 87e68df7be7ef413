"""Where training checkpoints live: directory kinds, and this process's orbax managers.

A training-checkpoint directory is marked by `MARKER` (written by process 0
before any step); a model checkpoint is a plain orbax directory (`_ORBAX_FILE`).
Each process keeps one `ocp.CheckpointManager` per directory, so asynchronous
saves continue after `shardlax.checkpoint.save` returns; `wait` finishes them
all, and they are closed at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

#: File at the root of a training-checkpoint directory (written before any step).
MARKER = "shardlax_checkpoint.json"
FORMAT = "shardlax.checkpoint"
VERSION = 1
_ARRAY_ITEMS = ("params", "opt_state", "rest")
_ORBAX_FILE = "_CHECKPOINT_METADATA"  # in every directory orbax wrote a checkpoint into

_LOCK = threading.RLock()
_MANAGERS: dict[str, tuple[ocp.CheckpointManager, int | None]] = {}


# ------------------------------------------------------------------ directories
def _root(directory: Any) -> Path:
    return Path(os.fspath(directory)).absolute()


def _is_training_root(root: Path) -> bool:
    return (root / MARKER).is_file()


def _is_model_checkpoint(root: Path) -> bool:
    return (root / _ORBAX_FILE).is_file()


def _visible(root: Path) -> list[str]:
    # a marker being written by another process (see _write_marker) does not count
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".shardlax"))


def _write_marker(root: Path) -> None:
    """Process 0 marks `root` as a training-checkpoint directory (atomic rename)."""
    if jax.process_index() != 0 or _is_training_root(root):
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".shardlax.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION}) + "\n")
    os.replace(tmp, root / MARKER)


def _check_save_root(root: Path, where: str) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(
            f"{where}(directory={str(root)!r}): this path is a file, not a directory. "
            f"Pass a new or empty directory, or one an earlier save wrote."
        )
    if root.is_dir() and not _is_training_root(root):
        entries = _visible(root)
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(
                f"{where}(directory={str(root)!r}): the directory is not empty ({shown}) and "
                f"is not a shardlax training checkpoint (no {MARKER}), so saving there "
                f"could mix or delete other files. Pass a new or empty directory."
            )


def _check_restore_root(root: Path, where: str) -> None:
    if not root.exists():
        raise FileNotFoundError(
            f"{where}(directory={str(root)!r}): no such directory, so there is no checkpoint "
            f"to restore. Pass the directory given to Trainer.save."
        )
    if not _is_training_root(root):
        hint = (
            " It holds a model checkpoint (save_model or orbax's StandardCheckpointer): "
            "restore it with shardlax.checkpoint.restore_model(directory, model)."
            if _is_model_checkpoint(root)
            else " Pass the directory given to Trainer.save."
        )
        raise ValueError(
            f"{where}(directory={str(root)!r}): not a shardlax training checkpoint (no "
            f"{MARKER}).{hint}"
        )


# ------------------------------------------------------------------ managers
def _manager(root: Path, max_to_keep: int | None, *, create: bool) -> ocp.CheckpointManager:
    """This process's manager of `root` (one per directory, kept for async saves)."""
    key = str(root)
    with _LOCK:
        found = _MANAGERS.get(key)
        if found is not None and (not create or found[1] == max_to_keep):
            return found[0]
        if found is not None:  # another max_to_keep: finish its saves, replace it
            found[0].wait_until_finished()
            found[0].close()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=create,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=create,
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in _ARRAY_ITEMS}
        handlers["meta"] = ocp.JsonCheckpointHandler()
        manager = ocp.CheckpointManager(root, options=options, item_handlers=handlers)
        _MANAGERS[key] = (manager, max_to_keep if create else (found or (None, None))[1])
        return manager


def _forget(root: Path) -> None:
    """Drop this process's manager of `root` (after finishing its saves)."""
    with _LOCK:
        found = _MANAGERS.pop(str(root), None)
    if found is not None:
        found[0].wait_until_finished()
        found[0].close()


def _pick_step(manager: ocp.CheckpointManager, root: Path, step: int | None, where: str) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise ValueError(
            f"{where}(directory={str(root)!r}): the directory holds no complete checkpoint "
            f"(a save may have been interrupted before it finished). Nothing was restored."
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(
            f"{where}(step={step}): {str(root)!r} holds no complete step {step}; it holds "
            f"steps {steps}. Pass one of them, or step=None for the latest."
        )
    return step


def wait_for(root: Path) -> None:
    """Finish this process's pending saves into `root` (a restore reads only complete steps)."""
    with _LOCK:
        found = _MANAGERS.get(str(root))
    if found is not None:
        found[0].wait_until_finished()
        found[0].check_for_errors()


def wait() -> None:
    """Block until every checkpoint this process started saving is written (and raise its error)."""
    with _LOCK:
        managers = [m for m, _ in _MANAGERS.values()]
    for m in managers:
        m.wait_until_finished()
        m.check_for_errors()


def _close_all() -> None:
    with _LOCK:
        managers = [m for m, _ in _MANAGERS.values()]
        _MANAGERS.clear()
    for m in managers:
        m.wait_until_finished()
        m.close()


atexit.register(_close_all)
