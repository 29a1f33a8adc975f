"""Run the converted classifier on a Raspberry Pi AI Camera and print its top classes.

Copied by the notebook's conversion step into output_dir/imx500/ as `classify.py`. On the Pi
(Raspberry Pi OS with the `imx500-all` and `python3-picamera2` packages):

    imx500-package -i packerOut.zip -o out     # gives out/network.rpk
    python3 classify.py --model out/network.rpk

It reads `labels.txt` (line number = class id; "-" marks an id no class has) and
`intrinsics.json` from its own folder unless told otherwise, and prints one line per frame:
the top classes and their scores. The network ends in softmax, so its outputs are already
probabilities. `--scores FILE` classifies a recorded output vector (a JSON list) instead of
the camera, which needs no Pi. This file uses only the standard library, numpy and picamera2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNUSED_LABEL = "-"  # picamera2's convention for an id no class has


def read_labels(path: str | Path) -> list[str]:
    """Class names by class id, from labels.txt (one per line)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SystemExit(f"{path} holds no labels: one class name per line, line = class id.")
    return [line.strip() for line in lines]


def top_classes(scores, labels: list[str], k: int = 3) -> list[tuple[str, float]]:
    """The k highest-scoring classes as (label, score), best first, ids without a class skipped."""
    values = [float(value) for value in scores]
    if len(values) != len(labels):
        raise SystemExit(
            f"The network gives {len(values)} scores but labels.txt has {len(labels)} lines: "
            "use the labels.txt written beside this network's packerOut.zip."
        )
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    named = [(labels[i], values[i]) for i in order if labels[i] != UNUSED_LABEL]
    return named[: max(k, 1)]


def format_top(top: list[tuple[str, float]]) -> str:
    """One line: "shoes 0.91 | hat 0.05 | shirt 0.02"."""
    return " | ".join(f"{label} {score:.2f}" for label, score in top)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="network.rpk made by imx500-package")
    parser.add_argument("--labels", type=Path, default=HERE / "labels.txt")
    parser.add_argument("--intrinsics", type=Path, default=HERE / "intrinsics.json")
    parser.add_argument("--top", type=int, default=3, help="classes printed per frame")
    parser.add_argument("--frames", type=int, default=0, help="stop after N frames (0: never)")
    parser.add_argument("--scores", type=Path, help="classify a recorded output vector (JSON)")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be 1 or more")
    if args.scores is None and args.model is None:
        parser.error("give --model network.rpk (on the Pi) or --scores FILE (a recorded output)")
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model} not found: run imx500-package -i packerOut.zip first")
    return args


def run_camera(model: Path, labels: list[str], intrinsics: dict, top: int, frames: int) -> None:
    """Load the network onto the IMX500 and print the top classes of each frame."""
    from picamera2 import Picamera2
    from picamera2.devices import IMX500
    from picamera2.devices.imx500 import NetworkIntrinsics

    imx500 = IMX500(str(model))
    network = imx500.network_intrinsics or NetworkIntrinsics(intrinsics)
    network.update_with_defaults()
    camera = Picamera2(imx500.camera_num)
    config = camera.create_preview_configuration(
        controls={"FrameRate": network.inference_rate}, buffer_count=12
    )
    imx500.show_network_fw_progress_bar()
    camera.start(config, show_preview=False)
    shown = 0
    try:
        while frames == 0 or shown < frames:
            outputs = imx500.get_outputs(camera.capture_metadata())
            if outputs is None:  # the network is still loading
                time.sleep(0.05)
                continue
            print(format_top(top_classes(outputs[0], labels, top)), flush=True)
            shown += 1
    finally:
        camera.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = read_labels(args.labels)
    if args.scores is not None:
        scores = json.loads(args.scores.read_text(encoding="utf-8"))
        print(format_top(top_classes(scores, labels, args.top)))
        return 0
    intrinsics = (
        json.loads(args.intrinsics.read_text(encoding="utf-8"))
        if args.intrinsics.is_file()
        else {"task": "classification", "classes": {"labels": labels}}
    )
    run_camera(args.model, labels, intrinsics, args.top, args.frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
