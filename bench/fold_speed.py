"""Training speed of fine-tuning's copy of the base above the cut, with the frozen
BatchNormalization layers kept as layers or folded into their convolutions (not a test).

The default MobileNetV2 (alpha 0.35, 224 px, bundled weights) cut at `block_12_add`; random
activations (the speed of a training step does not depend on the values) of ROWS rows in
memory, batches of BATCH; Adam, sparse cross-entropy, BATCHES_PER_EXECUTION steps per call, as
`train.fine_tune` compiles it. The two copies alternate ROUNDS times in one process, so that
a slower or faster spell of the machine falls on both; each round builds its model, runs one
epoch (tracing) and then times EPOCHS epochs one by one. Prints rows per second per timed epoch.

    .venv/bin/python bench/fold_speed.py [--cut block_12_add] [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cut", default="block_12_add")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    import tensorflow as tf

    import tl_helpers as tl

    keras = tf.keras
    tl.train.setup_tensorflow(0)
    base = tl.model.load_base_model(None, 224, 0.35)
    labels = {f"class{i}": i for i in range(5)}
    classifier = tl.model.build_classifier(base, labels, 224)
    split = tl.finetune.split_for(classifier, args.cut)
    rng = np.random.default_rng(0)
    rows = rng.random((args.rows, split.size), dtype=np.float32)
    ids = rng.integers(0, len(labels), args.rows)
    data = tf.data.Dataset.from_tensor_slices((rows, ids)).batch(args.batch).prefetch(2)

    def frozen_copy(upper: keras.Model) -> keras.Model:
        """The copy before folding: BatchNormalization layers kept, not trainable."""
        copy = keras.models.clone_model(upper)
        copy.set_weights(upper.get_weights())
        for layer in copy.layers:
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        return copy

    folded_copy = tl.finetune.folded_copy
    results: dict[str, list[float]] = {"frozen BatchNormalization": [], "folded": []}
    for _ in range(args.rounds):
        for name, copier in (("frozen BatchNormalization", frozen_copy), ("folded", folded_copy)):
            tl.finetune.folded_copy = copier  # what fine_tune_model builds its copy with
            model = tl.finetune.fine_tune_model(classifier, split)
            model.compile(
                optimizer=keras.optimizers.Adam(1e-4),
                loss="sparse_categorical_crossentropy",
                steps_per_execution=tl.finetune.steps_per_execution(args.rows, args.batch),
            )
            model.fit(data, epochs=1, verbose=0)
            for _ in range(args.epochs):
                start = time.perf_counter()
                model.fit(data, epochs=1, verbose=0)
                results[name].append(args.rows / (time.perf_counter() - start))
            print(name, " ".join(f"{rate:.0f}" for rate in results[name][-args.epochs :]))
    tl.finetune.folded_copy = folded_copy
    summary = {
        name: {"median_rows_per_s": float(np.median(rates)), "rows_per_s": rates}
        for name, rates in results.items()
    }
    print(json.dumps({"cut": args.cut, "batch": args.batch, **summary}, indent=1))


if __name__ == "__main__":
    main()
