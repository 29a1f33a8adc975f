"""Augmented views of training images, each computed once by the base and kept in the cache.

A view is a fixed transform of the decoded, upright image (before it is resized to the input
size), or of the resized image (`AFTER_RESIZE`): the same image always gives the same view,
so the base's features of a view can be cached like those of the image itself. The store
keeps a view's features under `view_digest(image digest, view)`, which follows the view's
name and the source of its transform: a changed view is computed again, and the other views
and the image itself are not. Only training images get views; validation images are always
used as they are.

The `augmentation` configuration key names a set of views (`VIEW_SETS`); the head then trains
on every training image once as it is and once per view. Fine-tuning also trains on the
"noise" view of each training image (`FINE_TUNE_VIEWS`, the `fine_tune_noise` key): the image
with faint fixed pixel noise, so that the fine-tuned layers do not rely on detail that the
quantized model's 8-bit activations below the cut erase (docs/fine-tuning.md).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Sequence

import tensorflow as tf

CROP_FRACTION = 0.8  # the "crop" views keep this central fraction of each side
NOISE_STDDEV = 4.0  # the "noise" view's Gaussian pixel noise, on the 0..255 scale


def _mirror(image: tf.Tensor) -> tf.Tensor:
    """The image mirrored left to right."""
    return tf.image.flip_left_right(image)


def _crop(image: tf.Tensor) -> tf.Tensor:
    """The central CROP_FRACTION of each side (a zoom in, as a random crop would often be)."""
    return tf.image.central_crop(image, CROP_FRACTION)


def _mirror_crop(image: tf.Tensor) -> tf.Tensor:
    """The central crop of the mirrored image."""
    return _crop(_mirror(image))


def _as_is(image: tf.Tensor) -> tf.Tensor:
    """The image unchanged."""
    return image


def _noise(image: tf.Tensor, contents: tf.Tensor) -> tf.Tensor:
    """The resized image plus Gaussian noise of NOISE_STDDEV, kept within 0..255.

    The noise is drawn from a seed made of the file's bytes (`contents`), so the same photo
    always gets the same noise, wherever it lies, and the view can be cached.
    """
    seed = tf.bitcast(tf.reshape(tf.fingerprint(contents[None]), [2, 4]), tf.int32)
    noise = tf.random.stateless_normal(tf.shape(image), seed, stddev=NOISE_STDDEV)
    return tf.clip_by_value(image + noise, 0.0, 255.0)


def _resized_as_is(image: tf.Tensor, contents: tf.Tensor) -> tf.Tensor:
    """The resized image unchanged."""
    return image


VIEWS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "mirror": _mirror,
    "crop": _crop,
    "mirror_crop": _mirror_crop,
    "noise": _as_is,  # its change comes after the resize (AFTER_RESIZE)
}
# Views that change the resized image: (resized image, file bytes) -> image.
AFTER_RESIZE: dict[str, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]] = {
    "noise": _noise,
}

# The values of the `augmentation` key: the views each training image gets besides itself.
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "mirror": ("mirror",),
    "mirror_crop": ("mirror", "crop"),
    "mirror_crop_both": ("mirror", "crop", "mirror_crop"),
}
# Views that only fine-tuning trains on, besides the head's (with `fine_tune_noise`).
FINE_TUNE_VIEWS: tuple[str, ...] = ("noise",)


def views_of(augmentation: str) -> tuple[str, ...]:
    """The view names of an `augmentation` setting."""
    if augmentation not in VIEW_SETS:
        raise ValueError(f"augmentation must be one of {sorted(VIEW_SETS)}, not {augmentation!r}")
    return VIEW_SETS[augmentation]


def view_function(view: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """The transform of a view name ("" = the image as it is)."""
    if not view:
        return _as_is
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views: {sorted(VIEWS)}")
    return VIEWS[view]


def after_resize_function(view: str) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A view's transform of the resized image and the file's bytes (most views: none)."""
    view_function(view)  # refuses an unknown name
    return AFTER_RESIZE.get(view, _resized_as_is)


# What decides each view's pixels besides its name: the functions it runs and their constants.
# A change to one of them changes the digests of the views listed with it, and only those.
VIEW_CODE: dict[str, tuple[Callable, ...]] = {
    "mirror": (_mirror,),
    "crop": (_crop,),
    "mirror_crop": (_mirror_crop, _mirror, _crop),
    "noise": (_as_is, _noise),
}
VIEW_CONSTANTS: dict[str, tuple[str, ...]] = {  # module constants each view reads
    "mirror": (),
    "crop": ("CROP_FRACTION",),
    "mirror_crop": ("CROP_FRACTION",),
    "noise": ("NOISE_STDDEV",),
}


def view_description(view: str) -> str:
    """What decides a view's pixels: its name, its constants and its functions' source."""
    view_function(view)  # refuses an unknown name
    constants = {name: globals()[name] for name in VIEW_CONSTANTS[view]}
    parts = [view, json.dumps(constants, sort_keys=True)]
    for code in VIEW_CODE[view]:
        try:
            parts.append(inspect.getsource(code))
        except (OSError, TypeError):  # installed without sources: the name must do
            parts.append(code.__qualname__)
    return "\n".join(parts)


def view_digest(digest: bytes, view: str) -> bytes:
    """The store key of an image's view: the image digest itself for "" (the image as is)."""
    return view_digests([digest], [view])[0]


def view_digests(digests: Sequence[bytes], views: Sequence[str]) -> list[bytes]:
    """`view_digest` of each (digest, view) pair, each distinct view described once."""
    descriptions = {view: view_description(view).encode() for view in set(views) if view}
    return [
        hashlib.sha256(b"view\0" + digest + descriptions[view]).digest() if view else digest
        for digest, view in zip(digests, views, strict=True)
    ]
