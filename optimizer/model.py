"""Load a chat model once (hub id, local folder or .gguf file) and find the modules we ablate."""

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
    device: torch.device
    dtype: torch.dtype
    layers: list[nn.Module]
    discovery: Discovery  # per component and layer: where the block writes to the residual stream
    checkpoint_dtype: torch.dtype | None = None  # what the weights are stored in (export keeps it)
    quantization: str | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

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
) -> LoadedModel:
    """Load the model and tokenizer; None loads the bundled default model (fetched on first use).

    If the dtype yields NaN/inf logits on a test prompt, the model is loaded again in the next
    wider dtype (float16 -> bfloat16 -> float32), and `console` is told.
    """
    from transformers import AutoConfig, AutoTokenizer

    if spec is None:
        from optimizer.fetch import ensure_model_folder

        spec = str(ensure_model_folder())
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(dtype, torch_device)
    location, kwargs, model_kwargs = locate(spec, trust_remote_code)
    if quantization == "4bit":
        # quantized weights are placed on the device while loading, not moved afterwards
        model_kwargs.update(quantization_config=four_bit_config(torch_device, torch_dtype), device_map={"": torch_device})
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        stored_dtype = getattr(AutoConfig.from_pretrained(location, **kwargs), "dtype", None)
        model = _from_pretrained(location, torch_dtype, torch_device, kwargs, model_kwargs)
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
        model = _from_pretrained(location, torch_dtype, torch_device, kwargs, model_kwargs)
    layers = find_layers(model)
    hidden = int(model.config.get_text_config().hidden_size)
    discovery = discover(model, layers, hidden, allow_missing_components)
    checkpoint_dtype = stored_dtype if isinstance(stored_dtype, torch.dtype) else None
    return LoadedModel(model, tokenizer, spec, torch_device, torch_dtype, layers, discovery, checkpoint_dtype, quantization)


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
