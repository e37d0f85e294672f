"""Stand-in for bitsandbytes (see ../README.md): names to import and to test isinstance against, nothing that runs."""

import types


class _Never:
    """No object is ever an instance of these: the benchmark loads no quantized layer."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("bitsandbytes stand-in: quantized loading is not available in this benchmark")


nn = types.SimpleNamespace(
    Linear8bitLt=type("Linear8bitLt", (_Never,), {}),
    Linear4bit=type("Linear4bit", (_Never,), {}),
    Params4bit=type("Params4bit", (_Never,), {}),
    Int8Params=type("Int8Params", (_Never,), {}),
)


def __getattr__(name):
    raise AttributeError(f"bitsandbytes stand-in has no {name!r}: quantized loading is not available in this benchmark")
