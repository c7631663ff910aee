"""The on-disk layout of a checkpoint directory: steps, their commit, lookup, retention, cleanup.

[Note: checkpoint commit]
A checkpoint is one unit across all ranks and hosts, so no rank's file may be
taken for a checkpoint on its own. A save of step N under ``ROOT``:

1. every rank writes its file into ``ROOT/step_{N:08d}.tmp/`` (atomically,
   fsync'ed), computing its size and CRC-32;
2. a barrier across every device of the job (a collective, so that it spans
   hosts) carries each rank's outcome, size and checksum to every rank;
3. if every rank succeeded, global rank 0 writes ``manifest.json`` into the
   staging directory last (atomically, fsync'ed): step, world size, sharding
   groups, each file's size and CRC-32, format version; then it renames the
   directory to ``ROOT/step_{N:08d}`` (a step saved again first moves the old
   one aside to ``step_{N:08d}.old``, removed once the new one is in place);
4. a second barrier tells every rank whether the commit happened.

A step is *committed* when ``step_{N:08d}/manifest.json`` exists and is
valid; nothing else is ever read as a checkpoint. A reader checks each file's
size and CRC-32 against the manifest and reports a damaged file by name: a
damaged newest step is an error, never a silent fall-back to an older one.
A kill at any point therefore leaves either the new step committed or the
previous ones untouched: a staging directory is invisible, and a kill
between the two renames of a re-save leaves ``step_{N:08d}.old`` with its
manifest, which lookup accepts while ``step_{N:08d}`` is missing. The next
commit removes what dead writers left behind (staging directories, ``.old``
copies whose step is committed again, temporary files), then applies
retention, which never removes the newest committed step.

This is the protocol of orbax (a temporary directory, renamed once complete,
with a commit marker) and of torch.distributed.checkpoint (every rank writes,
then the coordinator writes the metadata file last), on a plain directory.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from ._io import atomic_write, fsync_dir
from ._metadata import MANIFEST_NAME, Manifest, MetadataError

__all__ = ["step_dir", "staging_dir", "rank_file_name", "committed_steps", "latest_step", "read_committed",
           "commit_step", "StepNotCommittedError", "step_entries", "no_committed_step"]

_STEP = re.compile(r"^step_(\d{8,})(\.old)?$")
_STAGING = re.compile(r"^step_(\d{8,})\.tmp$")


class StepNotCommittedError(FileNotFoundError):
    """The requested step has no valid commit record."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def staging_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}.tmp"


def rank_file_name(name: str, group: int, groups: int, rank: int, world_size: int) -> str:
    """``{name}_rank-{r:08d}-of-{W:08d}.pth`` (torch_xla's naming); with several sharding groups,
    ``{name}_group-{g:04d}-of-{G:04d}_rank-...``, so that groups never share a file."""
    group_part = f"_group-{group:04d}-of-{groups:04d}" if groups > 1 else ""
    return f"{name}{group_part}_rank-{rank:08d}-of-{world_size:08d}.pth"


def _manifest_problem(directory: Path) -> tuple[Optional[Manifest], Optional[str]]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None, f"{directory} has no {MANIFEST_NAME} (not committed)"
    try:
        manifest = Manifest.read(path)
    except MetadataError as exc:
        return None, str(exc)
    return manifest, None


def _candidates(root: Path) -> dict[int, list[Path]]:
    """Step number -> its directories, ``step_N`` before ``step_N.old``."""
    found: dict[int, list[Path]] = {}
    if not Path(root).is_dir():
        return found
    for entry in sorted(Path(root).iterdir(), key=lambda p: p.name):
        match = _STEP.match(entry.name)
        if match and entry.is_dir():
            found.setdefault(int(match.group(1)), []).append(entry)
    return found


def read_committed(root: Path, step: int) -> tuple[Path, Manifest]:
    """The directory and manifest of committed ``step``; ``StepNotCommittedError`` says why not."""
    problems = []
    for directory in _candidates(root).get(step, []):
        manifest, problem = _manifest_problem(directory)
        if manifest is not None:
            if manifest.step != step:
                problems.append(f"{directory / MANIFEST_NAME}: field step is {manifest.step}, not {step}")
                continue
            return directory, manifest
        problems.append(problem)
    raise StepNotCommittedError(f"step {step} of {root} is not a committed checkpoint: "
                                + ("; ".join(problems) if problems else f"no {step_dir(root, step).name}"))


def committed_steps(root: Path) -> list[int]:
    """Steps under ``root`` with a valid commit record, oldest first."""
    steps = []
    for step in _candidates(root):
        try:
            read_committed(root, step)
        except StepNotCommittedError:
            continue
        steps.append(step)
    return sorted(steps)


def step_entries(root: Path) -> list[str]:
    """Names under ``root`` that are steps, committed or not (``step_N``, ``step_N.tmp``, ``step_N.old``)."""
    if not Path(root).is_dir():
        return []
    return sorted(p.name for p in Path(root).iterdir() if _STEP.match(p.name) or _STAGING.match(p.name))


def no_committed_step(root: Path) -> StepNotCommittedError:
    """The error for a checkpoint directory without a committed step (e.g. only a save that never finished)."""
    return StepNotCommittedError(f"{root}: no committed step (a step is committed once its {MANIFEST_NAME} is "
                                 f"written); found {step_entries(root)[:4]}")


def latest_step(root: Path) -> Optional[int]:
    steps = committed_steps(root)
    return steps[-1] if steps else None


def _remove_step(directory: Path) -> None:
    """Uncommit a step (its manifest goes first, durably), then delete it: a kill half-way through never
    leaves a manifest over missing files."""
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    fsync_dir(directory)
    _remove(directory)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def commit_step(root: Path, manifest: Manifest, keep_last_n: Optional[int] = None) -> Path:
    """Step 3 of [Note: checkpoint commit]; run by one rank after every rank wrote its file."""
    root = Path(root)
    staging = staging_dir(root, manifest.step)
    listed = {f.name for f in manifest.files}
    for f in manifest.files:
        size = (staging / f.name).stat().st_size  # FileNotFoundError names the file
        if size != f.size:
            raise OSError(f"{staging / f.name} has {size} bytes but its writer reported {f.size}")
    for entry in staging.iterdir():  # a dead writer's leftovers (temporary files, other world sizes)
        if entry.name not in listed:
            _remove(entry)
    atomic_write(staging / MANIFEST_NAME, lambda f: f.write(manifest.to_json().encode()))
    final, old = step_dir(root, manifest.step), Path(f"{step_dir(root, manifest.step)}.old")
    if final.exists():
        if old.exists():
            _remove_step(old)
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(root)
    if old.exists():
        _remove_step(old)
    _clean(root, keep_last_n)
    return final


def _clean(root: Path, keep_last_n: Optional[int]) -> None:
    """Remove what dead writers left, and committed steps beyond ``keep_last_n`` (never the newest)."""
    committed = committed_steps(root)
    for entry in list(root.iterdir()):
        staging = _STAGING.match(entry.name)
        step = _STEP.match(entry.name)
        if staging:
            _remove(entry)                               # no writer is left: every rank is in the barrier
        elif step and step.group(2):                     # step_N.old: an interrupted re-save
            if step_dir(root, int(step.group(1))).exists():
                _remove_step(entry)
            elif int(step.group(1)) in committed:
                os.replace(entry, step_dir(root, int(step.group(1))))
        elif entry.name.startswith(".") and ".tmp-" in entry.name:
            _remove(entry)                               # an atomic write that never finished
    if keep_last_n is not None:
        for step in committed[:-max(1, keep_last_n)]:
            for directory in _candidates(root).get(step, []):
                _remove_step(directory)
    fsync_dir(root)
