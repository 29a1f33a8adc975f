"""Benchmark: this project's pipeline against the classic per-epoch procedure and the floor.

    .venv/bin/python bench/benchmark.py [DATASET] [--epochs 10] [--publish] ...   (make bench)

On one dataset in the spec's layout (default ../shared/datasets/flowers128), with the same
images, backbone (MobileNetV2 alpha 0.35, bundled weights), input_tensor_size, batch_size and
epochs, each variant in its own child process (its peak RSS is its own: `wait4` rusage):

- project:    the notebook itself: its code cells executed in order, each timed and booked to
              a phase; the feature cache in a new empty folder (a first run), or off;
- project_head: the same with "augmentation": "none", "fine_tune": false and
              "label_smoothing": 0: the head alone on the pooled features (the pipeline before
              views, fine-tuning and label smoothing existed);
- project_views: the same with "augmentation": "mirror_crop", "fine_tune_cut": "block_11_add"
              and "fine_tune_epochs": 4, the configuration of the most accurate models
              measured;
- project_2x: the same on a copy of the dataset twice as large, for memory scaling;
- project_quantize: the same with "quantize": true, to time the quantization step's parts
              (MCT, calibration loading, export, quantized evaluation);
- classic:    the per-epoch procedure of the public reference notebook (Keras folder dataset,
              `fit` running the frozen network over every image every epoch, save, reload,
              batch-1 evaluation), class ids mapped to labels.json so Top-1 is comparable;
- floor:      one batched backbone pass over all training and validation images, nothing else;
- baseline:   issue 19's baseline, the product when that issue was filed (report.BASELINE_COMMIT:
              the head-only pipeline): that commit's own code and benchmark, taken from git
              history (`git archive`) and run as its `--variants project`, in the same rounds.

Outputs in bench/out/: benchmark.json (everything), benchmark.md (tables), benchmark.png (time
against epochs, peak memory), one log per variant. --publish copies the table and the chart
to docs/benchmark/. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import (
    BASELINE_COMMIT,
    TITLES,
    VARIANTS,
    VIEWS_SETTINGS,
    markdown_report,
    pipeline_seconds,
    plot_chart,
    summarise,
)
from variants import MB, child_main

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = (REPO.parent / "shared" / "datasets" / "flowers128").resolve()
DEFAULT_OUT = REPO / "bench" / "out"
DOCS_DIR = REPO / "docs" / "benchmark"
NOTEBOOK = REPO / "image_classification.ipynb"
PUBLISHED = REPO / "docs" / "performance.md"
# --publish replaces what docs/performance.md holds between these two lines.
PUBLISH_START = "<!-- benchmark results: start (written by make bench) -->"
PUBLISH_END = "<!-- benchmark results: end -->"
CHART_LINK = "benchmark/benchmark.png"  # relative to docs/performance.md
JPEG_START = b"\xff\xd8"
JPEG_COMMENT = b"\xff\xfe"
ONCE = ("project_quantize", "classic")  # long runs: first round only


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Benchmark this project's pipeline against the per-epoch procedure.",
        epilog="See bench/README.md.",
    )
    parser.add_argument("dataset", nargs="?", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every run (10)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch_size (32)")
    parser.add_argument("--input-size", type=int, default=224, help="input_tensor_size (224)")
    parser.add_argument("--alpha", type=float, default=0.35, help="MobileNetV2 alpha (0.35)")
    parser.add_argument(
        "--epochs-list",
        default="1,5,10,20",
        help="epoch counts of the chart, derived from the measured per-epoch times (1,5,10,20)",
    )
    parser.add_argument(
        "--limit-per-class",
        type=int,
        default=0,
        help="only the first N images (by name) of each class folder, training and validation: "
        "to check the script quickly, not a benchmark",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {','.join(VARIANTS)} (default: all, in that order)",
    )
    parser.add_argument(
        "--feature-cache",
        choices=("empty", "off"),
        default="empty",
        help="project runs: the feature cache on in a new, empty folder, as a user's first run "
        "with the default configuration (empty, the default); or switched off (off)",
    )
    parser.add_argument(
        "--floor-batch-size",
        type=int,
        default=0,
        help="images per batch of the floor's pass (default: tl_helpers' INFERENCE_BATCH_SIZE)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of the floor and project variants, each in a new process and work folder; "
        "the fastest is reported, the others are kept in the JSON (default 1; make bench: 2)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help='a configuration key of the "this project" runs other than head only, for example '
        "--set fine_tune_epochs=2 --set 'augmentation=\"none\"' (not with --publish)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (bench/out)")
    parser.add_argument(
        "--publish", action="store_true", help="copy the table and the chart to docs/benchmark/"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    args = parser.parse_args(argv)
    args.epochs_list = sorted({int(e) for e in args.epochs_list.split(",") if e.strip()})
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if min(args.epochs, args.batch_size, args.repeat, *args.epochs_list) < 1:
        parser.error("--epochs, --batch-size, --repeat, --epochs-list must be >= 1")
    if args.limit_per_class < 0:
        parser.error("--limit-per-class must be >= 0")
    if args.publish and (args.limit_per_class or args.dataset.resolve() != DEFAULT_DATASET):
        parser.error("--publish is for the full default dataset only (no --limit-per-class)")
    if args.publish and args.set:
        parser.error("--publish is for the default configuration only (no --set)")
    args.set = dict(parse_setting(parser, item) for item in args.set)
    if not (args.dataset / "training").is_dir() or not (args.dataset / "labels.json").is_file():
        parser.error(f"{args.dataset}: not a dataset in the spec's layout (training/, labels.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every variant in its own process, then write the JSON, the table and the chart."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    args = parse_args(argv)
    args.out = args.out.resolve()  # the children run in folders of their own
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(f"{machine['cpus']} CPU cores ({machine['cpu_model']}), {machine['memory_gib']} GiB RAM")
    if machine["load_average_before"][0] > 0.5:
        print(
            f"Warning: load average {machine['load_average_before'][0]:.2f}: the machine is "
            "busy, timings will be distorted."
        )
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.out))
    try:
        datasets = prepare_datasets(args, scratch)
        results = run_variants(args, datasets, scratch)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    machine["load_average_after"] = list(os.getloadavg())
    summary = summarise(settings(args), machine, datasets, results)
    write_outputs(summary, args.out, args.publish)
    print("\n" + markdown_report(summary))
    return 0 if all(r.get("ok") for r in results.values()) else 1


def parse_setting(parser: argparse.ArgumentParser, item: str) -> tuple[str, object]:
    """KEY=JSON of --set, as (key, value)."""
    key, equals, text = item.partition("=")
    try:
        if not equals:
            raise ValueError
        return key.strip(), json.loads(text)
    except ValueError:
        parser.error(f"--set {item}: write KEY=JSON, for example fine_tune_epochs=2")
        raise  # not reached: parser.error exits


def settings(args: argparse.Namespace) -> dict:
    """The run's settings and command, for the report."""
    return {
        "command": " ".join(["bench/benchmark.py", *sys.argv[1:]]),
        "dataset": str(args.dataset),
        "limit_per_class": args.limit_per_class,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "input_tensor_size": args.input_size,
        "mobilenet_alpha": args.alpha,
        "epochs_list": args.epochs_list,
        "feature_cache": args.feature_cache,
        "variants": args.variants,
        "repeat": args.repeat,
        "configuration_set": args.set,
    }


def machine_info() -> dict:
    """What the numbers were measured on, and how busy it was."""
    cpu_model, memory_kb = "", 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = (line.split(":", 1)[1].strip() for line in lines if "model name" in line)
        cpu_model = next(models, "")
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model or platform.machine(),
        "memory_gib": round(memory_kb / 1024**2, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average_before": list(os.getloadavg()),
    }


def _git(*args: str) -> str:
    """Output of a git command in the repository ("" without git)."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


# --------------------------------------------------------------------------- datasets


def prepare_datasets(args: argparse.Namespace, scratch: Path) -> dict[str, dict]:
    """The dataset (or its subset) and its doubled copy, with their image counts."""
    base = args.dataset.resolve()
    if args.limit_per_class:
        base = copy_dataset(base, scratch / "dataset", args.limit_per_class, copies=1)
    folders = {"1x": base}
    if "project_2x" in args.variants:
        folders["2x"] = copy_dataset(base, scratch / "dataset_2x", 0, copies=2)
    for folder in folders.values():
        warm_page_cache(folder)
    return {name: {"path": str(path), **count_images(path)} for name, path in folders.items()}


def copy_dataset(source: Path, target: Path, limit: int, copies: int) -> Path:
    """Copy a dataset, `limit` images per class folder (0: all), each image `copies` times.

    Copy k > 0 of an image is named `copy<k>-<name>` and carries a JPEG comment segment: the
    same pixels, other bytes, so that the content-keyed feature cache computes it too.
    """
    for split in ("training", "validation"):
        for class_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            images = sorted(p for p in class_dir.iterdir() if p.is_file())
            destination = target / split / class_dir.name
            destination.mkdir(parents=True, exist_ok=True)
            for image in images[:limit] if limit else images:
                data = image.read_bytes()
                for k in range(copies):
                    name = f"copy{k}-{image.name}" if k else image.name
                    (destination / name).write_bytes(with_comment(data, name) if k else data)
    shutil.copyfile(source / "labels.json", target / "labels.json")
    return target


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The JPEG with a comment (COM) segment after its start marker; decodes to the same pixels."""
    if not jpeg.startswith(JPEG_START):
        return jpeg + text.encode()  # not a JPEG: the project will refuse it either way
    payload = text.encode()[:60000]
    return JPEG_START + JPEG_COMMENT + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def count_images(root: Path) -> dict[str, int]:
    """Files per split of a dataset."""
    return {
        split: sum(1 for p in (root / split).glob("*/*") if p.is_file())
        for split in ("training", "validation")
    }


def warm_page_cache(root: Path) -> None:
    """Read every file once, so that no variant pays (or is spared) the first read from disk."""
    for path in root.rglob("*"):
        if path.is_file():
            path.read_bytes()


# --------------------------------------------------------------------------- child processes


def run_variants(args: argparse.Namespace, datasets: dict, scratch: Path) -> dict[str, dict]:
    """Run every variant in rounds (`--repeat`); keep each variant's fastest run.

    This machine's speed varies between runs minutes apart (the floor's pass has taken 37 s and
    82 s), so the fastest of several runs is the better estimate of what the code costs, and
    the rounds interleave the variants (floor, project, ..., floor, project, ...) so that a
    slow spell does not fall on one variant's runs only. The per-epoch procedure and the
    quantize-on run are long and run in the first round only.
    """
    reports: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for run in range(args.repeat):
        for variant in args.variants:
            if run and variant in ONCE:
                continue
            work = scratch / f"run{run + 1}"
            if variant == "baseline":
                report = run_baseline(args, datasets["1x"]["path"], scratch, work)
            else:
                report = run_child(child_spec(args, variant, datasets, work), work, args.out)
            reports[variant].append({**report, "round": run + 1})
    return {variant: best_run(variant, runs) for variant, runs in reports.items()}


def best_run(variant: str, reports: list[dict]) -> dict:
    """The fastest successful run, with every run's total listed (`repeats`)."""
    ok = [r for r in reports if r.get("ok")]
    if not ok:
        return reports[-1]
    best = min(ok, key=lambda r: pipeline_seconds(variant, r))
    if len(reports) > 1:
        best = {
            **best,
            "repeats": [
                {
                    "round": r["round"],
                    "pipeline_s": pipeline_seconds(variant, r) if r.get("ok") else None,
                    "backbone_s": r.get("phases", {}).get("backbone"),
                    "peak_rss_mb": r["peak_rss_mb"],
                    "process_wall_s": r["process_wall_s"],
                }
                for r in reports
            ],
        }
    return best


def child_spec(args: argparse.Namespace, variant: str, datasets: dict, scratch: Path) -> dict:
    """What a child needs: the variant, the dataset, the settings, a fresh work folder."""
    work = scratch / variant
    work.mkdir(parents=True)
    spec = {
        "variant": variant,
        "work_dir": str(work),
        "dataset": datasets["2x" if variant == "project_2x" else "1x"]["path"],
        "notebook": str(NOTEBOOK),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "input_size": args.input_size,
        "alpha": args.alpha,
        "floor_batch_size": args.floor_batch_size,
        # The project's defaults (configuration_schema.json), used by the other variants too.
        "seed": 0,
        "preprocessing": "minus_one_to_one",
        "learning_rate": 0.001,
    }
    if variant.startswith("project"):
        spec["configuration"] = write_configuration(
            spec,
            args.feature_cache,
            quantize=variant == "project_quantize",
            head_only=variant == "project_head",
            extra={}
            if variant == "project_head"
            else {**(VIEWS_SETTINGS if variant == "project_views" else {}), **args.set},
        )
    return spec


def write_configuration(
    spec: dict,
    cache_mode: str,
    quantize: bool = False,
    head_only: bool = False,
    extra: dict | None = None,
) -> dict:
    """configuration.json in the child's work folder, the feature cache cold or off; with
    `head_only`, no augmented views and no fine-tuning (the head on pooled features alone);
    `extra` keys last (--set)."""
    from tl_helpers import config  # no TensorFlow import

    dataset, work = Path(spec["dataset"]), Path(spec["work_dir"])
    settings = {
        "source_keras_model": "",
        "dataset_training_dir": str(dataset / "training"),
        "dataset_validation_dir": str(dataset / "validation"),
        "evaluate_label_file": str(dataset / "labels.json"),
        "batch_size": spec["batch_size"],
        "input_tensor_size": spec["input_size"],
        "epochs": spec["epochs"],
        "output_dir": str(work / "output" / "model"),
        "evaluate_result_dir": str(work / "output" / "evaluation"),
        "mobilenet_alpha": spec["alpha"],
        "quantize": quantize,
    }
    if head_only:
        settings.update({"augmentation": "none", "fine_tune": False, "label_smoothing": 0})
    settings.update(extra or {})
    settings.update(feature_cache_settings(config.SCHEMA_PATH, cache_mode, work / "feature_cache"))
    (work / "configuration.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return settings


def feature_cache_settings(schema_path: Path, mode: str, folder: Path) -> dict:
    """Values for the feature cache keys this version has: on in an empty folder, or off."""
    properties = json.loads(schema_path.read_text(encoding="utf-8"))["properties"]
    values: dict[str, object] = {}
    for key, prop in properties.items():
        if "cache" in key and prop.get("type") == "boolean":
            values[key] = mode == "empty"
        elif "cache" in key and prop.get("type") == "string":
            values[key] = str(folder)  # not created: the project creates it
    return values


def run_child(spec: dict, scratch: Path, out: Path) -> dict:
    """Run one variant in a child process; return its report with the child's peak RSS."""
    variant = spec["variant"]
    spec_path, result_path = scratch / f"{variant}.spec.json", scratch / f"{variant}.result.json"
    spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    command = [sys.executable, __file__, "--child", str(spec_path), str(result_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    print(f"\n=== {variant}: {TITLES[variant]} ===", flush=True)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    with (out / f"{variant}.log").open("w", encoding="utf-8") as log:
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for line in child.stdout:
            sys.stdout.write(line)
            log.write(line)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    report = {"ok": False}
    if child.returncode == 0 and result_path.is_file():
        report = json.loads(result_path.read_text(encoding="utf-8"))
    report.update(
        exit_code=child.returncode,
        process_wall_s=time.perf_counter() - start,
        peak_rss_mb=usage.ru_maxrss * 1024 / MB,  # ru_maxrss: KiB on Linux
        load_average_1min_before=load_before,
        configuration=spec.get("configuration"),
    )
    print(
        f"=== {variant}: exit status {child.returncode}, {report['process_wall_s']:.1f} s, "
        f"peak RSS {report['peak_rss_mb']:.0f} MB ===",
        flush=True,
    )
    return report


def run_baseline(args: argparse.Namespace, dataset: str, scratch: Path, work: Path) -> dict:
    """Issue 19's baseline: BASELINE_COMMIT's own benchmark, `--variants project`, on the same
    dataset and settings, its code first on `PYTHONPATH`; its report of that run.

    The code comes from this clone's history (`git archive`, once per benchmark); without it
    (no git, a shallow clone) the variant is reported as not run and its targets are skipped.
    """
    print(f"\n=== baseline: {TITLES['baseline']} ===", flush=True)
    code = scratch / "baseline-code"
    if not code.is_dir():
        code.mkdir()
        try:
            archive = subprocess.run(
                ["git", "archive", "--format=tar", BASELINE_COMMIT],
                cwd=REPO,
                capture_output=True,
                check=True,
                timeout=120,
            )
            subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
        except (OSError, subprocess.SubprocessError) as err:
            shutil.rmtree(code, ignore_errors=True)
            print(f"=== baseline: not run: commit {BASELINE_COMMIT} not readable here ({err}) ===")
            return {"ok": False, "error": f"git archive {BASELINE_COMMIT} failed"}
    out = work / "baseline-out"
    command = [
        sys.executable,
        str(code / "bench" / "benchmark.py"),
        dataset,
        "--variants",
        "project",
        "--repeat",
        "1",
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--input-size",
        str(args.input_size),
        "--alpha",
        str(args.alpha),
        "--out",
        str(out),
    ]
    path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    with (args.out / "baseline.log").open("w", encoding="utf-8") as log:
        done = subprocess.run(
            command, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        )
    result = out / "benchmark.json"
    report = {"ok": False, "exit_code": done.returncode}
    if done.returncode == 0 and result.is_file():
        report = json.loads(result.read_text(encoding="utf-8"))["variants"]["project"]
    status = f"{report['total_s']:.1f} s" if report.get("ok") else "failed"
    log = args.out / "baseline.log"
    print(f"=== baseline: exit status {done.returncode}, {status}; log {log} ===", flush=True)
    return {**report, "commit": BASELINE_COMMIT}


def write_outputs(summary: dict, out: Path, publish: bool) -> None:
    """benchmark.json, .md and .png in `out`; with `publish`, the table and chart in docs/."""
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "benchmark.md").write_text(markdown_report(summary) + "\n", encoding="utf-8")
    chart = plot_chart(summary, out / "benchmark.png")
    print(f"\nWrote {out}/benchmark.json, benchmark.md" + (", benchmark.png" if chart else ""))
    if publish:
        DOCS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "benchmark.md", DOCS_DIR / "benchmark.md")
        if chart:
            shutil.copyfile(chart, DOCS_DIR / "benchmark.png")
        print(f"Published benchmark.md and benchmark.png to {DOCS_DIR}")
        chart_line = f"![Time against epochs; peak memory]({CHART_LINK})\n\n" if chart else ""
        if replace_readme_block(chart_line + markdown_report(summary)):
            print(f"Updated the benchmark results in {PUBLISHED.name}")
        else:
            print(f"{PUBLISHED.name} has no '{PUBLISH_START}' line: paste benchmark.md there.")


def replace_readme_block(table: str) -> bool:
    """Put the table between docs/performance.md's benchmark marker lines (False: no markers)."""
    text = PUBLISHED.read_text(encoding="utf-8")
    start, end = text.find(PUBLISH_START), text.find(PUBLISH_END)
    if start < 0 or end < start:
        return False
    text = text[: start + len(PUBLISH_START)] + "\n\n" + table + "\n\n" + text[end:]
    temporary = PUBLISHED.with_name(f".{PUBLISHED.name}.bench-tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, PUBLISHED)
    return True


if __name__ == "__main__":
    sys.exit(main())
