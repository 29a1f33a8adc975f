"""Augmented views of training images, each computed once by the base and kept in the cache.

A view is a fixed transform of the decoded, upright image (before it is resized to the input
size): the same image always gives the same view, so the base's features of a view can be
cached like those of the image itself. The store keeps a view's features under
`view_digest(image digest, view)`, which follows the view's name and the source of its
transform: a changed view is computed again, and the other views and the image itself are
not. Only training images get views; validation images are always used as they are.

The `augmentation` configuration key names a set of views (`VIEW_SETS`); the head then trains
on every training image once as it is and once per view.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Sequence

import tensorflow as tf

CROP_FRACTION = 0.8  # the "crop" views keep this central fraction of each side


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


VIEWS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "mirror": _mirror,
    "crop": _crop,
    "mirror_crop": _mirror_crop,
}

# The values of the `augmentation` key: the views each training image gets besides itself.
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "mirror": ("mirror",),
    "mirror_crop": ("mirror", "crop"),
    "mirror_crop_both": ("mirror", "crop", "mirror_crop"),
}


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


# What decides each view's pixels besides its name: the functions it runs and their constants.
# A change to one of them changes the digests of the views listed with it, and only those.
VIEW_CODE: dict[str, tuple[Callable, ...]] = {
    "mirror": (_mirror,),
    "crop": (_crop,),
    "mirror_crop": (_mirror_crop, _mirror, _crop),
}
VIEW_CONSTANTS: dict[str, tuple[str, ...]] = {  # module constants each view reads
    "mirror": (),
    "crop": ("CROP_FRACTION",),
    "mirror_crop": ("CROP_FRACTION",),
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
