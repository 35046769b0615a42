"""Rank policies: from a user's request to one rank per layer, with the reference tool's semantics.

Parameter ratio, 2-D weights (Linear, Embedding, MatMul) of shape ``[out, in]``. A rank-``h`` factorization
``W ≈ A B`` with ``A: [out, h]`` and ``B: [h, in]`` keeps ``h (out + in)`` of the ``out · in`` parameters,
so keeping a fraction ``r`` of them means::

    h (out + in) = r · out · in   =>   h = int(r · out · in / (out + in))

Parameter ratio, conv kernels ``[out, in, *k]`` with ``p = prod(k)`` taps, Tucker-2 with the same rank
``h`` on both modes keeps ``in·h`` (first 1x1) ``+ h·h·p`` (core) ``+ h·out`` (last 1x1), so::

    p h² + (in + out) h − r · out · in · p = 0   =>   h = the larger root

(the reference tool uses ``k_h²`` for ``p`` even for non-square kernels; we use ``k_h · k_w``).

Divisor rounding (hardware likes multiples of 64)::

    h' = max(d, int(h + d/2) // d · d),  and h' += d if h' < 0.9 h

``d = 1`` rounds to the nearest integer. A layer whose factorized form would not have fewer
parameters than the original is left alone.

Per-layer rules (``from_dict``), as the reference tool reads them: keys are regular expressions
(strings or compiled ``re.Pattern``), tried in dict order with ``re.search``; the first that matches a
layer's name gives its value (``excludes``, exact names, are checked before any rule). A value is an
int rank, a float ratio in (0, 1), ``"vbmf"`` (any case), or an ``(out rank, in rank)`` pair: a conv's
Tucker-2 ranks, each rounded to the divisor on its own; on a matrix layer (Linear, Embedding, MatMul) a
pair means its larger rank, ``max(out, in)``, rounded.

A saved config file is the reference tool's ``decompose_config`` (``{layer: rank or [out, in]}``), plus,
when some k x k convs are written in another form than Tucker-2 (channel or spatial SVD, which a
latency budget may choose), one more top-level key :data:`FORMS_KEY` holding them::

    {"stem": [32, 16], "head.conv": [48, 48], "__forms__": {"head.conv": ["spatial_svd", 48]}}

Each layer of the section keeps a Tucker-2 entry as a stand-in (its ranks nearest the form's rank), so
the reference tool, which looks up layer names in the file and never reads this key, rebuilds the file
as Tucker-2 layers; ``from_file`` here restores the forms (:func:`config_document`,
:func:`split_config_document`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FORMS_KEY",
    "Policy",
    "RankSpec",
    "Rules",
    "config_document",
    "conv_ranks",
    "make_divisible",
    "matrix_rank",
    "plain_number",
    "ratio_rank",
    "smallest_ratio",
    "split_config_document",
    "tucker2_stand_in",
    "validate_config",
    "validate_dict",
    "validate_divisor",
    "validate_excludes",
    "validate_fixed",
    "validate_ratio",
]

VBMF = "vbmf"

#: The key of a saved config's optional section of layers written in another form: ``{name: [form, rank]}``.
#: Not a layer name any framework gives (nor a regular expression a rule would use).
FORMS_KEY = "__forms__"

#: What a user may ask for one layer: a rank, a parameter ratio in (0, 1), "vbmf", or an
#: ``(out rank, in rank)`` pair (a list is accepted for a pair, as JSON gives it).
RankSpec = int | float | str | tuple[int, int]

#: ``from_dict`` rules: a regular expression (string or compiled) -> what its layers get.
Rules = Mapping[str | re.Pattern[str], int | float | str | Sequence[int]]


def plain_number(value: object) -> object:
    """A numpy int or float scalar (``np.float32(0.5)``, ``np.int64(8)``) as the Python number; others as given.

    Every number the API takes goes through this first, so numpy scalars of any width are accepted
    where Python numbers are (booleans, numpy's included, stay booleans and are refused as numbers).
    """
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain_number(item) for item in value)
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_ratio(ratio: object) -> float:
    ratio = plain_number(ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, float) or not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be a float strictly between 0 and 1 (e.g. 0.5), got {ratio!r}")
    return ratio


def validate_fixed(rank: object) -> int:
    rank = plain_number(rank)
    if not _is_int(rank) or rank <= 0:  # type: ignore[operator]
        raise ValueError(f"fixed rank must be an int > 0 (not a bool or float), got {rank!r}")
    return rank  # type: ignore[return-value]


def validate_divisor(divisor: object) -> int:
    divisor = plain_number(divisor)
    if not _is_int(divisor) or divisor <= 0:  # type: ignore[operator]
        raise ValueError(f"divisor must be an int > 0 (1 disables rounding), got {divisor!r}")
    return divisor  # type: ignore[return-value]


def validate_excludes(excludes: object) -> tuple[str, ...]:
    if excludes is None:
        return ()
    if not isinstance(excludes, (list, tuple)):
        raise ValueError(f"excludes must be a list or tuple of layer names, got {type(excludes).__name__} "
                         f"{excludes!r}")
    bad = [item for item in excludes if not isinstance(item, str)]
    if bad:
        raise ValueError(f"excludes must hold layer names (str); these are not: {bad!r}")
    return tuple(excludes)


def _rank_pair(value: object) -> tuple[int, int] | None:
    """``value`` as an ``(out rank, in rank)`` pair if it is a list or tuple of two ints > 0, else None."""
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(_is_int(item) and item > 0 for item in value)):
        return int(value[0]), int(value[1])
    return None


def _validate_spec(spec: object, where: str) -> RankSpec:
    if isinstance(spec, str):
        if spec.lower() != VBMF:
            raise ValueError(f"{where}: the only method name accepted is 'vbmf', got {spec!r}")
        return VBMF
    if isinstance(spec, float):
        try:
            return validate_ratio(spec)
        except ValueError as err:  # the reference would read 64.0 as rank 64; we ask for the int
            hint = " (a rank is given as an int)" if spec >= 1.0 else ""
            raise ValueError(f"{where}: {err}{hint}") from err
    if _is_int(spec):
        try:
            return validate_fixed(spec)
        except ValueError as err:  # the reference reads 0 as "leave alone"; excludes says that by name
            raise ValueError(f"{where}: {err} (to leave layers alone, name them in excludes)") from err
    if isinstance(spec, (list, tuple)):
        pair = _rank_pair(spec)
        if pair is None:
            raise ValueError(f"{where}: a rank pair must be (out rank, in rank), two ints > 0 (not bools or "
                             f"floats), got {spec!r}")
        return pair
    raise ValueError(f"{where}: a value must be an int rank > 0, a float ratio in (0, 1), 'vbmf' or an "
                     f"(out rank, in rank) pair of ints, got {spec!r}")


def _compile_key(key: object) -> re.Pattern[str]:
    if isinstance(key, re.Pattern) and isinstance(key.pattern, str):
        return key
    if not isinstance(key, str):
        raise ValueError(f"from_dict keys must be regular-expression strings, got {key!r} (a compiled "
                         f"re.Pattern of a str pattern is accepted too)")
    try:
        return re.compile(key)
    except re.error as err:
        raise ValueError(f"from_dict key {key!r} is not a valid regular expression: {err}") from err


def validate_dict(rules: object) -> tuple[tuple[re.Pattern[str], RankSpec], ...]:
    """Check ``{regex: int | float | "vbmf" | (out, in)}`` rules; return the compiled rules in dict order.

    Keys that compile to the same pattern (``"fc"`` and ``re.compile("fc")``) are one rule, at the
    first key's place with the last key's value, as in the reference tool (which builds a dict of
    compiled keys).
    """
    if not isinstance(rules, Mapping) or not rules:
        raise ValueError(f"from_dict takes a non-empty dict {{regex: int | float | 'vbmf' | [out, in]}}, "
                         f"got {rules!r}")
    compiled: dict[re.Pattern[str], RankSpec] = {}
    for key, spec in rules.items():
        if key == FORMS_KEY:
            raise ValueError(f"from_dict rules hold {FORMS_KEY!r}, the section of a saved config file that records "
                             f"layers in two-factor forms; rules cannot restore forms: read that file with "
                             f"Decompose(model, config_file=...).from_file(), or drop the section to get Tucker-2")
        pattern = _compile_key(key)
        compiled[pattern] = _validate_spec(spec, f"from_dict[{key!r}]")
    return tuple(compiled.items())


def validate_config(config: object, source: str = "decompose_config") -> dict[str, int | list[int]]:
    """Check a saved ``decompose_config``: ``{layer name: rank}`` or ``{conv name: [out rank, in rank]}``."""
    if not isinstance(config, Mapping) or not config:
        raise ValueError(f"{source} must be a non-empty JSON object {{layer name: rank or [out, in]}}, "
                         f"got {config!r}")
    checked: dict[str, int | list[int]] = {}
    for name, rank in config.items():
        pair = _rank_pair(rank)
        if _is_int(rank) and rank > 0:
            checked[name] = rank
        elif pair is not None:
            checked[name] = list(pair)
        else:
            raise ValueError(f"{source}[{name!r}] must be an int rank > 0 or [out rank, in rank], got {rank!r}")
    return checked


def tucker2_stand_in(rank: int, shape: Sequence[int]) -> list[int]:
    """The Tucker-2 ranks ``[out, in]`` nearest ``rank`` of a conv of ``shape`` ``[out, in, *k]``.

    The entry a conv written in another two-factor form at ``rank`` keeps in a config file, for the reference
    tool (the form itself is in :data:`FORMS_KEY`), or a single-rank choice spelled as Tucker-2 ranks.
    """
    return [min(rank, int(shape[0])), min(rank, int(shape[1]))]


def config_document(config: Mapping[str, int | Sequence[int]],
                    forms: Mapping[str, tuple[str, int]] | None = None) -> dict[str, Any]:
    """What a config file holds: ``config`` (the reference's format), and :data:`FORMS_KEY` if there are ``forms``.

    ``forms``: layer name -> ``(form, rank)``, as ``Decompose.forms`` holds them; each layer must have
    a stand-in entry in ``config`` (``ValueError`` naming the layers that have none).
    """
    document: dict[str, Any] = {name: list(rank) if isinstance(rank, (list, tuple)) else rank
                                for name, rank in config.items()}
    if forms:
        missing = [name for name in forms if name not in config]
        if missing:
            raise ValueError(f"forms name layers the config does not decompose: {missing}; a layer in another "
                             f"form keeps a Tucker-2 entry in the config")
        document[FORMS_KEY] = {name: [form, int(rank)] for name, (form, rank) in forms.items()}
    return document


def split_config_document(document: object, source: str = "decompose_config",
                          ) -> tuple[dict[str, int | list[int]], dict[str, tuple[str, int]]]:
    """``(decompose_config, forms)`` of a config file's JSON (:func:`config_document`'s inverse), checked.

    The reference's files (no :data:`FORMS_KEY`) give no forms. ``ValueError`` starting with ``source``
    for a malformed section: not an object of ``{layer: [form name, rank]}``, or naming a layer without
    an entry in the config. Whether a layer can take its form at that rank is ``with_forms``'s check.
    """
    if not isinstance(document, Mapping):
        return validate_config(document, source), {}
    section = document.get(FORMS_KEY, {})
    config = validate_config({name: rank for name, rank in document.items() if name != FORMS_KEY}, source)
    where = f"{source}[{FORMS_KEY!r}]"
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a JSON object {{layer name: [form, rank]}}, got {section!r}")
    forms: dict[str, tuple[str, int]] = {}
    for name, value in section.items():
        if (not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], str)
                or not _is_int(value[1])):
            raise ValueError(f"{where}[{name!r}] must be [form name, int rank], e.g. ['spatial_svd', 48], "
                             f"got {value!r}")
        if name not in config:
            raise ValueError(f"{where} names {name!r}, which has no entry in {source}: a layer in another form "
                             f"keeps its Tucker-2 entry there (what the reference tool reads)")
        forms[name] = (value[0], int(value[1]))
    return config, forms


@dataclass(frozen=True, slots=True)
class Policy:
    """How ranks are chosen: ``kind`` is ``ratio``, ``fixed``, ``dict``, ``vbmf`` or ``config``."""

    kind: str
    value: Any = None
    excludes: tuple[str, ...] = ()
    divisor: int = 64

    @classmethod
    def ratio(cls, ratio: float, excludes: Sequence[str] | None = None, divisor: int = 64) -> Policy:
        return cls("ratio", validate_ratio(ratio), validate_excludes(excludes), validate_divisor(divisor))

    @classmethod
    def fixed(cls, rank: int, excludes: Sequence[str] | None = None, divisor: int = 64) -> Policy:
        return cls("fixed", validate_fixed(rank), validate_excludes(excludes), validate_divisor(divisor))

    @classmethod
    def from_dict(cls, rules: Rules, excludes: Sequence[str] | None = None,
                  divisor: int = 64) -> Policy:
        plain: Any = {key: plain_number(spec) for key, spec in rules.items()} if isinstance(rules, Mapping) else rules
        return cls("dict", validate_dict(plain), validate_excludes(excludes), validate_divisor(divisor))

    @classmethod
    def vbmf(cls, excludes: Sequence[str] | None = None, divisor: int = 64) -> Policy:
        return cls("vbmf", VBMF, validate_excludes(excludes), validate_divisor(divisor))

    @classmethod
    def config(cls, config: Mapping[str, Any]) -> Policy:
        """Exact ranks per layer, as a saved ``decompose_config`` holds them (no rounding)."""
        return cls("config", validate_config(config), (), 1)

    def spec_for(self, name: str) -> Any:
        """What this policy asks for layer ``name`` (None: leave it alone)."""
        if name in self.excludes:
            return None
        if self.kind == "dict":
            for pattern, spec in self.value:
                if pattern.search(name):
                    return spec
            return None
        if self.kind == "config":
            return self.value.get(name)
        return self.value


def make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to a multiple of ``divisor`` (at least ``divisor``, never 10% below ``value``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def ratio_rank(shape: tuple[int, ...], ratio: float) -> float:
    """The rank keeping a fraction ``ratio`` of a weight's parameters, before rounding (formulas above).

    ``shape`` is ``[out, in]`` for a matrix, ``[out, in, *k]`` for a conv kernel (Tucker-2, same rank
    on both modes).
    """
    out, inp = shape[0], shape[1]
    if len(shape) == 2:
        return float(int(ratio * out * inp / (out + inp)))
    taps = math.prod(shape[2:])
    target = ratio * out * inp * taps
    return (-(inp + out) + math.sqrt((inp + out) ** 2 + 4 * taps * target)) / (2 * taps)


def smallest_ratio(shape: tuple[int, ...]) -> float:
    """The smallest ratio whose :func:`ratio_rank` for ``shape`` reaches 1."""
    out, inp = shape[0], shape[1]
    taps = math.prod(shape[2:])
    return (taps + inp + out) / (out * inp * taps)


def matrix_rank(shape: tuple[int, int], spec: RankSpec, divisor: int,
                vbmf_ranks: Any = None, require_saving: bool = True) -> tuple[int, str]:
    """Rank for a 2-D weight ``[out, in]``; returns ``(rank, "")`` or ``(0, reason it is left alone)``.

    ``vbmf_ranks`` is a callable returning the EVBMF ranks of the weight (only called for ``"vbmf"``).
    With ``require_saving=False`` (exact ranks from a saved config) the saving check is skipped.
    """
    out, inp = shape
    if spec == VBMF:
        rank = float(max(vbmf_ranks()))
    elif isinstance(spec, float):
        rank = ratio_rank(shape, spec)
    elif isinstance(spec, tuple):  # an (out, in) pair: one rank serves both sides, so the larger
        rank = float(max(spec))
    else:
        rank = float(spec)
    hidden = make_divisible(rank, divisor)
    if require_saving and hidden * (out + inp) >= out * inp:
        return 0, (f"rank {hidden} would not save parameters ({hidden} x ({out} + {inp}) >= {out} x {inp})")
    return hidden, ""


def conv_ranks(shape: tuple[int, ...], spec: Any, divisor: int,
               vbmf_ranks: Any = None, require_saving: bool = True) -> tuple[tuple[int, int], str]:
    """Tucker-2 ranks ``(out rank, in rank)`` for a kernel ``[out, in, *k]``, or ``((0, 0), reason)``."""
    out, inp = shape[0], shape[1]
    taps = math.prod(shape[2:])
    ranks: tuple[float, float]
    if spec == VBMF:
        rank_out, rank_in = vbmf_ranks()
        ranks = (float(rank_out), float(rank_in))
    elif isinstance(spec, float):
        root = ratio_rank(shape, spec)
        ranks = (root, root)
    elif isinstance(spec, (list, tuple)):
        ranks = (float(spec[0]), float(spec[1]))
    else:
        ranks = (float(spec), float(spec))
    hidden_out = make_divisible(ranks[0], divisor)
    hidden_in = make_divisible(ranks[1], divisor)
    # The saving check runs on the rounded ranks before capping, as the reference tool does, so the
    # same layers are left alone (capping first would decompose e.g. a 3-channel stem it leaves alone).
    after = hidden_in * inp + hidden_in * hidden_out * taps + hidden_out * out
    before = out * inp * taps
    if require_saving and after >= before:
        return (0, 0), (f"ranks [{hidden_out}, {hidden_in}] would not save parameters "
                        f"({after} >= {before})")
    if require_saving:  # ranks from a rule are capped at the dimensions; exact config ranks are checked later
        hidden_out, hidden_in = min(hidden_out, out), min(hidden_in, inp)
    return (hidden_out, hidden_in), ""
