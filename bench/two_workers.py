"""The notebook in one process, then on two local workers (TF_CONFIG on localhost): wall time,
peak memory, Top-1, and whether the two feature stores hold the same features.

    .venv/bin/python bench/two_workers.py [--dataset ../shared/datasets/flowers128] [--out DIR]

Not a test: a measurement for docs/distributed.md. Each run gets its own folder under --out
(default bench/out/two_workers), so neither finds the other's features in its store. The two
workers share one machine's cores here, so their wall time shows the cost of the collectives
and of two processes, not the gain of two machines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "image_classification.ipynb"


def configure(folder: Path, dataset: Path) -> None:
    """A fresh folder with configuration.json: MobileNetV2 alpha 0.35 at 224 px, 10 epochs."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = {
        "source_keras_model": "",
        "dataset_training_dir": str(dataset / "training"),
        "dataset_validation_dir": str(dataset / "validation"),
        "evaluate_label_file": str(dataset / "labels.json"),
        "batch_size": 16,
        "input_tensor_size": 224,
        "epochs": 10,
        "output_dir": "out/model",
        "evaluate_result_dir": "out/evaluation",
        "mobilenet_alpha": 0.35,
        "quantize": False,
        "convert_for_imx500": False,
    }
    (folder / "configuration.json").write_text(json.dumps(config, indent=2))


def run(folder: Path, environments: list[dict]) -> float:
    """Run the notebook in `folder` once per environment, all at once; return the wall time."""
    command = [sys.executable, "-m", "tl_helpers.run_notebook", str(NOTEBOOK), "--cwd", str(folder)]
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            command,
            cwd=folder,
            env={**environ, "PYTHONPATH": str(ROOT)},
            stdout=(folder / f"run{index}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for index, environ in enumerate(environments)
    ]
    try:
        for process in processes:
            if process.wait(timeout=1800) != 0:
                raise SystemExit(f"a run in {folder} failed: see its run*.log")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return time.perf_counter() - start


def worker_environments(count: int) -> list[dict]:
    """TF_CONFIG for `count` workers on localhost ports the OS says are free."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    workers = [f"localhost:{sock.getsockname()[1]}" for sock in sockets]
    for sock in sockets:
        sock.close()
    return [
        {
            **os.environ,
            "TF_CONFIG": json.dumps(
                {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            ),
        }
        for index in range(count)
    ]


def stored_features(folder: Path, paths: list[str]) -> np.ndarray:
    """The features of `paths` in the store of the run in `folder`."""
    from tl_helpers.store import FeatureStore

    store_dir = folder / "out" / "model" / "feature_cache"
    (model_folder,) = store_dir.glob("features-*")
    with np.load(model_folder / "index.npz") as data:
        key = json.loads(str(data["meta"]))["key"]
    store = FeatureStore(store_dir)
    located = store.lookup(key, store.digests(paths))
    assert not located.missing, f"{len(located.missing)} images missing in {store_dir}"
    return np.asarray(located.features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared/datasets/flowers128")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/two_workers")
    args = parser.parse_args()
    one, two = args.out / "one_process", args.out / "two_workers"
    configure(one, args.dataset.resolve())
    configure(two, args.dataset.resolve())
    wall_one = run(one, [dict(os.environ)])
    wall_two = run(two, worker_environments(2))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    paths = sorted(str(path) for path in args.dataset.resolve().glob("*/*/*.jpg"))
    difference = np.abs(stored_features(one, paths) - stored_features(two, paths)).max()
    for name, folder, wall in (("one process", one, wall_one), ("two workers", two, wall_two)):
        results = json.loads((folder / "out/evaluation/results.json").read_text())
        print(
            f"{name}: {wall:.1f} s wall, Top-1 {results['top_1_accuracy']:.4f} "
            f"({results['num_correct']}/{results['num_images']})"
        )
    print(f"largest peak RSS of a run: {peak:.0f} MiB")
    print(f"features of {len(paths):,} images: largest difference {difference}")


if __name__ == "__main__":
    main()
