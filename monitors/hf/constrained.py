"""Constrained decoding for the transformers engine with xgrammar (the library vLLM's backend uses).

vLLM applies ``JsonConstraint`` itself (structured outputs, xgrammar by default); this module gives the
transformers engine the same behaviour: one compiler per tokenizer, a matcher per request that masks the
logits before each sample and advances with each sampled token.
"""

from __future__ import annotations

import functools
import json

import torch
from limbic.monitors.engine import JsonConstraint


class GrammarCompiler:
    """Compiles JSON constraints against one tokenizer; compiled grammars are cached by schema."""

    def __init__(self, tokenizer: object, vocab_size: int) -> None:
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgrammar.GrammarCompiler(info)
        self.vocab_size = vocab_size

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one compiler per engine, kept for the engine's life)
    def _compiled(self, schema_json: str) -> object:
        # Compact JSON (as vLLM with disable_any_whitespace): a small model cannot wander off into whitespace.
        return self._compiler.compile_json_schema(schema_json, any_whitespace=False, separators=(",", ":"))

    def matcher(self, constraint: JsonConstraint) -> Matcher:
        return Matcher(self._xgr, self._compiled(json.dumps(constraint.schema, sort_keys=True)), self.vocab_size)


class Matcher:
    """One request's grammar state; after the grammar accepts its end, it no longer constrains."""

    def __init__(self, xgr: object, compiled: object, vocab_size: int) -> None:
        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Sets the logits of tokens the grammar forbids next to -inf (in place, 1-D logits)."""
        if self._matcher.is_terminated():
            return
        self._matcher.fill_next_token_bitmask(self._bitmask)
        self._xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), self._bitmask.to(logits.device))

    def accept(self, token_id: int) -> None:
        if not self._matcher.is_terminated() and not self._matcher.accept_token(token_id):
            raise RuntimeError(f"the grammar rejected token {token_id} it had allowed")


def check_json_schema(schema: dict) -> None:
    """Raises ValueError when ``schema`` cannot be enforced (a client's 400, not a 500 later): xgrammar cannot
    compile it, or it uses keywords xgrammar would silently not enforce (vLLM's own list, where installed)."""
    import xgrammar

    try:
        xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception as exc:  # xgrammar raises RuntimeError/InvalidJSONError variants
        raise ValueError(f"not a JSON schema limbic can enforce: {exc}") from exc
    try:
        from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features
    except ImportError:
        return
    if has_xgrammar_unsupported_json_features(schema):
        raise ValueError(
            "the schema uses keywords constrained decoding cannot enforce (uniqueItems, contains, multipleOf, "
            "unknown string formats, or a pattern with length bounds)"
        )
