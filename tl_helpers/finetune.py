"""Fine-tuning the top of the base from cached activations.

The base is cut at an internal layer into a lower part, which stays frozen, and an upper part,
which trains with the head. The lower part's output (the activations at the cut) never changes
during training, so it is computed once per image and view and kept in the feature store like
the pooled features; each epoch then runs only the upper part and the head, forward and back.
BatchNormalization layers above the cut stay in inference mode with their statistics and
weights as loaded (the Keras transfer-learning guide's recipe), and the layers below the cut
are never touched. The fine-tuned weights are copied back into the classifier, which stays one
model taking raw pixels: nothing of the split is visible to the user, MCT or the converter.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tl_helpers.errors import TLError
from tl_helpers.model import FEATURES_LAYER, PREDICTIONS_LAYER

keras = tf.keras

# The cut for the Keras MobileNetV2: below its last four inverted-residual blocks (13-16), whose
# input is 14x14 at 224 px. Chosen by measurement (docs/fine-tuning.md).
DEFAULT_CUT = "block_12_add"
FINE_TUNE_DROPOUT = 0.2  # before the head, as in the head-only training
BATCHES_PER_EXECUTION = 8  # training steps per Keras call (fewer Python round trips)


@dataclass
class Split:
    """A classifier's base cut in two at the layer `cut`.

    `lower`: raw pixels -> preprocessing -> base up to the cut -> activations, flattened to
    vectors (the feature store keeps vectors); `upper`: those vectors -> the rest of the base
    -> the pooled features. Both use the classifier's own layers (they share its weights).
    """

    cut: str
    shape: tuple[int, ...]  # the activations' shape per image, e.g. (14, 14, 32)
    lower: keras.Model
    upper: keras.Model
    upper_base: keras.Model  # the base's layers above the cut, from the activations' shape

    @property
    def size(self) -> int:
        """Numbers per image and view that the store keeps."""
        return int(np.prod(self.shape))

    @functools.cached_property
    def pool(self):
        """`upper` in inference mode as one traced function, for batches of any size."""
        spec = tf.TensorSpec([None, self.size], tf.float32)
        return tf.function(lambda x: self.upper(x, training=False), input_signature=[spec])


def base_of(classifier: keras.Model) -> keras.Model:
    """The base model nested in a classifier from `model.build_classifier`."""
    pooled = classifier.get_layer(FEATURES_LAYER)
    layer = pooled._inbound_nodes[0].inbound_layers
    if not isinstance(layer, keras.Model):
        raise TLError(
            f"fine_tune: {classifier.name} has no base model before its {FEATURES_LAYER} "
            "layer; build it with tl_helpers.model.build_classifier."
        )
    return layer


def choose_cut(base: keras.Model, cut: str) -> str | None:
    """The layer to cut at: `cut` when given, else DEFAULT_CUT when the base has it, else None
    (a base that is not a Keras MobileNetV2 is fine-tuned only at a cut the user names)."""
    if cut:
        return cut
    if DEFAULT_CUT in {layer.name for layer in base.layers}:
        return DEFAULT_CUT
    return None


def split_for(classifier: keras.Model, cut: str) -> Split | None:
    """The classifier's split at `cut` ("": the default cut), said in one line; None (also
    said) for a base with no default cut when none is named."""
    chosen = choose_cut(base_of(classifier), cut)
    if chosen is None:
        print(
            "fine_tune: the base is not a Keras MobileNetV2, so there is no default cut; name "
            'the layer to cut at in "fine_tune_cut" to fine-tune it (training the head only).'
        )
        return None
    split = split_classifier(classifier, chosen)
    print(
        f"fine_tune: the base is cut after {chosen} (activations {split.shape}); the layers "
        "above it train with the head"
    )
    return split


def valid_cuts(base: keras.Model) -> list[str]:
    """Every layer of `base` whose output alone joins the layers below it to those above."""
    return [layer.name for layer in base.layers if _cut_problem(base, layer.name)[1] is None]


def check_cut(base: keras.Model, cut: str) -> tf.Tensor:
    """The tensor at which `base` is cut, or a TLError saying why `cut` cannot split it.

    A cut splits the base when every path from its input to its output passes through the
    cut layer's output: no skip connection jumps over it, and nothing above reads the input.
    """
    names = [layer.name for layer in base.layers]
    if cut not in names:  # the name is at fault, not where the layer is: no cut to suggest
        close = difflib.get_close_matches(cut, names, n=1)
        hint = f' Did you mean "{close[0]}"?' if close else ""
        raise TLError(
            f'fine_tune_cut: "{cut}" is not a layer of the base model {base.name}.{hint} '
            "base_model.summary() lists its layer names."
        )
    tensor, problem = _cut_problem(base, cut)
    if problem is None:
        return tensor
    raise TLError(f"fine_tune_cut: {problem} {_suggestion(base, cut)}")


def _cut_problem(base: keras.Model, cut: str) -> tuple[tf.Tensor | None, str | None]:
    """(the cut tensor, None), or (None, why the layer `cut` of `base` does not split it)."""
    layer = base.get_layer(cut)
    if isinstance(layer, keras.layers.InputLayer):
        return None, (
            f'"{cut}" is the input of {base.name}; fine-tuning from it would train the whole '
            "base from the images."
        )
    try:
        tensor = layer.output
    except (AttributeError, RuntimeError):
        return None, f'layer "{cut}" of {base.name} is used more than once, not one place.'
    if isinstance(tensor, (list, tuple)):
        return None, f'layer "{cut}" of {base.name} has {len(tensor)} outputs, not one.'
    if any(tensor is output for output in base.outputs):
        return None, (
            f'"{cut}" is the last layer of {base.name}, so nothing above it would be fine-tuned.'
        )
    below = _ancestors(tensor)
    reached = False
    stack = [(output, None) for output in base.outputs]
    seen: set[int] = set()
    while stack:
        current, reader = stack.pop()
        if current is tensor:
            reached = True
            continue
        if id(current) in below:
            producer = current._keras_history[0].name
            return None, (
                f'cutting {base.name} after "{cut}" does not split it into two parts joined by '
                f'one tensor: "{reader}" above the cut also reads the output of "{producer}" '
                "below it (a connection jumps over the cut)."
            )
        if id(current) in seen:
            continue
        seen.add(id(current))
        source, node_index, _ = current._keras_history
        for parent in _inputs(source, node_index):
            stack.append((parent, source.name))
    if not reached:
        return None, f'layer "{cut}" of {base.name} does not lead to its output.'
    return tensor, None


def split_classifier(classifier: keras.Model, cut: str) -> Split:
    """Cut the classifier's base at layer `cut` (checked by `check_cut`) into lower and upper."""
    base = base_of(classifier)
    tensor = check_cut(base, cut)
    if any(side is None for side in tensor.shape[1:]):
        raise TLError(
            f'fine_tune_cut: the output of "{cut}" has no fixed shape ({tensor.shape}); cut at '
            "a layer whose output size is fixed."
        )
    shape = tuple(int(side) for side in tensor.shape[1:])
    size = int(np.prod(shape))
    # The lower part runs on the classifier's preprocessed pixels, as the base does.
    source, node_index, _ = (
        classifier.get_layer(FEATURES_LAYER)._inbound_nodes[0].keras_inputs[0]._keras_history
    )
    pixels = _inputs(source, node_index)[0]
    below = keras.Model(base.inputs, tensor, name=f"{base.name}_to_{cut}")
    flat = keras.layers.Reshape((size,), name="activations")(below(pixels, training=False))
    lower = keras.Model(classifier.inputs, flat, name="lower")
    upper_base = keras.Model(tensor, base.outputs[0], name=f"{base.name}_above_{cut}")
    upper = _upper_model(upper_base, shape, classifier.get_layer(FEATURES_LAYER))
    return Split(cut, shape, lower, upper, upper_base)


def _upper_model(
    upper_base: keras.Model, shape: tuple[int, ...], pooling: keras.layers.Layer
) -> keras.Model:
    """Flattened activations -> the base above the cut (inference mode) -> pooled features."""
    inputs = keras.Input(shape=(int(np.prod(shape)),), name="activations")
    x = keras.layers.Reshape(shape)(inputs)
    x = upper_base(x, training=False)
    return keras.Model(inputs, pooling(x), name="upper")


def pooled_features(split: Split, activations, batch_size: int = 256) -> np.ndarray:
    """The pooled base features of stored activations (rows in order), in batches."""
    out = np.empty((len(activations), split.upper.output_shape[-1]), dtype=np.float32)
    for start in range(0, len(activations), batch_size):
        batch = np.asarray(activations[start : start + batch_size], dtype=np.float32)
        out[start : start + len(batch)] = split.pool(batch).numpy()
    return out


def fine_tune_model(classifier: keras.Model, split: Split) -> keras.Model:
    """A trainable copy of the base above the cut plus the head, on flattened activations.

    A copy, so that it can be built in a distribution strategy's scope: its weights start as
    the classifier's and go back with `copy_back`. BatchNormalization layers are frozen (kept
    in inference mode with their statistics and weights as loaded); every other layer above
    the cut trains. A frozen normalization right after a convolution is folded into it
    (`folded_copy`): the same function and the same trainable kernel, computed faster.
    """
    upper_base = folded_copy(split.upper_base)
    inputs = keras.Input(shape=(split.size,), name="activations")
    x = keras.layers.Reshape(split.shape)(inputs)
    x = upper_base(x)
    head = classifier.get_layer(PREDICTIONS_LAYER)
    x = keras.layers.GlobalAveragePooling2D()(x) if len(x.shape) == 4 else x
    x = keras.layers.Dropout(FINE_TUNE_DROPOUT)(x)
    dense = keras.layers.Dense(head.units, activation="softmax", name=PREDICTIONS_LAYER)
    outputs = dense(x)
    dense.set_weights(head.get_weights())
    return keras.Model(inputs, outputs, name="fine_tune")


def folded_copy(model: keras.Model) -> keras.Model:
    """A copy of `model` for training with BatchNormalization frozen, layer for layer.

    Each convolution whose only consumer is a BatchNormalization becomes a convolution with
    the normalization folded in (`FoldedConv2D`, `FoldedDepthwiseConv2D`: the same kernel
    variable, times the normalization's per-channel scale, plus its offset) and the
    normalization becomes an identity layer of the same name; other BatchNormalization layers
    stay, not trainable. The function is the same, and so is every gradient of the kernel, but
    a training step no longer runs the normalization's forward and backward operations over
    the activations: MobileNetV2's top blocks train 1.6-1.7x as fast on a CPU
    (docs/fine-tuning.md). The copy's layers are in the same order as `model`'s.
    """
    folds = _foldable_pairs(model)
    norms = {bn.name for _, bn in folds.values()}

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if layer.name in folds:
            conv, bn = folds[layer.name]
            return _folded(conv, bn)
        if layer.name in norms:
            return keras.layers.Activation("linear", name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    for original, cloned in zip(model.layers, copy.layers, strict=True):
        if cloned.weights:
            cloned.set_weights(original.get_weights())
        cloned.trainable = not isinstance(cloned, keras.layers.BatchNormalization)
    return copy


class _Folded:
    """What both folded convolutions add: the frozen normalization's per-channel scale and
    offset, as constants (not weights: the layer's weights stay the convolution's own)."""

    def __init__(self, scale: np.ndarray, offset: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.scale = tf.constant(scale, dtype=tf.float32)
        self.offset = tf.constant(offset, dtype=tf.float32)

    def folded_offset(self) -> tf.Tensor:
        """The offset added after the convolution (a convolution's own bias is scaled too)."""
        return self.offset + self.bias * self.scale if self.use_bias else self.offset


class FoldedConv2D(_Folded, keras.layers.Conv2D):
    """Conv2D followed by a frozen BatchNormalization: conv(x, kernel * scale) + offset."""

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self.kernel * self.scale)
        return self.activation(tf.nn.bias_add(outputs, self.folded_offset()))


class FoldedDepthwiseConv2D(_Folded, keras.layers.DepthwiseConv2D):
    """DepthwiseConv2D followed by a frozen BatchNormalization, folded like FoldedConv2D."""

    def call(self, inputs):
        # Output channel c * multiplier + m comes from input channel c and kernel slice m.
        scale = tf.reshape(self.scale, self.depthwise_kernel.shape[2:])
        outputs = keras.backend.depthwise_conv2d(
            inputs,
            self.depthwise_kernel * scale,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self.activation(tf.nn.bias_add(outputs, self.folded_offset()))


def _foldable_pairs(model: keras.Model) -> dict[str, tuple[keras.layers.Layer, keras.layers.Layer]]:
    """Convolution name -> (convolution, BatchNormalization) for each normalization that is
    the only reader, in `model`'s graph, of the output of a plain channels-last convolution with
    no activation (an output of `model` is read outside it)."""
    calls = {
        layer.name: [
            node
            for index, node in enumerate(layer._inbound_nodes)
            if f"{layer.name}_ib-{index}" in model._network_nodes
        ]
        for layer in model.layers
    }
    consumers = {id(tensor): 1 for tensor in model.outputs}  # an output is read outside
    for nodes in calls.values():
        for node in nodes:
            for tensor in tf.nest.flatten(node.keras_inputs):
                consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    pairs = {}
    for bn in model.layers:
        if not isinstance(bn, keras.layers.BatchNormalization) or len(calls[bn.name]) != 1:
            continue
        conv = calls[bn.name][0].inbound_layers
        if (
            type(conv) in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
            and conv.data_format == "channels_last"
            and getattr(conv, "groups", 1) == 1
            and conv.activation is keras.activations.linear
            and len(calls.get(conv.name, ())) == 1
            and consumers.get(id(calls[conv.name][0].outputs)) == 1
            and list(bn.axis) in ([3], [-1])
        ):
            pairs[conv.name] = (conv, bn)
    return pairs


def _folded(conv: keras.layers.Layer, bn: keras.layers.Layer) -> keras.layers.Layer:
    """`conv` with the frozen `bn` after it folded in (its scale and offset, as constants)."""
    mean, variance = (np.asarray(v, dtype=np.float64) for v in (bn.moving_mean, bn.moving_variance))
    gamma = np.asarray(bn.gamma, dtype=np.float64) if bn.scale else np.ones_like(mean)
    beta = np.asarray(bn.beta, dtype=np.float64) if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + bn.epsilon)
    offset = beta - mean * scale
    kind = FoldedConv2D if type(conv) is keras.layers.Conv2D else FoldedDepthwiseConv2D
    return kind(scale.astype(np.float32), offset.astype(np.float32), **conv.get_config())


def copy_back(classifier: keras.Model, split: Split, trained: keras.Model) -> None:
    """Copy the fine-tuned weights into the classifier's base above the cut and its head.

    BatchNormalization layers were frozen (or folded into their convolution): theirs stay as
    loaded."""
    copy = next(layer for layer in trained.layers if isinstance(layer, keras.Model))
    for original, tuned in zip(split.upper_base.layers, copy.layers, strict=True):
        if original.weights and not isinstance(original, keras.layers.BatchNormalization):
            original.set_weights(tuned.get_weights())
    classifier.get_layer(PREDICTIONS_LAYER).set_weights(
        trained.get_layer(PREDICTIONS_LAYER).get_weights()
    )


def steps_per_execution(rows: int, batch_size: int) -> int:
    """Training steps per Keras call: a few, never more than an epoch."""
    return max(1, min(BATCHES_PER_EXECUTION, math.ceil(rows / batch_size)))


def _ancestors(tensor) -> set[int]:
    """ids of `tensor` and every tensor it is computed from."""
    found: set[int] = set()
    stack = [tensor]
    while stack:
        current = stack.pop()
        if id(current) in found:
            continue
        found.add(id(current))
        source, node_index, _ = current._keras_history
        stack.extend(_inputs(source, node_index))
    return found


def _inputs(layer: keras.layers.Layer, node_index: int) -> list:
    """The tensors a layer read at one of its calls (none for an InputLayer)."""
    if isinstance(layer, keras.layers.InputLayer):
        return []
    return list(tf.nest.flatten(layer._inbound_nodes[node_index].keras_inputs))


def _suggestion(base: keras.Model, cut: str) -> str:
    """Name the valid cuts nearest to `cut` in the base's layer order."""
    names = [layer.name for layer in base.layers]
    valid = valid_cuts(base)
    if not valid:
        return f"{base.name} has no layer that splits it so; set fine_tune to false."
    where = names.index(cut)
    below = [name for name in valid if names.index(name) < where]
    above = [name for name in valid if names.index(name) > where]
    near = [*below[-1:], *above[:1]]
    return "Cut at " + " or ".join(f'"{name}"' for name in near) + " instead."
