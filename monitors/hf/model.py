"""Loading a Hugging Face causal LM and identifying it, shared by the engine and vector extraction."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from limbic.monitors.layers import hidden_size, num_hidden_layers
from limbic.monitors.model_source import ModelSource
from limbic.vectors.storage import ModelIdentity
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# Enough of the embedding matrix to tell two checkpoints apart, small enough to hash in milliseconds.
_FINGERPRINT_ROWS = 512


@dataclass
class LoadedModel:
    source: ModelSource
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: ModelIdentity

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def fingerprint(model: PreTrainedModel) -> str:
    """A hash of the architecture and a slice of the embeddings, stable across dtypes the weights load in.

    Rounding to bfloat16 first makes a float32 load of bf16 weights, and the GGUF they came from, agree.
    """
    return _fingerprint(type(model).__name__, model.config, model.get_input_embeddings().weight.detach())


def _fingerprint(architecture: str, config: PretrainedConfig, embeddings: torch.Tensor) -> str:
    digest = hashlib.sha256()
    shape = {"arch": architecture, "hidden": hidden_size(config), "layers": num_hidden_layers(config)}
    digest.update(json.dumps(shape, sort_keys=True).encode())
    rows = embeddings[:_FINGERPRINT_ROWS]
    digest.update(rows.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def folder_identity(source: ModelSource) -> ModelIdentity:
    """The identity ``load`` would report, read from the folder without loading the weights.

    For engines that load the model themselves (vLLM): the architecture comes from a model built on the
    meta device, the embedding rows straight from the safetensors files.
    """
    config = AutoConfig.from_pretrained(source.path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    embedding = skeleton.get_input_embeddings().weight
    name = next(n for n, p in skeleton.named_parameters() if p is embedding)
    rows = None
    for file in sorted(source.path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            if name in tensors.keys():  # noqa: SIM118 (safe_open has no __contains__)
                rows = tensors.get_slice(name)[:_FINGERPRINT_ROWS]
                break
    if rows is None:
        raise FileNotFoundError(f"no tensor {name} in {source.path}/*.safetensors")
    architecture = type(skeleton).__name__
    return ModelIdentity(
        name=source.name,
        architecture=architecture,
        hidden_size=hidden_size(config),
        num_layers=num_hidden_layers(config),
        fingerprint=_fingerprint(architecture, config, rows),
    )


def load(source: ModelSource, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    identity = ModelIdentity(
        name=source.name,
        architecture=type(model).__name__,
        hidden_size=hidden_size(model.config),
        num_layers=num_hidden_layers(model.config),
        fingerprint=fingerprint(model),
    )
    return LoadedModel(source, model, tokenizer, identity)


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    config = getattr(model.config, "text_config", None) or model.config
    limits = [getattr(config, a, None) for a in ("max_position_embeddings", "n_positions")]
    limits.append(tokenizer.model_max_length if tokenizer.model_max_length < 10**9 else None)
    return min(x for x in limits if isinstance(x, int)) if any(isinstance(x, int) for x in limits) else 2048


def eos_token_ids(generation_config: GenerationConfig | None, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The token ids that end a generation: the generation config's (one or a list) and the tokenizer's."""
    ids: set[int] = set()
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Token ids of ``messages`` through the model's chat template, or ``chat_template`` when given
    (tokenizers return a list or an encoding)."""
    encoded = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        tools=tools,
        chat_template=chat_template,
    )
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def chat_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``messages`` through the chat template, and each message's content span [start, end).

    Spans come from rendering growing prefixes of the conversation (templates render a conversation as the
    concatenation of its turns); the role header and end-of-turn tokens around a message's content are
    found by rendering the same turn with empty content, and left out. Raises ValueError for a template
    whose rendering of a prefix is not a prefix of the whole.
    """
    ids = chat_ids(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    before: list[int] = []
    for k, message in enumerate(messages):
        upto = chat_ids(tokenizer, messages[: k + 1])
        if upto != ids[: len(upto)] or before != upto[: len(before)]:
            raise ValueError("the chat template does not render a conversation turn by turn; spans are unknown")
        empty = chat_ids(tokenizer, [*messages[:k], {**message, "content": ""}])[len(before) :]
        turn = upto[len(before) :]
        head = _common_prefix(turn, empty)
        tail = _common_prefix(turn[head:][::-1], empty[head:][::-1])
        spans.append((len(before) + head, len(upto) - tail))
        before = upto
    return ids, spans
