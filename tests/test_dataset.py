"""Tests for tl_helpers.dataset: labels.json, folder scanning and the image pipeline."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import EXIF_UPRIGHT, quadrant_pixels, write_oriented_jpeg
from PIL import Image, ImageOps

from tl_helpers import dataset
from tl_helpers.dataset import (
    bad_image_error,
    exif_orientation,
    files_of_batch,
    find_bad_images,
    iter_batches,
    load_images,
    max_class_id,
    missing_ids,
    read_labels,
    scan_image_folder,
)
from tl_helpers.errors import TLError

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "clothing5"
# Deliberately not alphabetical: folder order would give dress=0, hat=1, t-shirt=2.
LABELS = {"t-shirt": 0, "dress": 1, "hat": 2}


def write_jpeg(path: Path, size=(12, 10), color=(200, 30, 60), mode="RGB") -> Path:
    """Write a small solid-colour JPEG (size is width x height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = color[0] if mode == "L" else color
    Image.new(mode, size, fill).save(path, "JPEG", quality=95)
    return path


def make_dataset(root: Path, per_class: dict[str, int]) -> Path:
    """Create root/<class>/img_<i>.jpg with varied sizes; return root."""
    sizes = [(8, 8), (40, 30), (17, 23), (30, 12)]
    for name, count in per_class.items():
        for i in range(count):
            write_jpeg(root / name / f"img_{i}.jpg", size=sizes[i % len(sizes)])
    return root


def write_labels(path: Path, content) -> Path:
    """Write labels.json content (a dict/list/..., or raw text)."""
    text = content if isinstance(content, str) else json.dumps(content)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def training(tmp_path: Path) -> Path:
    """A valid training folder for LABELS: 2 t-shirts, 3 dresses, 1 hat."""
    return make_dataset(tmp_path / "training", {"t-shirt": 2, "dress": 3, "hat": 1})


# --------------------------------------------------------------------------- labels.json


def test_read_labels_keeps_file_order(tmp_path):
    path = write_labels(tmp_path / "labels.json", '{"car": 1, "bike": 2, "human": 0}')
    labels = read_labels(path)
    assert labels == {"car": 1, "bike": 2, "human": 0}
    assert list(labels) == ["car", "bike", "human"]


@pytest.mark.parametrize(
    "content, words",
    [
        ([["a", 0]], ["JSON object", "array"]),
        ('"a"', ["JSON object", "string"]),
        ({"a": "0"}, ['"a": "0"', "not an integer"]),
        ({"a": 1.5}, ['"a": 1.5', "not an integer"]),
        ({"a": True}, ['"a": true', "not an integer"]),
        ({"a": None}, ['"a": null', "not an integer"]),
        ({"a": -1}, ['"a": -1', "negative"]),
        ({"a": 0, "": 1}, ['"": 1', "class name"]),
        ({}, ["empty"]),
        ('{"a": 0,}', ["not valid JSON", "line 1"]),
        ('{"a": 0, "a": 1}', ['"a"', "twice"]),
    ],
)
def test_read_labels_rejects(tmp_path, content, words):
    path = write_labels(tmp_path / "labels.json", content)
    with pytest.raises(TLError) as err:
        read_labels(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("largest", [50_000, 2**31, 2**63])
def test_read_labels_refuses_an_id_far_larger_than_the_classes(tmp_path, largest):
    path = write_labels(tmp_path / "labels.json", {"cat": 0, "dog": 1, "cow": largest})
    with pytest.raises(TLError) as err:
        read_labels(path)
    message = str(err.value)
    assert str(path) in message and f'"cow" has id {largest:,}' in message
    assert f"{largest + 1:,} outputs" in message and "the largest id allowed" in message
    assert "for 3 classes is 130" in message


def test_read_labels_accepts_ids_with_gaps_up_to_the_limit(tmp_path):
    assert max_class_id(3) == 130
    path = write_labels(tmp_path / "labels.json", {"cat": 0, "dog": 7, "cow": 130})
    assert read_labels(path) == {"cat": 0, "dog": 7, "cow": 130}


def test_read_labels_names_in_nfc_form(tmp_path):
    decomposed = unicodedata.normalize("NFD", "café")
    path = write_labels(tmp_path / "labels.json", {decomposed: 0, "tea": 1})
    assert list(read_labels(path)) == ["café", "tea"]
    same_twice = write_labels(tmp_path / "twice.json", {decomposed: 0, "café": 1})
    with pytest.raises(TLError, match="listed twice"):
        read_labels(same_twice)


@pytest.mark.parametrize("form", ["NFD", "NFC"])
def test_scan_matches_folder_and_labels_names_in_any_unicode_form(tmp_path, form):
    """A folder "café" made on macOS (decomposed) matches "café" in labels.json, and back."""
    folder_name = unicodedata.normalize(form, "café")
    label_name = unicodedata.normalize("NFD" if form == "NFC" else "NFC", "café")
    assert folder_name != label_name
    root = make_dataset(tmp_path / "training", {folder_name: 2, "tea": 1})
    labels = read_labels(write_labels(tmp_path / "labels.json", {label_name: 0, "tea": 1}))
    folder = scan_image_folder(root, labels)
    assert folder.counts() == {"café": 2, "tea": 1}
    assert [Path(p).parent.name for p in folder.paths][:2] == [folder_name, folder_name]


def test_scan_refuses_two_folders_with_one_name_in_two_forms(tmp_path):
    root = make_dataset(
        tmp_path / "training",
        {unicodedata.normalize("NFD", "café"): 1, unicodedata.normalize("NFC", "café"): 1},
    )
    with pytest.raises(TLError, match="same name in different Unicode forms"):
        scan_image_folder(root, {"café": 0})


def test_read_labels_duplicate_id_names_both_classes(tmp_path):
    path = write_labels(tmp_path / "labels.json", {"cat": 0, "dog": 1, "cow": 1})
    with pytest.raises(TLError, match=r'"dog" and "cow" both have id 1'):
        read_labels(path)


def test_read_labels_missing_file_and_symlink(tmp_path):
    with pytest.raises(TLError, match="not found.*nope.json"):
        read_labels(tmp_path / "nope.json")
    real = write_labels(tmp_path / "real.json", {"a": 0})
    link = tmp_path / "labels.json"
    link.symlink_to(real)
    with pytest.raises(TLError, match="symbolic link"):
        read_labels(link)


def test_read_labels_accepts_utf8_bom(tmp_path):
    path = tmp_path / "labels.json"
    path.write_bytes(b'\xef\xbb\xbf{"caf\xc3\xa9": 0}')
    assert read_labels(path) == {"café": 0}


def test_missing_ids():
    assert missing_ids({"a": 0, "b": 2, "c": 5}) == [1, 3, 4]
    assert missing_ids({"a": 1, "b": 0}) == []
    assert missing_ids({}) == []


# --------------------------------------------------------------------------- folder scan


def test_scan_ids_follow_labels_not_folder_order(training, capsys):
    folder = scan_image_folder(training, LABELS)
    names = [Path(p).parent.name for p in folder.paths]
    assert names == ["dress"] * 3 + ["hat"] + ["t-shirt"] * 2  # sorted by folder, then file
    assert folder.class_ids.dtype == np.int32
    assert folder.class_ids.tolist() == [LABELS[n] for n in names]
    assert all(os.path.isabs(p) for p in folder.paths)
    assert len(folder) == 6
    assert list(folder.counts().items()) == [("t-shirt", 2), ("dress", 3), ("hat", 1)]
    assert folder.skipped_files == 0
    assert capsys.readouterr().out == ""


def test_scan_is_deterministic_and_sorts_files(tmp_path):
    for name in ["b.jpg", "c.JPG", "a.jpeg", "D.JPEG"]:
        write_jpeg(tmp_path / "ds" / "x" / name)
    folder = scan_image_folder(tmp_path / "ds", {"x": 0})
    assert [Path(p).name for p in folder.paths] == ["D.JPEG", "a.jpeg", "b.jpg", "c.JPG"]
    assert scan_image_folder(tmp_path / "ds", {"x": 0}).paths == folder.paths


def test_scan_with_id_gaps_counts_in_id_order(tmp_path):
    root = make_dataset(tmp_path / "ds", {"a": 1, "b": 2})
    folder = scan_image_folder(root, {"b": 0, "a": 3})
    assert folder.class_ids.tolist() == [3, 0, 0]
    assert list(folder.counts().items()) == [("b", 2), ("a", 1)]


def test_scan_missing_folder(tmp_path):
    with pytest.raises(TLError, match=r"training folder .*nowhere does not exist.*dataset_tr"):
        scan_image_folder(tmp_path / "nowhere", LABELS)
    with pytest.raises(TLError, match=r"validation folder .*nowhere.*dataset_validation_dir"):
        scan_image_folder(tmp_path / "nowhere", LABELS, role="validation")


def test_scan_path_is_a_file(tmp_path):
    path = write_jpeg(tmp_path / "x.jpg")
    with pytest.raises(TLError, match=r"x\.jpg is not a folder"):
        scan_image_folder(path, LABELS)


def test_scan_refuses_symlinked_dataset_folder(training, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(training)
    with pytest.raises(TLError, match=r"link is a symbolic link"):
        scan_image_folder(link, LABELS)


def test_scan_refuses_symlinked_class_folder(tmp_path):
    root = make_dataset(tmp_path / "ds", {"dress": 1, "t-shirt": 1})
    (root / "hat").symlink_to(root / "dress")
    with pytest.raises(TLError, match=r"class folder .*hat is a symbolic link"):
        scan_image_folder(root, LABELS)


def test_scan_refuses_symlinked_image(training, tmp_path):
    real = write_jpeg(tmp_path / "elsewhere.jpg")
    (training / "hat" / "linked.jpg").symlink_to(real)
    with pytest.raises(TLError, match=r"hat/linked\.jpg is a symbolic link"):
        scan_image_folder(training, LABELS)


def test_scan_unknown_class_folder(training, tmp_path):
    write_jpeg(training / "socks" / "s.jpg")
    labels_path = tmp_path / "labels.json"
    with pytest.raises(TLError) as err:
        scan_image_folder(training, LABELS, labels_path=labels_path)
    message = str(err.value)
    assert str(training / "socks") in message
    assert str(labels_path) in message
    assert "Add it" in message and "remove the folder" in message


def test_scan_unknown_class_hints_at_case(training):
    (training / "hat").rename(training / "Hat")
    with pytest.raises(TLError, match=r"case sensitive: 'Hat' vs 'hat'"):
        scan_image_folder(training, LABELS)


def test_scan_dataset_root_given_instead_of_training(tmp_path):
    make_dataset(tmp_path / "ds" / "training", {"hat": 1})
    make_dataset(tmp_path / "ds" / "validation", {"hat": 1})
    with pytest.raises(TLError, match="dataset root folder"):
        scan_image_folder(tmp_path / "ds", {"hat": 0})


def test_scan_training_class_without_folder(tmp_path):
    root = make_dataset(tmp_path / "training", {"dress": 1, "t-shirt": 1})
    with pytest.raises(TLError) as err:
        scan_image_folder(root, LABELS, labels_path="data/labels.json")
    message = str(err.value)
    assert '"hat"' in message
    assert str(root / "hat") in message
    assert "data/labels.json" in message


def test_scan_validation_class_without_folder_is_fine(tmp_path, capsys):
    root = make_dataset(tmp_path / "validation", {"dress": 2, "t-shirt": 1})
    folder = scan_image_folder(root, LABELS, role="validation")
    assert folder.missing_classes == ("hat",)
    assert folder.counts() == {"t-shirt": 1, "dress": 2, "hat": 0}
    assert folder.class_ids.tolist() == [1, 1, 0]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("role", ["training", "validation"])
def test_scan_empty_class_folder(training, role):
    (training / "hat" / "img_0.jpg").unlink()
    (training / "hat" / "notes.txt").write_text("no images here")
    with pytest.raises(TLError, match=rf"{role} class folder .*hat has no JPEG images"):
        scan_image_folder(training, LABELS, role=role)


def test_scan_no_class_folders(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "readme.txt").write_text("hi")
    (tmp_path / "ds" / ".git").mkdir()
    with pytest.raises(TLError, match=r"ds has no class sub-folders. Expected layout"):
        scan_image_folder(tmp_path / "ds", LABELS)


@pytest.mark.parametrize(
    "content, kind",
    [
        (None, "PNG image"),
        (b"", "empty file"),
        (b"GIF89a....", "GIF image"),
        (b"<!DOCTYPE html>", "HTML"),
        (b"hello", "unknown data"),
    ],
)
def test_scan_refuses_jpg_that_is_not_jpeg(training, content, kind):
    fake = training / "dress" / "fake.jpg"
    if content is None:
        Image.new("RGB", (9, 9)).save(fake, "PNG")
    else:
        fake.write_bytes(content)
    with pytest.raises(TLError) as err:
        scan_image_folder(training, LABELS)
    message = str(err.value)
    assert f"{fake}: {kind}" in message
    assert "Re-save" in message


def test_scan_skips_non_jpeg_files_with_one_warning(training, capsys):
    (training / "dress" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    Image.new("RGB", (9, 9)).save(training / "hat" / "photo.png")
    (training / "t-shirt" / "Thumbs.db").write_bytes(b"x")
    (training / "README.txt").write_text("loose file in the dataset folder")
    folder = scan_image_folder(training, LABELS)
    assert folder.skipped_files == 4
    assert len(folder) == 6
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("training: skipped 4 files that are not JPEG")
    assert "(e.g. README.txt)" in lines[0]


def test_scan_ignores_hidden_folders_silently(training, capsys):
    write_jpeg(training / ".ipynb_checkpoints" / "x.jpg")
    write_jpeg(training / "dress" / ".ipynb_checkpoints" / "y.jpg")
    (training / ".git").mkdir()
    folder = scan_image_folder(training, LABELS)
    assert len(folder) == 6 and folder.skipped_files == 0
    assert capsys.readouterr().out == ""


def test_scan_5000_images(tmp_path, capsys):
    """Many files per class: every one listed with its id (its speed is the benchmark's job)."""
    data = (write_jpeg(tmp_path / "one.jpg")).read_bytes()
    labels = {f"class_{c}": c for c in range(10)}
    for name in labels:
        folder = tmp_path / "ds" / name
        folder.mkdir(parents=True)
        for i in range(500):
            (folder / f"{i:04d}.jpg").write_bytes(data)
    folder = scan_image_folder(tmp_path / "ds", labels)
    assert len(folder) == 5000
    assert folder.counts() == {name: 500 for name in labels}


# --------------------------------------------------------------------------- image loading


def test_load_images_shapes_dtype_range_and_order(tmp_path):
    colors = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (128, 128, 128), (0, 0, 0)]
    sizes = [(8, 8), (40, 30), (17, 23), (30, 12), (9, 31)]
    paths = [
        str(write_jpeg(tmp_path / f"{i}.jpg", size=s, color=c))
        for i, (s, c) in enumerate(zip(sizes, colors, strict=True))
    ]
    batches = list(load_images(paths, image_size=16, batch_size=2))
    assert [b.shape for b in batches] == [(2, 16, 16, 3), (2, 16, 16, 3), (1, 16, 16, 3)]
    images = np.concatenate([b.numpy() for b in batches])
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 255.0
    assert images.max() > 200.0  # raw pixel values, not rescaled to [0, 1] or [-1, 1]
    means = images.mean(axis=(1, 2))
    np.testing.assert_allclose(means, np.array(colors, dtype=np.float32), atol=4.0)
    # No autotuning thread: deleting the pass's iterator would wait for it (up to 10 s).
    assert load_images(paths, 16, 2).options().autotune.enabled is False


def test_load_images_grayscale_becomes_rgb(tmp_path):
    path = write_jpeg(tmp_path / "gray.jpg", size=(20, 11), color=(90, 0, 0), mode="L")
    (batch,) = list(load_images([str(path)], image_size=8, batch_size=4))
    assert batch.shape == (1, 8, 8, 3)
    image = batch.numpy()[0]
    np.testing.assert_allclose(image[..., 0], image[..., 1])
    np.testing.assert_allclose(image[..., 0], image[..., 2])
    assert abs(float(image.mean()) - 90.0) < 3.0


def test_load_images_empty_list(tmp_path):
    assert list(load_images([], image_size=8, batch_size=4)) == []


def truncated_batch_setup(tmp_path: Path) -> tuple[list[str], str]:
    """Ten good JPEGs with number 6 truncated to half its size; return (paths, bad path)."""
    paths = [str(write_jpeg(tmp_path / f"{i:02d}.jpg", size=(20 + i, 15))) for i in range(10)]
    bad = Path(paths[6])
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return paths, str(bad)


def test_truncated_jpeg_fails_at_its_batch_and_is_named(tmp_path):
    paths, bad = truncated_batch_setup(tmp_path)
    batch_size = 3
    batches = iter(load_images(paths, image_size=8, batch_size=batch_size))
    assert next(batches).shape[0] == 3  # images 0-2
    assert next(batches).shape[0] == 3  # images 3-5
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        next(batches)  # images 6-8: holds the truncated file
    error = bad_image_error(paths[2 * batch_size : 3 * batch_size], caught.value)
    assert isinstance(error, TLError)
    assert bad in str(error)
    assert "truncated" in str(error)
    assert "Re-save" in str(error)
    assert paths[7] not in str(error)


def test_iter_batches_raises_tlerror_naming_the_file(tmp_path):
    paths, bad = truncated_batch_setup(tmp_path)
    seen = []
    with pytest.raises(TLError, match=bad):
        for batch in iter_batches(paths, image_size=8, batch_size=4):
            seen.append(batch.shape[0])
    assert seen == [4]


def test_a_bad_file_in_a_pass_of_several_views_is_named(tmp_path):
    paths, bad = truncated_batch_setup(tmp_path)  # file 6 of 10: rows 18-20 of 30
    seen = []
    with pytest.raises(TLError, match=bad):
        for batch in iter_batches(paths, 8, batch_size=4, view=("", "mirror", "crop")):
            seen.append(batch.shape[0])
    assert seen == [4, 4, 4, 4]  # rows 0-15 (files 0-5) came through
    assert files_of_batch(paths, 4, 4, views=3) == paths[5:7]  # rows 16-19
    assert files_of_batch(paths, 4, 0, views=3) == paths[0:2]  # rows 0-3


def test_find_bad_images(tmp_path):
    paths, bad = truncated_batch_setup(tmp_path)
    gone = str(tmp_path / "deleted.jpg")
    found = dict(find_bad_images([*paths, gone]))
    assert list(found) == [bad, gone]
    assert "truncated" in found[bad]
    assert "not found" in found[gone]
    assert find_bad_images(paths[:3]) == []


def test_bad_image_error_without_culprit_keeps_original_message(tmp_path):
    paths = [str(write_jpeg(tmp_path / "ok.jpg"))]
    original = tf.errors.InvalidArgumentError(None, None, "{{function_node x}} boom\nmore")
    error = bad_image_error(paths, original)
    assert "boom" in str(error) and "function_node" not in str(error)
    assert paths[0] in str(error)


# --------------------------------------------------------------------------- shipped samples


def test_samples_clothing5(capsys):
    labels = read_labels(SAMPLES / "labels.json")
    assert labels == {"t-shirt": 0, "dress": 1, "shoes": 2, "hat": 3, "pants": 4}
    assert list(labels) != sorted(labels)
    training = scan_image_folder(SAMPLES / "training", labels)
    validation = scan_image_folder(SAMPLES / "validation", labels, role="validation")
    assert training.counts() == dict.fromkeys(labels, 25)
    assert validation.counts() == dict.fromkeys(labels, 8)
    assert training.skipped_files == validation.skipped_files == 0
    assert capsys.readouterr().out == ""
    assert find_bad_images(validation.paths) == []
    for path in training.paths[::25]:
        with Image.open(path) as image:
            assert max(image.size) == 224 and image.mode == "RGB"
            assert not image.getexif()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_images_the_right_way_up(tmp_path, orientation):
    stored = quadrant_pixels(32, 32)
    path = write_oriented_jpeg(tmp_path / f"o{orientation}.jpg", stored, orientation)
    assert exif_orientation(str(path)) == orientation
    (batch,) = list(load_images([str(path)], image_size=32, batch_size=1))
    expected = EXIF_UPRIGHT[orientation](stored).astype(np.float32)
    np.testing.assert_allclose(batch.numpy()[0], expected, atol=12)
    with Image.open(path) as image:  # Pillow, turned as a photo viewer shows it, agrees
        shown = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.float32)
    np.testing.assert_allclose(batch.numpy()[0], shown, atol=12)


def test_exif_rotation_of_a_portrait_photo_swaps_its_sides(tmp_path):
    stored = quadrant_pixels(48, 16)  # stored landscape, shown portrait (orientation 6)
    path = write_oriented_jpeg(tmp_path / "portrait.jpg", stored, 6)
    upright_image = dataset.upright(tf.io.decode_jpeg(tf.io.read_file(str(path))), tf.constant(6))
    assert upright_image.shape == (48, 16, 3)
    np.testing.assert_allclose(upright_image.numpy(), np.rot90(stored, -1), atol=12)


@pytest.mark.parametrize(
    ("height", "width", "size", "ratio"),
    [
        (3024, 4032, 224, 4),  # a 12 MP phone photo at the default size: 756 x 1008
        (4032, 3024, 224, 4),  # the same, portrait
        (768, 1024, 224, 1),  # under 4x the size: decoded whole, as before
        (895, 2000, 224, 1),
        (896, 2000, 224, 2),
        (6000, 8000, 224, 8),  # never more than libjpeg's 1/8
        (128, 128, 224, 1),  # smaller than the input size
    ],
)
def test_decode_ratio_keeps_twice_the_input_size(height, width, size, ratio):
    assert dataset.DECODE_RATIOS[int(dataset.decode_ratio_index(height, width, size))] == ratio


def smooth_photo(height: int, width: int) -> np.ndarray:
    """A large uint8 image of gradients and soft shapes: what a photo looks like to a JPEG."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * x / width
    green = 127 + 120 * np.sin(y / 40.0) * np.cos(x / 55.0)
    blue = 255 * ((x - width / 3) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2)
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def test_large_photo_is_decoded_at_a_reduced_scale_and_still_looks_the_same(tmp_path):
    stored = smooth_photo(768, 1024)
    path = tmp_path / "big.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=92)
    contents = tf.io.read_file(str(path))
    decoded = dataset.decode_jpeg(contents, 32).numpy()
    assert decoded.shape == (96, 128, 3)  # 1/8: 768 >= 2 * 32 * 8
    with Image.open(path) as image:  # Pillow asks libjpeg for the same 1/8 decode
        image.draft("RGB", (128, 96))
        assert image.size == (128, 96)
        np.testing.assert_allclose(decoded, np.asarray(image, np.float32), atol=3)
    assert dataset.decode_jpeg(contents, 224).shape == (768, 1024, 3)  # under 4 x 224: whole
    # What the model sees is the photo: the full decode shrunk by area averaging, to a few levels
    (batch,) = list(load_images([str(path)], image_size=32, batch_size=1))
    with Image.open(path) as image:
        reference = np.asarray(image.convert("RGB").resize((32, 32), Image.BOX), np.float32)
    assert np.abs(batch.numpy()[0] - reference).mean() < 4


def test_large_portrait_photo_with_exif_orientation_is_upright(tmp_path):
    stored = quadrant_pixels(1024, 768)  # stored landscape, shown portrait (orientation 6)
    path = write_oriented_jpeg(tmp_path / "portrait.jpg", stored, 6)
    (batch,) = list(load_images([str(path)], image_size=32, batch_size=1))
    expected = np.asarray(
        Image.fromarray(np.rot90(stored, -1).copy()).resize((32, 32), Image.NEAREST), np.float32
    )
    inner = (slice(2, 14), slice(18, 30))  # away from the quadrants' edges
    for rows in inner:
        for cols in inner:
            np.testing.assert_allclose(batch.numpy()[0][rows, cols], expected[rows, cols], atol=12)


def test_exif_orientation_of_files_without_one(tmp_path):
    plain = write_jpeg(tmp_path / "plain.jpg")
    assert exif_orientation(str(plain)) == 1
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff" + b"\0" * 20)
    assert exif_orientation(str(junk)) == 1  # the decoder names it later
    assert exif_orientation(str(tmp_path / "gone.jpg")) == 1
