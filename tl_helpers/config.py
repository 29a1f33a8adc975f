"""Read and check configuration.json, whole, before anything runs.

The rules live in configuration_schema.json (types, ranges, defaults and the documentation of
every key); this module adds what a schema cannot say (files and folders exist, no symbolic
links) and turns every problem into a TLError that names the key and says how to fix it.
It does not import TensorFlow, and imports jsonschema only when a file is checked (see
`import_jsonschema` for why that import is handled with care).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

from tl_helpers.errors import TLError

CONFIG_FILE_NAME = "configuration.json"
SCHEMA_PATH = Path(__file__).with_name("configuration_schema.json")
LABEL_FILE_NAME = "labels.json"
MODEL_SUFFIXES = (".h5", ".hdf5", ".keras")
SAVED_MODEL_FILE = "saved_model.pb"
# Spec step 2 checks these two before anything else.
STEP_2_KEYS = ("source_keras_model", "dataset_training_dir")
MODEL_KEY = "source_keras_model"
LABEL_KEY = "evaluate_label_file"
CACHE_DIR_KEY = "feature_cache_dir"
CACHE_FOLDER_NAME = "feature_cache"  # the default feature_cache_dir, inside output_dir

_SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
_PROPERTIES: dict[str, dict[str, Any]] = _SCHEMA["properties"]


def _is_annotation(key: str) -> bool:
    """Tell whether a key is a user's note ("$comment", "_..."), which is allowed and ignored."""
    return key == "$comment" or key.startswith("_")


SETTING_KEYS: tuple[str, ...] = tuple(key for key in _PROPERTIES if not _is_annotation(key))
PATH_KEYS: tuple[str, ...] = tuple(key for key in SETTING_KEYS if "x-path" in _PROPERTIES[key])


def _default(key: str) -> Any:
    """Return the schema's default for an optional key: the one source of truth for defaults."""
    return _PROPERTIES[key]["default"]


def _is_strict_integer(checker: Any, instance: object) -> bool:
    """Accept ints only: JSON Schema would take 32.0 (and Python's bool is an int)."""
    return isinstance(instance, int) and not isinstance(instance, bool)


def import_jsonschema() -> ModuleType:
    """Import jsonschema without loading the optional `rfc3987_syntax` package.

    Jupyter installs `rfc3987_syntax`, and jsonschema imports it when present to check the
    "iri" formats; it compiles a grammar on import, 2-3 s on a 2-core machine, in every kernel
    and every nbformat user. No schema used here (ours, nbformat's) has those formats, so the
    package is hidden while jsonschema loads; `import rfc3987_syntax` still works afterwards.
    """
    if "jsonschema" in sys.modules:
        return sys.modules["jsonschema"]
    hide = "rfc3987_syntax" not in sys.modules
    if hide:
        sys.modules["rfc3987_syntax"] = None  # makes `import rfc3987_syntax` raise ImportError
    try:
        import jsonschema
    finally:
        if hide and sys.modules.get("rfc3987_syntax", False) is None:
            del sys.modules["rfc3987_syntax"]
    return jsonschema


@functools.cache
def _validator() -> Any:
    """Build the schema validator on first use."""
    import_jsonschema()
    from jsonschema import Draft202012Validator
    from jsonschema.validators import extend

    type_checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer)
    return extend(Draft202012Validator, type_checker=type_checker)(_SCHEMA)


@dataclass(frozen=True)
class Config:
    """The checked settings of configuration.json, with paths made absolute."""

    source_keras_model: Path | None
    dataset_training_dir: Path
    dataset_validation_dir: Path
    batch_size: int
    input_tensor_size: int
    epochs: int
    output_dir: Path
    evaluate_result_dir: Path
    evaluate_label_file: Path
    mobilenet_alpha: float = _default("mobilenet_alpha")
    preprocessing: str = _default("preprocessing")
    learning_rate: float = _default("learning_rate")
    label_smoothing: float = _default("label_smoothing")
    augmentation: str = _default("augmentation")
    fine_tune: bool = _default("fine_tune")
    fine_tune_cut: str = _default("fine_tune_cut")
    fine_tune_epochs: int = _default("fine_tune_epochs")
    fine_tune_learning_rate: float = _default("fine_tune_learning_rate")
    fine_tune_noise: bool = _default("fine_tune_noise")
    fine_tune_quantized: bool = _default("fine_tune_quantized")
    seed: int = _default("seed")
    tensorboard_log_dir: Path | str | None = _default("tensorboard_log_dir")
    feature_cache: bool = _default("feature_cache")
    feature_cache_dir: Path | str = _default("feature_cache_dir")
    feature_cache_max_gb: float = _default("feature_cache_max_gb")
    backbone_batch_size: int = _default("backbone_batch_size")
    evaluate_from_features: bool = _default("evaluate_from_features")
    quantize: bool = _default("quantize")
    calibration_batch_size: int = _default("calibration_batch_size")
    calibration_batches: int = _default("calibration_batches")
    imx500_tpc_version: str = _default("imx500_tpc_version")
    convert_for_imx500: bool = _default("convert_for_imx500")
    imx500_input_persistency: bool = _default("imx500_input_persistency")
    base_dir: Path = Path(".")
    raw: dict = field(default_factory=dict, repr=False, compare=False)
    # False on the other workers of a multi-worker run (distribute.for_this_worker): they train
    # as the chief does, but only the chief writes, quantizes and converts.
    chief: bool = True

    def summary(self) -> str:
        """Return the resolved settings as a `key = value` table, for the notebook to show."""
        names = [f.name for f in fields(self) if f.name not in ("base_dir", "raw", "chief")]
        width = max(len(name) for name in names)
        lines = [f"{CONFIG_FILE_NAME} in {self.base_dir}"]
        lines += [f"  {name:<{width}} = {self._shown(name)}" for name in names]
        return "\n".join(lines)

    def _shown(self, name: str) -> str:
        """Return one value as the summary shows it, marking the defaults."""
        value = getattr(self, name)
        if name == MODEL_KEY and value is None:
            text = f"Keras standard MobileNetV2 (ImageNet weights, alpha {self.mobilenet_alpha})"
        elif value is None:
            text = "off"  # an optional folder left empty, such as tensorboard_log_dir
        else:
            text = str(value)
        if self.raw and name not in self.raw:
            text += "  (default)"
        return text


def find_configuration(directory: str | Path = ".") -> Path:
    """Return the path of configuration.json in `directory`, checked (spec step 1)."""
    folder = _absolute(directory)
    if not folder.is_dir():
        raise TLError(
            f"Folder not found: {folder}. Run the notebook from the folder that holds "
            f"{CONFIG_FILE_NAME}, or pass that folder."
        )
    path = folder / CONFIG_FILE_NAME
    _check_config_file(path)
    return path


def load_configuration(path: str | Path = CONFIG_FILE_NAME) -> Config:
    """Read and check the whole configuration file, so that no step fails half-way on it."""
    path = _absolute(path)
    _check_config_file(path)
    data = _read_json_object(path)
    for find_problems in (
        _step_2_problems,
        _missing_key_problems,
        _unknown_key_problems,
        _schema_problems,
    ):
        _raise_if_any(path.name, find_problems(data))
    config = _build_config(data, path.parent)
    _raise_if_any(path.name, _path_problems(config))
    return config


def require_setting(config: Config, key: str) -> object:
    """Return a setting a notebook step needs, checking it is set and its path still exists."""
    if key not in SETTING_KEYS:
        raise TLError(f'"{key}" is not a configuration key. Valid keys: {", ".join(SETTING_KEYS)}.')
    value = getattr(config, key)
    if value is None and key != MODEL_KEY:
        _raise_if_any(CONFIG_FILE_NAME, [_no_value_problem(key)])
    if key in PATH_KEYS:
        _raise_if_any(CONFIG_FILE_NAME, [p for p in [_path_problem(config, key)] if p])
    return value


# --- the configuration file itself -------------------------------------------------------------


def _absolute(path: str | Path) -> Path:
    """Make a path absolute without resolving symbolic links (they must stay visible)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _check_config_file(path: Path) -> None:
    """Refuse a configuration file that is missing, a symbolic link or not a regular file."""
    name, folder = path.name, path.parent
    if path.is_symlink():
        raise TLError(
            f"{name} in {folder} is a symbolic link (to {os.readlink(path)}); symbolic links "
            "are not allowed: put the real file there instead."
        )
    if not path.exists():
        raise TLError(
            f'{name} not found in {folder}: create it there (see README, "Configuration") or '
            "run the notebook from the folder that holds it."
        )
    if path.is_dir():
        raise TLError(
            f"{name} in {folder} is a folder, not a file: replace it with the JSON settings "
            'file (see README, "Configuration").'
        )
    if not path.is_file():
        raise TLError(f"{name} in {folder} is not a regular file: replace it with a JSON file.")


class _JSONProblem(ValueError):
    """Something json.loads accepts but a configuration must not hold."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, refusing a key written twice (JSON would keep the last silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _JSONProblem(f'key "{key}" is written twice: keep one.')
        result[key] = value
    return result


def _refuse_constant(name: str) -> float:
    """Refuse NaN and Infinity, which are not JSON although Python reads them."""
    raise _JSONProblem(f"{name} is not a valid JSON value: write a number.")


def _read_json_object(path: Path) -> dict[str, Any]:
    """Read the file as one JSON object, reporting syntax errors with line and column."""
    name = path.name
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise TLError(
            f"{name} is not UTF-8 text (bad byte at offset {error.start}): save it as UTF-8."
        ) from None
    except OSError as error:
        raise TLError(f"{name} cannot be read ({error.strerror}): check its permissions.") from None
    if not text.strip():
        raise TLError(
            f"{name} in {path.parent} is empty: write the settings into it (see README, "
            '"Configuration").'
        )
    try:
        data = json.loads(
            text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
        )
    except json.JSONDecodeError as error:
        raise TLError(
            f"{name} is not valid JSON: {error.msg} at line {error.lineno}, column "
            f"{error.colno}. Fix it there (common causes: a missing or trailing comma, single "
            "quotes, a comment)."
        ) from None
    except _JSONProblem as error:
        raise TLError(f"{name}: {error}") from None
    if not isinstance(data, dict):
        raise TLError(
            f'{name} must hold one JSON object, {{"key": value, ...}}, but holds '
            f"{_json_kind(data)}."
        )
    return data


def _json_kind(value: object) -> str:
    """Name a JSON value's type the way a user writing JSON would."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = {list: "a list", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), "null" if value is None else type(value).__name__)


def _raise_if_any(file_name: str, problems: list[str]) -> None:
    """Raise one TLError listing every problem found, so the user can fix them in one go."""
    if len(problems) == 1:
        raise TLError(f"{file_name}: {problems[0]}")
    if problems:
        listed = "\n".join(f"- {problem}" for problem in problems)
        raise TLError(f"{file_name} has {len(problems)} problems:\n{listed}")


# --- keys ------------------------------------------------------------------------------------


def _has_no_value(data: dict[str, Any], key: str) -> bool:
    """Tell whether a key is absent, null, or (except for the model key) blank."""
    value = data.get(key)
    if value is None:
        return True
    return key != MODEL_KEY and isinstance(value, str) and not value.strip()


def _step_2_problems(data: dict[str, Any]) -> list[str]:
    """Spec step 2: the base model and the training folder must have values."""
    return [
        _missing_key_problem(data, key) if key not in data else _no_value_problem(key)
        for key in STEP_2_KEYS
        if _has_no_value(data, key)
    ]


def _missing_key_problems(data: dict[str, Any]) -> list[str]:
    """Report the other required keys that are absent."""
    return [
        _missing_key_problem(data, key)
        for key in _SCHEMA["required"]
        if key not in data and key not in STEP_2_KEYS
    ]


def _missing_key_problem(data: dict[str, Any], key: str) -> str:
    """Say which required key is missing, an example value, and a likely misspelling."""
    problem = (
        f'required key "{key}" ({_PROPERTIES[key]["title"]}) is missing: add e.g. '
        f'"{key}": {_example(key)}; it must be {_rule(key)}.'
    )
    typos = [other for other in data if other not in _PROPERTIES and _closest_key(other) == key]
    if typos:
        problem += f' Found "{typos[0]}" instead: keys are case sensitive, rename it to "{key}".'
    return problem


def _no_value_problem(key: str) -> str:
    """Say that a key is present but empty, with an example value."""
    return (
        f'"{key}" ({_PROPERTIES[key]["title"]}) has no value: set e.g. '
        f'"{key}": {_example(key)}; it must be {_rule(key)}.'
    )


def _example(key: str) -> str:
    """Return the schema's example value for a key, as JSON."""
    return json.dumps(_PROPERTIES[key]["examples"][0])


def _unknown_key_problems(data: dict[str, Any]) -> list[str]:
    """Refuse unknown keys: a typo must never fall back to a default silently."""
    return [
        _unknown_key_problem(key)
        for key in data
        if key not in _PROPERTIES and not _is_annotation(key)
    ]


def _unknown_key_problem(key: str) -> str:
    """Name an unknown key and suggest the valid key closest to it."""
    closest = _closest_key(key)
    if closest:
        return f'unknown key "{key}". Did you mean "{closest}"?'
    return (
        f'unknown key "{key}". Valid keys: {", ".join(SETTING_KEYS)}. To keep a note, start '
        'its key with "_".'
    )


def _closest_key(key: str) -> str | None:
    """Return the valid key a user most likely meant: same letters in another case first."""
    by_letters = {_squash(valid): valid for valid in SETTING_KEYS}
    if _squash(key) in by_letters:
        return by_letters[_squash(key)]
    lowered = {valid.lower(): valid for valid in SETTING_KEYS}
    matches = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[matches[0]] if matches else None


def _squash(key: str) -> str:
    """Drop case and separators, so "Batch-Size" and "batchSize" match "batch_size"."""
    return "".join(char for char in key.lower() if char.isalnum())


# --- values ----------------------------------------------------------------------------------


def _schema_problems(data: dict[str, Any]) -> list[str]:
    """Check types and ranges against the schema, one message per key, in schema order."""
    order = {key: index for index, key in enumerate(_PROPERTIES)}
    problems: dict[str, str] = {}
    for error in _validator().iter_errors(data):
        key = str(error.path[0]) if error.path else ""
        if key not in problems:
            problems[key] = _schema_problem(key, error.instance) if key else error.message
    return [problems[key] for key in sorted(problems, key=lambda k: order.get(k, -1))]


def _schema_problem(key: str, value: object) -> str:
    """Say what a key must hold, and what it holds instead."""
    return f'"{key}" must be {_rule(key)}, got {_shown_value(key, value)}.'


def _rule(key: str) -> str:
    """Describe a key's allowed values from the schema: type, range or choices, and advice."""
    prop = _PROPERTIES[key]
    if "enum" in prop:
        text = "one of " + ", ".join(json.dumps(choice) for choice in prop["enum"])
    elif prop.get("type") == "string":
        text = "a non-empty string" if prop.get("minLength") else "a string"
    else:
        kinds = {"integer": "an integer", "number": "a number", "boolean": "true or false"}
        text = kinds[prop["type"]] + _range(prop)
    if "x-hint" in prop:
        text += f" ({prop['x-hint']})"
    return text


def _range(prop: dict[str, Any]) -> str:
    """Describe a numeric range, e.g. ">= 1", "from 32 to 1024" or "> 0 and <= 1"."""
    if "minimum" in prop and "maximum" in prop:
        return f" from {prop['minimum']} to {prop['maximum']}"
    bounds = [
        (">=", "minimum"),
        (">", "exclusiveMinimum"),
        ("<=", "maximum"),
        ("<", "exclusiveMaximum"),
    ]
    parts = [f"{sign} {prop[name]}" for sign, name in bounds if name in prop]
    return " " + " and ".join(parts) if parts else ""


def _shown_value(key: str, value: object) -> str:
    """Show a bad value as JSON, with a hint for the usual slips (quotes, 32.0, case)."""
    text = json.dumps(value)
    if len(text) > 60:
        text = text[:57] + "..."
    prop = _PROPERTIES[key]
    if isinstance(value, float) and value.is_integer() and prop.get("type") == "integer":
        text += f" (write {int(value)}, without the decimal point)"
    elif isinstance(value, str) and prop.get("type") in ("integer", "number"):
        if _looks_like_number(value):
            text += f" (text in quotes: write {value.strip()} without quotes)"
    elif isinstance(value, str) and "enum" in prop:
        same_letters = [c for c in prop["enum"] if str(c).lower() == value.lower()]
        if same_letters:
            text += f' (values are case sensitive: write "{same_letters[0]}")'
    return text


def _looks_like_number(text: str) -> bool:
    """Tell whether a string holds a number, e.g. "32"."""
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- building the Config and checking its paths -----------------------------------------------


def _build_config(data: dict[str, Any], base_dir: Path) -> Config:
    """Make a Config from checked JSON: defaults filled in, paths made absolute."""
    values = {key: _setting_value(key, data, base_dir) for key in SETTING_KEYS}
    if values[LABEL_KEY] is None:
        values[LABEL_KEY] = _default_label_file(values["dataset_training_dir"])
    if values[CACHE_DIR_KEY] is None:
        values[CACHE_DIR_KEY] = values["output_dir"] / CACHE_FOLDER_NAME
    return Config(**values, base_dir=base_dir, raw=dict(data))


def _setting_value(key: str, data: dict[str, Any], base_dir: Path) -> Any:
    """Return one setting: the JSON value or the schema default, paths made absolute."""
    prop = _PROPERTIES[key]
    value = data.get(key, prop.get("default"))
    if "x-path" in prop:
        return None if value in (None, "") else _resolve(value, base_dir)
    if prop.get("type") == "number":
        return float(value)
    return value


def _resolve(value: str, base_dir: Path) -> Path:
    """Make a configured path absolute, relative to the configuration's folder; keep links."""
    return Path(os.path.abspath(os.path.join(base_dir, os.path.expanduser(value))))


def _default_label_file(training_dir: Path) -> Path:
    """Return labels.json in the folder that holds the training folder (the spec's layout)."""
    return training_dir.parent / LABEL_FILE_NAME


def _path_problems(config: Config) -> list[str]:
    """Check every configured path; a default derived from a bad path is left for later."""
    problems = {key: _path_problem(config, key) for key in PATH_KEYS}
    if problems["dataset_training_dir"] and LABEL_KEY not in config.raw:
        problems[LABEL_KEY] = None
    if problems["output_dir"] and CACHE_DIR_KEY not in config.raw:
        problems[CACHE_DIR_KEY] = None  # its default lies in output_dir, reported already
    return [problem for problem in problems.values() if problem]


def _path_problem(config: Config, key: str) -> str | None:
    """Check one configured path: no symbolic link, and the file or folder it must be."""
    path = getattr(config, key)
    if path is None:
        return None
    written = config.raw.get(key)
    link = _symbolic_link_in(path, written, config.base_dir)
    if link:
        return (
            f'"{key}" goes through a symbolic link: {link} -> {os.readlink(link)}. Symbolic '
            f'links are not allowed: set "{key}" to the real path, {os.path.realpath(path)}, '
            "or copy the data there."
        )
    origin = f' (from "{written}")' if isinstance(written, str) and written != str(path) else ""
    fix = f"Fix the path; relative paths are relative to {config.base_dir}."
    kind = _PROPERTIES[key]["x-path"]
    if kind == "model":
        return _model_problem(key, path, origin, fix)
    if kind == "input-folder":
        return _input_folder_problem(key, path, origin, fix)
    if kind == "output-folder":
        return _output_folder_problem(key, path, origin)
    if written is None:
        return _default_file_problem(key, path)
    return _input_file_problem(key, path, origin, fix)


def _symbolic_link_in(path: Path, written: object, base_dir: Path) -> str | None:
    """Return the first symbolic link on a configured path: for a relative path, any part."""
    candidates = []
    if isinstance(written, str) and not os.path.isabs(os.path.expanduser(written)):
        current = str(base_dir)
        for part in Path(written).parts:
            current = os.path.join(current, part)
            candidates.append(current)
    candidates.append(str(path))
    return next((os.path.abspath(c) for c in candidates if os.path.islink(c)), None)


def _model_problem(key: str, path: Path, origin: str, fix: str) -> str | None:
    """Check the base model: an .h5/.keras file or a folder holding saved_model.pb."""
    if not path.exists():
        return (
            f'"{key}" not found: {path}{origin}. {fix} Or set it to "" to use the Keras '
            "standard MobileNetV2."
        )
    if path.is_dir():
        if (path / SAVED_MODEL_FILE).is_file():
            return None
        return (
            f'"{key}" folder {path}{origin} is not a Keras SavedModel folder (no '
            f"{SAVED_MODEL_FILE} inside). Point it at the SavedModel folder itself, or at an "
            ".h5 or .keras file."
        )
    if path.suffix.lower() not in MODEL_SUFFIXES:
        return (
            f'"{key}" must be an .h5 or .keras file or a Keras SavedModel folder, got '
            f"{path}{origin}. Point it at the model, or convert the model to one of these."
        )
    return None


def _input_folder_problem(key: str, path: Path, origin: str, fix: str) -> str | None:
    """Check a folder that must already exist, such as a dataset folder."""
    if not path.exists():
        return f'"{key}" folder not found: {path}{origin}. {fix}'
    if not path.is_dir():
        return f'"{key}" must be a folder, but {path}{origin} is a file. Point it at the folder.'
    return None


def _output_folder_problem(key: str, path: Path, origin: str) -> str | None:
    """Check a folder created later: it must not be a file, nor lie below a file."""
    if path.exists() and not path.is_dir():
        return (
            f'"{key}" must be a folder, but {path}{origin} is an existing file. Choose another '
            "path, or move the file away."
        )
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return (
            f'"{key}" folder {path}{origin} cannot be created: {ancestor} is a file. Choose '
            "another path."
        )
    return None


def _input_file_problem(key: str, path: Path, origin: str, fix: str) -> str | None:
    """Check a file that must already exist, such as labels.json."""
    if not path.exists():
        return f'"{key}" file not found: {path}{origin}. {fix}'
    if not path.is_file():
        return f'"{key}" must be a file, but {path}{origin} is a folder. Point it at the file.'
    return None


def _default_file_problem(key: str, path: Path) -> str | None:
    """Check the default label file, explaining where the default comes from."""
    if path.is_file():
        return None
    if path.exists():
        return f'"{key}" defaults to {path}, which is not a file: set "{key}" to your label file.'
    return (
        f'label file not found: {path}. "{key}" is not set, so it defaults to '
        f'{LABEL_FILE_NAME} in the folder that holds "dataset_training_dir". Create it there '
        f'(class folder name -> class id, e.g. {{"daisy": 0, "roses": 1}}) or set "{key}" '
        "to its path."
    )


def markdown_table() -> str:
    """Every configuration key as a Markdown table, from the schema (docs/configuration.md)."""
    required = set(_SCHEMA.get("required", []))
    rows = ["| key | required / default | allowed values | what it does |", "|---|---|---|---|"]
    for key, prop in _PROPERTIES.items():
        if _is_annotation(key):
            continue
        default = "**required**" if key in required else f"`{json.dumps(prop.get('default'))}`"
        if key == LABEL_KEY:
            default = "`labels.json` beside the training folder"
        description = prop["description"].removeprefix("Optional. ").replace("|", "\\|")
        rows.append(f"| `{key}` | {default} | {_rule(key)} | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m tl_helpers.config: the key table of docs/configuration.md
    print(markdown_table())
