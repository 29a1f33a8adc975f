"""The benchmark's summary: derived time-against-epochs curves, targets, markdown, PNG chart."""

from __future__ import annotations

import statistics
from pathlib import Path

VARIANTS = (
    "floor",
    "baseline",
    "project_head",
    "project",
    "project_views",
    "project_2x",
    "project_quantize",
    "classic",
)
# project_views: the configuration of the most accurate models measured (README, "Performance").
VIEWS_SETTINGS = {
    "augmentation": "mirror_crop",
    "fine_tune_cut": "block_11_add",
    "fine_tune_epochs": 4,
}
# Issue 19 sets its targets against the product as it was when the issue was filed ("today's"):
# the head-only pipeline of this commit, whose `make bench` of 2026-11-26 measured 66.1 s,
# Top-1 0.7306 and 1097 MB. The "baseline" variant runs that commit's own benchmark again, on
# the same machine in the same rounds, so the ratios compare code, not machines or days.
BASELINE_COMMIT = "5a1ce37"
# Issue 19's fine-tuning option: flowers128 Top-1 at least 0.775 (4.5 points above the baseline's
# 0.7306) within 6x the baseline's first run.
VIEWS_TOP_1 = 0.775
# The head-only pipeline's peak memory in the benchmark of 2026-11-26 (AMD EPYC, 2 cores), before
# views and fine-tuning: the default run must not use more (issue 19).
HEAD_ONLY_PEAK_MB = 1097
TITLES = {
    "baseline": f"issue 19's baseline (commit {BASELINE_COMMIT}, head only)",
    "project_head": "this project, head only",
    "project": "this project",
    "project_views": "this project, most accurate (views, cut block_11_add, 4 epochs)",
    "project_2x": "this project, 2x dataset",
    "project_quantize": "this project, quantize on",
    "classic": "per-epoch procedure",
    "floor": "floor (one backbone pass)",
}
BAR_LABELS = {
    "floor": "floor",
    "baseline": "issue 19\nbaseline",
    "project_head": "head\nonly",
    "project": "default",
    "project_views": "most\naccurate",
    "project_2x": "2x\ndataset",
    "project_quantize": "quantize\non",
    "classic": "per-epoch\nprocedure",
}
# The pipeline's phases (configuration through results.json), in order, with table titles.
PIPELINE = (
    ("config", "configuration + TensorFlow setup"),
    ("scan", "data scan"),
    ("model", "base model + classifier"),
    ("backbone", "backbone pass (features; floor)"),
    ("training", "training (fit)"),
    ("fine-tuning", "fine-tuning (fit)"),
    ("save", "save SavedModel"),
    ("reload", "reload SavedModel"),
    ("evaluation", "evaluation"),
    ("results", "write results.json"),
)
# Notebook cells outside the pipeline: shown, not counted in the pipeline total.
EXTRA = (
    ("figures", "notebook figures (not in total)"),
    ("quantization", "quantization (not in total)"),
    ("other", "other cells (not in total)"),
)


def time_for_epochs(total: float, epoch_seconds: list[float], epochs: int) -> float:
    """A run's total time for `epochs` epochs, from its measured total and epoch times."""
    fixed = total - sum(epoch_seconds)
    measured = len(epoch_seconds)
    if epochs <= measured:
        return fixed + sum(epoch_seconds[:epochs])
    later = epoch_seconds[1:] or epoch_seconds
    return fixed + sum(epoch_seconds) + (epochs - measured) * statistics.fmean(later)


def chart_epochs(settings: dict) -> list[int]:
    """The epoch counts of the chart and tables: the asked ones and the measured one."""
    return sorted({*settings["epochs_list"], settings["epochs"]})


def pipeline_seconds(variant: str, report: dict) -> float:
    """Configuration through results.json, imports not counted; the floor: its pass alone."""
    if variant == "floor":
        return report["phases"]["backbone"]
    return sum(report["phases"].get(name, 0.0) for name, _ in PIPELINE)


def summarise(settings: dict, machine: dict, datasets: dict, results: dict) -> dict:
    """Everything measured, plus the derived curves and the issue's targets."""
    variants = {}
    for variant, report in results.items():
        if report.get("ok"):
            report = {**report, "total_s": pipeline_seconds(variant, report)}
            if report.get("epoch_s"):
                report["time_by_epochs_s"] = {
                    str(e): time_for_epochs(report["total_s"], report["epoch_s"], e)
                    for e in chart_epochs(settings)
                }
        variants[variant] = report
    summary = {"settings": settings, "datasets": datasets, "machine": machine}
    summary["variants"] = variants
    summary["targets"] = check_targets(summary)
    return summary


def check_targets(summary: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it holds."""
    v = {k: r for k, r in summary["variants"].items() if r.get("ok")}
    epochs = summary["settings"]["epochs"]
    targets = []

    def add(target: str, measured: str, holds: bool) -> None:
        targets.append({"target": target, "measured": measured, "holds": bool(holds)})

    # The head-only pipeline (no views, no fine-tuning) does the floor's work plus training the
    # head: the 1.3x and 6x targets are its own; the default does more and has its own targets.
    lean = "project_head" if "project_head" in v else "project"
    lean_title = " (head only)" if lean == "project_head" else ""
    if lean in v and "floor" in v:
        # Separate processes minutes apart can run at different speeds on this machine, so the
        # ratio is also given against the project's own backbone pass (same process, same
        # work as the floor's pass plus hashing) and round by round; all must hold.
        project, floor = v[lean], v["floor"]
        ratio = project["total_s"] / floor["total_s"]
        own = project["total_s"] / project["phases"]["backbone"]
        rounds = round_ratios(project, floor)
        shown = f"{ratio:.2f}x (fastest runs); {own:.2f}x the project's own pass"
        if rounds:
            shown += "; by round: " + ", ".join(f"{r:.2f}x" for r in rounds)
        add(
            f"pipeline total within 1.3x the floor{lean_title}",
            shown,
            max([ratio, own, *rounds]) <= 1.3,
        )
    if lean in v and "classic" in v:
        speedup = v["classic"]["total_s"] / v[lean]["total_s"]
        add(
            f"6x faster than per-epoch at {epochs} epochs{lean_title}",
            f"{speedup:.1f}x",
            speedup >= 6,
        )
    # Issue 19's targets, against the product when the issue was filed (the baseline); then,
    # stricter than the issue, against today's head only, which the passes on TFLite made
    # faster than the baseline: those ratios measure only what views and fine-tuning add.
    references = (
        ("baseline", "", "issue 19's baseline"),
        ("project_head", "stricter: ", "this project's head only"),
    )
    for reference, prefix, name in references:
        if reference not in v:
            continue
        base = v[reference]
        if "project" in v:
            default = v["project"]
            ratio = default["total_s"] / base["total_s"]
            add(f"{prefix}default first run at most 3x {name}", f"{ratio:.2f}x", ratio <= 3)
            gain = default["top_1"] - base["top_1"]
            add(
                f"{prefix}default Top-1 at least 2 points above {name}",
                f"{default['top_1']:.4f} vs {base['top_1']:.4f} ({100 * gain:+.1f} points)",
                gain >= 0.02,
            )
        if "project_views" in v:
            views = v["project_views"]
            ratio = views["total_s"] / base["total_s"]
            add(
                f"{prefix}most accurate setting: Top-1 at least {VIEWS_TOP_1} within 6x {name}",
                f"{views['top_1']:.4f} in {ratio:.2f}x",
                views["top_1"] >= VIEWS_TOP_1 and ratio <= 6,
            )
    if "project" in v and "classic" in v:
        speedup = v["classic"]["total_s"] / v["project"]["total_s"]
        if "project_head" in v:
            add(
                f"default at least 3x faster than per-epoch at {epochs} epochs",
                f"{speedup:.1f}x",
                speedup >= 3,
            )
        ours = v["project"].get("time_by_epochs_s", {})
        theirs = v["classic"].get("time_by_epochs_s", {})
        gaps = {e: theirs[e] / ours[e] for e in ours if e in theirs}
        if gaps:
            ratios = list(gaps.values())
            grows = all(b >= a for a, b in zip(ratios, ratios[1:], strict=False))
            shown = ", ".join(f"{e}: {g:.1f}x" for e, g in gaps.items())
            add("the gap grows with epochs (derived)", shown, grows)
        ours_top, theirs_top = v["project"]["top_1"], v["classic"]["top_1"]
        add(
            "Top-1 at least the per-epoch one",
            f"{ours_top:.4f} vs {theirs_top:.4f}",
            ours_top >= theirs_top,
        )
    if "project" in v:
        peak = v["project"]["peak_rss_mb"]
        add("peak memory under 1.5 GB", f"{peak:.0f} MB", peak < 1500)
        if "project_head" in v or "baseline" in v:
            others = [
                f"{TITLES[name].split(' (')[0]}: {v[name]['peak_rss_mb']:.0f} MB"
                for name in ("baseline", "project_head")
                if name in v
            ]
            add(
                f"default's peak memory at most issue 19's baseline's of 2026-11-26 "
                f"({HEAD_ONLY_PEAK_MB} MB)",
                f"{peak:.0f} MB (in this run, {'; '.join(others)})",
                peak <= HEAD_ONLY_PEAK_MB,
            )
    if "project" in v and "project_2x" in v:
        growth = v["project_2x"]["peak_rss_mb"] / v["project"]["peak_rss_mb"] - 1
        add("peak memory within 10% when the dataset doubles", f"{growth:+.1%}", growth <= 0.1)
    q = v.get("project_quantize", {}).get("quantization")
    if q:
        images, given = q["calibration_images"], q["calibration_images_given_to_mct"]
        add(
            "quantization: one pass over the calibration images plus MCT's work",
            f"{q['calibration_images_decoded']} of {images} calibration images decoded, "
            f"{given} given to MCT",
            q["calibration_images_decoded"] == images
            and given <= images + q["calibration_batch_size"],
        )
    return targets


def round_ratios(project: dict, floor: dict) -> list[float]:
    """Project total / floor pass for each round in which both ran (`--repeat` > 1)."""
    floors = {r["round"]: r["pipeline_s"] for r in floor.get("repeats", []) if r["pipeline_s"]}
    return [
        r["pipeline_s"] / floors[r["round"]]
        for r in project.get("repeats", [])
        if r["pipeline_s"] and r["round"] in floors
    ]


def _cell(value: float | None, fmt: str = "{:.1f}") -> str:
    """A table cell: the formatted value, or a dash."""
    return "–" if value is None else fmt.format(value)


def markdown_report(summary: dict) -> str:
    """The markdown tables: settings, phases per variant, the derived curves, the targets."""
    s, m, d = summary["settings"], summary["machine"], summary["datasets"]["1x"]
    ok = {k: r for k, r in summary["variants"].items() if r.get("ok")}
    columns = [v for v in VARIANTS if v in ok]
    subset = f" (first {s['limit_per_class']} per class)" if s["limit_per_class"] else ""
    lines = [
        f"Dataset `{Path(s['dataset']).name}`{subset}: {d['training']:,} training + "
        f"{d['validation']:,} validation images; input {s['input_tensor_size']}, MobileNetV2 "
        f"alpha {s['mobilenet_alpha']}, batch_size {s['batch_size']}, {s['epochs']} epochs; "
        f"feature cache {s['feature_cache']}.  ",
        f"Machine: {m['cpus']} CPU cores ({m['cpu_model']}), {m['memory_gib']} GiB RAM; load "
        f"average {m['load_average_before'][0]:.2f} before, {m['load_average_after'][0]:.2f} "
        f"after. {m['date_utc']}, commit {m['git_commit'] or 'unknown (not run in a git checkout)'}"
        + (" + uncommitted changes" if m["git_dirty"] else "")
        + ".  ",
        f"Command: `{s['command']}`"
        + (
            f"; the variants ran in {s['repeat']} interleaved rounds (the per-epoch procedure and "
            "the quantize-on run in the first only), each run in a new process and folder, and "
            "the fastest run of each is shown (all runs are in the JSON)"
            if s.get("repeat", 1) > 1
            else ""
        ),
        "",
        "| wall seconds | " + " | ".join(TITLES[c] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, title in PIPELINE:
        # The floor's total is its pass alone: its other phases are in the JSON only.
        cells = [
            _cell(ok[c]["phases"].get(name) if c != "floor" or name == "backbone" else None)
            for c in columns
        ]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    rows = [
        ("**pipeline total** (floor: its pass)", lambda r: _cell(r["total_s"], "**{:.1f}**")),
        *[
            (title, lambda r, n=name: _cell(r["phases"].get(n)))
            for name, title in EXTRA
            if any(name in ok[c]["phases"] for c in columns)
        ],
        ("Python + TensorFlow import", lambda r: _cell(r["phases"].get("import"))),
        ("process CPU seconds (all phases)", lambda r: _cell(sum(r["cpu_phases"].values()))),
        ("backbone images/s", lambda r: _cell(r.get("backbone_images_per_s"))),
        ("backbone runs per image", lambda r: _cell(r.get("backbone_passes"), "{:.2f}")),
        ("peak RSS (MB)", lambda r: _cell(r["peak_rss_mb"], "{:.0f}")),
        ("Top-1", lambda r: _cell(r.get("top_1"), "{:.4f}")),
    ]
    for title, show in rows:
        lines.append(f"| {title} | " + " | ".join(show(ok[c]) for c in columns) + " |")
    lines += _curve_table(summary, ok)
    lines += _quantization_table(ok)
    if summary["targets"]:
        lines += ["", "| target | measured | holds |", "|---|---|---|"]
        for t in summary["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['holds'] else 'NO'} |")
    return "\n".join(lines)


def _curve_table(summary: dict, ok: dict) -> list[str]:
    """Markdown lines of the time-against-epochs table (empty when nothing to show)."""
    s = summary["settings"]
    curves = [
        c
        for c in ("baseline", "project_head", "project", "project_views", "classic")
        if "time_by_epochs_s" in ok.get(c, {})
    ]
    if not curves:
        return []
    floor = ["floor"] if "floor" in ok else []
    lines = [
        "",
        f"Pipeline time against epochs (seconds). Only the {s['epochs']}-epoch runs were "
        "measured; the other points are derived from their per-epoch wall times (Keras "
        "callback): the measured epochs, plus the mean of epochs 2.. for each further epoch.",
        "",
        "| epochs | " + " | ".join(TITLES[c] for c in curves + floor) + " |",
        "|---:|" + "---:|" * len(curves + floor),
    ]
    for e in chart_epochs(s):
        cells = [_cell(ok[c]["time_by_epochs_s"][str(e)]) for c in curves]
        cells += [_cell(ok["floor"]["total_s"])] if floor else []
        mark = " (measured)" if e == s["epochs"] else ""
        lines.append(f"| {e}{mark} | " + " | ".join(cells) + " |")
    return lines


def _quantization_table(ok: dict) -> list[str]:
    """Markdown lines of the quantization step's parts (empty without a quantize-on run)."""
    q = ok.get("project_quantize", {}).get("quantization")
    if not q:
        return []
    images, floor_rate = q["calibration_images"], ok.get("floor", {}).get("backbone_images_per_s")
    one_pass = f"{images / floor_rate:.1f}" if floor_rate else "–"
    top = q["top_1"]
    rows = [
        ("calibration images (training set, seeded sample)", f"{images}"),
        (
            "calibration images decoded / given to MCT",
            f"{q['calibration_images_decoded']} / {q['calibration_images_given_to_mct']} "
            "(MCT reads the first batch twice; it is decoded once)",
        ),
        ("import MCT", f"{q['mct_import_s']:.1f}"),
        (
            "MCT waiting for calibration images (decoded in parallel with its work)",
            f"{q['calibration_loading_s']:.1f}",
        ),
        (
            "MCT post-training quantization (statistics, thresholds)",
            f"{q['mct_quantization_s']:.1f}",
        ),
        ("for scale: one backbone pass over them at the floor's rate", one_pass),
        ("export (.keras for the IMX500 converter, int8 .tflite)", f"{q['export_s']:.1f}"),
        (
            f"Top-1 of both quantized models on {q['validation_images']} validation images",
            f"{q['evaluation_s']:.1f}",
        ),
        (
            "Top-1 float / quantized .keras / int8 .tflite",
            f"{top['float']:.4f} / {top['quantized_keras']:.4f} / {top['quantized_tflite']:.4f}",
        ),
    ]
    lines = [
        "",
        f"Quantization step of the quantize-on run ({q['tool']}, IMX500 TPC "
        f"{q['tpc_version']}, batches of {q['calibration_batch_size']}); wall seconds:",
        "",
        "| part | seconds / value |",
        "|---|---:|",
    ]
    lines += [f"| {title} | {value} |" for title, value in rows]
    return lines


def plot_chart(summary: dict, path: Path) -> Path | None:
    """Time against epochs (project, per-epoch, floor line) and peak memory per variant."""
    ok = {k: r for k, r in summary["variants"].items() if r.get("ok")}
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, m, d = summary["settings"], summary["machine"], summary["datasets"]["1x"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=(3, 2))
    colours = {
        "baseline": "tab:brown",
        "project_head": "tab:green",
        "project": "tab:blue",
        "project_views": "tab:olive",
        "project_2x": "tab:cyan",
        "project_quantize": "tab:purple",
        "classic": "tab:red",
    }
    for variant in ("baseline", "project_head", "project", "project_views", "classic"):
        curve = ok.get(variant, {}).get("time_by_epochs_s")
        if curve:
            epochs = [int(e) for e in curve]
            left.plot(epochs, list(curve.values()), "o-", color=colours[variant])
            left.plot([], [], "o-", color=colours[variant], label=TITLES[variant])
            left.plot([s["epochs"]], [ok[variant]["total_s"]], "ko", markersize=4)
    if "floor" in ok:
        left.axhline(ok["floor"]["total_s"], color="gray", linestyle="--", label=TITLES["floor"])
    left.set_xlabel("epochs")
    left.set_ylabel("seconds, configuration through results.json")
    left.set_xticks(chart_epochs(s))
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(
        fontsize=8,
        title=f"black dots: measured ({s['epochs']} epochs); the rest derived",
        title_fontsize=8,
    )
    left.set_title("Time against epochs", fontsize=10)
    names = [v for v in VARIANTS if v in ok]
    bars = right.bar(
        range(len(names)),
        [ok[v]["peak_rss_mb"] for v in names],
        color=[colours.get(v, "gray") for v in names],
    )
    right.bar_label(bars, fmt="%.0f", fontsize=8)
    right.set_xticks(range(len(names)), [BAR_LABELS[v] for v in names])
    right.tick_params(axis="x", labelsize=7)
    right.set_ylabel("peak resident memory (MB)")
    right.set_title("Peak memory of each run's process", fontsize=10)
    figure.suptitle(
        f"{Path(s['dataset']).name}: {d['training']:,} + {d['validation']:,} images, input "
        f"{s['input_tensor_size']}, MobileNetV2 alpha {s['mobilenet_alpha']}, batch "
        f"{s['batch_size']}; {m['cpus']} CPU cores, {m['date_utc'][:10]}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
