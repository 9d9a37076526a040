"""Validated hierarchy → :class:`Compiled`: a networkx graph of levels with operator bundles.

Nodes are level names with their facts (``h``, parameter count, estimated FLOPs per sample,
input shape); each edge ``coarse → fine`` carries an :class:`~mlsgd_dsl.operators.EdgeTransfer`.
Shapes are worked out on the ``meta`` device, so compiling allocates no weights and a file
asking for an absurd network is refused before anything is allocated.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import nn

from .api import DataContext, GroupSpec, ModelContext, TransferBindError
from .contract import module_problem, operator_problem, raw_data_problem, strategy_problem
from .data.check import check_raw
from .errors import ConfigError, PluginFailure, UserError
from .operators import BoundGroup, EdgeTransfer, Transfer
from .registry import Entry, Registry
from .schema import Hierarchy, TransferSpec, for_level

MAX_PARAMETERS = 500_000_000


@dataclass
class LevelNode:
    name: str
    h: float
    family: Entry
    options: Any
    input_shape: tuple[int, int, int]
    num_classes: int
    shapes: dict[str, torch.Size]
    parameters: tuple[str, ...]
    hints: dict[str, dict[str, Any]]
    n_parameters: int
    flops: float | None  # forward FLOPs per sample (estimate)
    coarsen: list[tuple[Entry, Any]] = field(default_factory=list)


class Compiled:
    """A compiled hierarchy. ``levels`` lists level names coarsest first."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        self.file: str = getattr(hierarchy, "_file", "<hierarchy>")
        self.registry: Registry = hierarchy._registry
        self.base_dir: Path | None = getattr(hierarchy, "_base_dir", None)
        self._options: dict[tuple, Any] = dict(hierarchy._plugin_options)
        self._check_validation_split()
        self._resolve_data_paths()
        self._transfers: dict[tuple[str, str], Transfer] = {}
        self._data_cache: dict[str, Any] = {}
        self.nodes: dict[str, LevelNode] = {}
        self.graph = nx.DiGraph()
        self._build_nodes()
        self._build_graph()
        self._bind_edges()
        self.paths = self._resolve_paths()

    # ------------------------------------------------------------------ levels

    def _err(self, message: str, path: tuple) -> ConfigError:
        return ConfigError(message, file=self.file, path=path)

    def _check_validation_split(self) -> None:
        if self.hierarchy.data.validation == 0:
            raise self._err("must be at least 1 image, or a fraction above 0: the run measures "
                            "val_acc, the time to each threshold and the final validation "
                            "accuracy on this split", ("data", "validation"))

    def _resolve_data_paths(self) -> None:
        """Relative file paths among the data source's options are taken from the hierarchy
        file's folder, as ``extends`` and ``import`` modules are."""
        options = self._options[("data",)]
        if self.base_dir is None:
            return
        update = {}
        for name in _path_fields(options):
            value = getattr(options, name)
            if isinstance(value, str) and value and \
                    not Path(value).expanduser().is_absolute():
                update[name] = str(self.base_dir / value)
        if update:
            self._options[("data",)] = options.model_copy(update=update)

    def _build_nodes(self) -> None:
        h = self.hierarchy
        src_entry, src_opts = self.registry.get("data sources", h.data.source), \
            self._options[("data",)]
        try:
            c, hh, ww, classes = src_entry.record.shape(src_opts)
            self.data_shape = (int(c), int(hh), int(ww), int(classes))
        except UserError as exc:
            if exc.file is None:
                raise type(exc)(exc.message, file=self.file, path=("data", "options")) from None
            raise
        except Exception as exc:
            raise PluginFailure(f"{src_entry.label()}: data source {h.data.source!r} shape() "
                                f"raised {type(exc).__name__}: {exc}") from None
        self._source_shape = (int(c), int(hh), int(ww), int(classes))
        for name, level in h.levels.items():
            shape = (int(c), int(hh), int(ww))
            coarsen = []
            for i, step in enumerate(level.data.coarsen):
                entry = self.registry.get("coarsenings", step.method)
                opts = self._options[("levels", name, "data", "coarsen", i)]
                try:
                    shape = tuple(entry.record.output_shape(shape, opts))
                except ValueError as exc:
                    raise self._err(str(exc), ("levels", name, "data", "coarsen", i)) from None
                coarsen.append((entry, opts))
            family = self.registry.get("architectures", level.model.family)
            options = self._options[("levels", name, "model")]
            ctx = ModelContext(in_channels=shape[0], image_size=(shape[1], shape[2]),
                               num_classes=int(classes), h=level.h)
            model = self._build(family, options, ctx, name, device="meta")
            state = model.state_dict(keep_vars=True)
            shapes = {n: t.shape for n, t in state.items()}
            params = tuple(n for n, _ in model.named_parameters())
            n_params = sum(p.numel() for p in model.parameters())
            if n_params > MAX_PARAMETERS:
                raise self._err(f"the model has {n_params:,} parameters; the cap is "
                                f"{MAX_PARAMETERS:,}", ("levels", name, "model"))
            hints = {k: dict(v) for k, v in getattr(model, "transfer_hints", {}).items()}
            self.nodes[name] = LevelNode(
                name=name, h=level.h, family=family, options=options, input_shape=shape,
                num_classes=int(classes), shapes=shapes, parameters=params, hints=hints,
                n_parameters=n_params, flops=_flops(model, shape), coarsen=coarsen)

    def _context(self, name: str) -> ModelContext:
        node = self.nodes[name]
        return ModelContext(in_channels=node.input_shape[0],
                            image_size=(node.input_shape[1], node.input_shape[2]),
                            num_classes=node.num_classes, h=node.h)

    def _build(self, family: Entry, options: Any, ctx: ModelContext, level: str,
               device: str | None = None) -> nn.Module:
        if self.base_dir is not None and hasattr(options, "search_path"):
            options = options.model_copy(
                update={"search_path": self._search_path(options.search_path)})
        path = ("levels", level, "model")
        try:
            if device == "meta":
                try:
                    with torch.device("meta"):
                        model = family.record.build(options, ctx)
                except (NotImplementedError, RuntimeError):
                    model = family.record.build(options, ctx)  # factory not meta-friendly
            else:
                model = family.record.build(options, ctx)
        except ConfigError as exc:
            raise ConfigError(exc.message, file=self.file,
                              path=(*path, *exc.path[1:])) from None
        except UserError as exc:
            if exc.file is None:
                raise type(exc)(exc.message, file=self.file, path=path) from None
            raise
        except (SystemExit, KeyboardInterrupt) as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise PluginFailure(f"{family.label()}: architecture {family.record.name!r} "
                                f"tried to exit the process (SystemExit {exc.code!r})",
                                file=self.file, path=path) from None
        except (ValueError, TypeError) as exc:
            raise self._err(str(exc), path) from None
        except Exception as exc:
            raise PluginFailure(f"{family.label()}: architecture {family.record.name!r} "
                                f"raised {type(exc).__name__}: {exc}",
                                file=self.file, path=path) from None
        problem = module_problem(model)
        if problem:
            raise PluginFailure(f"{family.label()}: architecture {family.record.name!r}: "
                                f"{problem}", file=self.file, path=path)
        return model

    def _search_path(self, given: list[str]) -> list[str]:
        """``search_path`` with relative entries taken from the hierarchy file's folder, then
        that folder itself."""
        assert self.base_dir is not None
        folders = [str(self.base_dir / p) if not Path(p).expanduser().is_absolute() else p
                   for p in given]
        return list(dict.fromkeys([*folders, str(self.base_dir)]))

    def model(self, level: str) -> nn.Module:
        """A fresh, initialised module for ``level`` (on the CPU)."""
        node = self.nodes[level]
        return self._build(node.family, node.options, self._context(level), level)

    def h(self, level: str) -> float:
        return self.nodes[level].h

    # ------------------------------------------------------------------ graph

    def _build_graph(self) -> None:
        g = self.graph
        for name, node in self.nodes.items():
            g.add_node(name, h=node.h, parameters=node.n_parameters, flops=node.flops,
                       input_shape=node.input_shape, family=node.family.record.name)
        for i, (coarse, fine, _) in enumerate(self.hierarchy.edge_list()):
            if coarse == fine:
                raise self._err(f"edge from level {coarse!r} to itself", ("edges", i))
            if g.has_edge(coarse, fine):
                raise self._err(f"edge {coarse} -> {fine} is given twice", ("edges", i))
            g.add_edge(coarse, fine)
        where = ("edges",) if self.hierarchy.edges is not None else ("levels",)
        if not nx.is_directed_acyclic_graph(g):
            cycle = nx.find_cycle(g)
            raise self._err("the level graph has a cycle: " + " -> ".join(
                [a for a, _ in cycle] + [cycle[0][0]]), where)
        if not nx.is_weakly_connected(g):
            parts = [sorted(c) for c in nx.weakly_connected_components(g)]
            raise self._err(f"the level graph is not connected: {parts}", where)
        finest = [n for n in g if g.out_degree(n) == 0]
        if len(finest) != 1:
            raise self._err(f"the level graph must have one finest level, found "
                            f"{len(finest)}: {finest}", where)
        self.finest = finest[0]
        order = list(self.nodes)  # file order, finest first
        self.levels = list(nx.lexicographical_topological_sort(
            g, key=lambda n: -order.index(n)))

    def _bind_edges(self) -> None:
        h = self.hierarchy
        for i, (coarse, fine, spec) in enumerate(h.edge_list()):
            base = ("edges", i, "transfer") if (h.edges is not None and h.edges[i].transfer
                                                is not None) else ("transfer",)
            edge = self._bind_edge(coarse, fine, spec, base)
            self.graph.edges[coarse, fine]["transfer"] = edge

    def _bind_edge(self, coarse: str, fine: str, spec: TransferSpec,
                   base: tuple) -> EdgeTransfer:
        cn, fn = self.nodes[coarse], self.nodes[fine]
        owner: dict[tuple[str, str], str] = {}
        groups: list[tuple[tuple, str, list[str], list[str]]] = []
        for pattern in spec.rules:
            cm = [n for n in cn.shapes if fnmatch.fnmatchcase(n, pattern)]
            fm = [n for n in fn.shapes if fnmatch.fnmatchcase(n, pattern)]
            where = (*base, "rules", pattern)
            if not cm and not fm:
                raise self._err(f"pattern matches no parameter or buffer of {coarse!r} or "
                                f"{fine!r}", where)
            for side, names in (("coarse", cm), ("fine", fm)):
                for n in names:
                    if (side, n) in owner:
                        raise self._err(f"{n!r} ({side} level "
                                        f"{coarse if side == 'coarse' else fine!r}) is "
                                        f"matched by both {owner[side, n]!r} and "
                                        f"{pattern!r}", where)
                    owner[side, n] = pattern
            groups.append((where, pattern, cm, fm))
        rest_c = [n for n in cn.shapes if ("coarse", n) not in owner]
        rest_f = [n for n in fn.shapes if ("fine", n) not in owner]
        if rest_c or rest_f:
            if spec.default is None:
                missing = (rest_f or rest_c)[:3]
                raise self._err(f"no rule covers {missing} on edge {coarse} -> {fine} and "
                                "there is no default rule", (*base, "rules"))
            groups.append(((*base, "default"), "*", rest_c, rest_f))

        full: list[BoundGroup] = []
        params: list[BoundGroup] = []
        for where, pattern, cm, fm in groups:
            entry, options = self._options[where]
            for subset, target in ((None, full), ("params", params)):
                c_names = cm if subset is None else [n for n in cm if n in cn.parameters]
                f_names = fm if subset is None else [n for n in fm if n in fn.parameters]
                if subset == "params" and not c_names and not f_names:
                    continue
                gspec = GroupSpec(
                    pattern=pattern,
                    coarse={n: cn.shapes[n] for n in c_names},
                    fine={n: fn.shapes[n] for n in f_names},
                    coarse_level=coarse, fine_level=fine, h_coarse=cn.h, h_fine=fn.h,
                    coarse_hints={n: cn.hints[n] for n in c_names if n in cn.hints},
                    fine_hints={n: fn.hints[n] for n in f_names if n in fn.hints})
                try:
                    op = entry.record.bind(gspec, options)
                except TransferBindError as exc:
                    raise self._err(f"rule {entry.record.name!r} on edge {coarse} -> {fine}: "
                                    f"{exc}", where) from None
                except Exception as exc:
                    raise PluginFailure(f"{entry.label()}: rule {entry.record.name!r} raised "
                                        f"{type(exc).__name__} while binding {pattern!r} on "
                                        f"{coarse} -> {fine}: {exc}", file=self.file,
                                        path=where) from None
                problem = operator_problem(op)
                if problem:
                    raise PluginFailure(f"{entry.label()}: rule {entry.record.name!r}: "
                                        f"{problem} (binding {pattern!r} on {coarse} -> "
                                        f"{fine})", file=self.file, path=where)
                target.append(BoundGroup(pattern=pattern, rule=entry.record.name,
                                         operator=op))
        return EdgeTransfer(coarse=coarse, fine=fine, h_coarse=cn.h, h_fine=fn.h,
                            full=full, params=params, coarse_names=tuple(cn.shapes),
                            fine_names=tuple(fn.shapes), coarse_params=cn.parameters,
                            fine_params=fn.parameters)

    def edge(self, coarse: str, fine: str) -> EdgeTransfer:
        return self.graph.edges[coarse, fine]["transfer"]

    def transfer(self, coarse: str, fine: str, via: list[str] | None = None) -> Transfer:
        """P/R/P* from ``coarse`` to ``fine``, composed along ``via`` or the shortest path."""
        if via is None:
            key = (coarse, fine)
            if key not in self._transfers:
                try:
                    path = nx.shortest_path(self.graph, coarse, fine)
                except (nx.NetworkXNoPath, nx.NodeNotFound):
                    raise KeyError(f"no path from {coarse!r} up to {fine!r}") from None
                self._transfers[key] = self._compose(path)
            return self._transfers[key]
        return self._compose(via)

    def _compose(self, path: list[str]) -> Transfer:
        return Transfer([self.edge(a, b) for a, b in zip(path, path[1:])])

    def all_paths(self, coarse: str, fine: str) -> list[list[str]]:
        return [list(p) for p in nx.all_simple_paths(self.graph, coarse, fine)]

    # ------------------------------------------------------------------ cycles

    def _resolve_paths(self) -> list[list[str]]:
        spec = self.hierarchy.mlsgd.path
        if spec:
            paths = spec
            for i, p in enumerate(paths):
                where = ("mlsgd", "path", i) if len(paths) > 1 else ("mlsgd", "path")
                if p[-1] != self.finest:
                    raise self._err(f"a path must end at the finest level {self.finest!r}",
                                    where)
                for a, b in zip(p, p[1:]):
                    if not self.graph.has_edge(a, b):
                        raise self._err(f"no edge {a} -> {b} in the level graph", where)
            return [list(p) for p in paths]
        chain = list(nx.topological_sort(self.graph))
        if all(self.graph.has_edge(a, b) for a, b in zip(chain, chain[1:])):
            return [chain]
        if self.hierarchy.mlsgd.method == "sgd":
            return [[self.finest]]
        raise self._err("the level graph is not a chain; say which levels a cycle visits "
                        "with mlsgd.path (one path, or a list of paths to alternate)",
                        ("mlsgd", "path"))

    def path(self, cycle: int) -> list[str]:
        """Levels visited in ``cycle`` (from 0), coarsest first."""
        return list(self.paths[cycle % len(self.paths)])

    for_level = staticmethod(for_level)  # one implementation: mlsgd_dsl.schema.for_level

    # ------------------------------------------------------------------ data & plugins

    def data(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Prepared splits per level (coarsened copies computed once, cached)."""
        from .data.prepare import prepare

        key = str(device)
        if key in self._data_cache:
            return self._data_cache[key]
        h = self.hierarchy
        src = self.registry.get("data sources", h.data.source)
        try:
            raw = src.record.load(self._options[("data",)], DataContext(seed=h.data.seed))
        except UserError as exc:
            if exc.file is None:
                raise type(exc)(exc.message, file=self.file, path=("data",)) from None
            raise
        except Exception as exc:
            raise PluginFailure(f"{src.label()}: data source {h.data.source!r} raised "
                                f"{type(exc).__name__}: {exc}", file=self.file,
                                path=("data", "source")) from None
        problem = raw_data_problem(raw, self._source_shape)
        if problem:
            raise PluginFailure(f"{src.label()}: data source {h.data.source!r}: {problem}",
                                file=self.file, path=("data", "source"))
        try:  # what the contract does not cover: label range, dtypes, NaN, empty splits
            check_raw(raw, self.data_shape, f"data source {h.data.source!r}")
        except UserError as exc:
            raise type(exc)(exc.message, file=self.file, path=("data",)) from None
        try:
            validation = h.data.validation
            validation = int(validation) if validation >= 1 else float(validation)
            splits = prepare(raw, validation=validation, subset=h.data.subset,
                             test_subset=h.data.test_subset, seed=h.data.seed,
                             normalize=h.data.normalize)
        except ValueError as exc:
            raise self._err(str(exc), ("data",)) from None
        if len(splits.val_x) == 0:  # a fraction too small for this training set
            raise self._err(f"leaves no validation image (of {len(raw.train_x)} training "
                            "images); give a count >= 1 or a larger fraction",
                            ("data", "validation"))
        by_signature: dict[str, Any] = {}
        out = {}
        for name, node in self.nodes.items():
            sig = repr([(e.record.name, o.model_dump()) for e, o in node.coarsen])
            if sig not in by_signature:
                steps = [(e.record, o) for e, o in node.coarsen]
                by_signature[sig] = (splits.coarsened(steps) if steps else splits).to(device)
            out[name] = by_signature[sig]
        self._data_cache[key] = out
        return out

    def plugin_options(self) -> dict[tuple, Any]:
        """Validated options of every plugin-named table, by key path (from the loader)."""
        return dict(self._options)

    def correction(self) -> Any:
        """A fresh correction strategy from the file's ``mlsgd.correction`` (checked)."""
        entry, options = self._options[("mlsgd", "correction")]
        path = ("mlsgd", "correction")
        try:
            strategy = entry.record.create(options)
        except UserError:
            raise
        except Exception as exc:
            raise PluginFailure(f"{entry.label()}: strategy {entry.record.name!r} raised "
                                f"{type(exc).__name__} in create: {exc}", file=self.file,
                                path=path) from None
        problem = strategy_problem(strategy)
        if problem:
            raise PluginFailure(f"{entry.label()}: strategy {entry.record.name!r}: {problem}",
                                file=self.file, path=path)
        return strategy

    def resolved(self) -> dict[str, Any]:
        """The fully resolved configuration (inheritance and overrides applied).

        Paths are written out absolute, so the saved copy in a run folder runs from any
        current directory on this machine: your-own-model levels (``family = "import"``) get
        the hierarchy file's folder in their ``search_path``, and relative data paths are
        taken from that folder.
        """
        data = self.hierarchy.model_dump(mode="json")
        data.pop("extends", None)
        if self.base_dir is not None:
            for level in data["levels"].values():
                model = level.get("model", {})
                if model.get("family") == "import":
                    model["search_path"] = self._search_path(list(model.get("search_path", [])))
            options = self._options[("data",)]
            for name in _path_fields(options):
                if name in data["data"]["options"]:
                    data["data"]["options"][name] = getattr(options, name)
        return data

    def hash_basis(self) -> dict[str, Any]:
        """What the configuration hash covers: the resolved configuration without anything
        that names a place (import folders, data paths), plus the content of each imported
        factory's source file. A moved or copied project hashes the same; an edited
        ``nets.py`` does not."""
        data = self.hierarchy.model_dump(mode="json")
        data.pop("extends", None)
        for name in _path_fields(self._options[("data",)]):
            data["data"]["options"].pop(name, None)
        for level, spec in data["levels"].items():
            model = spec.get("model", {})
            if model.get("family") == "import":
                from .models.imported import source_digest

                model.pop("search_path", None)
                options = self.nodes[level].options
                if self.base_dir is not None:
                    options = options.model_copy(
                        update={"search_path": self._search_path(options.search_path)})
                model["factory_source"] = source_digest(options)
        return data

    def config_hash(self) -> str:
        text = json.dumps(self.hash_basis(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> list[dict[str, Any]]:
        """One record per level, coarsest first (for reports)."""
        return [{"level": n, "h": self.nodes[n].h, "parameters": self.nodes[n].n_parameters,
                 "flops": self.nodes[n].flops, "input": self.nodes[n].input_shape}
                for n in self.levels]


def _path_fields(options: Any) -> list[str]:
    """Names of the option fields marked :data:`~mlsgd_dsl.api.FILE_PATH`."""
    fields = getattr(type(options), "model_fields", {})
    return [name for name, info in fields.items()
            if isinstance(info.json_schema_extra, dict)
            and info.json_schema_extra.get("file_path") is True]


def _flops(model: nn.Module, shape: tuple[int, int, int]) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(1, *shape, device=device)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.eval()(x)
        model.train()
        return float(counter.get_total_flops())
    except Exception:  # an estimate only: a model the counter cannot trace has none
        return None


def compile(hierarchy: Hierarchy) -> Compiled:  # noqa: A001 - the public API name
    """Compile a loaded hierarchy (see :func:`mlsgd_dsl.load`)."""
    return Compiled(hierarchy)
