"""Generate golden batch-norm cases from real tf-keras, for tests that run without TensorFlow.

Run it in a throwaway virtual environment outside the repository (TensorFlow is never a dependency
of batchnorm):

    python3.11 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.20.0 tf-keras==2.20.1
    /tmp/tfenv/bin/python tools/make_keras_golden.py

It writes tests/golden/keras_cases.json (case descriptions, layer configs as tf-keras writes them)
and tests/golden/keras_cases.npz (inputs, initial weights, and for every step the outputs,
gradients and weights that tf-keras produced).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import tf_keras

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden"
SEED = 20261122


def case(
    name,
    shape,
    layer=None,
    *,
    steps=3,
    dtype="float32",
    mask=False,
    adjustment=False,
    call_training=True,
    data="normal",
    infer_batch=None,
):
    return {
        "name": name,
        "input_shape": list(shape),
        "layer": layer or {},
        "steps": steps,
        "input_dtype": dtype,
        "mask": mask,
        "adjustment": adjustment,
        "call_training": call_training,
        "data": data,
        "infer_batch": infer_batch,
    }


CASES = [
    case("dense_default", (16, 5)),
    case("rank3_axis_last", (6, 4, 3)),
    case("rank3_axis1", (6, 4, 3), {"axis": 1}),
    case("rank4_nchw_fused_auto", (6, 3, 4, 5), {"axis": 1}),
    case("rank4_nhwc_fused_auto", (6, 4, 5, 3)),
    case("rank4_nhwc_fused_false", (6, 4, 5, 3), {"fused": False}),
    case("rank4_nchw_fused_true", (6, 3, 4, 5), {"axis": 1, "fused": True}),
    case("rank4_axis2_nonfused", (6, 3, 4, 5), {"axis": 2, "fused": False}),
    case("rank5_ncdhw_fused_auto", (4, 3, 2, 3, 4), {"axis": 1}),
    case("rank5_ndhwc_fused_auto", (4, 2, 3, 4, 3)),
    case("rank5_axis2_auto_nonfused", (4, 3, 2, 3, 4), {"axis": 2}),
    case("rank2_axis0", (4, 6), {"axis": 0}),
    case("axis_list_1_3", (6, 3, 4, 5), {"axis": [1, 3]}),
    case("axis_list_neg", (6, 3, 4), {"axis": [-1, 1]}),
    case("no_center_no_scale", (12, 4), {"center": False, "scale": False}),
    case("no_center", (6, 3, 4, 5), {"axis": 1, "center": False}),
    case("no_scale", (12, 4), {"scale": False}),
    case("momentum_eps", (12, 4), {"momentum": 0.9, "epsilon": 0.01}),
    case("momentum_zero", (12, 4), {"momentum": 0.0}),
    case("trainable_false", (12, 4), {"trainable": False}),
    case("trainable_false_fused", (6, 3, 4, 5), {"axis": 1, "trainable": False}),
    case("renorm", (16, 4), {"renorm": True}, steps=4),
    case(
        "renorm_clipping",
        (16, 4),
        {
            "renorm": True,
            "renorm_momentum": 0.9,
            "renorm_clipping": {"rmin": 0.8, "rmax": 1.2, "dmax": 0.1},
        },
        steps=4,
    ),
    case(
        "renorm_rank4_axis1",
        (6, 3, 4, 5),
        {"axis": 1, "renorm": True, "momentum": 0.8, "renorm_clipping": {"rmax": 1.5}},
        steps=4,
    ),
    case("ghost_dense", (16, 4), {"virtual_batch_size": 4}, infer_batch=6),
    case("ghost_rank4_nhwc", (8, 3, 4, 3), {"virtual_batch_size": 2}),
    case(
        "ghost_renorm",
        (16, 4),
        {
            "virtual_batch_size": 4,
            "renorm": True,
            "renorm_clipping": {"rmin": 0.5, "rmax": 2.0, "dmax": 1.0},
        },
    ),
    case("adjustment", (12, 4), {}, adjustment=True),
    case("adjustment_rank4", (6, 3, 4, 5), {"axis": 1}, adjustment=True),
    case("mask_rank3", (6, 7, 3), {}, mask=True),
    case("mask_rank2", (16, 3), {}, mask=True),
    case("float16_dense", (16, 4), {"dtype": "mixed_float16"}, dtype="float16"),
    case("float16_fused", (6, 4, 5, 3), {"dtype": "mixed_float16"}, dtype="float16"),
    case("float64_layer", (6, 3, 4, 5), {"axis": 1, "dtype": "float64"}, dtype="float64"),
    case("one_value_per_channel", (1, 4), {}, steps=2),
    case("one_value_fused", (1, 1, 1, 3), {}, steps=2),
    case("ill_conditioned_dense", (64, 4), {}, data="ill", steps=2),
    case("ill_conditioned_fused", (8, 4, 4, 3), {}, data="ill", steps=2),
    case("regularized", (12, 4), {"gamma_regularizer": "l2", "beta_regularizer": "l1"}, steps=1),
    case(
        "regularized_dicts",
        (6, 3, 4, 5),
        {
            "axis": [1, 3],
            "gamma_regularizer": {"class_name": "L1L2", "config": {"l1": 0.003, "l2": 0.02}},
            "beta_regularizer": {"class_name": "L2", "config": {"l2": 0.5}},
        },
        steps=1,
    ),
    case(
        "initializers",
        (12, 4),
        {
            "gamma_initializer": {"class_name": "Constant", "config": {"value": 0.5}},
            "beta_initializer": "ones",
            "moving_variance_initializer": {"class_name": "Constant", "config": {"value": 2.0}},
        },
        steps=1,
    ),
    # Appended last so the random draws of the cases above are unchanged. tf-keras' mask has the
    # shape of x without its LAST axis, whatever the channel axis, and is broadcast along it.
    case("mask_axis1_rank3", (6, 3, 4), {"axis": 1}, mask=True),
    case("mask_axis1_rank4", (4, 3, 2, 5), {"axis": 1, "fused": False}, mask=True),
    # An adjustment that varies inside a channel: one factor per sample with as many samples as
    # channels (a (4, 1) factor was taken for a per-channel one), and one along the last axis
    # with renorm and the channel axis not last (r and d were broadcast along the last axis).
    case("adjustment_per_sample_no_scale", (4, 4), {"scale": False}, adjustment="per_sample"),
    case(
        "adjustment_per_sample_no_affine",
        (3, 3),
        {"scale": False, "center": False},
        adjustment="per_sample",
    ),
    case(
        "adjustment_along_last_renorm_axis1",
        (4, 3, 5),
        {"axis": 1, "renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}},
        adjustment="along_last",
    ),
]

CONSTRAINTS = [
    "non_neg",
    "max_norm",
    "unit_norm",
    "min_max_norm",
    {"class_name": "MaxNorm", "config": {"max_value": 0.5, "axis": 0}},
    {
        "class_name": "MinMaxNorm",
        "config": {"min_value": 0.2, "max_value": 0.6, "rate": 0.5, "axis": 0},
    },
]


def adjustment_arrays(shape, rng):
    """The adjustment's (scale, bias) in the shape they broadcast from against x."""
    return (
        rng.uniform(0.5, 1.5, shape).astype("float32"),
        rng.normal(0.0, 0.3, shape).astype("float32"),
    )


def adjustment_shape(spec):
    """True: per channel (the channel axis' size, else 1); "per_sample": (N, 1, ...);
    "along_last": (1, ..., L)."""
    shape = spec["input_shape"]
    broadcast = [1] * len(shape)
    if spec["adjustment"] == "per_sample":
        broadcast[0] = shape[0]
    elif spec["adjustment"] == "along_last":
        broadcast[-1] = shape[-1]
    else:
        axis = spec["layer"].get("axis", -1)
        broadcast[axis] = shape[axis]
    return broadcast


def initial_weights(layer, rng):
    weights = []
    for variable in layer.weights:
        shape = tuple(variable.shape)
        name = variable.name.split("/")[-1].split(":")[0]
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
        weights.append(value.astype(variable.dtype.as_numpy_dtype))
    return weights


def make_input(spec, rng, batch=None):
    shape = list(spec["input_shape"])
    if batch is not None:
        shape[0] = batch
    if spec["data"] == "ill":
        x = 1000.0 + 0.01 * rng.standard_normal(shape)
    else:
        x = 0.5 + 2.0 * rng.standard_normal(shape)
    return x.astype(spec["input_dtype"])


def run_case(spec, arrays, rng):
    name = spec["name"]
    kwargs = dict(spec["layer"])
    layer_shape = spec["input_shape"]
    if spec["adjustment"]:
        broadcast = adjustment_shape(spec)
        # per channel: drawn as a vector, as before (the earlier cases' draws are unchanged)
        drawn = [math.prod(broadcast)] if spec["adjustment"] is True else broadcast
        adj_scale, adj_bias = (a.reshape(broadcast) for a in adjustment_arrays(drawn, rng))
        # saved as they broadcast against x: the tests take them as they are
        arrays[f"{name}/adjustment_scale"] = adj_scale
        arrays[f"{name}/adjustment_bias"] = adj_bias
        kwargs["adjustment"] = lambda shape: (tf.constant(adj_scale), tf.constant(adj_bias))
    layer = tf_keras.layers.BatchNormalization(**kwargs)
    layer.build(tuple(layer_shape))
    weights = initial_weights(layer, rng)
    layer.set_weights(weights)
    for i, w in enumerate(weights):
        arrays[f"{name}/initial_{i}"] = w
    spec["weight_names"] = [v.name.split("/")[-1].split(":")[0] for v in layer.weights]
    spec["trainable_names"] = [v.name.split("/")[-1].split(":")[0] for v in layer.trainable_weights]
    spec["keras_config"] = json.loads(json.dumps(layer.get_config(), default=dict))
    spec["fused_resolved"] = bool(layer.fused)
    spec["losses"] = [float(loss.numpy()) for loss in layer.losses]
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
        grads = tape.gradient(loss, [xt, *layer.trainable_weights])
        arrays[f"{name}/x_{step}"] = x
        arrays[f"{name}/dy_{step}"] = dy
        arrays[f"{name}/y_{step}"] = y.numpy()
        arrays[f"{name}/dx_{step}"] = grads[0].numpy()
        for weight_name, grad in zip(spec["trainable_names"], grads[1:], strict=True):
            arrays[f"{name}/grad_{weight_name}_{step}"] = grad.numpy()
        for i, w in enumerate(layer.get_weights()):
            arrays[f"{name}/weights_{step}_{i}"] = w
    x = make_input(spec, rng, batch=spec["infer_batch"])
    arrays[f"{name}/x_infer"] = x
    arrays[f"{name}/y_infer"] = layer(tf.constant(x), training=False).numpy()


def run_constraints(arrays, specs):
    rng = np.random.default_rng(SEED + 1)
    weights = {
        "vector": rng.normal(0, 0.8, (5,)).astype("float32"),
        "full_rank": rng.normal(0, 0.8, (1, 3, 1, 4)).astype("float32"),
    }
    for key, w in weights.items():
        arrays[f"constraints/{key}"] = w
    for index, identifier in enumerate(CONSTRAINTS):
        constraint = tf_keras.constraints.get(identifier)
        specs.append(
            {
                "identifier": identifier,
                "config": json.loads(json.dumps(tf_keras.constraints.serialize(constraint))),
            }
        )
        for key, w in weights.items():
            arrays[f"constraints/{index}/{key}"] = constraint(tf.constant(w)).numpy()


def main() -> int:
    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    for spec in CASES:
        run_case(spec, arrays, rng)
    constraint_specs: list[dict] = []
    run_constraints(arrays, constraint_specs)
    OUT.mkdir(parents=True, exist_ok=True)
    document = {
        "generator": "tools/make_keras_golden.py",
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "cases": CASES,
        "constraints": constraint_specs,
    }
    (OUT / "keras_cases.json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(OUT / "keras_cases.npz", **arrays)
    print(f"wrote {len(CASES)} cases, {len(arrays)} arrays to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
