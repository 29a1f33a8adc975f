"""Tests for tl_helpers.config: every configuration rule, on real files (no TensorFlow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from tl_helpers.config import (
    CONFIG_FILE_NAME,
    SCHEMA_PATH,
    Config,
    find_configuration,
    load_configuration,
    require_setting,
)
from tl_helpers.errors import TLError

REQUIRED = [
    "source_keras_model",
    "dataset_training_dir",
    "dataset_validation_dir",
    "batch_size",
    "input_tensor_size",
    "epochs",
    "output_dir",
    "evaluate_result_dir",
]


def minimal() -> dict:
    """Return the smallest valid configuration, with paths relative to its folder."""
    return {
        "source_keras_model": "",
        "dataset_training_dir": "dataset/training",
        "dataset_validation_dir": "dataset/validation",
        "batch_size": 32,
        "input_tensor_size": 224,
        "epochs": 10,
        "output_dir": "output",
        "evaluate_result_dir": "results",
    }


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """Make a project folder with the spec's dataset layout and labels.json."""
    for split in ("training", "validation"):
        (tmp_path / "dataset" / split / "cat").mkdir(parents=True)
    (tmp_path / "dataset" / "labels.json").write_text('{"cat": 0}')
    return tmp_path


def write(folder: Path, data: dict | str) -> Path:
    """Write configuration.json (a dict as JSON, a string as is) and return its path."""
    path = folder / CONFIG_FILE_NAME
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


def error_for(folder: Path, data: dict | str) -> str:
    """Write a configuration and return the TLError message loading it gives."""
    path = write(folder, data)
    with pytest.raises(TLError) as caught:
        load_configuration(path)
    return str(caught.value)


def with_(**changes: object) -> dict:
    """Return the minimal configuration with some keys changed."""
    return {**minimal(), **changes}


def without(*keys: str) -> dict:
    """Return the minimal configuration without some keys."""
    return {k: v for k, v in minimal().items() if k not in keys}


# --- valid configurations ----------------------------------------------------------------------


def test_minimal_config_loads_with_absolute_paths_and_defaults(project: Path) -> None:
    config = load_configuration(write(project, minimal()))
    assert config.source_keras_model is None
    assert config.dataset_training_dir == project / "dataset" / "training"
    assert config.dataset_validation_dir == project / "dataset" / "validation"
    assert config.output_dir == project / "output"
    assert config.evaluate_result_dir == project / "results"
    assert config.evaluate_label_file == project / "dataset" / "labels.json"
    assert (config.batch_size, config.input_tensor_size, config.epochs) == (32, 224, 10)
    assert config.mobilenet_alpha == 1.0
    assert config.preprocessing == "minus_one_to_one"
    assert config.learning_rate == 0.001
    assert config.seed == 0
    assert config.base_dir == project
    assert config.raw == minimal()
    assert all(p.is_absolute() for p in (config.output_dir, config.evaluate_label_file))


def test_relative_paths_resolve_against_config_folder_not_cwd(
    project: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(project, minimal())
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_configuration(path)
    assert config.dataset_training_dir == project / "dataset" / "training"
    assert config.base_dir == project


def test_default_path_is_configuration_json_in_cwd(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(project, minimal())
    monkeypatch.chdir(project)
    assert load_configuration().base_dir == project
    assert find_configuration() == project / CONFIG_FILE_NAME


def test_absolute_paths_and_home_are_accepted(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(project))
    data = with_(dataset_training_dir=str(project / "dataset" / "training"))
    data["dataset_validation_dir"] = "~/dataset/validation"
    config = load_configuration(write(project, data))
    assert config.dataset_training_dir == project / "dataset" / "training"
    assert config.dataset_validation_dir == project / "dataset" / "validation"


def test_optional_keys_override_defaults(project: Path) -> None:
    data = with_(mobilenet_alpha=0.35, preprocessing="none", learning_rate=1, seed=7)
    config = load_configuration(write(project, data))
    assert config.mobilenet_alpha == 0.35
    assert config.preprocessing == "none"
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.seed == 7


def test_comments_and_underscore_keys_are_ignored(project: Path) -> None:
    data = with_(**{"$comment": "my flowers", "_note": {"any": ["thing"]}})
    config = load_configuration(write(project, data))
    assert config.raw["$comment"] == "my flowers"
    assert not hasattr(config, "_note")


def test_utf8_bom_is_accepted(project: Path) -> None:
    path = project / CONFIG_FILE_NAME
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(minimal()).encode())
    assert load_configuration(path).epochs == 10


def test_model_file_and_savedmodel_folder_are_accepted(project: Path) -> None:
    (project / "base.h5").write_bytes(b"")
    (project / "base.keras").write_bytes(b"")
    (project / "saved").mkdir()
    (project / "saved" / "saved_model.pb").write_bytes(b"")
    for written in ("base.h5", "base.keras", "saved"):
        config = load_configuration(write(project, with_(source_keras_model=written)))
        assert config.source_keras_model == project / written


def test_summary_lists_every_setting_and_marks_defaults(project: Path) -> None:
    text = load_configuration(write(project, minimal())).summary()
    assert str(project) in text
    assert "Keras standard MobileNetV2" in text
    for field in fields(Config):
        if field.name not in ("raw", "base_dir", "chief"):
            assert field.name in text
    assert "learning_rate" in text and "(default)" in text
    assert re.search(r"\n  batch_size += 32\n", text), text


def test_config_is_frozen_and_hashable(project: Path) -> None:
    config = load_configuration(write(project, minimal()))
    with pytest.raises(AttributeError):
        config.epochs = 3  # type: ignore[misc]
    assert hash(config) == hash(load_configuration(project / CONFIG_FILE_NAME))


def test_schema_is_valid_and_matches_config_fields() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    keys = [k for k in schema["properties"] if k != "$comment"]
    not_keys = ("base_dir", "raw", "chief")
    assert keys == [f.name for f in fields(Config) if f.name not in not_keys]
    assert schema["required"] == REQUIRED
    for key, prop in schema["properties"].items():
        assert prop.get("description"), key
        if key not in REQUIRED and key not in ("$comment", "evaluate_label_file"):
            assert "default" in prop, key
            assert Config.__dataclass_fields__[key].default == prop["default"]


def test_config_module_imports_fast_without_tensorflow_or_jsonschema() -> None:
    code = (
        "import sys, tl_helpers.config; "
        "assert 'tensorflow' not in sys.modules and 'jsonschema' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_jsonschema_is_imported_without_the_slow_iri_parser_which_stays_importable() -> None:
    """Jupyter installs rfc3987_syntax (seconds to import); checking a file must not load it,
    and the hiding must not leak: the package imports normally afterwards."""
    pytest.importorskip("rfc3987_syntax")
    code = (
        "import sys; from tl_helpers import config; config._validator(); "
        "assert 'jsonschema' in sys.modules and 'rfc3987_syntax' not in sys.modules; "
        "import rfc3987_syntax; assert rfc3987_syntax.is_valid_syntax('iri', 'http://a.b/c')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- the file itself ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TLError, match=r"configuration\.json not found in .*create it there"):
        load_configuration(tmp_path / CONFIG_FILE_NAME)
    with pytest.raises(TLError, match=str(tmp_path)):
        find_configuration(tmp_path)


def test_find_configuration_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TLError, match="Folder not found: .*nowhere"):
        find_configuration(tmp_path / "nowhere")


def test_folder_named_configuration_json(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE_NAME).mkdir()
    with pytest.raises(TLError, match=r"configuration\.json in .* is a folder, not a file"):
        load_configuration(tmp_path / CONFIG_FILE_NAME)
    with pytest.raises(TLError, match="is a folder"):
        find_configuration(tmp_path)


def test_symlinked_configuration_json(project: Path, tmp_path_factory) -> None:
    real = write(tmp_path_factory.mktemp("real"), minimal())
    (project / CONFIG_FILE_NAME).symlink_to(real)
    for call in (
        lambda: load_configuration(project / CONFIG_FILE_NAME),
        lambda: find_configuration(project),
    ):
        with pytest.raises(TLError, match=r"configuration\.json .* is a symbolic link"):
            call()


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    message = error_for(tmp_path, '{\n  "epochs": 10\n  "batch_size": 32\n}')
    assert "configuration.json is not valid JSON" in message
    assert "line 3, column 3" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty"),
        ("[1, 2]", "must hold one JSON object.* a list"),
        ('"text"', "must hold one JSON object.* a string"),
        ('{"epochs": 1, "epochs": 2}', 'key "epochs" is written twice'),
        ('{"learning_rate": NaN}', "NaN is not a valid JSON value"),
    ],
)
def test_file_content_that_is_not_a_settings_object(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = error_for(tmp_path, text)
    assert message.startswith("configuration.json")
    assert re.search(expected, message), message


# --- required keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["source_keras_model", "dataset_training_dir"])
def test_step_2_keys_are_reported_before_other_missing_keys(project: Path, key: str) -> None:
    message = error_for(project, without(key, "epochs", "batch_size"))
    assert f'required key "{key}"' in message
    assert "epochs" not in message and "batch_size" not in message


@pytest.mark.parametrize("value", [None, "", "  "])
def test_dataset_training_dir_without_value(project: Path, value: object) -> None:
    message = error_for(project, with_(dataset_training_dir=value, epochs=0))
    assert '"dataset_training_dir" (training images folder) has no value' in message
    assert "epochs" not in message


def test_source_keras_model_null_has_no_value(project: Path) -> None:
    message = error_for(project, with_(source_keras_model=None))
    assert '"source_keras_model" (base model) has no value' in message
    assert "MobileNetV2" in message


def test_both_step_2_keys_missing_are_listed_together(project: Path) -> None:
    message = error_for(project, without(*REQUIRED[:2]))
    assert "has 2 problems" in message
    assert '"source_keras_model"' in message and '"dataset_training_dir"' in message


@pytest.mark.parametrize("key", REQUIRED[2:])
def test_each_other_missing_required_key(project: Path, key: str) -> None:
    message = error_for(project, without(key))
    assert message.startswith(f'configuration.json: required key "{key}"')
    assert "is missing: add e.g." in message


def test_missing_keys_come_before_unknown_keys_and_types(project: Path) -> None:
    message = error_for(project, {**without("epochs"), "colour": 1, "batch_size": 0})
    assert '"epochs"' in message
    assert "colour" not in message and "batch_size" not in message


# --- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("learning_rat", "learning_rate"),
        ("Seed", "seed"),
        ("PREPROCESSING", "preprocessing"),
        ("mobilenetAlpha", "mobilenet_alpha"),
        ("evaluate_labels_file", "evaluate_label_file"),
    ],
)
def test_unknown_key_suggests_closest(project: Path, typo: str, meant: str) -> None:
    message = error_for(project, with_(**{typo: 1}))
    assert f'unknown key "{typo}". Did you mean "{meant}"?' in message


def test_unknown_key_epoch_beside_epochs(project: Path) -> None:
    message = error_for(project, with_(epoch=3))
    assert message == 'configuration.json: unknown key "epoch". Did you mean "epochs"?'


def test_unknown_key_without_close_match_lists_valid_keys(project: Path) -> None:
    message = error_for(project, with_(zzz=1))
    assert 'unknown key "zzz"' in message and "Valid keys: source_keras_model" in message


def test_case_sensitive_key_suggests_lower_case(project: Path) -> None:
    data = without("epochs")
    data["Epochs"] = 10
    message = error_for(project, data)
    assert 'required key "epochs"' in message
    assert 'Found "Epochs" instead: keys are case sensitive, rename it to "epochs"' in message


def test_all_unknown_keys_are_reported_at_once(project: Path) -> None:
    message = error_for(project, with_(epoch=3, batchsize=2))
    assert "has 2 problems" in message and '"epoch"' in message and '"batchsize"' in message


# --- types and ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["batch_size", "input_tensor_size", "epochs", "seed"])
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("32", '"32" (text in quotes: write 32 without quotes)'),
        (32.0, "32.0 (write 32, without the decimal point)"),
        (True, "true"),
        (None, "null"),
        (32.5, "32.5"),
    ],
)
def test_integer_keys_refuse_other_types(
    project: Path, key: str, value: object, shown: str
) -> None:
    message = error_for(project, with_(**{key: value}))
    assert message.startswith(f'configuration.json: "{key}" must be an integer')
    assert message.endswith(f"got {shown}.")


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("batch_size", 0, "an integer >= 1 (powers of 2 recommended)"),
        ("batch_size", -4, "an integer >= 1 (powers of 2 recommended)"),
        ("epochs", 0, "an integer >= 1"),
        ("input_tensor_size", 31, "an integer from 32 to 1024 (MobileNetV2 needs at least 32)"),
        ("input_tensor_size", 1025, "an integer from 32 to 1024 (MobileNetV2 needs at least 32)"),
        ("seed", -1, "an integer from 0 to 4294967295"),
        ("seed", 2**32, "an integer from 0 to 4294967295"),
        ("learning_rate", 0, "a number > 0 and <= 1"),
        ("learning_rate", 1.5, "a number > 0 and <= 1"),
        ("label_smoothing", -0.1, "a number from 0 to 0.5"),
        ("label_smoothing", 0.6, "a number from 0 to 0.5"),
        ("mobilenet_alpha", 0.6, "one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4"),
    ],
)
def test_out_of_range_values(project: Path, key: str, value: object, rule: str) -> None:
    message = error_for(project, with_(**{key: value}))
    assert message == f'configuration.json: "{key}" must be {rule}, got {json.dumps(value)}.'


def test_batch_size_zero_message_matches_the_documented_style(project: Path) -> None:
    assert error_for(project, with_(batch_size=0)) == (
        'configuration.json: "batch_size" must be an integer >= 1 (powers of 2 recommended), got 0.'
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("learning_rate", "0.01"), ("learning_rate", True), ("mobilenet_alpha", "1.0")],
)
def test_number_keys_refuse_other_types(project: Path, key: str, value: object) -> None:
    message = error_for(project, with_(**{key: value}))
    assert f'"{key}" must be' in message and f"got {json.dumps(value)}" in message


@pytest.mark.parametrize("value", ["None", "Zero_To_One", "unit", 1])
def test_preprocessing_is_case_sensitive(project: Path, value: object) -> None:
    message = error_for(project, with_(preprocessing=value))
    assert '"preprocessing" must be one of "minus_one_to_one", "zero_to_one", "none"' in message
    if value == "None":
        assert 'case sensitive: write "none"' in message


@pytest.mark.parametrize("key", ["source_keras_model", *REQUIRED[2:3], *REQUIRED[6:]])
def test_path_keys_must_be_strings(project: Path, key: str) -> None:
    message = error_for(project, with_(**{key: 5}))
    assert f'"{key}" must be a' in message and "got 5" in message


@pytest.mark.parametrize("key", ["dataset_validation_dir", "output_dir", "evaluate_result_dir"])
def test_empty_path_strings_are_refused(project: Path, key: str) -> None:
    message = error_for(project, with_(**{key: ""}))
    assert f'"{key}" must be a non-empty string, got "".' in message


def test_explicit_empty_label_file_is_refused(project: Path) -> None:
    message = error_for(project, with_(evaluate_label_file=""))
    assert '"evaluate_label_file" must be a non-empty string' in message


def test_all_type_problems_are_reported_at_once_in_schema_order(project: Path) -> None:
    message = error_for(project, with_(seed=-1, batch_size=0, epochs="3"))
    lines = message.splitlines()
    assert lines[0] == "configuration.json has 3 problems:"
    assert [line.split('"')[1] for line in lines[1:]] == ["batch_size", "epochs", "seed"]


# --- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["dataset_training_dir", "dataset_validation_dir"])
def test_missing_dataset_folder(project: Path, key: str) -> None:
    message = error_for(project, with_(**{key: "data/nowhere"}))
    assert message == (
        f'configuration.json: "{key}" folder not found: {project / "data" / "nowhere"} '
        f'(from "data/nowhere"). Fix the path; relative paths are relative to {project}.'
    )


def test_dataset_folder_that_is_a_file(project: Path) -> None:
    (project / "file.txt").write_text("x")
    message = error_for(project, with_(dataset_validation_dir="file.txt"))
    assert '"dataset_validation_dir" must be a folder' in message and "file.txt" in message


@pytest.mark.parametrize("key", ["dataset_training_dir", "dataset_validation_dir"])
def test_symlinked_dataset_folder(project: Path, key: str) -> None:
    (project / "link").symlink_to(project / "dataset" / "training")
    message = error_for(project, with_(**{key: "link"}))
    assert f'"{key}" goes through a symbolic link: {project / "link"} ->' in message
    assert str(project / "dataset" / "training") in message


def test_symlinked_dataset_folder_given_as_absolute_path(project: Path) -> None:
    (project / "link").symlink_to(project / "dataset" / "training")
    message = error_for(project, with_(dataset_training_dir=str(project / "link")))
    assert '"dataset_training_dir" goes through a symbolic link' in message


def test_symlinked_intermediate_folder_in_relative_path(project: Path) -> None:
    (project / "data").symlink_to(project / "dataset")
    message = error_for(project, with_(dataset_validation_dir="data/validation"))
    assert f'"dataset_validation_dir" goes through a symbolic link: {project / "data"}' in message


def test_dangling_symlink_is_reported_as_a_link(project: Path) -> None:
    (project / "gone").symlink_to(project / "missing")
    message = error_for(project, with_(output_dir="gone"))
    assert '"output_dir" goes through a symbolic link' in message


def test_symlinked_source_model(project: Path) -> None:
    (project / "real.h5").write_bytes(b"")
    (project / "base.h5").symlink_to(project / "real.h5")
    message = error_for(project, with_(source_keras_model="base.h5"))
    assert '"source_keras_model" goes through a symbolic link' in message
    assert str(project / "real.h5") in message


def test_nonexistent_source_model(project: Path) -> None:
    message = error_for(project, with_(source_keras_model="models/base.h5"))
    assert '"source_keras_model" not found' in message
    assert str(project / "models" / "base.h5") in message
    assert 'set it to "" to use the Keras standard MobileNetV2' in message


def test_source_model_folder_without_saved_model_pb(project: Path) -> None:
    (project / "model").mkdir()
    message = error_for(project, with_(source_keras_model="model"))
    assert '"source_keras_model" folder' in message
    assert "is not a Keras SavedModel folder (no saved_model.pb inside)" in message


def test_source_model_with_unknown_suffix(project: Path) -> None:
    (project / "model.onnx").write_bytes(b"")
    message = error_for(project, with_(source_keras_model="model.onnx"))
    assert '"source_keras_model" must be an .h5 or .keras file' in message


@pytest.mark.parametrize("key", ["output_dir", "evaluate_result_dir"])
def test_output_folder_that_is_an_existing_file(project: Path, key: str) -> None:
    (project / "taken").write_text("x")
    message = error_for(project, with_(**{key: "taken"}))
    assert f'"{key}" must be a folder, but {project / "taken"}' in message
    assert "is an existing file" in message


def test_output_folder_below_a_file(project: Path) -> None:
    (project / "taken").write_text("x")
    message = error_for(project, with_(output_dir="taken/model"))
    assert '"output_dir" folder' in message and "cannot be created" in message


def test_output_folders_may_be_missing_or_existing(project: Path) -> None:
    (project / "results").mkdir()
    config = load_configuration(write(project, with_(output_dir="out/deep/model")))
    assert config.output_dir == project / "out" / "deep" / "model"
    assert not config.output_dir.exists()


def test_default_label_file_missing(project: Path) -> None:
    (project / "dataset" / "labels.json").unlink()
    message = error_for(project, minimal())
    assert f"label file not found: {project / 'dataset' / 'labels.json'}" in message
    assert '"evaluate_label_file" is not set' in message
    assert '"dataset_training_dir"' in message


def test_explicit_label_file(project: Path) -> None:
    (project / "my_labels.json").write_text('{"cat": 0}')
    config = load_configuration(write(project, with_(evaluate_label_file="my_labels.json")))
    assert config.evaluate_label_file == project / "my_labels.json"


def test_explicit_label_file_missing(project: Path) -> None:
    message = error_for(project, with_(evaluate_label_file="nope.json"))
    assert f'"evaluate_label_file" file not found: {project / "nope.json"}' in message


def test_explicit_label_file_that_is_a_folder(project: Path) -> None:
    message = error_for(project, with_(evaluate_label_file="dataset"))
    assert '"evaluate_label_file" must be a file' in message


def test_symlinked_label_file(project: Path) -> None:
    (project / "labels.json").symlink_to(project / "dataset" / "labels.json")
    message = error_for(project, with_(evaluate_label_file="labels.json"))
    assert '"evaluate_label_file" goes through a symbolic link' in message


def test_all_path_problems_are_reported_at_once(project: Path) -> None:
    (project / "taken").write_text("x")
    message = error_for(
        project, with_(dataset_training_dir="a", dataset_validation_dir="b", output_dir="taken")
    )
    assert message.startswith("configuration.json has 3 problems:")
    for key in ("dataset_training_dir", "dataset_validation_dir", "output_dir"):
        assert f'"{key}"' in message
    assert "label file" not in message  # its default follows the training folder, fixed first


# --- require_setting -----------------------------------------------------------------------------


def test_require_setting_returns_values(project: Path) -> None:
    config = load_configuration(write(project, minimal()))
    assert require_setting(config, "source_keras_model") is None
    assert require_setting(config, "dataset_training_dir") == project / "dataset" / "training"
    assert require_setting(config, "epochs") == 10
    assert require_setting(config, "output_dir") == project / "output"


def test_require_setting_on_deleted_validation_folder(project: Path) -> None:
    config = load_configuration(write(project, minimal()))
    (project / "dataset" / "validation" / "cat").rmdir()
    (project / "dataset" / "validation").rmdir()
    with pytest.raises(TLError) as caught:
        require_setting(config, "dataset_validation_dir")
    assert str(caught.value) == (
        f'configuration.json: "dataset_validation_dir" folder not found: '
        f'{project / "dataset" / "validation"} (from "dataset/validation"). Fix the path; '
        f"relative paths are relative to {project}."
    )


def test_require_setting_on_folder_replaced_by_a_link(project: Path) -> None:
    config = load_configuration(write(project, minimal()))
    training = project / "dataset" / "training"
    training.rename(project / "moved")
    training.symlink_to(project / "moved")
    with pytest.raises(TLError, match='"dataset_training_dir" goes through a symbolic link'):
        require_setting(config, "dataset_training_dir")


def test_require_setting_on_deleted_model(project: Path) -> None:
    (project / "base.h5").write_bytes(b"")
    config = load_configuration(write(project, with_(source_keras_model="base.h5")))
    os.remove(project / "base.h5")
    with pytest.raises(TLError, match='"source_keras_model" not found'):
        require_setting(config, "source_keras_model")


def test_require_setting_unknown_key(project: Path) -> None:
    config = load_configuration(write(project, minimal()))
    with pytest.raises(TLError, match='"epoch" is not a configuration key'):
        require_setting(config, "epoch")


def test_docs_list_every_key_as_the_schema_describes_it():
    """docs/configuration.md's key table is the schema's (regenerate: python -m
    tl_helpers.config), and the README's Configuration section names every key, the required
    ones in bold."""
    from tl_helpers.config import _SCHEMA, SETTING_KEYS, markdown_table

    root = Path(__file__).parents[1]
    docs = (root / "docs" / "configuration.md").read_text(encoding="utf-8")
    begin, end = "<!-- configuration keys: begin -->\n", "\n<!-- configuration keys: end -->"
    table = docs[docs.index(begin) + len(begin) : docs.index(end)]
    assert table == markdown_table()
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    for key in SETTING_KEYS:
        assert f"| `{key}` |" in table
        bold = f"**`{key}`**" in section
        assert f"`{key}`" in section, f"README's Configuration section does not name {key}"
        assert bold == (key in _SCHEMA["required"]), f"{key}: bold in the README iff required"
