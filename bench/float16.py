"""Top-1 of head training and fine-tuning on float32 vs float16-rounded training activations
(not a test): what storing training rows as float16 in the feature store costs.

Reads the activations of the default configuration (mirror_crop views, cut block_12_add) from
bench/finetune.py's feature store (float32 entries, written before the store kept training
rows as float16; run `bench/finetune.py --settings mirror_crop` first on an empty OUT to make
them), then, for each seed, trains the head (10 epochs) and fine-tunes (5 epochs, Adam 3e-4,
cosine) once on the activations as stored and once on the same activations rounded to
float16. Validation rows are float32 both times, as the store keeps them.

    .venv/bin/python bench/float16.py flowers128
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from augmentation import load_sets, top1  # beside this

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import tl_helpers as tl

    name = sys.argv[1] if len(sys.argv) > 1 else "flowers128"
    labels, train, validation = load_sets(name)
    tl.train.setup_tensorflow(0)
    base = tl.model.load_base_model("", 224, 0.35)
    original = base.get_weights()
    classifier = tl.model.build_classifier(base, labels, 224)
    features = tl.train.compute_features(
        classifier,
        train,
        validation,
        224,
        cache_dir=ROOT / "bench" / "out" / "finetune" / "feature_cache" / name,
        views=tl.augment.views_of("mirror_crop"),
        fine_tune_cut="block_12_add",
    )
    as_stored = np.asarray(features.train_activations)
    if as_stored.dtype != np.float32 or np.array_equal(as_stored, as_stored.astype(np.float16)):
        sys.exit("The store's training activations are float16 already: see the docstring.")
    rounded = as_stored.astype(np.float16).astype(np.float32)
    print(f"largest change by rounding: {np.abs(as_stored - rounded).max():.3g}")
    validation_activations = np.asarray(features.validation_activations)
    for mode, activations in (("float32", as_stored), ("float16", rounded)):
        for seed in (0, 1):
            base.set_weights(original)
            features.train_activations = activations
            features.train = tl.finetune.pooled_features(features.split, activations)
            features.validation_activations = validation_activations
            features.validation = tl.finetune.pooled_features(
                features.split, validation_activations
            )
            tl.train.setup_tensorflow(seed)
            tl.train.train_head(classifier, features, 10, 32, verbose=0)
            head = top1(classifier, features)
            tl.train.fine_tune(classifier, features, 5, 32, 3e-4, verbose=0)
            row = {"dataset": name, "training_rows": mode, "seed": seed, "head_top1": head}
            print(json.dumps(row | {"fine_tuned_top1": top1(classifier, features)}), flush=True)


if __name__ == "__main__":
    main()
