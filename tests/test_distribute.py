"""Distribution: the strategy chosen once, GPUs stood in for by logical CPUs, and two local
worker processes (TF_CONFIG on localhost) standing in for two machines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import NOTEBOOK, ROOT, make_dataset, tiny_base_model, write_config

from tl_helpers import config, convert, dataset, distribute, quantize
from tl_helpers.errors import TLError
from tl_helpers.inference import keras_runner

RUN = Path(__file__).resolve().parent / "distributed_run.py"
RUN_TIMEOUT = 240  # seconds per run of distributed_run.py; a run takes about 10 s alone
LABELS = {"red": 0, "green": 1, "blue": 2}


def tf_config(workers: list[str], task_type: str = "worker", index: int = 0, **extra) -> dict:
    return {
        "TF_CONFIG": json.dumps(
            {"cluster": {"worker": workers, **extra}, "task": {"type": task_type, "index": index}}
        )
    }


# --------------------------------------------------------------------------- TF_CONFIG


def test_no_tf_config_means_no_cluster_and_the_chief():
    assert distribute.cluster_from_environment({}) is None
    assert distribute.cluster_from_environment({"TF_CONFIG": "{}"}) is None
    assert distribute.is_chief({})


def test_workers_are_numbered_chief_first():
    workers = ["a:1", "b:1"]
    second = distribute.cluster_from_environment(tf_config(workers, index=1))
    assert (second.num_workers, second.worker_index, second.is_chief) == (2, 1, False)
    assert distribute.is_chief(tf_config(workers, index=0))
    with_chief = {"chief": ["c:1"]}
    assert distribute.is_chief(tf_config(workers, "chief", 0, **with_chief))
    worker0 = distribute.cluster_from_environment(tf_config(workers, "worker", 0, **with_chief))
    assert (worker0.num_workers, worker0.worker_index, worker0.is_chief) == (3, 1, False)


@pytest.mark.parametrize(
    "environ, culprit",
    [
        ({"TF_CONFIG": "{not json"}, "not valid JSON"),
        (tf_config(["a:1"], "ps", 0, ps=["p:1"]), "'ps'"),
        (tf_config(["a:1", "b:1"], index=2), "task worker 2"),
    ],
)
def test_a_tf_config_this_project_cannot_run_is_named(environ, culprit):
    with pytest.raises(TLError, match=culprit):
        distribute.cluster_from_environment(environ)


def test_each_worker_takes_every_nth_image():
    one, two = (
        distribute.Distribution(strategy=None, num_workers=2, worker_index=index)
        for index in (0, 1)
    )
    assert one.share(list("abcde")) == ["a", "c", "e"]
    assert two.share(list("abcde")) == ["b", "d"]


# --------------------------------------------------------------------------- this machine


def test_cpu_alone_gets_the_default_strategy_and_the_cpu_batch_size(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    distribute.reset_for_tests()
    chosen = distribute.choose_distribution()
    assert chosen.strategy is tf.distribute.get_strategy()
    assert (chosen.replicas, chosen.devices, chosen.is_chief) == (1, (), True)
    assert chosen.backbone_batch_size == distribute.CPU_BACKBONE_BATCH_SIZE
    assert distribute.choose_distribution(48).backbone_batch_size == 48  # the configuration key


def test_backbone_batch_size_follows_the_device_unless_configured():
    cpu, per_gpu = distribute.CPU_BACKBONE_BATCH_SIZE, distribute.GPU_BACKBONE_BATCH_PER_REPLICA
    assert distribute.choose_backbone_batch_size(0, num_gpus=0, num_devices=2) == cpu
    assert distribute.choose_backbone_batch_size(0, num_gpus=1, num_devices=0) == per_gpu
    assert distribute.choose_backbone_batch_size(0, num_gpus=4, num_devices=4) == 4 * per_gpu
    assert distribute.choose_backbone_batch_size(32, num_gpus=4, num_devices=4) == 32


def test_backbone_batch_size_is_a_checked_configuration_key(tmp_path):
    make_dataset(tmp_path / "data", LABELS, 1, 1)
    assert config.load_configuration(write_config(tmp_path)).backbone_batch_size == 0
    cfg = config.load_configuration(write_config(tmp_path, backbone_batch_size=128))
    assert cfg.backbone_batch_size == 128
    with pytest.raises(TLError, match="backbone_batch_size"):
        config.load_configuration(write_config(tmp_path, backbone_batch_size=-1))


def test_a_batch_split_between_devices_gives_the_same_outputs_in_order():
    model = tiny_base_model(16)
    images = tf.random.uniform((7, 16, 16, 3), 0, 255, seed=1)
    whole = keras_runner(model, 16)(images)
    for devices in (["/cpu:0"] * 2, ["/cpu:0"] * 3):
        # Float32 rounding of smaller batches: relative (outputs reach ~100; one image out of
        # order would differ by tens).
        split = keras_runner(model, 16, devices)(images)
        np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)


def test_only_the_chief_writes_where_the_configuration_says(tmp_path):
    make_dataset(tmp_path / "data", LABELS, 1, 1)
    cfg = config.load_configuration(write_config(tmp_path, quantize=True))
    chief = distribute.Distribution(strategy=None, num_workers=2, worker_index=0)
    other = distribute.Distribution(strategy=None, num_workers=2, worker_index=1)
    assert distribute.for_this_worker(cfg, chief) is cfg
    theirs = distribute.for_this_worker(cfg, other)
    for key in ("output_dir", "evaluate_result_dir"):
        assert not Path(getattr(theirs, key)).is_relative_to(tmp_path), key
    assert theirs.feature_cache_dir == cfg.feature_cache_dir  # the store stays shared
    # Quantization and conversion are the chief's; the worker trains on the same rows.
    assert cfg.chief and not theirs.chief
    assert quantize.quantize_for_imx500(None, None, LABELS, theirs) is None
    skipped = convert.convert_for_imx500(None, LABELS, theirs)
    assert not skipped.ran and skipped.reason == "the chief worker converts"
    train_set = dataset.scan_image_folder(tmp_path / "data" / "training", LABELS)
    assert quantize.lower_quantization(train_set, theirs) == quantize.lower_quantization(
        train_set, cfg
    )
    assert quantize.lower_quantization(train_set, cfg) is not None


# --------------------------------------------------------------------------- fresh processes


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny dataset and configuration (3 classes, 8 training and 4 validation images each)."""
    root = tmp_path_factory.mktemp("distributed")
    make_dataset(root / "data", LABELS, train_per_class=8, val_per_class=4)
    # Fine-tuning above conv1 of the tiny base (tests/conftest.tiny_base_model): the cut's
    # activations are what the workers share, and conv2 trains in step on both.
    write_config(
        root,
        epochs=8,
        learning_rate=0.1,
        batch_size=8,
        fine_tune_cut="conv1",
        fine_tune_epochs=3,
        fine_tune_learning_rate=0.01,
    )
    return root


def start(folder: Path, result: Path, *args: str, environ: dict | None = None):
    """Start tests/distributed_run.py in `folder` (a fresh process), output to a log file."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("TF_CONFIG", None)
    env.update(environ or {})
    log = open(result.with_suffix(".log"), "w")  # noqa: SIM115 (closed by finish)
    process = subprocess.Popen(
        [sys.executable, str(RUN), str(folder), str(result), *args],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    process.log = log
    return process


def finish(processes: list, results: list[Path], check: bool = True) -> list[dict]:
    """Wait for every process (RUN_TIMEOUT each); kill them all on any failure. With `check`,
    each must succeed and its results are returned; without, nothing is checked or read."""
    try:
        for process in processes:
            process.wait(timeout=RUN_TIMEOUT)
        if not check:
            return []
        for process, result in zip(processes, results, strict=True):
            log = result.with_suffix(".log").read_text()
            assert process.returncode == 0, f"{result.name} failed:\n{log[-4000:]}"
        return [json.loads(result.read_text()) for result in results]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.log.close()


def run(folder: Path, name: str, *args: str) -> dict:
    """Run tests/distributed_run.py alone in `folder`; return its `name`.json."""
    result = folder / f"{name}.json"
    return finish([start(folder, result, *args)], [result])[0]


@pytest.fixture(scope="module")
def alone(folder: Path) -> dict:
    """The run in one process on one device: what distributed runs must agree with."""
    return run(folder, "alone")


def clear_outputs(folder: Path) -> None:
    """Delete the outputs and the feature store of the previous run in `folder`."""
    import shutil

    shutil.rmtree(folder / "out", ignore_errors=True)


@pytest.mark.distributed
def test_two_logical_devices_give_the_same_features_and_train(folder, alone):
    clear_outputs(folder)
    mirrored = run(folder, "mirrored", "--logical-cpus", "2")
    assert (alone["replicas"], mirrored["replicas"]) == (1, 2)
    assert alone["fine_tune_final_loss"] is not None  # the runs fine-tune above conv1
    # On one device the base runs on TFLite's CPU path, on two in TensorFlow (each batch split
    # between them): the same features up to rounding, which can move a training row stored as
    # float16 by one float16 step (2**-10 relative).
    for key in ("train_activations", "train_features", "validation_features"):
        np.testing.assert_allclose(mirrored[key], alone[key], rtol=2e-3, atol=1e-4, err_msg=key)
    assert mirrored["top_1"] >= alone["top_1"] - 2 / 12  # within noise: 2 of 12 images


def free_ports(count: int) -> list[int]:
    """Ports free on localhost now (the OS picks them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("localhost", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_two_workers(folder: Path) -> tuple[list[dict], list[Path]]:
    """Run tests/distributed_run.py as two local workers in `folder`: their results, and
    their result files (each with its .log beside it)."""
    workers = [f"localhost:{port}" for port in free_ports(2)]
    results = [folder / f"worker{index}.json" for index in (0, 1)]
    processes = [
        start(folder, result, environ=tf_config(workers, index=index))
        for index, result in enumerate(results)
    ]
    return finish(processes, results), results


@pytest.mark.distributed
def test_two_workers_share_the_features_train_together_and_only_the_chief_writes(folder, alone):
    clear_outputs(folder)
    (chief, other), _ = run_two_workers(folder)
    assert (chief["is_chief"], other["is_chief"]) == (True, False)
    assert chief["replicas"] == other["replicas"] == 2
    for key in ("train_activations", "train_features", "validation_features"):
        np.testing.assert_allclose(chief[key], alone[key], atol=1e-5, err_msg=key)
        np.testing.assert_allclose(other[key], alone[key], atol=1e-5, err_msg=key)
    # Synchronous training: both workers end with the same model, as good as one process's.
    assert chief["top_1"] == other["top_1"]
    assert chief["final_loss"] == pytest.approx(other["final_loss"])
    assert chief["fine_tune_final_loss"] == pytest.approx(other["fine_tune_final_loss"])
    assert abs(chief["top_1"] - alone["top_1"]) <= 2 / 12  # within noise: 2 of 12 images
    # Only the chief's outputs are in the configured folders; the other's went away with it.
    assert chief["output_dir"] == str(folder / "out" / "model")
    assert (folder / "out" / "model" / "saved_model").is_dir()
    assert (folder / "out" / "evaluation" / "results.json").is_file()
    assert not Path(other["output_dir"]).exists()
    assert not Path(other["output_dir"]).is_relative_to(folder)


@pytest.mark.mct
@pytest.mark.distributed
def test_two_workers_share_the_rows_through_the_quantized_lower_part(tmp_path):
    """With quantization on, fine-tuning's rows through the MCT-quantized lower part are
    computed a share per worker, like the float rows: after the shares, each worker finds
    them all in the store, and they are the rows one process computes alone."""
    make_dataset(tmp_path / "data", LABELS, train_per_class=8, val_per_class=4)
    write_config(
        tmp_path,
        epochs=2,
        batch_size=8,
        fine_tune_cut="conv1",
        fine_tune_epochs=1,
        quantize=True,
        calibration_batch_size=4,
        calibration_batches=2,
    )
    alone = run(tmp_path, "alone")
    clear_outputs(tmp_path)
    (chief, other), results = run_two_workers(tmp_path)
    train_images = 3 * 8
    for report, result in ((chief, results[0]), (other, results[1])):
        log = result.with_suffix(".log").read_text()
        assert log.count("its share") == 2, log[-3000:]  # the float rows, the quantized rows
        # The quantized rows' lookup after the shares: every row from the store.
        assert f"features: {train_images} images, {train_images} from cache, 0 computed" in log
        rows = np.asarray(report["train_activations"])
        assert len(rows) == 2 * train_images  # as is, then through the quantized lower part
        np.testing.assert_allclose(rows, alone["train_activations"], atol=1e-5)


@pytest.mark.distributed
def test_a_lost_worker_stops_the_others_with_one_line_saying_what_to_do(folder):
    clear_outputs(folder)
    workers = [f"localhost:{port}" for port in free_ports(2)]
    results = [folder / f"lost{index}.json" for index in (0, 1)]
    processes = [
        start(folder, results[0], environ=tf_config(workers, index=0)),
        start(folder, results[1], "--die-after-features", environ=tf_config(workers, index=1)),
    ]
    finish(processes, results, check=False)
    chief_log = results[0].with_suffix(".log").read_text()
    assert processes[1].returncode == 3
    assert processes[0].returncode != 0, chief_log[-3000:]
    last = chief_log.strip().splitlines()[-1]
    assert last.startswith("tl_helpers.errors.TLError: Worker 0 of 2, "), chief_log[-3000:]
    assert "another worker stopped or cannot be reached" in last
    assert "start the notebook again on every machine" in last
    assert not (folder / "out" / "model" / "saved_model").exists()  # the chief wrote nothing


def test_other_errors_and_a_process_alone_keep_their_own_error():
    alone = distribute.Distribution(strategy=None)
    cluster = distribute.Distribution(strategy=None, num_workers=2, worker_index=1)
    lost = tf.errors.UnavailableError(None, None, "Collective ops is aborted by: heartbeat")
    with pytest.raises(tf.errors.UnavailableError):
        with distribute.lost_worker_errors(alone, "training"):
            raise lost
    with pytest.raises(ValueError):
        with distribute.lost_worker_errors(cluster, "training"):
            raise ValueError("not a collective")
    with pytest.raises(TLError, match="Worker 1 of 2, training: another worker stopped"):
        with distribute.lost_worker_errors(cluster, "training"):
            raise lost


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.distributed
def test_the_notebook_runs_on_two_workers_and_only_the_chief_writes(tmp_path):
    make_dataset(tmp_path / "data", LABELS, train_per_class=4, val_per_class=2)
    write_config(tmp_path, epochs=2)
    workers = [f"localhost:{port}" for port in free_ports(2)]
    scratch = tmp_path / "scratch"  # the temporary folders (TMPDIR) of the processes
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)}
    logs = [tmp_path / f"worker{index}.log" for index in (0, 1)]
    processes = []
    try:
        for index, log in enumerate(logs):
            command = [sys.executable, "-m", "tl_helpers.run_notebook", str(NOTEBOOK)]
            processes.append(
                subprocess.Popen(
                    [*command, "--cwd", str(tmp_path)],
                    cwd=tmp_path,
                    env={**env, **tf_config(workers, index=index)},
                    stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                )
            )
        for process in processes:
            process.wait(timeout=2 * RUN_TIMEOUT)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    chief, other = (log.read_text() for log in logs)
    assert [process.returncode for process in processes] == [0, 0], other[-3000:]
    assert "Top-1 accuracy" in chief.splitlines()[-1]
    assert "Not the chief" in other.splitlines()[-1]
    assert f"Saved {scratch}" in other  # its model went to its temporary folder
    # The configured folders hold the chief's outputs only: one model, one results.json.
    assert (tmp_path / "out" / "model" / "saved_model" / "saved_model.pb").is_file()
    assert (tmp_path / "out" / "evaluation" / "results.json").is_file()
    executed = sorted(path.name for path in (tmp_path / "output").iterdir())
    assert executed == ["image_classification.executed.ipynb"]
