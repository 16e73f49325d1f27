"""The choice lists: every setting that takes one of a few names, one constant each.

Each is a ``Literal`` type, for annotations, and the tuple of its names, in the order
messages list them: the config's check (``wfcore.config.CHOICES``), the code that acts on
the choice, the command line and the docs all read the same tuple. The config schema keeps
these fields ``str`` (OmegaConf has no ``Literal``); ``config.load`` refuses any other name.

No imports beyond ``typing``: the config and the command line read it without torch.
"""

from __future__ import annotations

from typing import Literal, get_args

# -- train ------------------------------------------------------------------------------
Optimizer = Literal["sgd", "adam", "adamw"]
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)  # train.optimizer
LrSchedule = Literal["cosine", "step", "exponential", "constant"]
LR_SCHEDULES: tuple[LrSchedule, ...] = get_args(LrSchedule)  # train.lr_schedule

# -- fisher: the gradients and their store -----------------------------------------------
# fisher.labels: the data's, or drawn from the model
Labels = Literal["empirical", "sampled"]
LABELS: tuple[Labels, ...] = get_args(Labels)
StorageDtype = Literal["float32", "float16", "bfloat16"]
STORAGE_DTYPE_NAMES: tuple[StorageDtype, ...] = get_args(StorageDtype)  # fisher.storage_dtype
Place = Literal["memory", "disk"]  # where a gradient store keeps its rows
PLACES: tuple[Place, ...] = get_args(Place)
StoreChoice = Literal["auto", Place]  # fisher.store: auto = the plan decides
STORE_CHOICES: tuple[StoreChoice, ...] = get_args(StoreChoice)
GradMethod = Literal["auto", "vmap", "loop"]
GRAD_METHODS: tuple[GradMethod, ...] = get_args(GradMethod)  # fisher.grad_method

# -- estimators and scorers ----------------------------------------------------------------
UpdateMode = Literal["independent", "joint"]
UPDATE_MODES: tuple[UpdateMode, ...] = get_args(UpdateMode)  # Curvature.prune_update's mode
Update = Literal["none", UpdateMode]  # scorer.update
UPDATES: tuple[Update, ...] = get_args(Update)
# How an estimator's ``damp`` is read: ``relative`` = a fraction of the Fisher's own
# scale (the mean of its diagonal; unit-free), ``absolute`` = added to F as it is.
DampMode = Literal["relative", "absolute"]
DAMP_MODES: tuple[DampMode, ...] = get_args(DampMode)

# -- the run -------------------------------------------------------------------------------
Fallback = Literal["magnitude", "none"]
FALLBACKS: tuple[Fallback, ...] = get_args(Fallback)  # safeguard.fallback
Backend = Literal["auto", "gloo", "nccl"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)  # distributed.backend

# -- structure -----------------------------------------------------------------------------
Unit = Literal["weight", "channel", "head"]
UNITS: tuple[Unit, ...] = get_args(Unit)  # structure.unit
# the units removed from the modules (the model shrinks): wfcore.structured
STRUCTURED_UNITS: tuple[Unit, ...] = ("channel", "head")
Metric = Literal["flops", "params"]
METRICS: tuple[Metric, ...] = get_args(Metric)  # structure.target
Rank = Literal["saliency", "per_cost"]
RANKS: tuple[Rank, ...] = get_args(Rank)  # structure.rank
Normalize = Literal["none", "mean"]
NORMALIZE: tuple[Normalize, ...] = get_args(Normalize)  # structure.normalize
GroupScores = Literal["auto", "magnitude", "taylor", "random", "tp_magnitude"]
GROUP_SCORES: tuple[GroupScores, ...] = get_args(GroupScores)  # structure.scores

# -- export and bench ----------------------------------------------------------------------
Quantize = Literal["none", "int8"]
QUANTIZE_MODES: tuple[Quantize, ...] = get_args(Quantize)  # export.quantize, --quantize
Engine = Literal["deepsparse", "onnxruntime", "torch"]
ENGINES: tuple[Engine, ...] = get_args(Engine)  # wfcore bench --engines
