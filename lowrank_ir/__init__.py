"""lowrank-ir: low-rank decomposition of trained neural networks through one layer IR.

The public API is what ``__all__`` lists; everything in ``_``-prefixed modules may change.
Importing this package imports numpy only, never a deep-learning framework: frameworks are loaded
by the frontends and backends when a model of theirs is handed in.
"""

from lowrank_ir._api import Decompose, count_parameters
from lowrank_ir._backend import LINALG_BACKENDS, linalg_backend
from lowrank_ir._cross import convert, load_converted, parity, save_converted
from lowrank_ir._engine import (
    CONV_FORMS,
    LAYOUTS,
    LayerStats,
    Plan,
    PlanEntry,
    RewriteResult,
    plan,
    rewrite,
    with_forms,
    with_layout,
)
from lowrank_ir._files import SafeWriteUmask, atomic_write, write_json
from lowrank_ir._ir import Graph, GraphError, LazyArray, Node, Op, Value, conv_pads, verify
from lowrank_ir._logging import set_logger_level
from lowrank_ir._parity_report import ParityReport, ParityRow
from lowrank_ir._policy import Policy, make_divisible
from lowrank_ir._registry import framework_of
from lowrank_ir._report import LayerReport, Report, build_report
from lowrank_ir.serde import load_graph, save_graph

__version__ = "0.1.0"

__all__ = [
    "CONV_FORMS",
    "LAYOUTS",
    "LINALG_BACKENDS",
    "Decompose",
    "Graph",
    "GraphError",
    "LazyArray",
    "LayerReport",
    "LayerStats",
    "Node",
    "Op",
    "Plan",
    "ParityReport",
    "ParityRow",
    "PlanEntry",
    "Policy",
    "Report",
    "RewriteResult",
    "SafeWriteUmask",
    "Value",
    "__version__",
    "atomic_write",
    "build_report",
    "conv_pads",
    "convert",
    "count_parameters",
    "framework_of",
    "load_converted",
    "linalg_backend",
    "load_graph",
    "make_divisible",
    "parity",
    "plan",
    "rewrite",
    "save_converted",
    "save_graph",
    "set_logger_level",
    "verify",
    "with_forms",
    "with_layout",
    "write_json",
]
