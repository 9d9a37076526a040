"""A transfer rule written from scratch and registered in-process, without packaging it.

    python examples/custom_rule.py          # check the rule, validate, train the quickstart
    python examples/custom_rule.py --tiny   # the same on tiny data, one cycle (CI)

The rule ``example.depth-pairs`` moves the residual layers of a depth hierarchy: fine layers
2i and 2i+1 are copies of coarse layer i (P), the restriction averages each pair (R = ½Pᵀ, as
in the thesis, 4.2.2) and the transpose sums each pair (Pᵀ). It is the built-in
``depth.constant`` in thirty lines; the script checks that both give the same P.

It also shows the mistake ``validate`` exists to catch: a rule whose ``transpose`` returns R
(the mean) instead of Pᵀ (the sum) — R and Pᵀ differ by the factor ½ here — fails the adjoint
check. To use a rule from the command line, package it as a plugin (docs/plugins.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

import mlsgd_dsl
from mlsgd_dsl.api import GroupOperator, GroupSpec, NoOptions, TransferBindError, TransferRule
from mlsgd_dsl.hookspecs import hookimpl
from mlsgd_dsl.registry import build_registry
from mlsgd_dsl.testing import assert_rule_coherent, check_rule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "hierarchies" / "quickstart.toml"
TINY = {"data.options.train": 400, "data.options.test": 200, "data.validation": 100,
        "mlsgd.cycles": 1, "mlsgd.batch_size": 50}


# --------------------------------------------------------------------------- the rule


def layer_index(name: str) -> tuple[str, int]:
    """``blocks.0.layers.3.conv.weight`` → (``blocks.0.layers.#.conv.weight``, 3)."""
    parts = name.split(".")
    for k in range(len(parts) - 1):
        if parts[k] == "layers" and parts[k + 1].isdigit():
            return ".".join(parts[:k + 1] + ["#"] + parts[k + 2:]), int(parts[k + 1])
    raise TransferBindError(f"example.depth-pairs: {name!r} has no 'layers.<number>' part")


class DepthPairs(GroupOperator):
    """P: fine layers 2i, 2i+1 = coarse layer i.  R: their mean.  Pᵀ: their sum."""

    left_inverse = True  # R∘P = I: the mean of two copies is the original; validate checks it

    def __init__(self, spec: GroupSpec, pairs: list[tuple[str, str, str]]) -> None:
        super().__init__(spec)
        self.pairs = pairs  # (coarse name, first fine name, second fine name)

    def prolongate(self, coarse: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for c, f0, f1 in self.pairs:
            out[f0], out[f1] = coarse[c].clone(), coarse[c].clone()
        return out

    def restrict(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {c: (fine[f0] + fine[f1]) / 2 if fine[f0].is_floating_point() else fine[f0]
                for c, f0, f1 in self.pairs}

    def transpose(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {c: fine[f0] + fine[f1] for c, f0, f1 in self.pairs}


def bind_pairs(spec: GroupSpec, options: NoOptions) -> DepthPairs:
    """Pair every coarse layer with two fine layers; refuse anything else with a reason."""
    def stacks(names: Mapping[str, torch.Size]) -> dict[str, list[str]]:
        out: dict[str, list[tuple[int, str]]] = {}
        for name in names:
            key, index = layer_index(name)
            out.setdefault(key, []).append((index, name))
        return {key: [n for _, n in sorted(items)] for key, items in out.items()}

    coarse, fine = stacks(spec.coarse), stacks(spec.fine)
    pairs = []
    for key, names in coarse.items():
        twins = fine.get(key, [])
        if len(twins) != 2 * len(names):
            raise TransferBindError(
                f"example.depth-pairs: {key!r} has {len(names)} layers on "
                f"{spec.coarse_level!r} but {len(twins)} on {spec.fine_level!r} (needs "
                f"{2 * len(names)})")
        for i, name in enumerate(names):
            if spec.coarse[name] != spec.fine[twins[2 * i]]:
                raise TransferBindError(f"example.depth-pairs: {name!r} changes shape")
            pairs.append((name, twins[2 * i], twins[2 * i + 1]))
    if set(fine) - set(coarse):
        raise TransferBindError(f"example.depth-pairs: {sorted(set(fine) - set(coarse))} "
                                f"only exist on {spec.fine_level!r}")
    return DepthPairs(spec, pairs)


RULE = TransferRule(name="example.depth-pairs", options=NoOptions, bind=bind_pairs,
                    description="Residual layers: each coarse layer copied to two fine ones.")


class WrongTranspose(DepthPairs):
    """The classic slip: Pᵀ written as R. Here R = ½Pᵀ, so P* comes out half as large."""

    def transpose(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.restrict(fine)


WRONG = TransferRule(name="example.wrong-transpose", options=NoOptions,
                     bind=lambda spec, options: WrongTranspose(spec, bind_pairs(spec,
                                                                               options).pairs))


class ExamplePlugin:
    """What a plugin's entry-point module would hold; here an object registered in-process."""

    @hookimpl
    def mlsgd_transfer_rules(self) -> list[TransferRule]:
        return [RULE, WRONG]


# --------------------------------------------------------------------------- using it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny data, one cycle (CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder, new or empty (default: a new runs/quickstart-TIME)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    # 1. The rule alone, as a plugin's test would check it: every numerical check validate
    #    runs on a rule (shapes, R∘P = I, Pᵀ against autograd, the adjoint identity with
    #    P* = (h_fine/h_coarse)·Pᵀ, linearity), on random float64 tensors.
    layers = {"layers.0.weight": (4, 4, 3, 3), "layers.0.bias": (4,)}
    twice = {"layers.0.weight": (4, 4, 3, 3), "layers.1.weight": (4, 4, 3, 3),
             "layers.0.bias": (4,), "layers.1.bias": (4,)}
    rows = assert_rule_coherent(RULE, coarse=layers, fine=twice, h_coarse=2.0, h_fine=1.0)
    print(f"{RULE.name}: {len(rows)} checks passed")
    for row in check_rule(WRONG, coarse=layers, fine=twice, h_coarse=2.0, h_fine=1.0):
        if row.status == "fail":
            print(f"{WRONG.name}: {row.name}: {row.status}: {row.detail}")

    # 2. Register it in-process: built-ins + installed plugins + this object.
    #    (mlsgd_dsl.registry.set_default_registry(registry) makes it the default instead.)
    registry = build_registry(extra_plugins=[("example", ExamplePlugin())])

    # 3. Use it by name in a hierarchy: the quickstart with its residual layers moved by it.
    overrides = {**(TINY if args.tiny else {}),
                 'transfer.rules."blocks.*.layers.*"': RULE.name}
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(QUICKSTART, overrides, registry=registry))
    report = mlsgd_dsl.validate(compiled)
    print("\n".join(line for line in report.table().splitlines() if RULE.name in line))
    print(report.table().splitlines()[-1])
    assert report.ok, report.table()

    # Same P as the built-in depth.constant, on the quickstart's real weights.
    builtin = mlsgd_dsl.compile(mlsgd_dsl.load(QUICKSTART, TINY, registry=registry))
    start = compiled.model("coarse").state_dict()
    ours = compiled.transfer("coarse", "fine").prolongate(start)
    theirs = builtin.transfer("coarse", "fine").prolongate(start)
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    print("P of example.depth-pairs == P of depth.constant on coarse -> mid -> fine")

    # The broken rule in a hierarchy: validate fails, and run() refuses to start.
    bad = mlsgd_dsl.compile(mlsgd_dsl.load(
        QUICKSTART, {**TINY, 'transfer.rules."blocks.*.layers.*"': WRONG.name},
        registry=registry))
    failed = [r for r in mlsgd_dsl.validate(bad).rows if r.status == "fail"]
    print(f"with {WRONG.name}: {len(failed)} failed check(s), e.g. {failed[0].name}")

    # 4. Train with it.
    summary = mlsgd_dsl.run(compiled, out_dir=args.out, quiet=True, validate=False)
    print(f"trained {summary['cycles']} cycle(s) with {RULE.name}: val acc "
          f"{summary['val_acc']:.3f} ({summary['run_dir']})")


if __name__ == "__main__":
    main()
