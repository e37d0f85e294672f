"""Load a chat model once (hub id, local folder or .gguf file) and find the modules we ablate."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from optimizer.errors import UserError

# Per decoder block, the modules whose outputs are added to the residual stream.
ATTENTION_OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")
MLP_OUTPUT_NAMES = ("down_proj", "c_proj", "w2", "fc2", "dense_4h_to_h")
COMPONENTS = ("attn", "mlp")


@dataclass
class LoadedModel:
    """A model ready for trials: the torch module, its tokenizer, and where its blocks are."""

    model: nn.Module
    tokenizer: object
    source: str  # what the user gave (or the default model's folder)
    device: torch.device
    dtype: torch.dtype
    layers: list[nn.Module]
    components: dict[str, list[nn.Module]]  # component -> one output module per layer
    checkpoint_dtype: torch.dtype | None = None  # what the weights are stored in (export keeps it)

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


def load_model(spec: str | None, device: str = "auto", dtype: str = "auto", chat_template: str | None = None) -> LoadedModel:
    """Load the model and tokenizer; None loads the bundled default model (fetched on first use)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if spec is None:
        from optimizer.fetch import ensure_model_folder

        spec = str(ensure_model_folder())
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(dtype, torch_device)
    kwargs: dict = {}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file {spec} does not exist; check the --model path")
        from transformers import GgufConfig

        location, kwargs = str(path.parent), {"gguf_file": path.name}
        model_kwargs = {"quantization_config": GgufConfig(dequantize=True)}
    elif path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{spec} is not a Hugging Face model folder (no config.json); pass a model folder, a .gguf file or a hub id")
        location, model_kwargs = str(path), {}
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path {spec} does not exist; check the --model path")
    else:
        location, model_kwargs = spec, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        stored_dtype = getattr(AutoConfig.from_pretrained(location, **kwargs), "dtype", None)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs, **model_kwargs)
    except ValueError as e:  # transformers' word for an architecture or GGUF layout it cannot load
        raise UserError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}; use a supported architecture or convert it to a HF folder") from None
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = "the hub is offline (HF_HUB_OFFLINE=1): download it first or pass a local folder" if offline else "check the hub id, your network and HF_TOKEN"
        raise UserError(f"could not load model {spec!r}: {str(e).splitlines()[0]}; {hint}") from None
    model.to(torch_device).eval()
    model.requires_grad_(False)
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
    layers = find_layers(model)
    components = {c: [find_component(layer, c, i) for i, layer in enumerate(layers)] for c in COMPONENTS}
    checkpoint_dtype = stored_dtype if isinstance(stored_dtype, torch.dtype) else None
    return LoadedModel(model, tokenizer, spec, torch_device, torch_dtype, layers, components, checkpoint_dtype)


def find_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: the longest ModuleList in the model."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None or len(best) == 0:
        raise UserError(f"could not find decoder blocks in {type(model).__name__}; this architecture is not supported")
    return list(best)


def find_component(layer: nn.Module, component: str, index: int) -> nn.Module:
    """The module whose output is the block's attention (or MLP) contribution to the residual."""
    parent_names = ("self_attn", "attn", "attention") if component == "attn" else ("mlp", "feed_forward", "ffn")
    leaf_names = ATTENTION_OUTPUT_NAMES if component == "attn" else MLP_OUTPUT_NAMES
    for parent_name in parent_names:
        parent = getattr(layer, parent_name, None)
        if parent is None:
            continue
        for leaf in leaf_names:
            module = getattr(parent, leaf, None)
            if isinstance(module, nn.Module):
                return module
    raise UserError(
        f"could not find the {component} output projection in block {index} ({type(layer).__name__}); "
        "this architecture is not supported yet"
    )


def model_fingerprint(loaded: LoadedModel) -> str:
    """A hash of what makes the model this model: config, chat template and a sample of every weight.

    Weight samples are rounded to bfloat16 so that the same checkpoint loaded in float32 on a CPU
    and in bfloat16 on a GPU has the same identity.
    """
    digest = hashlib.sha256()
    config = loaded.model.config.to_dict()
    for volatile in ("_name_or_path", "dtype", "torch_dtype", "transformers_version", "quantization_config"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(str(loaded.tokenizer.chat_template).encode())
    for name, param in loaded.model.state_dict().items():
        sample = param.detach().flatten()[:16].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
