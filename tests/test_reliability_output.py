"""Atomic, verified output: faults injected while a pruned checkpoint is written never touch the target.

Faults: an exception inside the write, a full disk (``OSError(ENOSPC)`` from the safetensors writer after a partial
file), a failed verification, a SIGKILL after the write and between the two renames of the fallback replacement;
then the stale temporary folders are cleaned by the next write. Also: no pickle anywhere in the package.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_olica  # noqa: F401
from optimum_olica import atomic_io
from optimum_olica._faults import ENVIRONMENT_VARIABLE, InjectedFault
from optimum_olica.atomic_io import (
    STAGING_PREFIX,
    clean_interrupted_writes,
    prepare_output_directory,
    write_directory_atomically,
)
from optimum_olica.checkpoint import save_pruned_model
from optimum_olica.configuration import OlicaConfig
from optimum_olica.errors import CheckpointVerificationError
from optimum_olica.integrity import read_safetensors_header, verify_saved_checkpoint
from optimum_olica.pruner import OlicaPruner

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

PACKAGE = Path(optimum_olica.__file__).parent
WORKER = Path(__file__).with_name("reliability_worker.py")


def calibration_ids() -> torch.Tensor:
    return torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pruner() -> OlicaPruner:
    pruner = OlicaPruner(make_tiny_model("llama_gqa", num_hidden_layers=2))
    pruner.prune(OlicaConfig(ratio=0.25), calibration_ids(), progress=False)
    return pruner


@pytest.fixture
def existing_target(tmp_path) -> Path:
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text('{"precious": true}')
    return target


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def temporary_leftovers(parent: Path) -> list[str]:
    return [path.name for path in parent.iterdir() if path.name.startswith(".olica")]


def test_exception_mid_write_leaves_the_target_untouched(pruner, existing_target, monkeypatch):
    before = snapshot(existing_target)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "output_written:raise")
    with pytest.raises(InjectedFault):
        pruner.save_pretrained(existing_target, overwrite=True)
    assert snapshot(existing_target) == before
    assert temporary_leftovers(existing_target.parent) == []


def test_full_disk_leaves_the_target_untouched(pruner, existing_target, monkeypatch):
    import transformers.modeling_utils

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # a partial file, as a disk filling up leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    before = snapshot(existing_target)
    with pytest.raises(OSError) as error:
        pruner.save_pretrained(existing_target, overwrite=True)
    assert error.value.errno == errno.ENOSPC
    assert snapshot(existing_target) == before
    assert temporary_leftovers(existing_target.parent) == []


def test_a_checkpoint_that_fails_verification_is_not_moved_into_place(pruner, tmp_path):
    with pytest.raises(CheckpointVerificationError, match="parameters but the pruning report promises"):
        save_pruned_model(pruner.pruned_model, tmp_path / "out", expected_parameters=pruner.pruned_model.num_parameters() + 1)
    assert not (tmp_path / "out").exists()
    assert temporary_leftovers(tmp_path) == []


def test_verification_catches_truncated_and_missing_weights(pruner, tmp_path):
    saved = pruner.save_pretrained(tmp_path / "good")
    assert verify_saved_checkpoint(saved, pruner.report["parameters_after"]) == pruner.report["parameters_after"]

    weights = saved / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-10])
    with pytest.raises(CheckpointVerificationError, match="truncated or corrupted"):
        verify_saved_checkpoint(saved)
    weights.write_bytes(original + b"junk")
    with pytest.raises(CheckpointVerificationError, match="truncated or corrupted"):
        verify_saved_checkpoint(saved)

    # A checkpoint whose config promises a tensor the weights do not hold.
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights.write_bytes(original)

    with safe_open(weights, framework="pt") as handle:
        kept = {name: handle.get_tensor(name) for name in handle.keys() if "layers.1.mlp.down_proj" not in name}
    save_file(kept, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointVerificationError, match="missing.*layers.1.mlp.down_proj"):
        verify_saved_checkpoint(saved)


def test_verification_is_cheap(pruner, tmp_path):
    saved = pruner.save_pretrained(tmp_path / "out")
    started = time.perf_counter()
    verify_saved_checkpoint(saved, pruner.report["parameters_after"])
    # Headers and a meta-device model only: well under a second even on a busy 2-core machine.
    assert time.perf_counter() - started < 5


def test_header_reader_matches_safetensors(pruner, tmp_path):
    saved = pruner.save_pretrained(tmp_path / "out")
    from safetensors import safe_open

    header = read_safetensors_header(saved / "model.safetensors")
    with safe_open(saved / "model.safetensors", framework="pt") as handle:
        assert sorted(header) == sorted(handle.keys())
        for name in handle.keys():
            assert header[name][1] == tuple(handle.get_slice(name).get_shape())


# ---- real kills mid-write -------------------------------------------------------------------------------------------


def run_worker(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != ENVIRONMENT_VARIABLE}
    if fault:
        env[ENVIRONMENT_VARIABLE] = fault
    return subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fault", ["output_written", "output_before_rename"])
def test_killed_save_leaves_the_target_untouched_and_is_cleaned_next_time(fault, existing_target):
    before = snapshot(existing_target)
    killed = run_worker("save", "--out", str(existing_target), "--overwrite", fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert snapshot(existing_target) == before
    leftovers = temporary_leftovers(existing_target.parent)
    assert len(leftovers) == 1 and leftovers[0].startswith(f"{STAGING_PREFIX}out-")  # clearly temporary
    prepare_output_directory(existing_target, overwrite=True)  # what the next run does first
    assert temporary_leftovers(existing_target.parent) == []
    assert snapshot(existing_target) == before


def test_kill_between_the_two_renames_is_repaired_by_the_next_run(existing_target):
    """Where the OS cannot exchange two directories atomically, the old target is moved aside first; a kill right
    then leaves no target, and the next run puts the old one back before anything else."""
    before = snapshot(existing_target)
    killed = run_worker("save", "--out", str(existing_target), "--overwrite", "--no-exchange",
                        fault="output_between_renames")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not existing_target.exists()
    clean_interrupted_writes(existing_target)
    assert snapshot(existing_target) == before
    assert temporary_leftovers(existing_target.parent) == []


def test_replacing_a_target_uses_an_atomic_exchange(pruner, existing_target, monkeypatch):
    calls = []
    exchange = atomic_io._exchange
    monkeypatch.setattr(atomic_io, "_exchange", lambda a, b: calls.append((a, b)) or exchange(a, b))
    pruner.save_pretrained(existing_target, overwrite=True)
    assert len(calls) == 1
    AutoModelForCausalLM.from_pretrained(existing_target)
    assert temporary_leftovers(existing_target.parent) == []


def test_staging_folders_of_live_processes_are_left_alone(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / f"{STAGING_PREFIX}out-{2**22 + 12345}-abc"  # above the default pid_max: no such process
    alive = tmp_path / f"{STAGING_PREFIX}out-{os.getppid()}-abc"  # e.g. a concurrent writer of the same target
    other = tmp_path / f"{STAGING_PREFIX}other-{2**22 + 12345}-abc"  # another target's: not ours to judge
    similar = tmp_path / f"{STAGING_PREFIX}out-2-{os.getppid()}-abc"  # target "out-2", live: its "2" is no pid
    for folder in (dead, alive, other, similar):
        folder.mkdir()
    clean_interrupted_writes(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, similar.name])


def test_write_directory_atomically_runs_verify_before_publishing(tmp_path):
    def write(staging: Path) -> None:
        (staging / "a.txt").write_text("a")

    def verify(staging: Path) -> None:
        assert (staging / "a.txt").exists()
        assert not (tmp_path / "out").exists()  # not yet published
        raise CheckpointVerificationError("incomplete")

    with pytest.raises(CheckpointVerificationError):
        write_directory_atomically(tmp_path / "out", write, verify=verify)
    assert list(tmp_path.iterdir()) == []


# ---- no pickle -------------------------------------------------------------------------------------------------------


def test_the_package_never_uses_pickle():
    """safetensors and JSON only: no pickle module, no torch.load without weights_only=True, no torch.save."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\b(import\s+(c?pickle|dill|joblib|shelve)|from\s+(c?pickle|dill|joblib|shelve)\s+import)\b", code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
            if re.search(r"\btorch\.save\(|\bsafe_serialization\s*=\s*False", code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start() : text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
    assert offenders == []
