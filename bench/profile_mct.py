"""Where MCT's post-training quantization spends its time (cProfile; not a test).

    .venv/bin/python bench/profile_mct.py [--dataset clothing10] [--images 100]

Trains the float classifier as bench/calibration.py does (feature cache in bench/out), then
profiles one `tl_helpers.quantize.quantize_model` call and prints the functions with the most
cumulative and own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from calibration import ROOT, float_classifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="clothing10")
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    import tl_helpers as tl

    out = ROOT / "bench" / "out" / "calibration"
    classifier, _, train, _, _ = float_classifier(args.dataset, 10, out / "cache")
    paths = tl.calibration.calibration_paths(train, 50, max(1, args.images // 50), 0)
    data = tl.calibration.CalibrationData(paths, 224, 50)
    tl.quantize.mct()  # the import is not what is profiled
    profile = cProfile.Profile()
    profile.enable()
    tl.quantize.quantize_model(classifier, data)
    profile.disable()
    stats = pstats.Stats(profile).strip_dirs()
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
