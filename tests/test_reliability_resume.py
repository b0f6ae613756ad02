"""Resume after an interruption: real SIGKILLs at every stage of a layer's checkpoint, then a bit-identical result.

The kill tests run the pruning in a subprocess (tests/reliability_worker.py) armed with ``OLICA_FAULT_INJECTION``,
which SIGKILLs the process at a named point: after a layer's checkpoint is committed, after the temporary files of a
checkpoint are written but before they are renamed, after the rename but before the commit record, after the last
layer, and with the output fully staged but not yet renamed into place. Each rerun continues from the checkpoint;
the final output must equal, byte for byte, the output of one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import optimum_olica  # noqa: F401
from optimum_olica._faults import ENVIRONMENT_VARIABLE, InjectedFault
from optimum_olica.configuration import OlicaConfig
from optimum_olica.errors import CheckpointVerificationError, OlicaError, ResumeMismatchError
from optimum_olica.pruner import OlicaPruner, prune_model
from optimum_olica.resume import MANIFEST_NAME, PROGRESS_NAME

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from magnitude import MagnitudeLayerPruner  # noqa: E402

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

WORKER = Path(__file__).with_name("reliability_worker.py")
NUM_LAYERS = 4
CONFIG = OlicaConfig(ratio=0.25, num_calibrated_layers=1, calibration_rank_ratio=0.1)
# The dense model's own activations travel beside the pruned ones, and the checkpoints must carry them too.
TRAJECTORY_CONFIG = OlicaConfig(ratio=0.25, num_calibrated_layers=1, calibration_rank_ratio=0.1, trajectory_weight=0.5)


def calibration_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(seed))


def run_worker(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != ENVIRONMENT_VARIABLE}
    if fault:
        env[ENVIRONMENT_VARIABLE] = fault
    return subprocess.run(
        [sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=300
    )


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def assert_same_checkpoint(result: Path, reference: Path) -> None:
    """Same weight files byte for byte (so the same tensors, bit for bit) and the same config."""
    weight_files = sorted(path.name for path in reference.iterdir() if path.name.endswith((".safetensors", ".json")))
    assert sorted(path.name for path in result.iterdir() if path.name.endswith((".safetensors", ".json"))) == (
        weight_files
    )
    for name in weight_files:
        if name == "olica_report.json":
            continue  # holds timings
        assert (result / name).read_bytes() == (reference / name).read_bytes(), name
    expected, actual = tensors_of(reference), tensors_of(result)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    report, reference_report = (json.loads((d / "olica_report.json").read_text()) for d in (result, reference))
    strip = lambda layers: [{k: v for k, v in layer.items()} for layer in layers]  # noqa: E731
    assert strip(report["layers"]) == strip(reference_report["layers"])
    assert report["calibrated_layers"] == reference_report["calibrated_layers"]


def last_finished_layer(checkpoint: Path) -> int | None:
    progress = checkpoint / PROGRESS_NAME
    return json.loads(progress.read_text())["last_layer"] if progress.exists() else None


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("base") / "tiny"
    make_tiny_model("llama_gqa", num_hidden_layers=NUM_LAYERS).save_pretrained(base, max_shard_size="60KB")
    return base


@pytest.fixture(scope="module")
def references(base_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per mode, without a checkpoint directory, in this process (same recipe and data as the
    worker, one thread like the worker): the resumed runs must match it bit for bit."""
    sys.path.insert(0, str(WORKER.parent))
    from reliability_worker import RECIPE, calibration_ids as worker_ids

    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for mode in ("in-memory", "streaming"):
            pruner = OlicaPruner.from_pretrained(base_checkpoint, streaming=mode == "streaming")
            pruner.prune(RECIPE, worker_ids(), save_directory=root / mode, progress=False)
    finally:
        torch.set_num_threads(threads)
    return {mode: root / mode for mode in ("in-memory", "streaming")}


# (fault armed in the killed run, last finished layer the checkpoint must hold after the kill)
IN_MEMORY_KILLS = [
    ("layer_checkpointed:0", 0),  # layer 0 committed, then killed
    ("checkpoint_before_rename:1", 0),  # layer 1's files written under temporary names, not renamed
    ("checkpoint_before_commit:1", 0),  # layer 1's files renamed, commit record not yet replaced
    ("layer_checkpointed:3", 3),  # every layer done, killed while assembling the model
    ("output_before_rename", 3),  # output staged and verified, killed before it is moved into place
]
STREAMING_KILLS = [
    ("checkpoint_before_rename:0", None),  # killed inside the very first checkpoint
    ("layer_checkpointed:2", 2),
    ("output_written", 3),  # the streamed shards are complete in the staging directory
]


@pytest.mark.parametrize("mode", ["in-memory", "streaming"])
def test_sigkilled_runs_resume_to_a_bit_identical_checkpoint(mode, base_checkpoint, references, tmp_path):
    output, checkpoint = tmp_path / "out", tmp_path / "resume"
    flags = ["--streaming"] if mode == "streaming" else []
    arguments = ["prune", "--base", str(base_checkpoint), "--out", str(output), "--checkpoint", str(checkpoint), *flags]
    kills = IN_MEMORY_KILLS if mode == "in-memory" else STREAMING_KILLS
    for fault, finished in kills:
        killed = run_worker(*arguments, fault=fault)
        assert killed.returncode == -9, (fault, killed.returncode, killed.stderr[-3000:])  # really SIGKILLed
        assert not output.exists(), fault  # nothing half-written at the target
        assert last_finished_layer(checkpoint) == finished, fault
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".olica-tmp-")]
    assert leftovers  # the killed writes left staging folders behind ...

    resumed = run_worker(*arguments)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".olica")] == []  # ... which the rerun removed
    assert_same_checkpoint(output, references[mode])
    assert not checkpoint.exists()  # the resume files are deleted once the output is verified in place


# ---- in-process: mismatches, damage, foreign directories --------------------------------------------------------


def interrupted_run(
    checkpoint: Path, monkeypatch, after_layer: int = 1, config: OlicaConfig = CONFIG, **run_settings
) -> None:
    """A run with a checkpoint directory stopped by an exception right after ``after_layer`` was committed."""
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, f"layer_checkpointed:{after_layer}:raise")
    with pytest.raises(InjectedFault):
        prune_model(make_tiny_model("llama_bias"), config, calibration_ids(), progress=False, checkpoint_dir=checkpoint,
                    **run_settings)
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    assert last_finished_layer(checkpoint) == after_layer


@pytest.mark.parametrize("config", [CONFIG, TRAJECTORY_CONFIG], ids=["default", "trajectory"])
def test_in_process_resume_matches_an_uninterrupted_run(config, tmp_path, monkeypatch):
    reference = prune_model(make_tiny_model("llama_bias"), config, calibration_ids(), progress=False)
    interrupted_run(tmp_path / "resume", monkeypatch, config=config)
    with safe_open(next((tmp_path / "resume").glob("state-*.safetensors")), framework="pt") as handle:
        carried = any(name.startswith("dense_activations.") for name in handle.keys())
    assert carried == (config.trajectory_weight > 0)
    resumed = prune_model(
        make_tiny_model("llama_bias"), config, calibration_ids(), progress=False, checkpoint_dir=tmp_path / "resume"
    )
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert resumed.report["layers"] == reference.report["layers"]
    assert resumed.report["calibrated_layers"] == reference.report["calibrated_layers"]
    assert len(resumed.report["timings"]["per_layer_s"]) == 3


def test_resume_on_another_device_setting_continues_the_run(tmp_path, monkeypatch):
    # Where the run happens is not what it computes: a run started with device="cpu" and resumed with the default
    # device and activations offloaded continues, to the checkpoint an uninterrupted run gives.
    reference = prune_model(make_tiny_model("llama_bias"), CONFIG, calibration_ids(), progress=False)
    interrupted_run(tmp_path / "resume", monkeypatch, device="cpu")
    resumed = prune_model(
        make_tiny_model("llama_bias"), CONFIG, calibration_ids(), progress=False, checkpoint_dir=tmp_path / "resume",
        offload_activations=True,
    )
    assert resumed.report["layers"] == reference.report["layers"]
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_a_checkpoint_whose_recipe_holds_run_settings_continues(tmp_path, monkeypatch):
    # Earlier versions kept `streaming` in the recipe the manifest fingerprints (the device and offload_activations
    # left out); such a checkpoint continues, on any device setting: the manifest's mode already says how it ran.
    checkpoint = tmp_path / "resume"
    interrupted_run(checkpoint, monkeypatch, device="cpu", offload_activations=True)
    manifest_path = checkpoint / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    assert not {"device", "offload_activations", "streaming"} & set(manifest["olica_config"])
    manifest["olica_config"]["streaming"] = False
    manifest_path.write_text(json.dumps(manifest))
    resumed = prune_model(make_tiny_model("llama_bias"), CONFIG, calibration_ids(), progress=False,
                          checkpoint_dir=checkpoint)
    reference = prune_model(make_tiny_model("llama_bias"), CONFIG, calibration_ids(), progress=False)
    assert resumed.report["layers"] == reference.report["layers"]
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_a_recipe_field_added_later_compares_at_its_default(tmp_path, monkeypatch):
    # A checkpoint written before OlicaConfig.self_calibration existed ran without it (its default, 0): the same
    # recipe continues it; asking for self-generated data is a different run and is refused.
    import dataclasses

    checkpoint = tmp_path / "resume"
    interrupted_run(checkpoint, monkeypatch)
    manifest_path = checkpoint / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["olica_config"]["self_calibration"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ResumeMismatchError, match="OlicaConfig.self_calibration is 0.5, the checkpoint has 0.0"):
        prune_model(make_tiny_model("llama_bias"), dataclasses.replace(CONFIG, self_calibration=0.5),
                    calibration_ids(), progress=False, checkpoint_dir=checkpoint)
    resumed = prune_model(make_tiny_model("llama_bias"), CONFIG, calibration_ids(), progress=False,
                          checkpoint_dir=checkpoint)
    reference = prune_model(make_tiny_model("llama_bias"), CONFIG, calibration_ids(), progress=False)
    assert resumed.report["layers"] == reference.report["layers"]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"config": lambda: OlicaConfig(ratio=0.3, num_calibrated_layers=1, calibration_rank_ratio=0.1)},
         "OlicaConfig.ratio is 0.3, the checkpoint has 0.25"),
        ({"ids": lambda: calibration_ids(seed=1)}, "calibration data"),
        ({"model": lambda: make_tiny_model("llama_bias", seed=1)}, "model's weights differ"),
        ({"model": lambda: make_tiny_model("llama_bias", num_hidden_layers=4)}, "model's config differs"),
        # The baseline itself, past its refusal of a recipe with branches: only the algorithm differs.
        ({"algorithm": lambda: lambda plan_config, config: MagnitudeLayerPruner(plan_config)}, "method is 'magnitude'"),
    ],
    ids=["recipe", "data", "weights", "architecture", "method"],
)
def test_resume_with_other_arguments_is_refused(change, expected, tmp_path, monkeypatch):
    checkpoint = tmp_path / "resume"
    interrupted_run(checkpoint, monkeypatch)
    before = sorted(path.name for path in checkpoint.iterdir())
    with pytest.raises(ResumeMismatchError, match=expected) as error:
        prune_model(
            change.get("model", lambda: make_tiny_model("llama_bias"))(), change.get("config", lambda: CONFIG)(),
            change.get("ids", calibration_ids)(), progress=False,
            layer_algorithm=change.get("algorithm", lambda: None)(),
            checkpoint_dir=checkpoint,
        )
    assert "delete" in str(error.value) and "original" in str(error.value)  # the two ways out
    assert sorted(path.name for path in checkpoint.iterdir()) == before  # the checkpoint is left as it was


def test_damaged_resume_files_are_reported_not_used(tmp_path, monkeypatch):
    checkpoint = tmp_path / "resume"
    interrupted_run(checkpoint, monkeypatch)
    state = checkpoint / "state-00001.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointVerificationError, match="damaged.*Delete"):
        prune_model(make_tiny_model("llama_bias"), CONFIG, calibration_ids(), progress=False, checkpoint_dir=checkpoint)


def test_a_foreign_directory_is_not_used_as_checkpoint_dir(tmp_path):
    foreign = tmp_path / "my-model"
    foreign.mkdir()
    (foreign / "layer-notes.txt").write_text("mine")
    (foreign / "weights.bin").write_text("mine too")
    with pytest.raises(CheckpointVerificationError, match="not written by an Olica run"):
        prune_model(make_tiny_model("llama"), CONFIG, calibration_ids(), progress=False, checkpoint_dir=foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["layer-notes.txt", "weights.bin"]


def test_checkpoint_dir_inside_the_output_is_refused(tmp_path):
    pruner = OlicaPruner(make_tiny_model("llama"))
    with pytest.raises(OlicaError, match="outside save_directory"):
        pruner.prune(CONFIG, calibration_ids(), save_directory=tmp_path / "out",
                     checkpoint_dir=tmp_path / "out" / "resume", progress=False)
    assert not (tmp_path / "out").exists()


def test_checkpoint_dir_without_output_is_kept_and_reused(tmp_path):
    checkpoint = tmp_path / "resume"
    first = OlicaPruner(make_tiny_model("qwen3"), checkpoint_dir=checkpoint).prune(CONFIG, calibration_ids(), progress=False)
    assert (checkpoint / MANIFEST_NAME).exists() and last_finished_layer(checkpoint) == 2
    # Everything is finished: a rerun restores all layers and computes no layer again.
    again = OlicaPruner(make_tiny_model("qwen3"), checkpoint_dir=checkpoint).prune(CONFIG, calibration_ids(), progress=False)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_fingerprints_of_large_tensors_are_sampled_and_stable():
    from optimum_olica.resume import fingerprint_state_dict

    # Large enough that a float32 linspace of sample positions would round past the last index.
    big = torch.zeros(28_311_553, dtype=torch.int8)
    first = fingerprint_state_dict({"w": big})
    assert fingerprint_state_dict({"w": big.clone()}) == first
    big[-1] = 1  # the last element is always sampled
    assert fingerprint_state_dict({"w": big}) != first
    assert fingerprint_state_dict({"w": torch.zeros(3, dtype=torch.bfloat16)}) != fingerprint_state_dict(
        {"w": torch.zeros(3, dtype=torch.float16)}
    )


def test_two_runs_cannot_share_a_checkpoint_dir(tmp_path):
    from optimum_olica.resume import LayerCheckpoint

    manifest = {"format_version": 1}
    first = LayerCheckpoint(tmp_path / "resume", manifest)
    assert first.open() is None
    with pytest.raises(CheckpointVerificationError, match="in use by another running pruning job"):
        LayerCheckpoint(tmp_path / "resume", manifest).open()
    del first  # the first run ends (a killed process releases its lock the same way)
    assert LayerCheckpoint(tmp_path / "resume", manifest).open() is None


def test_a_checkpoint_older_than_a_recipe_field_compares_at_what_it_ran():
    """A field added later is absent from an older checkpoint's recipe: the checkpoint ran at what the code did before
    the field (not at today's default where the field changed it), so only that recipe resumes it."""
    from optimum_olica.resume import _differences

    ran_then = OlicaConfig(qk_covariance_shrinkage=1.0, self_calibration=0.0, layer_allocation="uniform").to_dict()
    older = {key: value for key, value in ran_then.items()
             if key not in ("qk_covariance_shrinkage", "self_calibration", "layer_allocation")}
    assert _differences({"olica_config": older}, {"olica_config": ran_then}) == []
    today = OlicaConfig(self_calibration=0.0, layer_allocation="uniform").to_dict()
    assert _differences({"olica_config": older}, {"olica_config": today}) == [
        "OlicaConfig.qk_covariance_shrinkage is 0.5, the checkpoint has 1.0"
    ]
