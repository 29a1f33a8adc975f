"""One run of the notebook's steps in a fresh process, for tests/test_distribute.py.

    python tests/distributed_run.py FOLDER RESULT.json [--logical-cpus N]

FOLDER holds configuration.json (tests/conftest.write_config) and the data it names. The run
follows the notebook's calls: choose the distribution, compute the features (the feature store
in the configuration; with "quantize", fine-tuning's rows through the MCT-quantized lower
part), train the head, fine-tune (when the configuration names a cut), and
save the model and results where the configuration,
as `distribute.for_this_worker` leaves it, says. RESULT.json (a test artefact, written by
every process) gets the features, Top-1 and where the outputs went. With `--logical-cpus N`,
the CPU is split into N logical devices before TensorFlow starts, standing in for N GPUs.
A fresh process is needed because devices and collectives are fixed when TensorFlow starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--logical-cpus", type=int, default=0)
    parser.add_argument(
        "--die-after-features", action="store_true", help="stand in for a lost worker"
    )
    args = parser.parse_args()

    import tensorflow as tf

    devices: list[str] = []
    if args.logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus
        )
        devices = [f"/cpu:{number}" for number in range(args.logical_cpus)]

    from conftest import tiny_base_model

    from tl_helpers import config, dataset, distribute, evaluate, export, model, quantize, train

    cfg = config.load_configuration(args.folder / "configuration.json")
    train.setup_tensorflow(cfg.seed)
    distribution = distribute.choose_distribution(cfg.backbone_batch_size, devices)
    cfg = distribute.for_this_worker(cfg, distribution)
    labels = dataset.read_labels(cfg.evaluate_label_file)
    train_set = dataset.scan_image_folder(cfg.dataset_training_dir, labels)
    val_set = dataset.scan_image_folder(cfg.dataset_validation_dir, labels, role="validation")
    classifier = model.build_classifier(
        tiny_base_model(cfg.input_tensor_size), labels, cfg.input_tensor_size
    )
    features = train.compute_features(
        classifier,
        train_set,
        val_set,
        cfg.input_tensor_size,
        cache_dir=cfg.feature_cache_dir,
        distribution=distribution,
        fine_tune_cut=cfg.fine_tune_cut if cfg.fine_tune else None,
        quantization=quantize.lower_quantization(train_set, cfg),
    )
    if args.die_after_features:
        os._exit(3)  # as a machine that goes away: no clean-up, no goodbye to the others
    # The features as the pass gave them (fine-tuning recomputes the validation ones).
    train_features = np.asarray(features.train).tolist()
    validation_features = np.asarray(features.validation).tolist()
    history = train.train_head(
        classifier,
        features,
        cfg.epochs,
        cfg.batch_size,
        cfg.learning_rate,
        verbose=0,
        distribution=distribution,
        label_smoothing=cfg.label_smoothing,
    )
    tuned = train.fine_tune(
        classifier,
        features,
        cfg.fine_tune_epochs,
        cfg.batch_size,
        cfg.fine_tune_learning_rate,
        verbose=0,
        distribution=distribution,
        label_smoothing=cfg.label_smoothing,
    )
    model_dir = export.save_model(classifier, cfg.output_dir, labels)
    results = evaluate.evaluate_saved_model(model_dir, val_set, cfg.input_tensor_size)
    evaluate.save_results(results, cfg.evaluate_result_dir)
    report = {
        "replicas": distribution.replicas,
        "worker_index": distribution.worker_index,
        "is_chief": distribution.is_chief,
        "output_dir": str(cfg.output_dir),
        "train_features": train_features,
        "validation_features": validation_features,
        "final_loss": history.history["loss"][-1],
        "fine_tune_final_loss": tuned.history["loss"][-1] if tuned else None,
        "train_activations": np.asarray(features.train_activations).tolist()
        if features.split
        else None,
        "top_1": results["top_1_accuracy"],
    }
    args.result.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
