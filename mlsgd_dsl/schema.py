"""The hierarchy file format, as pydantic v2 models (``extra="forbid"`` everywhere).

Tables that name a plugin (``model.family``, ``levels.X.data.coarsen[i].method``, a transfer
rule, ``mlsgd.correction.strategy``) keep their remaining keys as that plugin's options; the
loader validates them with the plugin's own options model in a second pass, so unknown keys are
still refused with their key path.

Per-level settings accept either a scalar (all levels) or a table keyed by level name, as in
PyAMG's per-level options.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    field_validator,
    model_validator,
)

# Caps keep a hostile or mistyped file from asking for absurd allocations; each is far above
# anything the thesis (or a laptop) uses and the loader reports the cap it hit.
MAX_LEVELS = 32
MAX_CYCLES = 100_000
MAX_EPOCHS = 10_000.0
MAX_BATCH = 1 << 16
MAX_IMAGES = 10_000_000

Name = Annotated[str, StringConstraints(min_length=1, max_length=64,
                                        pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")]
PluginName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Epochs = Annotated[float, Field(gt=0, le=MAX_EPOCHS, allow_inf_nan=False)]
LearningRate = Annotated[float, Field(gt=0, le=1e3, allow_inf_nan=False)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]


M = TypeVar("M", bound=BaseModel)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime.date | datetime.time):  # TOML dates: as their text
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a TOML value")


def validate_strict(model: type[M], data: Any) -> M:
    """Validate TOML data with ``model`` without coercions the user did not mean.

    Pydantic's strict mode, on the data as JSON (where an array is a valid tuple): a boolean is
    not a number (``cycles = true``), a string is not a number (``seed = "3"``) and a float is
    not an integer, while an integer is still a valid float (``lr = 1``). Used for the core
    schema and every plugin's options alike.
    """
    text = json.dumps(data, default=_json_value, allow_nan=True, ensure_ascii=False)
    return model.model_validate_json(text, strict=True)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class Open(BaseModel):
    """A table naming a plugin; its other keys are the plugin's options (checked later)."""

    model_config = ConfigDict(extra="allow")

    def options(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


# --------------------------------------------------------------------------- data


class AugmentSpec(Strict):
    flip: bool = Field(False, description="Random horizontal flip of each image (p = 1/2).")
    crop: float = Field(0.0, ge=0, le=0.5, allow_inf_nan=False,
                        description="Random crop with zero padding, as a fraction of the image "
                                    "size (thesis: 0.0625, i.e. 2 px of 32).")


class DataSpec(Strict):
    source: PluginName = Field("synthetic", description="Data source plugin name.")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="Options of the data source (its own schema).")
    validation: float = Field(0.1, ge=0, le=MAX_IMAGES, allow_inf_nan=False,
                              description="Validation images carved from the training set: a "
                                          "count (>= 1) or a fraction (< 1).")
    subset: int | None = Field(None, ge=1, le=MAX_IMAGES,
                               description="Use only this many training images (seeded).")
    test_subset: int | None = Field(None, ge=1, le=MAX_IMAGES,
                                    description="Use only this many test images (seeded).")
    normalize: bool = Field(True, description="Per-channel normalisation from the training split.")
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the split and subsets.")


class CoarsenStep(Open):
    method: PluginName = Field(description="Coarsening plugin name, e.g. 'avgpool'.")


class LevelDataSpec(Strict):
    coarsen: list[CoarsenStep] = Field(default_factory=list, max_length=8,
                                       description="Coarsenings applied to the data set, in "
                                                   "order (computed once per run).")


# --------------------------------------------------------------------------- levels


class ModelSpec(Open):
    family: PluginName = Field(description="Architecture family plugin name.")


class LevelSpec(Strict):
    extends: Name | None = Field(None, description="Inherit every key of another level.")
    description: str = ""
    h: PositiveFloat = Field(1.0, le=1e6, description="Inner-product weight h_l "
                             "(<.,.>_l = h_l <.,.>); also the residual time step unless "
                             "model.h is set.")
    model: ModelSpec
    data: LevelDataSpec = Field(default_factory=LevelDataSpec)


# --------------------------------------------------------------------------- transfer


class RuleRef(Open):
    rule: PluginName = Field(description="Transfer rule plugin name.")


RuleValue = PluginName | RuleRef


class TransferSpec(Strict):
    default: RuleValue | Literal[False] | None = Field(
        "identity", description="Rule for every tensor no pattern matches (false: none; then "
        "every tensor must match a pattern).")

    @model_validator(mode="after")
    def _false_is_none(self) -> TransferSpec:
        if self.default is False:
            self.default = None
        return self
    rules: dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], RuleValue] = \
        Field(default_factory=dict, description="Glob over state-dict names -> rule.")


class EdgeSpec(Strict):
    coarse: Name = Field(description="The coarser level of the pair.")
    fine: Name = Field(description="The finer level of the pair.")
    transfer: TransferSpec | None = Field(None, description="Replaces [transfer] on this edge.")


# --------------------------------------------------------------------------- training


def per_level(kind: Any) -> Any:
    return kind | dict[Name, kind]


def for_level(value: Any, level: str) -> Any:
    """A per-level setting (``per_level``: one value, or a table by level name) for ``level``."""
    return value[level] if isinstance(value, Mapping) else value


class ScheduleSpec(Strict):
    kind: Literal["constant", "step", "cosine", "onecycle"] = Field(
        "constant", description="constant; step (x factor every `every` epochs, counting "
        "epochs on all levels as the thesis does); cosine / onecycle over the whole run.")
    factor: float = Field(0.7, gt=0, le=1, description="Decay factor of 'step'.")
    every: Epochs = Field(10.0, description="Epochs (all levels) between 'step' decays.")
    warmup: float = Field(0.0, ge=0, le=MAX_EPOCHS, description="Linear warm-up, in epochs.")
    min_lr: float = Field(0.0, ge=0, description="Floor of cosine / onecycle.")


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Level solver.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (0: the thesis' SGD).")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled (AdamW) or SGD weight "
                                "decay; the thesis' l2 term is objective.l2 instead.")


class ObjectiveSpec(Strict):
    l2: float = Field(2e-3, ge=0, description="l2 regularisation of non-bias weights (thesis "
                      "4.1.2: 2e-3), part of F_l and hence of every gradient.")
    smoothness: float = Field(2e-3, ge=0, description="Penalty on the change of kernels "
                              "between consecutive residual layers of a block (thesis 4.1.2).")


class CorrectionSpec(Open):
    strategy: PluginName = Field("none", description="none | deterministic | stochastic | a "
                                 "plugin's strategy; its options follow in the same table.")


class AngleSpec(Strict):
    mu: float = Field(gt=-1, le=1, description="Accept a coarse step only if cos(angle to "
                      "-grad F_L) >= mu (thesis (3.3)).")
    gradient: Literal["full", "stochastic"] = Field(
        "full", description="Gradient of the finest level used in the check.")
    fraction: float = Field(0.03125, gt=0, le=1, description="Data fraction of 'stochastic'.")
    every: int = Field(1, ge=1, le=1_000_000, description="Check every n-th step.")


class EarlyStopSpec(Strict):
    eta: float = Field(0.0, ge=0, description="Descend only if ||P* g||_{l-1} >= eta ||g||_l.")
    epsilon: float = Field(0.0, ge=0, description="Descend only if ||P* g||_{l-1} >= epsilon.")


class DivergenceSpec(Strict):
    factor: float = Field(3.0, gt=1, description="A level's epoch whose loss exceeds factor x "
                          "its starting loss (or is NaN/Inf) counts as diverged.")
    action: Literal["reject", "stop"] = Field(
        "reject", description="reject: discard the level's step and go on; stop: end the run. "
        "A NaN/Inf loss on the finest level always stops the run (last checkpoint kept).")


class EvalSpec(Strict):
    every: Literal["epoch", "level", "cycle"] = Field(
        "epoch", description="When the finest network is evaluated on the validation split.")
    batch_size: BatchSize = 1000
    recalibrate: int = Field(
        2000, ge=0, le=MAX_IMAGES, description="Training images on which the finest "
        "network's BatchNorm statistics are re-estimated before an evaluation, checkpoint or "
        "summary whenever its weights changed since the last estimate (0: use the running "
        "statistics training left, which lag weights that moved fast).")
    compare_running: bool = Field(
        False, description="Also evaluate with the running statistics before re-estimating "
        "them (metrics column val_acc_running; costs one more evaluation).")


class MLSGDSpec(Strict):
    method: Literal["mlsgd", "sgd"] = Field(
        "mlsgd", description="mlsgd: cycles over the hierarchy; sgd: the finest level alone "
        "(the baseline), for `sgd_epochs` epochs.")
    cycle: Literal["V", "W", "F", "cascade", "fmg"] = Field(
        "V", description="Cycle kind: V (the thesis), W, F; cascade: one coarse-to-fine pass, "
        "then the finest level alone (progressive resizing / growth); fmg: the same pass, then "
        "V-cycles (full multigrid). docs/schedules.md.")
    cycles: int = Field(1, ge=1, le=MAX_CYCLES, description="Number of cycles (K).")
    path: list[Annotated[list[Name], Field(min_length=1)]] | None = Field(
        None, description="Levels a run visits, coarsest first; a list of paths alternates "
        "between them from cycle to cycle. Default: the only chain.")
    epochs: per_level(Epochs) = Field(1.0, description="T_l: epochs per level per visit "
                                      "(fractions allowed).")
    cascade_epochs: per_level(Epochs) | None = Field(
        None, description="Epochs of each level in the coarse-to-fine pass that starts "
        "cycle = 'cascade' and 'fmg' (default: `epochs`; unused by V/W/F, validate warns); the "
        "finest level's entry is its first visit.")
    sgd_epochs: Epochs | None = Field(None, description="Epochs of method = 'sgd' (default: "
                                      "cycles x the finest level's epochs).")
    time_budget: float | None = Field(None, gt=0, description="Stop after this many seconds "
                                      "of training (wall clock of training steps; evaluation "
                                      "and checkpoints excluded).")
    plan: Literal["off", "auto", "measure"] = Field(
        "off", description="auto (needs time_budget): measure every level's cost per batch "
        "(cached) and set cycles and one factor on every level's epochs so that the planned "
        "run, and its schedule, end with the budget; measure: the same, ignoring the cache. "
        "Printed before training, written to plan.json.")
    lr: per_level(LearningRate) = Field(0.05, description="Learning rate alpha_l (start value "
                                        "of the schedule).")
    batch_size: per_level(BatchSize) = Field(250, description="Mini-batch size (thesis: 250).")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    optimizer: per_level(OptimizerSpec) = Field(default_factory=OptimizerSpec)
    optimizer_state: Literal["reset", "keep", "transfer"] = Field(
        "reset", description="What happens to a level's optimiser state between visits: reset, "
        "keep per level, or transfer the first moment with P (default: reset; transfer with "
        "cycle = 'cascade').")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    correction: PluginName | CorrectionSpec = Field(default_factory=CorrectionSpec)
    uncorrected_cycles: int = Field(0, ge=0, description="Cycles at the start without "
                                    "correction (the thesis uses 1).")
    step_regularization: float = Field(0.0, ge=0, description="lambda of (3.2): "
                                       "lambda/2 ||w - R w_{l+1}||_l^2 (thesis: 5).")
    angle: AngleSpec | None = None
    early_stop: EarlyStopSpec | None = None
    init: Literal["nested", "independent"] = Field(
        "nested", description="nested: finer levels start from the prolongated coarsest "
        "initialisation; independent: each level initialised on its own.")
    bn_recalibration: int = Field(2000, ge=0, le=MAX_IMAGES, description="Training images "
                                  "used to re-estimate BatchNorm statistics after a "
                                  "prolongation (0: off).")
    divergence: DivergenceSpec = Field(default_factory=DivergenceSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    # 500, not larger: on 2 CPU cores a chunk of 2000 made a full-gradient pass 3x slower
    # than chunks of 250-500 and a deterministic VR cycle peak at 8.1 GB (benchmarks/)
    full_batch_size: BatchSize = Field(500, description="Batch size of full-gradient "
                                       "passes (no augmentation; BatchNorm statistics are "
                                       "not updated).")
    compile: per_level(bool) = Field(
        False, description="torch.compile each level's training step (inductor). Faster "
        "steps after a compilation paid once per level inside the run's time (tens of "
        "seconds on a CPU); evaluation, BatchNorm re-estimation and gradient passes run "
        "uncompiled. docs/speed.md.")
    channels_last: per_level(bool) = Field(
        False, description="Keep each level's convolution weights in channels_last (NHWC) "
        "memory format: 0.84-0.91x the time per batch on a 2-core CPU, but less accurate "
        "gradients on the thesis network. docs/speed.md.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of initialisation, batches "
                      "and augmentation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when "
                                                   "available.")
    threads: int | None = Field(None, ge=1, le=1024, description="torch threads (default: "
                                "torch's choice).")


    @model_validator(mode="after")
    def _plan_and_cascade(self) -> MLSGDSpec:
        if self.plan != "off" and self.time_budget is None:
            raise ValueError(f"plan = {self.plan!r} needs time_budget (the seconds of training "
                             "to plan for)")
        # a cascade trains the finest level on and on: restarting its momentum at every
        # visit (the thesis' reset) would throw it away; moved with P, it also survives the
        # way up (the growth literature's convention)
        if self.cycle == "cascade" and "optimizer_state" not in self.model_fields_set:
            self.optimizer_state = "transfer"
        return self

    @field_validator("path", mode="before")
    @classmethod
    def _one_path(cls, value: Any) -> Any:
        # `path = ["coarse", "fine"]` is one path; a list of lists alternates between paths.
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return [value]
        return value


class ReportSpec(Strict):
    thresholds: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        [0.5, 0.7, 0.8], max_length=32,
        description="Validation accuracies whose first-reach time the summary reports.")
    checkpoint: Literal["cycle", "none"] = Field("cycle", description="Checkpoint after every "
                                                 "cycle (atomic) or never.")
    plot: bool = Field(True, description="Write accuracy.png (accuracy against training "
                                         "time).")
    tensorboard: bool = Field(False, description="Write TensorBoard event files into the "
                              "run folder's tensorboard/ (needs the tensorboard extra).")


class Hierarchy(Strict):
    extends: str | None = Field(None, description="Path of a hierarchy file (relative to "
                                "this one) whose keys this file deep-merges over.")
    name: Name = Field(description="Name of the hierarchy (run folders are named after it).")
    description: str = Field("", description="Free text shown by validate and in summaries.")
    data: DataSpec = Field(default_factory=DataSpec)
    model: dict[str, Any] = Field(default_factory=dict,
                                  description="Defaults every level's model table inherits.")
    levels: dict[Name, LevelSpec] = Field(
        min_length=1, max_length=MAX_LEVELS,
        description="Levels, finest first (file order); a chain unless [[edges]] is given.")
    edges: list[EdgeSpec] | None = Field(None, max_length=MAX_LEVELS * MAX_LEVELS)
    transfer: TransferSpec = Field(default_factory=TransferSpec)
    mlsgd: MLSGDSpec = Field(default_factory=MLSGDSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)

    # Attached by the loader: where the file came from and its validated plugin options.
    _file: str = PrivateAttr("<hierarchy>")
    _base_dir: Any = PrivateAttr(None)
    _registry: Any = PrivateAttr(None)
    _plugin_options: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _edges_name_levels(self) -> Hierarchy:
        for i, edge in enumerate(self.edges or []):
            for side in ("coarse", "fine"):
                if getattr(edge, side) not in self.levels:
                    raise ValueError(f"edges[{i}].{side}: no level named "
                                     f"{getattr(edge, side)!r} (levels: "
                                     f"{', '.join(self.levels)})")
        return self

    # ---------------------------------------------------------------- helpers

    def level_names(self) -> list[str]:
        return list(self.levels)

    def edge_list(self) -> list[tuple[str, str, TransferSpec]]:
        """(coarse, fine, transfer) for every edge; a chain in file order by default."""
        if self.edges is not None:
            return [(e.coarse, e.fine, e.transfer or self.transfer) for e in self.edges]
        names = self.level_names()
        return [(names[i + 1], names[i], self.transfer) for i in range(len(names) - 1)]

    @staticmethod
    def for_level(value: Any, level: str) -> Any:
        """Resolve a per-level setting (scalar or table) for one level."""
        return for_level(value, level)


#: $defs table -> (registry kind, the key that names the record in that table)
PLUGIN_TABLES = {
    "ModelSpec": ("architectures", "family"),
    "RuleRef": ("transfer rules", "rule"),
    "CorrectionSpec": ("corrections", "strategy"),
    "CoarsenStep": ("coarsenings", "method"),
}


def _rewrite_refs(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: (f"#/$defs/{names[v.rsplit('/', 1)[-1]]}" if k == "$ref" and isinstance(
            v, str) else _rewrite_refs(v, names)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v, names) for v in node]
    return node


def _options_schema(model: type[BaseModel], prefix: str, defs: dict[str, Any]
                    ) -> dict[str, Any]:
    """A plugin's options model as JSON Schema, its own $defs moved into ``defs``."""
    own = model.model_json_schema()
    local = own.pop("$defs", {})
    names = {k: f"{prefix}.{k}" for k in local}
    for k, v in local.items():
        defs[names[k]] = _rewrite_refs(v, names)
    return _rewrite_refs(own, names)


def _when(key: str, name: str, then: dict[str, Any], default: bool = False) -> dict[str, Any]:
    condition: dict[str, Any] = {"properties": {key: {"const": name}}, "required": [key]}
    if default:  # the key's default names this record: it also applies when the key is absent
        condition = {"anyOf": [condition, {"not": {"required": [key]}}]}
    return {"if": condition, "then": then}


def _plugin_branches(registry: Any, defs: dict[str, Any]) -> None:
    """Each plugin-named table checks the named plugin's options (``if``/``then`` per name)."""
    for table, (kind, key) in PLUGIN_TABLES.items():
        target = defs.get(table)
        if target is None:
            continue
        names = registry.names(kind)
        target.setdefault("properties", {}).setdefault(key, {})["examples"] = names
        branches = []
        for name in names:
            options = _options_schema(registry.items[kind][name].record.options,
                                      f"{table}.{name}", defs)
            props = {key: {"const": name}, **options.get("properties", {})}
            branches.append(_when(key, name, {"properties": props,
                                              "additionalProperties": False}))
        if branches:
            target["allOf"] = branches


def _data_branches(registry: Any, defs: dict[str, Any]) -> None:
    target = defs.get("DataSpec")
    if target is None:
        return
    default = target["properties"]["source"].get("default")
    target["properties"]["source"]["examples"] = registry.names("data sources")
    branches = []
    for name in registry.names("data sources"):
        options = _options_schema(registry.items["data sources"][name].record.options,
                                  f"DataSpec.{name}", defs)
        branches.append(_when("source", name, {"properties": {"options": options}},
                              default=name == default))
    if branches:
        target["allOf"] = branches


def json_schema(registry: Any = None) -> dict[str, Any]:
    """JSON Schema of hierarchy files, with the options of every plugin in ``registry``.

    Built from the installed registry (default: the process-wide one), so an editor completes
    and checks a plugin's options under its ``family`` / ``rule`` / ``strategy`` / ``source`` /
    ``method`` key (``if``/``then`` per registered name).
    """
    if registry is None:
        from .registry import default_registry

        registry = default_registry()
    schema = Hierarchy.model_json_schema()
    defs = schema.setdefault("$defs", {})
    # Inheritance (file `extends`, [model] defaults, level `extends`) fills these in a file
    # that does not write them, so an editor must not demand them.
    schema.pop("required", None)
    for name in ("LevelSpec", "ModelSpec"):
        defs.get(name, {}).pop("required", None)
    # `path` also takes one flat path (the validator wraps it); say so to editors.
    path = defs.get("MLSGDSpec", {}).get("properties", {}).get("path")
    if path and "anyOf" in path:
        nested = next(a for a in path["anyOf"] if a.get("type") == "array")
        path["anyOf"].insert(0, nested["items"])
    _plugin_branches(registry, defs)
    _data_branches(registry, defs)
    if "ModelSpec" in defs:  # the top-level [model] defaults are a level's model table
        schema["properties"]["model"] = {**schema["properties"]["model"],
                                         "allOf": defs["ModelSpec"].get("allOf", [])}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mlsgd-dsl hierarchy file"
    return schema
