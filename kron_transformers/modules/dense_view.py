"""The read-only dense ``weight`` every compressed module exposes."""


def dense_weight_property() -> property:
    """A ``weight`` property returning ``module.materialize()``.

    HF code reads ``.weight`` (GPT-2's ``_init_weights`` reaches into ``c_proj.weight``; dtype and
    device probes), so compressed modules expose the dense reconstruction. It has no setter:
    assigning a Parameter raises instead of silently replacing the factors.
    """
    return property(lambda module: module.materialize(), doc="Dense weight, rebuilt on each access (read-only).")
