"""The bench configuration: what is trained, on what, with which budget.

Everything that decides the numbers lives in :class:`BenchConfig` and is saved
as ``config.json`` in the run folder.  Each field is defined once, with
:func:`option`: its default, help text, command-line flag, type, choices and
lower bound.  The ``losskit bench`` options (:mod:`losskit.bench.cli`), the
checks (:meth:`BenchConfig.validate`) and the protocol that ``--resume``
compares (:mod:`losskit.bench.protocol`) are all read from these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any, Callable

from . import tasks
from .errors import BenchConfigError
from .labels import parse_set, split_objectives
from .model import MODELS
from .optim_axis import OPTIMIZERS, SCHEDULES, validate_axis

__all__ = ["BenchConfig", "BenchConfigError", "option", "cli_fields", "flag_of", "choices_of"]


def option(default: Any = MISSING, *, help: str, factory: Callable[[], Any] | Any = MISSING,
           flag: str | None = None, type: Callable[[str], Any] | None = None,
           choices: tuple | Callable[[], Any] | None = None, low: float | None = None, low_open: bool = False,
           default_text: str | None = None, metavar: str | None = None, cli: bool = True,
           parse: Callable[[Any], Any] | None = None, append: bool = False) -> Any:
    """A :class:`BenchConfig` field and its one definition as an option.

    ``flag`` (default ``--field-name``), ``type`` (default: the default's type), ``choices``
    (a tuple, or a callable returning the current ones), ``low`` (with ``low_open``: ``> low``,
    else ``>= low``) and ``default_text`` (how ``--help`` shows the default) describe the
    command-line option; ``parse`` turns the option's text (a list of texts with ``append``)
    into the field's value; ``cli=False`` keeps a field off the command line (Python API only).
    """
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "low": low, "low_open": low_open,
            "default_text": default_text, "metavar": metavar, "cli": cli, "parse": parse, "append": append}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _datasets() -> tuple[str, ...]:
    from losskit.data import DATASETS

    return tuple(DATASETS)


@dataclass
class BenchConfig:
    """The full protocol of one bench run.

    ``objectives`` empty means the task's default list (embedding: softmax plus every
    registered embedding objective).  ``batch_classes``/``batch_samples`` of 0 mean
    "choose from the data" (see :func:`losskit.data.samplers.pk_batch_shape`).
    """

    task: str = option(tasks.DEFAULT_TASK, choices=tasks.names, help="what the bench trains and measures")
    objectives: list[str] = option(
        factory=list, parse=split_objectives,
        help="comma-separated registry names or variants NAME[param=value,...], e.g. "
             "softmax,arcface,arcface[head=chunked]",
        default_text="the task's list; embedding: softmax + every embedding objective + arcface's dense and "
                     "chunked heads")
    overrides: dict[str, dict[str, Any]] = option(
        factory=dict, flag="--set", append=True, metavar="NAME.PARAM=VALUE", parse=parse_set,
        help="override a hyperparameter, e.g. --set arcface.margin=0.4 (python literal; repeatable; applies to "
             "arcface and its variants; 'arcface[head=chunked].margin=0.4' sets one variant)",
        default_text="none")
    seeds: int = option(3, low=1, help="number of seeds 0..N-1")
    epochs: int = option(10, low=1, help="training epochs per cell")
    dataset: str = option("digits", choices=_datasets, help="data set")
    data_dir: str | None = option(None, type=str, help="folder (one subfolder per class) or Omniglot zips/folders")
    image_size: int = option(28, low=4, help="resize side for folder/omniglot")
    max_per_class: int | None = option(None, type=int, help="cap images per class (folder/omniglot)",
                                       default_text="all")
    embedding_dim: int = option(64, low=1, help="embedding size")
    model: str = option("auto", metavar="{" + ",".join(MODELS) + "} or MODULE:FUNCTION",
                        help="network: auto = MLP for <=16x16 images, small CNN above; cnn-large = 4 wider blocks; "
                             "conv4 = the prototypical networks' 4 blocks of 64 filters (Snell et al. 2017; the one-shot "
                             "choice); MODULE:FUNCTION = your own, called as "
                             "FUNCTION(input_shape, embedding_dim) and returning an nn.Module")
    lr: float = option(1e-3, low=0, low_open=True, help="Adam learning rate, all parameters")
    weight_decay: float = option(0.0, low=0, help="Adam weight decay")
    optimizer: str = option("adam", choices=OPTIMIZERS,
                            help="optimiser of every cell: adam, adamw, sgd (momentum 0.9) or frugal (docs/optim.md)")
    schedule: str = option("constant", choices=SCHEDULES,
                           help="learning-rate schedule: constant, cosine, linear-decay or refined (from "
                                "--refine-from's gradient norms, else from a pilot run the bench trains first); "
                                "non-constant schedules record each cell's gradient norms")
    refine_from: str | None = option(None, type=str, metavar="RUN_DIR",
                                     help="--schedule refined: the run folder whose cells' gradient norms "
                                          "(same objective and seed) shape the schedule",
                                     default_text="none: a pilot run with --schedule linear-decay into OUT/pilot "
                                                  "(twice the training time)")
    batch_size: int = option(80, low=2, help="target batch size when P is automatic")
    batch_classes: int = option(0, low=0, help="P classes per batch", default_text="0 = from the data")
    batch_samples: int = option(0, low=0, help="K samples per class", default_text="0 = from the data")
    augment: str = option("none", choices=("none", "shift", "affine"),
                          help="training augmentation, identical for all objectives (affine: rotation, shear, "
                               "scale and translation as the Siamese one-shot paper)")
    rotation_classes: bool = option(False, help="add each training class rotated by 90, 180 and 270 degrees as "
                                                "three new classes (x4 classes; Santoro et al. 2016, Snell et al. "
                                                "2017 on Omniglot); the held-out images are left as they are")
    train_on: str = option("split", choices=("split", "all"),
                           help="omniglot with --oneshot: 'split' = the class split (held-out metrics on its test "
                                "classes); 'all' = train on every class of both background splits and compute the "
                                "held-out metrics on the one-shot runs' 800 images (400 evaluation-alphabet "
                                "characters, 2 each: the curve then watches test data; look, do not select)")
    splits: int = option(1, low=1, help="repeat the protocol over N class splits (split seeds "
                                        "SPLIT_SEED..SPLIT_SEED+N-1)")
    split_seed: int = option(0, low=0, help="seed of the first class split (digits: 0 = classes 0-4 train)")
    baselines: bool = option(True, help="leaderboard rows for the raw input and the untrained network")
    skip_bad_images: bool = option(False, help="leave out unreadable image files (each is listed) instead of "
                                               "stopping with the list")
    track_every: int = option(1, low=0, help="evaluate the held-out primary metric every N epochs for the "
                                             "curves and the budget warning (0 = never)")
    early_stop: float = option(0.0, low=0, help="stop a cell once the learning-curve forecaster says its held-out "
                                                "metric is within EPS of the forecast asymptote (docs/theory.md; "
                                                "needs --track-every >= 1)", default_text="0 = off")
    oneshot: bool = option(False, help="omniglot: also measure 20-way one-shot error on the 20 runs of "
                                       "all_runs.zip in --data-dir")
    amp: str = option("none", choices=("none", "bf16", "fp16"),
                      help="mixed precision for the network's forward (torch.autocast; fp16 on CUDA only)")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1 ...")
    threads: int = option(1, low=0, help="torch CPU threads while training (the bench's models are tiny and extra "
                                         "threads only contend on a busy machine; 0 = torch's default)")
    # -- the classification task (tasks/classification.py); ignored by the embedding task
    test_fraction: float = option(0.3, low=0, low_open=True,
                                  help="classification: share of each class's images held out for testing (< 1)")
    label_noise: float = option(0.0, low=0, help="classification: share of training labels corrupted (< 1)")
    noise: str = option("symmetric", choices=("symmetric", "pair"),
                        help="classification: label noise kind, symmetric (a uniform other class) or pair "
                             "(class c -> c + 1)")
    imbalance: float = option(1.0, low=1, help="classification: largest / smallest training class size "
                                               "(exponential profile; 1 = as loaded)")
    pgd_radius: float = option(8 / 255, low=0, default_text="8/255",
                               help="classification: l_inf radius of the robust-accuracy PGD attack (0 = skip)")
    pgd_steps: int = option(10, low=1, help="classification: PGD steps of the robust-accuracy attack")
    ks: tuple[int, ...] = option((1, 2, 4, 8), cli=False, help="the k of Recall@k")
    fars: tuple[float, ...] = option((1e-3, 1e-2), cli=False, help="the false-accept rates of TAR@FAR")
    hist_bins: int = option(80, low=1, cli=False, help="bins of the similarity histograms")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BenchConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise BenchConfigError(f"config.json has unknown fields {unknown}; written by another losskit version?")
        return cls(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in d.items()})

    def validate(self) -> "BenchConfig":
        """Check every field's choices and bound, then the task's own rules (BenchConfigError)."""
        for f in dataclasses.fields(self):
            value, md = getattr(self, f.name), f.metadata
            choices = choices_of(f)
            if choices is not None and value not in choices:
                raise BenchConfigError(f"{flag_of(f)} must be one of {', '.join(map(str, choices))}; got {value!r}")
            kind = _kind(f)
            if kind in (int, float, bool, str) and value is not None and not _is_kind(value, kind):
                raise BenchConfigError(f"{flag_of(f)} must be {_KIND_WORDS[kind]}; got {value!r}")
            low = md.get("low")
            if low is not None and value is not None:
                ok = value > low if md.get("low_open") else value >= low
                if not ok:
                    raise BenchConfigError(f"{flag_of(f)} must be {'>' if md.get('low_open') else '>='} {low}; "
                                           f"got {value}")
        if self.early_stop and not self.track_every:
            raise BenchConfigError(f"--early-stop {self.early_stop} needs the held-out curve: --track-every must be "
                                   ">= 1 (got 0)")
        validate_axis(self)
        tasks.get_task(self.task).validate(self)
        return self


_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _kind(f: dataclasses.Field):
    """The field's scalar type (its option's ``type`` or its default's), or None."""
    t = f.metadata.get("type")
    if t is None and f.default is not MISSING and f.default is not None:
        t = type(f.default)
    return t if t in _KIND_WORDS else None


def _is_kind(value: Any, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def flag_of(f: dataclasses.Field) -> str:
    """The field's command-line flag (``--field-name`` unless its option says otherwise)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def choices_of(f: dataclasses.Field) -> tuple | None:
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def cli_fields() -> list[dataclasses.Field]:
    """The BenchConfig fields that are command-line options, in order."""
    return [f for f in dataclasses.fields(BenchConfig) if f.metadata.get("cli", True)]
