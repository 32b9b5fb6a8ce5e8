"""The declarative suite format.

A suite is one module in ``flashtree/bench/suites/`` that defines ``SUITE = Suite(...)`` and has one line in
``suites/__init__.py``'s registry. It declares:

- ``workloads``: a list of parameter dicts (``grid`` builds the cross product of some axes);
- ``setup(params, device) -> Case``: for one workload, a factory of fresh inputs, the providers to time
  (the flashtree op and its peers), the bytes and flops that set the floor, and an optional ``Check``.

The runner builds the input sets (enough to exceed 2 x L2), checks every provider against the reference,
times the ones that are right, and reports the rest as wrong, failed or unavailable.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch

SUBJECT = "flashtree"  # the provider every other provider is compared with


def _identity_args(*args):
    return args


def _identity(x):
    return x


@dataclass(frozen=True)
class Provider:
    """One implementation of the op under test.

    ``fn(*args)`` is the timed call. ``prepare(*input_set) -> args`` adapts a shared input set to this
    provider (e.g. a peer's layout or LSE base) and ``normalize(output)`` maps its output back to the
    suite's convention for the check; neither is timed.
    """

    fn: Callable[..., Any]
    prepare: Callable[..., tuple] = _identity_args
    normalize: Callable[[Any], Any] = _identity


@dataclass(frozen=True)
class Unavailable:
    """Stands in for a provider that cannot run here (its import failed); ``reason`` is printed once."""

    reason: str


class Verdict(NamedTuple):
    """A check's answer: ``ok`` and a one-line ``detail`` (the error and the tolerance it met or missed)."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class Check:
    """Correctness check run on the first input set before anything is timed.

    ``reference(*input_set)`` computes the expected output once per workload (typically in float64);
    ``compare(output, expected) -> Verdict`` judges each provider's normalized output.
    """

    reference: Callable[..., Any]
    compare: Callable[[Any, Any], Verdict]


@dataclass(frozen=True)
class Case:
    """Everything the runner needs for one workload.

    ``inputs()`` returns one fresh input set (a tuple of positional arguments). ``nbytes`` and ``flops``
    are the workload's essential memory traffic and arithmetic: the inputs of the floor.
    """

    inputs: Callable[[], tuple]
    providers: dict[str, Provider | Unavailable | Callable[..., Any]]
    nbytes: int
    flops: int
    check: Check | None = None

    def provider(self, name: str) -> Provider | Unavailable:
        """``providers[name]``, with a bare callable wrapped as a ``Provider``."""
        p = self.providers[name]
        return p if isinstance(p, (Provider, Unavailable)) else Provider(p)


@dataclass(frozen=True)
class Suite:
    """A named list of workloads and how to set each one up."""

    name: str
    description: str
    workloads: Sequence[dict]
    setup: Callable[[dict, torch.device], Case]
    quick: Sequence[dict] | None = None  # the subset ``--quick`` runs; None: all workloads
    subject: str = SUBJECT
    label: Callable[[dict], str] | None = field(default=None)  # None: the parameters that vary

    def select(self, *, quick: bool) -> list[dict]:
        return list(self.quick if quick and self.quick is not None else self.workloads)

    def workload_label(self, params: dict) -> str:
        """A short name for a workload: by default ``k=v`` for each parameter that varies in the suite."""
        if self.label is not None:
            return self.label(params)
        varying = [k for k in params if len({repr(w.get(k)) for w in self.workloads}) > 1]
        return " ".join(f"{k}={params[k]}" for k in (varying or list(params)))


def grid(**axes: Sequence[Any]) -> list[dict]:
    """The cross product of the axes as parameter dicts, the last axis varying fastest.

    >>> grid(N=[1, 2], S=[4])
    [{'N': 1, 'S': 4}, {'N': 2, 'S': 4}]
    """
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]
