"""Generate golden cases from real Keras 3, and small Keras model files for the loader tests.

Run it in a throwaway virtual environment outside the repository (neither TensorFlow nor Keras is
ever a dependency of batchnorm):

    python3.11 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.20.0 tf-keras==2.20.1 keras==3.15.1
    KERAS_BACKEND=tensorflow /tmp/tfenv/bin/python tools/make_keras3_golden.py [--only custom|nested]

It writes into tests/golden/ (with ``--only custom`` or ``--only nested``, only that item
below, leaving the other files as they are):

- keras3_cases.json / keras3_cases.npz: Keras 3 ``BatchNormalization`` layers run for a few
  training steps (outputs, gradients, weights after every step) and then in inference.
- keras_files.json plus the model files tfk_model.h5 (tf-keras ``model.save``), tfk_weights.h5
  (tf-keras ``model.save_weights``), tfk_nested.h5 (a Sequential inside a functional model),
  k3_model.keras (Keras 3 ``model.save``), k3_model.weights.h5 (Keras 3 ``model.save_weights``),
  tfk_no_bn.h5 and k3_no_bn.keras (no batch norm), and in both Keras the layouts where a layer's
  name does not say where its weights are: two nested models that each hold a layer named "bn"
  (tfk_repeated.h5, k3_repeated.keras) and a BatchNormalization inside TimeDistributed
  (tfk_time_distributed.h5, k3_time_distributed.keras, k3_time_distributed.weights.h5);
  the JSON records each file's batch-norm weights and an inference input/output pair, the
  convolution and dense weights are in keras3_cases.npz under ``files/``.
- keras_custom.json / keras_custom.npz and the files they describe: batch norms that no model
  config lists, in a custom layer ``Block`` holding two as attributes (the ResNet-block
  pattern), a registered subclass of BatchNormalization and, in tf-keras, a layer named "a/b":
  tfk_custom.h5 / tfk_custom_weights.h5 (tf-keras ``model.save`` / ``save_weights``),
  k3_custom.keras / k3_custom.weights.h5 (Keras 3); and tf-keras 2.13+'s own ``.keras`` and
  ``.weights.h5`` (tfk_native.keras, tfk_native.weights.h5) of a fused rank-4 layer, a
  SyncBatchNormalization and another fused layer, with the moving variances after one training
  step. The JSON gives every batch norm's weights (as Keras returned them, in the npz under
  ``<file>/<layer path>/<weight>``) and config, and an inference input/output pair.
- keras_nested.json / keras_nested.npz (``--only nested``) and the files they describe: three
  layers named "bn" at three depths of nested Sequential models (``enc/s2/bn``, ``enc/bn``,
  ``bn``) as k3_deep.keras, k3_deep.weights.h5 (Keras 3) and tfk_deep.weights.h5 (tf-keras
  2.13+'s ``.weights.h5``, which names no group); and tf-keras ``.h5`` files of batch norms built
  in a custom layer's ``build()`` and in an RNN cell under Bidirectional (tfk_cell.h5,
  tfk_cell_weights.h5), whose weights tf-keras names in the holder's scope. Each batch norm has
  its own random weights (no training, so no optimizer state is saved); the JSON and npz are laid
  out as keras_custom's, ``where`` being the layer's expected path, plus the Dense "dd" weights
  of the deep model (``<file>/dd_<i>``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf
import tf_keras

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden"
SEED = 20261123


def case(name, shape, layer=None, *, steps=3, dtype="float32", mask=False, call_training=True):
    return {
        "name": name,
        "input_shape": list(shape),
        "layer": layer or {},
        "steps": steps,
        "input_dtype": dtype,
        "mask": mask,
        "call_training": call_training,
    }


CASES = [
    case("dense_default", (16, 5)),
    case("rank3_axis_last", (6, 4, 3)),
    case("rank3_axis1", (6, 4, 3), {"axis": 1}),
    case("rank4_nhwc", (6, 4, 5, 3)),
    case("rank4_nchw", (6, 3, 4, 5), {"axis": 1}),
    case("rank5_ndhwc", (4, 2, 3, 4, 3)),
    case("no_center_no_scale", (12, 4), {"center": False, "scale": False}),
    case("no_center_rank4", (6, 3, 4, 5), {"axis": 1, "center": False}),
    case("momentum_eps", (12, 4), {"momentum": 0.9, "epsilon": 0.01}),
    case("momentum_eps_rank4", (6, 4, 5, 3), {"momentum": 0.5, "epsilon": 1e-5}),
    case("trainable_false", (12, 4), {"trainable": False}),
    case("mask_rank3", (6, 7, 3), {}, mask=True),
    case("mask_rank2", (16, 3), {}, mask=True),
    case("renorm", (16, 4), {"renorm": True}, steps=4),
    case(
        "renorm_clipping_rank4",
        (6, 3, 4, 5),
        {
            "axis": 1,
            "renorm": True,
            "renorm_momentum": 0.9,
            "renorm_clipping": {"rmin": 0.8, "rmax": 1.2, "dmax": 0.1},
        },
        steps=4,
    ),
    case("float64_rank4", (6, 3, 4, 5), {"axis": 1, "dtype": "float64"}, dtype="float64"),
    case("float16_mixed", (16, 4), {"dtype": "mixed_float16"}, dtype="float16"),
]


def initial_weights(layer, rng):
    weights = []
    for variable in layer.weights:
        shape = tuple(variable.shape)
        name = variable.path.split("/")[-1]
        if name == "gamma":
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name == "beta":
            value = 0.2 * rng.standard_normal(shape)
        elif name in ("moving_mean", "renorm_mean"):
            value = 0.1 * rng.standard_normal(shape)
        elif name == "moving_variance":
            value = rng.uniform(0.5, 1.5, shape)
        else:  # moving_stddev, renorm_stddev
            value = rng.uniform(0.8, 1.2, shape)
        weights.append(value.astype(keras.backend.standardize_dtype(variable.dtype)))
    return weights


def make_input(spec, rng):
    return (0.5 + 2.0 * rng.standard_normal(spec["input_shape"])).astype(spec["input_dtype"])


def run_case(spec, arrays, rng):
    name = spec["name"]
    layer = keras.layers.BatchNormalization(**spec["layer"])
    layer.build(tuple(spec["input_shape"]))
    weights = initial_weights(layer, rng)
    layer.set_weights(weights)
    for i, w in enumerate(weights):
        arrays[f"{name}/initial_{i}"] = w
    spec["weight_names"] = [v.path.split("/")[-1] for v in layer.weights]
    spec["trainable_names"] = [v.path.split("/")[-1] for v in layer.trainable_weights]
    spec["keras_config"] = json.loads(json.dumps(layer.get_config(), default=str))
    for step in range(spec["steps"]):
        x = make_input(spec, rng)
        dy = rng.standard_normal(x.shape).astype("float32")
        mask = None
        if spec["mask"]:
            mask = rng.uniform(size=x.shape[:-1]) > 0.3
            arrays[f"{name}/mask_{step}"] = mask
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(
                xt, training=spec["call_training"], mask=None if mask is None else tf.constant(mask)
            )
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        variables = [v.value for v in layer.trainable_weights]
        grads = tape.gradient(loss, [xt, *variables])
        arrays[f"{name}/x_{step}"] = x
        arrays[f"{name}/dy_{step}"] = dy
        arrays[f"{name}/y_{step}"] = y.numpy()
        arrays[f"{name}/dx_{step}"] = grads[0].numpy()
        for weight_name, grad in zip(spec["trainable_names"], grads[1:], strict=True):
            arrays[f"{name}/grad_{weight_name}_{step}"] = grad.numpy()
        for i, w in enumerate(layer.get_weights()):
            arrays[f"{name}/weights_{step}_{i}"] = w
    x = make_input(spec, rng)
    arrays[f"{name}/x_infer"] = x
    arrays[f"{name}/y_infer"] = np.asarray(layer(tf.constant(x), training=False))


# ---------------------------------------------------------------------------- model files
def conv_stack(layers, **second_bn):
    """Input (6, 6, 2) -> Conv2D -> BN -> ReLU -> Flatten -> Dense -> BN, in either Keras."""
    return [
        layers.Conv2D(3, 3, use_bias=False, name="conv"),
        layers.BatchNormalization(momentum=0.9, epsilon=0.01, name="bn_conv"),
        layers.ReLU(name="relu"),
        layers.Flatten(name="flatten"),
        layers.Dense(5, name="dense"),
        layers.BatchNormalization(name="bn_dense", **second_bn),
    ]


def train_a_little(model, rng, x_shape):
    model.compile(optimizer="sgd", loss="mse")
    x = rng.standard_normal((32, *x_shape)).astype("float32") * 2.0 + 0.5
    y = rng.standard_normal((32, *model.output_shape[1:])).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)


def bn_weights(layer, prefix, arrays):
    names = [v.name.split("/")[-1].split(":")[0] for v in layer.weights]
    for weight_name, value in zip(names, layer.get_weights(), strict=True):
        arrays[f"{prefix}/{layer.name}/{weight_name}"] = value
    return {"name": layer.name, "weight_names": names, "config": _plain(layer.get_config())}


def _plain(config):
    return json.loads(json.dumps(config, default=str))


def record_file(files, arrays, key, model, bn_layers, rng, input_shape, extra=None):
    x = rng.standard_normal((4, *input_shape)).astype("float32")
    arrays[f"files/{key}/x"] = x
    arrays[f"files/{key}/y"] = np.asarray(model(x, training=False))
    for layer in model.layers:
        if layer.name in ("conv", "dense"):
            for i, w in enumerate(layer.get_weights()):
                arrays[f"files/{key}/{layer.name}_{i}"] = w
    files[key] = {
        "batch_norm_layers": [bn_weights(layer, f"files/{key}", arrays) for layer in bn_layers],
        **(extra or {}),
    }


def make_files(arrays):
    rng = np.random.default_rng(SEED + 1)
    files = {}
    tf_keras.utils.set_random_seed(SEED)
    model = tf_keras.Sequential(
        [tf_keras.Input((6, 6, 2)), *conv_stack(tf_keras.layers, renorm=True, center=False)]
    )
    train_a_little(model, rng, (6, 6, 2))
    model.save(OUT / "tfk_model.h5")
    model.save_weights(OUT / "tfk_weights.h5")
    bn = [model.get_layer("bn_conv"), model.get_layer("bn_dense")]
    extra = {"fused": [bool(layer.fused) for layer in bn]}
    record_file(files, arrays, "tfk_model.h5", model, bn, rng, (6, 6, 2), extra)
    files["tfk_weights.h5"] = {**files["tfk_model.h5"], "arrays_of": "tfk_model.h5"}

    inner = tf_keras.Sequential(
        [
            tf_keras.Input((4,)),
            tf_keras.layers.Dense(3, name="inner_dense"),
            tf_keras.layers.BatchNormalization(scale=False, name="inner_bn"),
        ],
        name="inner",
    )
    x = tf_keras.Input((4,))
    y = tf_keras.layers.BatchNormalization(axis=1, epsilon=0.1, name="outer_bn")(inner(x))
    nested = tf_keras.Model(x, y)
    train_a_little(nested, rng, (4,))
    nested.save(OUT / "tfk_nested.h5")
    bn = [inner.get_layer("inner_bn"), nested.get_layer("outer_bn")]
    record_file(files, arrays, "tfk_nested.h5", nested, bn, rng, (4,))

    keras.utils.set_random_seed(SEED)
    model3 = keras.Sequential([keras.Input((6, 6, 2)), *conv_stack(keras.layers, scale=False)])
    train_a_little(model3, rng, (6, 6, 2))
    model3.save(OUT / "k3_model.keras")
    model3.save_weights(OUT / "k3_model.weights.h5")
    bn = [model3.get_layer("bn_conv"), model3.get_layer("bn_dense")]
    record_file(files, arrays, "k3_model.keras", model3, bn, rng, (6, 6, 2))
    files["k3_model.weights.h5"] = {**files["k3_model.keras"], "arrays_of": "k3_model.keras"}

    plain = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2, name="dense")])
    plain.save(OUT / "tfk_no_bn.h5")
    plain3 = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    plain3.save(OUT / "k3_no_bn.keras")
    make_placement_files(files, arrays)
    return files


def repeated_names(keras_module):
    """A Sequential "zz" and a functional model "aa", each holding a batch norm named "bn" with
    its own settings (Keras 3 saves "aa"'s group, functional/, before "zz"'s, sequential/)."""
    layers = keras_module.layers
    zz = keras_module.Sequential(
        [
            keras_module.Input((4,)),
            layers.Dense(3, name="zz_dense"),
            layers.BatchNormalization(momentum=0.5, epsilon=0.1, name="bn"),
        ],
        name="zz",
    )
    inner = keras_module.Input((3,))
    aa = keras_module.Model(inner, layers.BatchNormalization(name="bn")(inner), name="aa")
    x = keras_module.Input((4,))
    return keras_module.Model(x, aa(zz(x))), [
        ("zz/bn", zz.get_layer("bn")),
        ("aa/bn", aa.get_layer("bn")),
    ]


def time_distributed(keras_module):
    """A batch norm inside TimeDistributed, then one after it, on (batch, 2, 3) inputs."""
    layers = keras_module.layers
    inner = layers.BatchNormalization(epsilon=0.1, name="td_bn")
    x = keras_module.Input((2, 3))
    wrapped = layers.TimeDistributed(inner, name="td")
    after = layers.BatchNormalization(momentum=0.9, name="after")
    model = keras_module.Model(x, after(wrapped(x)))
    return model, [("td/td_bn", inner), ("after", after)]


def make_placement_files(files, arrays):
    rng = np.random.default_rng(SEED + 2)
    for keras_module, prefix, suffix in ((tf_keras, "tfk", ".h5"), (keras, "k3", ".keras")):
        keras_module.utils.set_random_seed(SEED)
        for stem, make, shape in (
            ("repeated", repeated_names, (4,)),
            ("time_distributed", time_distributed, (2, 3)),
        ):
            model, placed = make(keras_module)
            train_a_little(model, rng, shape)
            key = f"{prefix}_{stem}{suffix}"
            if keras_module is tf_keras:  # its optimizer weights of two "bn/gamma:0" collide
                model.save(OUT / key, include_optimizer=False)
            else:
                model.save(OUT / key)
            x = rng.standard_normal((4, *shape)).astype("float32")
            arrays[f"files/{key}/x"] = x
            arrays[f"files/{key}/y"] = np.asarray(model(x, training=False))
            layers = []
            for path, layer in placed:
                record = bn_weights(layer, f"files/{key}/{path.rpartition('/')[0]}", arrays)
                layers.append({**record, "path": path})
            files[key] = {"batch_norm_layers": layers}
            if prefix == "k3" and stem == "time_distributed":
                model.save_weights(OUT / "k3_time_distributed.weights.h5")
                files["k3_time_distributed.weights.h5"] = {**files[key], "arrays_of": key}


# ------------------------------------------------------- batch norms no config lists
def custom_layer_classes(keras_module):
    """``Block``, a layer holding two batch norms as attributes (auto-named, as in a ResNet
    block), and ``MyBN``, a registered subclass of BatchNormalization."""
    layers = keras_module.layers
    register = (
        keras.saving.register_keras_serializable("batchnorm_golden")
        if keras_module is keras
        else tf_keras.utils.register_keras_serializable("batchnorm_golden")
    )

    class Block(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.bn1 = layers.BatchNormalization(momentum=0.5)
            self.bn2 = layers.BatchNormalization(epsilon=0.1)

        def call(self, inputs, training=None):
            return self.bn2(self.bn1(inputs, training=training), training=training)

    class MyBN(layers.BatchNormalization):
        pass

    return register(Block), register(MyBN)


def custom_model(keras_module):
    """stem -> Block(bn1, bn2) -> MyBN "mine" -> ["a/b" (tf-keras only)] -> head, on (batch, 4)."""
    keras_module.backend.clear_session()  # auto names batch_normalization, _1 inside the block
    block_class, subclass = custom_layer_classes(keras_module)
    layers = keras_module.layers
    x = keras_module.Input((4,))
    stem = layers.BatchNormalization(name="stem")
    block = block_class(name="block")
    mine = subclass(epsilon=0.5, momentum=0.8, name="mine")
    head = layers.BatchNormalization(momentum=0.9, name="head")
    y = mine(block(stem(x)))
    placed = [("stem", stem), ("block.bn1", block.bn1), ("block.bn2", block.bn2), ("mine", mine)]
    if keras_module is tf_keras:
        slash = layers.BatchNormalization(epsilon=0.2, name="a/b")
        y = slash(y)
        placed.append(("a/b", slash))
    placed.append(("head", head))
    return keras_module.Model(x, head(y)), placed


def native_tf_keras_model():
    """tf-keras' own ``.keras`` layout: a fused rank-4 layer, a SyncBatchNormalization (never
    fused) and another fused layer."""
    tf_keras.backend.clear_session()
    layers = tf_keras.layers
    x = tf_keras.Input((4, 4, 3))
    placed = [
        ("bn", layers.BatchNormalization(momentum=0.5, name="bn")),
        ("sync", layers.experimental.SyncBatchNormalization(momentum=0.5, name="sync")),
        ("last", layers.BatchNormalization(momentum=0.8, epsilon=0.01, name="last")),
    ]
    y = x
    for _, layer in placed:
        y = layer(y)
    return tf_keras.Model(x, y), placed


def record_placed(arrays, key, model, placed, rng, shape):
    x = (0.5 + 2.0 * rng.standard_normal((6, *shape))).astype("float32")
    arrays[f"{key}/x"] = x
    arrays[f"{key}/y"] = np.asarray(model(x, training=False))
    layers = []
    for where, layer in placed:
        names = [v.name.split("/")[-1].split(":")[0] for v in layer.weights]
        for weight_name, value in zip(names, layer.get_weights(), strict=True):
            arrays[f"{key}/{where}/{weight_name}"] = value
        layers.append(
            {
                "where": where,
                "name": layer.name,
                "class_name": type(layer).__name__,
                "weight_names": names,
                "config": _plain(layer.get_config()),
            }
        )
    return {"batch_norm_layers": layers}


def make_custom_files(arrays):
    rng = np.random.default_rng(SEED + 3)
    files = {}
    for keras_module, stem, suffixes in (
        (tf_keras, "tfk_custom", (".h5", "_weights.h5")),
        (keras, "k3_custom", (".keras", ".weights.h5")),
    ):
        keras_module.utils.set_random_seed(SEED)
        model, placed = custom_model(keras_module)
        train_a_little(model, rng, (4,))
        full, weights_only = (stem + suffix for suffix in suffixes)
        if keras_module is tf_keras:
            model.save(OUT / full, include_optimizer=False)
        else:
            model.save(OUT / full)
        model.save_weights(OUT / weights_only)
        files[full] = record_placed(arrays, full, model, placed, rng, (4,))
        files[weights_only] = {**files[full], "arrays_of": full}

    tf_keras.utils.set_random_seed(SEED)
    model, placed = native_tf_keras_model()
    for _, layer in placed:
        layer.set_weights(
            [
                1.0 + 0.1 * rng.standard_normal(3),
                0.1 * rng.standard_normal(3),
                0.2 * rng.standard_normal(3),
                rng.uniform(0.5, 1.5, 3),
            ]
        )
    model.save(OUT / "tfk_native.keras")  # tf-keras 2.13+'s own format, not the legacy HDF5
    model.save_weights(OUT / "tfk_native.weights.h5")
    key = "tfk_native.keras"
    files[key] = record_placed(arrays, key, model, placed, rng, (4, 4, 3))
    files[key]["fused"] = [bool(getattr(layer, "fused", False)) for _, layer in placed]
    x_train = (1.0 + 2.0 * rng.standard_normal((8, 4, 4, 3))).astype("float32")
    model(tf.constant(x_train), training=True)  # one training step: moving statistics update
    arrays[f"{key}/x_train"] = x_train
    for where, layer in placed:
        arrays[f"{key}/{where}/moving_variance_after_step"] = layer.get_weights()[3]
        arrays[f"{key}/{where}/moving_mean_after_step"] = layer.get_weights()[2]
    files["tfk_native.weights.h5"] = {**files[key], "arrays_of": key}
    return files


# ------------------------------------- nested models and batch norms built in build()
def deep_model(keras_module):
    """outer = [enc = [s2 = [Dense "dd", BN "bn"], BN "bn"], BN "bn"], on (batch, 3): three
    layers named "bn" at three depths, each with its own epsilon."""
    layers = keras_module.layers
    s2 = keras_module.Sequential(
        [layers.Dense(3, name="dd"), layers.BatchNormalization(epsilon=0.1, name="bn")], name="s2"
    )
    enc = keras_module.Sequential(
        [keras_module.Input((3,)), s2, layers.BatchNormalization(epsilon=0.01, name="bn")],
        name="enc",
    )
    model = keras_module.Sequential(
        [keras_module.Input((3,)), enc, layers.BatchNormalization(name="bn")], name="outer"
    )
    placed = [("enc/s2/bn", s2.layers[-1]), ("enc/bn", enc.layers[-1]), ("bn", model.layers[-1])]
    return model, placed


def cell_model():
    """tf-keras: Bidirectional(RNN(cell)) -> Block -> BN "bn_end" on (batch, 3, 4), where the
    cell and Block build their Dense and BatchNormalization in ``build()``, so tf-keras names the
    batch norm's weights in their scope (``block/gamma:0`` beside ``block/kernel:0``)."""
    tf_keras.backend.clear_session()
    layers = tf_keras.layers
    register = tf_keras.utils.register_keras_serializable("batchnorm_golden_nested")

    @register
    class BNCell(layers.Layer):
        def __init__(self, units=2, **kwargs):
            super().__init__(**kwargs)
            self.units, self.state_size = units, units
            self.dense = layers.Dense(units, name="cell_dense")
            self.bn = layers.BatchNormalization(momentum=0.5, name="cell_bn")

        def build(self, shape):
            self.dense.build((shape[0], shape[-1] + self.units))
            self.bn.build((shape[0], self.units))
            self.built = True

        def call(self, inputs, states, training=None):
            joined = tf_keras.backend.concatenate([inputs, states[0]], axis=-1)
            h = self.bn(self.dense(joined), training=training)
            return h, [h]

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    @register
    class Block(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = layers.Dense(3, name="block_dense")
            self.bn = layers.BatchNormalization(epsilon=0.1, name="block_bn")

        def build(self, shape):
            self.dense.build(shape)
            self.bn.build((*shape[:-1], 3))
            super().build(shape)

        def call(self, inputs, training=None):
            return self.bn(self.dense(inputs), training=training)

    x = tf_keras.Input((3, 4))
    bidir = layers.Bidirectional(
        layers.RNN(BNCell(2, name="bn_cell"), return_sequences=True), name="bidir"
    )
    block = Block(name="block")
    end = layers.BatchNormalization(momentum=0.9, name="bn_end")
    model = tf_keras.Model(x, end(block(bidir(x))))
    placed = [
        ("bidir/forward_rnn/bn_cell", bidir.forward_layer.cell.bn),
        ("bidir/backward_rnn/bn_cell", bidir.backward_layer.cell.bn),
        ("block", block.bn),
        ("bn_end", end),
    ]
    return model, placed


def set_distinct_weights(placed, rng):
    """Every batch norm gets its own gamma, beta and moving statistics, so a layer loaded into
    another's module shows."""
    for _, layer in placed:
        size = layer.get_weights()[0].shape
        layer.set_weights(
            [
                1.0 + 0.3 * rng.standard_normal(size),
                0.2 * rng.standard_normal(size),
                rng.standard_normal(size),
                rng.uniform(0.5, 1.5, size),
            ]
        )


def make_nested_files(arrays):
    rng = np.random.default_rng(SEED + 4)
    files = {}
    for keras_module, stem, suffixes in (
        (keras, "k3_deep", (".keras", ".weights.h5")),
        (tf_keras, "tfk_deep", (".weights.h5",)),  # tf-keras 2.13+'s Keras-3 layout, no names
    ):
        keras_module.backend.clear_session()  # group names sequential, sequential/sequential
        keras_module.utils.set_random_seed(SEED)
        model, placed = deep_model(keras_module)
        set_distinct_weights(placed, rng)
        for suffix in suffixes:
            if suffix == ".keras":
                model.save(OUT / f"{stem}{suffix}")
            else:
                model.save_weights(OUT / f"{stem}{suffix}")
        key = stem + suffixes[0]
        files[key] = record_placed(arrays, key, model, placed, rng, (3,))
        for i, value in enumerate(model.get_layer("enc").get_layer("s2").layers[0].get_weights()):
            arrays[f"{key}/dd_{i}"] = value
        for suffix in suffixes[1:]:
            files[f"{stem}{suffix}"] = {**files[key], "arrays_of": key}

    tf_keras.utils.set_random_seed(SEED)
    model, placed = cell_model()
    set_distinct_weights(placed, rng)
    model.save(OUT / "tfk_cell.h5")
    model.save_weights(OUT / "tfk_cell_weights.h5")
    files["tfk_cell.h5"] = record_placed(arrays, "tfk_cell.h5", model, placed, rng, (3, 4))
    files["tfk_cell_weights.h5"] = {**files["tfk_cell.h5"], "arrays_of": "tfk_cell.h5"}
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=["custom", "nested"],
        help="write only the custom-layer files (keras_custom.*) or the nested-model files "
        "(keras_nested.*), leaving the others as they are",
    )
    options = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    versions = {
        "generator": "tools/make_keras3_golden.py",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf_keras": tf_keras.__version__,
        "backend": keras.backend.backend(),
    }
    if options.only is None:
        keras.utils.set_random_seed(SEED)
        rng = np.random.default_rng(SEED)
        arrays: dict[str, np.ndarray] = {}
        for spec in CASES:
            run_case(spec, arrays, rng)
        files = make_files(arrays)
        document = {**versions, "cases": CASES}
        (OUT / "keras3_cases.json").write_text(
            json.dumps(document, indent=1, sort_keys=True) + "\n"
        )
        (OUT / "keras_files.json").write_text(
            json.dumps({**versions, "files": files}, indent=1, sort_keys=True) + "\n"
        )
        np.savez_compressed(OUT / "keras3_cases.npz", **arrays)
        print(f"wrote {len(CASES)} Keras 3 cases, {len(files)} model files, {len(arrays)} arrays")
    for only, stem, make in (
        ("custom", "keras_custom", make_custom_files),
        ("nested", "keras_nested", make_nested_files),
    ):
        if options.only not in (None, only):
            continue
        more_arrays: dict[str, np.ndarray] = {}
        written = make(more_arrays)
        (OUT / f"{stem}.json").write_text(
            json.dumps({**versions, "files": written}, indent=1, sort_keys=True) + "\n"
        )
        np.savez_compressed(OUT / f"{stem}.npz", **more_arrays)
        print(f"wrote {len(written)} {only} model files, {len(more_arrays)} arrays")
    return 0


if __name__ == "__main__":
    sys.exit(main())
