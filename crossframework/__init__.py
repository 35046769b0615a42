"""Work that orchestrates several frameworks, above the backends: converting models between them, parity.

The core reaches it only through its registry table (``lowrank_ir._registry.CROSS_FRAMEWORK``);
users call it as ``lowrank_ir.convert``, ``save_converted``, ``load_converted`` and ``parity``.
"""
