"""Every model the notebook writes with quantization on converts for the IMX500 (not a test).

Runs the whole notebook headless, quantization and conversion on, for each case and prints
Top-1 (float, quantized .keras, int8 .tflite), the conversion's seconds and the memory report:

- flowers128 and clothing10 (../shared/datasets) at 224 px with the bundled MobileNetV2;
- a user-supplied .h5 base model: Keras's whole MobileNetV2 alpha 0.35 (ImageNet base weights,
  an untrained 1000-class top that remove_top_layer_if_needed() strips) on samples/clothing5.

    .venv/bin/python bench/convert_check.py [--cases flowers128 clothing10 user_h5]
    .venv/bin/python bench/convert_check.py --cases flowers128 clothing10 \
        --set 'augmentation="mirror_crop"' --set 'fine_tune_cut="block_11_add"' \
        --set fine_tune_epochs=4 --out bench/out/convert_check_accurate

Results in OUT/<case>/ (default bench/out/convert_check: the executed notebook,
results.json, imx500/). `--set KEY=JSON` adds a configuration key to every case.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmark import parse_setting  # beside this

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
OUT = ROOT / "bench" / "out" / "convert_check"


def dataset_config(root: Path) -> dict:
    return {
        "dataset_training_dir": str(root / "training"),
        "dataset_validation_dir": str(root / "validation"),
        "evaluate_label_file": str(root / "labels.json"),
    }


def user_h5(folder: Path) -> Path:
    """A whole Keras MobileNetV2 (with its top) saved as .h5, as a user would bring one."""
    import tensorflow as tf

    from tl_helpers.model import BUNDLED_WEIGHTS

    model = tf.keras.applications.MobileNetV2(alpha=0.35, include_top=True, weights=None)
    model.load_weights(str(BUNDLED_WEIGHTS), by_name=True)
    path = folder / "mobilenet_v2_035_with_top.h5"
    model.save(path)
    return path


def run_case(name: str, out: Path = OUT, settings: dict | None = None) -> dict:
    from tl_helpers.run_notebook import run_notebook

    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = {
        "source_keras_model": "",
        "batch_size": 32,
        "input_tensor_size": 224,
        "epochs": 10,
        "output_dir": "output/model",
        "evaluate_result_dir": "output/evaluation",
        "mobilenet_alpha": 0.35,
        "quantize": True,
    }
    if name == "user_h5":
        config |= dataset_config(ROOT / "samples" / "clothing5")
        config["source_keras_model"] = str(user_h5(folder))
    else:
        config |= dataset_config(DATASETS / name)
    config |= settings or {}
    (folder / "configuration.json").write_text(json.dumps(config, indent=2))
    start = time.perf_counter()
    run_notebook(ROOT / "image_classification.ipynb", folder / "executed.ipynb", cwd=folder)
    seconds = time.perf_counter() - start
    results = json.loads((folder / "output" / "evaluation" / "results.json").read_text())
    conversion = results["imx500_conversion"]
    return {
        "case": name,
        "settings": settings or {},
        "notebook_seconds": round(seconds, 1),
        "top_1": results["top_1_accuracy"],
        "quantized_keras_top_1": results["quantized_keras_top_1_accuracy"],
        "quantized_tflite_top_1": results["quantized_tflite_top_1_accuracy"],
        "quantization_seconds": results["quantization"]["quantization_seconds"],
        "conversion_ran": conversion["ran"],
        "conversion_seconds": conversion.get("seconds"),
        "memory_usage_bytes": (conversion.get("memory") or {}).get("usage_bytes"),
        "fits_in_chip": conversion.get("fits_in_chip"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["flowers128", "clothing10", "user_h5"])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a configuration key for every case, e.g. --set fine_tune_epochs=4",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    args = parser.parse_args()
    settings = dict(parse_setting(parser, item) for item in args.set)
    rows = []
    for name in args.cases:
        rows.append(run_case(name, args.out.resolve(), settings))
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "convert_check.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
