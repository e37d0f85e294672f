"""Load a chat model once (hub id, local folder or .gguf file) and find the modules we ablate.

A model too large for one GPU is spread over every visible GPU when `--device auto` finds
several: accelerate's device map puts whole decoder blocks on each (balanced), and its hooks move
the hidden states from one GPU to the next. `LoadedModel.device` is then the embeddings' device,
where inputs go and results are gathered; each block's tensors stay where the block is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from optimizer.components import Discovery, discover
from optimizer.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for trials: the torch module, its tokenizer, and where its blocks are."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user gave (or the default model's folder)
    device: torch.device  # where inputs go and results are gathered: the embeddings' device
    dtype: torch.dtype
    layers: list[nn.Module]
    discovery: Discovery  # per component and layer: where the block writes to the residual stream
    checkpoint_dtype: torch.dtype | None = None  # what the weights are stored in (export keeps it)
    quantization: str | None = None
    # accelerate's placement (module name -> device) where a device map spreads the blocks, run
    # through its hooks; None: the whole model is on `device`
    device_map: dict[str, str | int] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def split(self) -> bool:
        """Blocks placed by a device map (over several GPUs; in tests, groups of blocks on the CPU)."""
        return self.device_map is not None

    def devices(self) -> list[torch.device]:
        """Every device that holds some of the weights, in the order of the model's parameters."""
        return list(dict.fromkeys(p.device for p in self.model.parameters()))

    def placement(self) -> str:
        """Where the blocks are, e.g. "blocks 0-39 on cuda:0, 40-79 on cuda:1"."""
        groups: list[tuple[torch.device, list[int]]] = []
        for index, layer in enumerate(self.layers):
            where = next(layer.parameters()).device
            if groups and groups[-1][0] == where:
                groups[-1][1].append(index)
            else:
                groups.append((where, [index]))
        spans = [f"{b[0]}-{b[-1]}" if len(b) > 1 else f"{b[0]}" for _, b in groups]
        return "blocks " + ", ".join(f"{span} on {where}" for span, (where, _) in zip(spans, groups))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)


def choose_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown --device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} asked for, but no CUDA device is available; use --device cpu")
    return device


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        # bfloat16 is ~10x slower than float32 on CPUs without native support
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


# When a dtype gives NaN/inf logits on a test prompt, try these next (float32 always works).
DTYPE_FALLBACKS = {torch.float16: [torch.bfloat16, torch.float32], torch.bfloat16: [torch.float32], torch.float32: []}


def locate(spec: str, trust_remote_code: bool = False) -> tuple[str, dict, dict]:
    """Where transformers should load from: (location, tokenizer/config kwargs, model kwargs).
    `trust_remote_code` lets transformers run an architecture that ships as code with the model."""
    path = Path(spec).expanduser()
    code = {"trust_remote_code": trust_remote_code}
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file {spec} does not exist; check the --model path")
        from transformers import GgufConfig

        return str(path.parent), {"gguf_file": path.name, **code}, {"quantization_config": GgufConfig(dequantize=True)}
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(
                f"{spec} is not a Hugging Face model folder (no config.json); pass a model folder, a .gguf file or a hub id"
            )
        return str(path), code, {}
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path {spec} does not exist; check the --model path")
    return spec, code, {}


def four_bit_config(device: torch.device, compute_dtype: torch.dtype):
    """bitsandbytes NF4 settings; bitsandbytes needs a CUDA device."""
    if device.type != "cuda":
        raise UserError(
            f"--quantization 4bit needs a CUDA GPU (bitsandbytes), but the device is {device}; "
            "drop --quantization to load the full model"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--quantization 4bit needs bitsandbytes; install it with `pip install bitsandbytes`") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


# a model whose weights take at most this share of the first GPU's free memory is loaded there
# alone, even where several GPUs are visible: one device keeps the CUDA-graph decoder
ONE_GPU_SHARE = 0.8
# the most of each GPU's free memory that a device map fills with weights (a balanced map, where the
# GPUs have room, fills less): the rest holds activations and the KV cache
SPREAD_SHARE = 0.95


def empty_model(location: str, kwargs: dict) -> PreTrainedModel:
    """The model's modules on the meta device, no weights read: names and sizes for a device map."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(location, **kwargs)
    code = {"trust_remote_code": kwargs.get("trust_remote_code", False)}
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, **code)
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise
            model = AutoModelForImageTextToText.from_config(config, **code)
    model.tie_weights()  # tied tensors count once and stay together
    return model


def gpu_device_map(model: nn.Module, dtype: torch.dtype, free: list[int]) -> dict[str, str | int] | None:
    """Where the weights of `model` (on the meta device) go on GPUs with `free` bytes each: None where
    they fit on the first one (ONE_GPU_SHARE), else accelerate's device map over all of them,
    balanced, with every decoder block whole on one GPU."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory

    size = compute_module_sizes(model, dtype=dtype)[""]
    if size <= ONE_GPU_SHARE * free[0]:
        return None
    whole = sorted({type(find_layers(model)[0]).__name__, *(getattr(model, "_no_split_modules", None) or ())})
    budget: dict[int | str, int] = {i: int(SPREAD_SHARE * f) for i, f in enumerate(free)}
    balanced = get_balanced_memory(model, max_memory=budget, no_split_module_classes=whole, dtype=dtype)
    for limits in (balanced, budget):  # balancing leaves some room unused; filling the GPUs in order, none
        placement = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=whole, dtype=dtype)
        if all(isinstance(where, int) for where in placement.values()):  # nothing left to the CPU or disk
            return dict(placement)
    raise UserError(
        f"the model needs {size / 2**30:.1f} GiB in {_name(dtype)}, more than the {len(free)} GPUs have free "
        f"({sum(free) / 2**30:.1f} GiB, of which {SPREAD_SHARE:.0%} is used for weights); "
        "load it in 4 bits (--quantization 4bit) or on more GPUs"
    )


def _dispatch(model: PreTrainedModel, device_map: dict[str, str | int]) -> None:
    """accelerate's hooks, which move each block's inputs to its device. transformers adds them when
    a map names two or more devices; a map onto one device (the tests' groups of blocks on the CPU)
    gets the same hooks here."""
    if getattr(model, "_hf_hook", None) is not None:
        return
    from accelerate import dispatch_model

    dispatch_model(model, device_map, skip_keys=model._skip_keys_device_placement, force_hooks=True)


def _from_pretrained(
    location: str, dtype: torch.dtype, device: torch.device, kwargs: dict, model_kwargs: dict
) -> PreTrainedModel:
    """The model with its LM head; checkpoints with a vision tower load through the image-text class,
    whose text decoder is what we ablate."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs, **model_kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        model = AutoModelForImageTextToText.from_pretrained(location, dtype=dtype, **kwargs, **model_kwargs)
    if "device_map" not in model_kwargs:
        nn.Module.to(model, device)  # (transformers' decorated `to` is typed for dtypes only)
    return model.eval().requires_grad_(False)


def _test_prompt(model: nn.Module, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello! How are you?"}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)


@torch.inference_mode()
def logits_are_finite(model: nn.Module, tokenizer) -> bool:
    """One forward pass of a short chat prompt: the cheapest test that a dtype does not overflow."""
    return bool(torch.isfinite(model(input_ids=_test_prompt(model, tokenizer), logits_to_keep=1).logits).all())


@torch.inference_mode()
def first_nonfinite_layer(model: nn.Module, tokenizer) -> int | None:
    """The first decoder block whose output holds NaN/inf on the test prompt (None: the embeddings)."""
    hidden = model(input_ids=_test_prompt(model, tokenizer), output_hidden_states=True, logits_to_keep=1).hidden_states
    bad = [i for i, h in enumerate(hidden) if not torch.isfinite(h).all()]
    return bad[0] - 1 if bad and bad[0] > 0 else None


def load_model(
    spec: str | None,
    device: str = "auto",
    dtype: str = "auto",
    chat_template: str | None = None,
    allow_missing_components: bool = False,
    quantization: str | None = None,
    console=None,
    trust_remote_code: bool = False,
    device_map: dict[str, str | int] | None = None,
) -> LoadedModel:
    """Load the model and tokenizer; None loads the bundled default model (fetched on first use).

    If the dtype yields NaN/inf logits on a test prompt, the model is loaded again in the next
    wider dtype (float16 -> bfloat16 -> float32), and `console` is told.

    With `device` auto and several GPUs, a model that does not fit on the first one is spread over
    all of them (`gpu_device_map`). `device_map` (module name -> device) places the model so
    instead, through the same accelerate hooks: tests split a CPU model's blocks into groups with it.
    """
    from transformers import AutoConfig, AutoTokenizer

    if spec is None:
        from optimizer.fetch import ensure_model_folder

        spec = str(ensure_model_folder())
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(dtype, torch_device)
    if console is not None:  # a line, not only a spinner: logs show where start-up time goes (a large model loads for minutes)
        console.print(
            f"Loading model {spec} on {torch_device} {str(torch_dtype).removeprefix('torch.')}",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    location, kwargs, model_kwargs = locate(spec, trust_remote_code)
    if quantization == "4bit":
        if device_map is not None:
            raise ValueError("a 4-bit model is loaded on one device")
        # quantized weights are placed on the device while loading, not moved afterwards
        model_kwargs.update(quantization_config=four_bit_config(torch_device, torch_dtype), device_map={"": torch_device})
    spread = device == "auto" and device_map is None and quantization is None and torch.cuda.device_count() > 1

    def load(dtype: torch.dtype) -> tuple[PreTrainedModel, dict[str, str | int] | None]:
        """The model in `dtype`, and its device map where one places it."""
        placement = device_map
        if spread:
            free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
            placement = gpu_device_map(empty_model(location, kwargs), dtype, free)
            if placement is None and console is not None:
                console.print(f"The model fits on one of the {len(free)} GPUs: loading it on cuda:0 alone")
        extra = model_kwargs if placement is None else {**model_kwargs, "device_map": placement}
        model = _from_pretrained(location, dtype, torch_device, kwargs, extra)
        if placement is not None:
            _dispatch(model, placement)
        return model, placement

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        stored_dtype = getattr(AutoConfig.from_pretrained(location, **kwargs), "dtype", None)
        model, placement = load(torch_dtype)
    except ValueError as e:  # transformers' word for an architecture or GGUF layout it cannot load
        if "trust_remote_code" in str(e):
            raise UserError(
                f"model {spec!r} ships its architecture as code, which runs only with --trust-remote-code; "
                "pass it if you trust the model's source (the code runs on this machine)"
            ) from None
        raise UserError(
            f"cannot load model {spec!r}: {str(e).splitlines()[0]}; use a supported architecture or convert it to a HF folder"
        ) from None
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "the hub is offline (HF_HUB_OFFLINE=1): download it first or pass a local folder"
            if offline
            else "check the hub id, your network and HF_TOKEN"
        )
        raise UserError(f"could not load model {spec!r}: {str(e).splitlines()[0]}; {hint}") from None
    if chat_template:
        try:
            tokenizer.chat_template = Path(chat_template).read_text()
        except OSError as e:
            raise UserError(f"cannot read --chat-template {chat_template}: {e.strerror}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"model {spec} has no chat template; pass one with --chat-template FILE (a Jinja template)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # so the last position of every row is the next-token position
    fallbacks = list(DTYPE_FALLBACKS.get(torch_dtype, []))
    while not logits_are_finite(model, tokenizer):
        if not fallbacks:
            layer = first_nonfinite_layer(model, tokenizer)
            where = "in the embeddings" if layer is None else f"at layer {layer}"
            raise UserError(
                f"model {spec} gives NaN or inf {where} on a test prompt, even in {_name(torch_dtype)}; "
                "the checkpoint looks damaged: check the model file"
            )
        previous, torch_dtype = torch_dtype, fallbacks.pop(0)
        if console is not None:
            console.print(
                f"[yellow]{_name(previous)} gives NaN/inf logits on a test prompt; "
                f"loading the model again in {_name(torch_dtype)}[/]"
            )
        del model
        model, placement = load(torch_dtype)
    layers = find_layers(model)
    hidden = int(model.config.get_text_config().hidden_size)
    discovery = discover(model, layers, hidden, allow_missing_components)
    checkpoint_dtype = stored_dtype if isinstance(stored_dtype, torch.dtype) else None
    input_device = torch_device if placement is None else next(model.get_input_embeddings().parameters()).device
    loaded = LoadedModel(
        model, tokenizer, spec, input_device, torch_dtype, layers, discovery, checkpoint_dtype, quantization, placement
    )
    if spread and placement is not None and console is not None:
        console.print(f"The model is spread over {len(loaded.devices())} GPUs by accelerate's device map: {loaded.placement()}")
    return loaded


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def find_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: the text decoder's `layers` (or `h`, `blocks`), else the longest
    ModuleList that is not nested in another one (expert lists of MoE blocks are)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return list(blocks)
    nested = {
        id(inner)
        for outer in model.modules()
        if isinstance(outer, nn.ModuleList)
        for inner in outer.modules()
        if inner is not outer
    }
    lists: list[nn.ModuleList] = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and id(m) not in nested and len(m) > 0
    ]
    if not lists:
        raise UserError(f"could not find decoder blocks in {type(model).__name__}; this architecture is not supported")
    return list(max(lists, key=lambda blocks: sum(1 for _ in blocks)))


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
