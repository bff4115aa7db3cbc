"""``batchnorm demo [placement | shift | modes]``: the command-line wiring of the demos.

``batchnorm demo`` alone runs the classic Keras experiment (Dense network with and without batch
norm; training, validation on the moving averages and on population statistics, side by side).
Options shared by every experiment (``--seed``, ``--out``, and ``--data`` / ``--inputs`` for those
on images) may come before or after the experiment's name. The output folder is checked while the
arguments are parsed, and the files the experiment writes there before it runs: a path that cannot
be written stops the command before any training.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="batchnorm")
    >>> add_demo_parser(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["demo", "shift", "--steps", "10"]).steps
    10
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from batchnorm.cli._paths import files_to_write, output_directory
from batchnorm.demo._datasets import INPUTS
from batchnorm.demo._mnist import DataError

DEFAULT_OUT = Path("demo-output")
# Epochs per data set: the digits are 23 batches an epoch, MNIST 938.
DEFAULT_EPOCHS = {"classic": (30, 3), "placement": (10, 2)}
DEFAULT_TARGET = (0.95, 0.97)
DEFAULT_STEPS = {"shift": 3000, "modes": 3000}
# What each experiment writes into --out (the JSON and PNG names passed to `write`, or fixed there).
OUTPUT_FILES = {
    "classic": ("history.json", "curves.png"),
    "placement": ("placement.json", "placement.png"),
    "shift": ("shift.json", "shift.png"),
    "modes": ("modes.png",),
}


# torch.Generator.manual_seed takes 64 bits (a negative seed wrapped onto a large one).
_MAX_SEED = 2**64 - 1


def _seed(text: str) -> int:
    """``--seed``: an int torch's generators accept, or argparse's usage error (exit status 2);
    a larger one failed after the arguments were parsed, with a traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer. Received: {text!r}") from None
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"must be in [0, 2**64 - 1] (torch's seed range). Received: {text}"
        )
    return value


def _add_common(parser: argparse.ArgumentParser, *, top: bool, data: bool) -> None:
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--seed",
        type=_seed,
        default=default(0),
        help="seed for weights and batches, 0 to 2**64 - 1 (default 0)",
    )
    # A string default: argparse runs it through `type` too, so the default folder is checked.
    parser.add_argument(
        "--out",
        type=output_directory,
        default=default(str(DEFAULT_OUT)),
        help="output folder, created if missing (default demo-output/)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default(1),
        help="torch CPU threads (default 1: the demos' small batches run fastest on one thread, "
        "also on a busy machine)",
    )
    if data:
        parser.add_argument(
            "--data",
            type=Path,
            default=default(None),
            help="MNIST: a folder of IDX files (train-*/t10k-*, .gz or not) or a Keras mnist.npz "
            "(default: scikit-learn's bundled 8x8 digits)",
        )
        parser.add_argument(
            "--inputs",
            choices=INPUTS,
            default=None if top else argparse.SUPPRESS,
            help="scaled: pixels divided by their peak, in [0, 1] (default); raw: the unscaled "
            "pixel values (0-16 on the digits, 0-255 on MNIST), where hidden values are large",
        )
        parser.add_argument(
            "--limit", type=int, default=default(None), help=argparse.SUPPRESS
        )  # keep only the first N training samples (tests)


def _add_epochs(parser: argparse.ArgumentParser, name: str, *, top: bool) -> None:
    digits, mnist = DEFAULT_EPOCHS[name]
    parser.add_argument(
        "--epochs",
        type=int,
        default=None if top else argparse.SUPPRESS,
        help=f"training epochs (default {digits} on the digits, {mnist} on MNIST)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None if top else argparse.SUPPRESS,
        help="validation accuracy to reach (default 0.95 on the digits, 0.97 on MNIST)",
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=None if top else argparse.SUPPRESS,
        help="the BatchNormalization layers' momentum (default 0.99, Keras')",
    )
    parser.add_argument(
        "--max-batches",
        type=int,
        default=None if top else argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )  # cap on batches per epoch (tests)


def add_demo_parser(commands: Any) -> None:
    """Add ``demo`` and its experiments to the ``batchnorm`` command's subparsers."""
    demo = commands.add_parser(
        "demo",
        help="what batch norm does: with vs without BN on real data (and more experiments)",
        description="Train Dense(1000, relu) -> BatchNormalization -> Dense(10) with and without "
        "the BatchNormalization layer (Adam, batch size 64) and compare them each epoch on three "
        "measures: training loss and accuracy, validation on the moving averages (as Keras "
        "evaluates), and validation of the BN network on population statistics "
        "(batchnorm.recalibrate over the training set, on a copy); writes curves.png and "
        "history.json.",
    )
    _add_common(demo, top=True, data=True)
    _add_epochs(demo, "classic", top=True)
    demo.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    experiments = demo.add_subparsers(dest="experiment", metavar="{placement,shift,modes}")
    placement = experiments.add_parser(
        "placement",
        help="Conv2D -> BN -> ReLU against Conv2D -> ReLU -> BN",
        description="BatchNormalization before or after the activation: Conv2D(64, 3x3) -> BN "
        "-> ReLU (the original paper's placement) against Conv2D -> ReLU -> BN (common in Keras "
        "code), each followed by 2x2 max pooling and Dense(10), from the same initial weights on "
        "the same batches; writes placement.png and placement.json.",
    )
    _add_common(placement, top=False, data=True)
    _add_epochs(placement, "placement", top=False)
    shift = experiments.add_parser(
        "shift",
        help="internal covariate shift: Ioffe & Szegedy 2015, Figure 1",
        description="Internal covariate shift, after Ioffe & Szegedy (2015), Figure 1: three "
        "hidden layers of 100 sigmoids trained with plain SGD (batches of 60) with and without "
        "BatchNormalization before each sigmoid, recording the validation accuracy and the "
        "15th/50th/85th percentiles of one sigmoid's input; writes shift.png and shift.json.",
    )
    _add_common(shift, top=False, data=True)
    shift.add_argument(
        "--steps", type=int, default=argparse.SUPPRESS, help="SGD steps (default 3000)"
    )
    modes = experiments.add_parser(
        "modes",
        help="training vs inference, momentum, trainable=False vs training=False",
        description="Training vs inference mode on synthetic data, printed with numbers: batch "
        "vs moving statistics, how fast the moving averages converge for each momentum, and "
        "training=False (moving statistics, gamma and beta still learn) against trainable=False "
        "(frozen, and inference mode even when training=True); writes modes.png.",
    )
    _add_common(modes, top=False, data=False)
    modes.add_argument(
        "--steps", type=int, default=argparse.SUPPRESS, help="training steps (default 3000)"
    )


class _UsageError(Exception):
    pass


def _positive(arguments: argparse.Namespace, name: str) -> None:
    value = getattr(arguments, name, None)
    if value is not None and value < 1:
        flag = "--" + name.replace("_", "-")
        raise _UsageError(f"{flag} must be >= 1. Received: {value}")


def _check(arguments: argparse.Namespace, experiment: str) -> None:
    for name in ("epochs", "steps", "max_batches", "limit", "threads"):
        _positive(arguments, name)
    target = getattr(arguments, "target", None)
    if target is not None and not 0 < target <= 1:
        raise _UsageError(f"--target must be in (0, 1]. Received: {target}")
    momentum = getattr(arguments, "momentum", None)
    if momentum is not None and not 0 <= momentum < 1:
        raise _UsageError(f"--momentum must be in [0, 1). Received: {momentum}")
    uses_steps = experiment in DEFAULT_STEPS
    wrong = [
        flag
        for flag, given, applies in (
            ("--epochs", arguments.epochs, not uses_steps),
            ("--steps", arguments.steps, uses_steps),
            ("--target", arguments.target, not uses_steps),
            ("--momentum", arguments.momentum, not uses_steps),
            ("--data", arguments.data, experiment != "modes"),
            ("--inputs", arguments.inputs, experiment != "modes"),
        )
        if given is not None and not applies
    ]
    if wrong:
        raise _UsageError(f"{', '.join(wrong)} does not apply to the {experiment} demo")
    try:
        # A directory named curves.png let the training run and then failed writing it.
        files_to_write(arguments.out, OUTPUT_FILES[experiment])
    except ValueError as error:
        raise _UsageError(str(error)) from None
    if importlib.util.find_spec("matplotlib") is None:
        # Checked now: the plots are drawn only after the training.
        raise _UsageError(
            "the demo's plots need matplotlib: pip install 'batchnorm[demo]'. "
            f"Received: --out {arguments.out} without it"
        )


def run_demo(arguments: argparse.Namespace) -> int:
    """Run the demo the parsed ``arguments`` name; returns the exit status (2 on bad input)."""
    experiment = arguments.experiment or "classic"
    threads = torch.get_num_threads()
    try:
        _check(arguments, experiment)
        torch.set_num_threads(arguments.threads)
        paths = _run(experiment, arguments)
    except (_UsageError, DataError, ImportError) as error:
        print(f"batchnorm demo: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _run(experiment: str, arguments: argparse.Namespace) -> list[Path]:
    if experiment == "modes":
        from batchnorm.demo._modes import run_modes_demo

        result = run_modes_demo(
            seed=arguments.seed, steps=arguments.steps or DEFAULT_STEPS["modes"]
        )
        print(result.text)
        return result.write(arguments.out)

    from batchnorm.demo._datasets import load_dataset

    dataset = load_dataset(arguments.data, arguments.inputs or "scaled")
    if arguments.limit is not None:
        dataset = dataset.limited(arguments.limit, arguments.limit)
    on_mnist = arguments.data is not None
    if experiment == "placement":
        from batchnorm.demo._placement import check_image_size

        try:
            check_image_size(*dataset.train_images.shape[1:])
        except ValueError as error:
            raise _UsageError(f"{error} in {dataset.name}") from None
    print(dataset.describe())
    if experiment == "shift":
        from batchnorm.demo._shift import run_shift_demo

        steps = arguments.steps or DEFAULT_STEPS["shift"]
        print(f"Training 2 x {steps} SGD steps (batch 60, lr 0.1), seed {arguments.seed}")
        shift = run_shift_demo(dataset, steps=steps, seed=arguments.seed)
        print(shift.report())
        return shift.write(arguments.out)

    epochs = arguments.epochs or DEFAULT_EPOCHS[experiment][on_mnist]
    momentum = 0.99 if arguments.momentum is None else arguments.momentum
    target = arguments.target or DEFAULT_TARGET[on_mnist]
    print(f"Training 2 x {epochs} epochs (Adam, batch size 64), seed {arguments.seed}")
    if experiment == "placement":
        from batchnorm.demo._placement import run_placement_demo as run_comparison

        title = (
            "BatchNormalization placement: Conv2D(64, 3x3) -> BN -> ReLU vs Conv2D -> ReLU -> BN"
        )
    else:
        from batchnorm.demo._classic import run_classic_demo as run_comparison

        title = (
            "Dense(1000, relu) -> BatchNormalization -> Dense(10), with and without the "
            "BatchNormalization layer"
        )
    comparison = run_comparison(
        dataset,
        epochs=epochs,
        seed=arguments.seed,
        momentum=momentum,
        max_batches=arguments.max_batches,
    )
    print(comparison.report(target))
    json_name, png_name = OUTPUT_FILES[experiment]
    return comparison.write(arguments.out, json_name, png_name, title, target=target)
