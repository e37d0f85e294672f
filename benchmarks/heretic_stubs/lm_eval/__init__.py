"""Stand-in for lm_eval (see ../README.md): heretic imports it at start and calls it only from its benchmark menu."""


def simple_evaluate(*args, **kwargs):
    raise RuntimeError("lm_eval stand-in: benchmarks are not available in this run")
