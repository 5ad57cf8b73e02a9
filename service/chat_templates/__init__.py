"""Rendering chat requests to prompt token ids, tools included.

The model's own chat template renders every request it can. Tools need a template that knows them: a
model whose template has no tool support (SmolLM2's) gets one limbic ships for its template family, and
the response says which template rendered the prompt (``limbic.chat_template``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from limbic.monitors.hf import model as hf_model

BUNDLED = {"chatml": "chatml_tools.jinja"}  # template family -> tool-capable template shipped here


class TemplateError(ValueError):
    """The request needs something no available template can render."""


@dataclass(frozen=True)
class ChatRenderer:
    tokenizer: Any
    tool_template: str | None  # None: the model's own handles tools (or nothing can)
    tool_template_name: str  # "model" or "limbic:<file>"
    tool_call_parser: str | None  # vLLM's parser for the tool-call format of the template that renders tools
    override: bool = False  # the operator's --chat-template: it renders every request

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Any, tool_call_parser: str | None = None, template_file: Path | None = None
    ) -> ChatRenderer:
        if template_file is not None:
            return cls(tokenizer, template_file.read_text(), f"file:{template_file.name}", tool_call_parser, True)
        own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        if "tools" in own:
            return cls(tokenizer, None, "model", tool_call_parser)
        if "<|im_start|>" in own:
            text = resources.files(__package__).joinpath(BUNDLED["chatml"]).read_text()
            return cls(tokenizer, text, f"limbic:{BUNDLED['chatml']}", tool_call_parser or "hermes")
        return cls(tokenizer, None, "none", tool_call_parser)

    @property
    def supports_tools(self) -> bool:
        return self.tool_template_name != "none"

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> tuple[list[int], str]:
        """Prompt ids for ``messages`` (and ``tools``, offered to the model), and the template's name."""
        uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if not uses_tools and not self.override:
            return hf_model.chat_ids(self.tokenizer, messages, add_generation_prompt=True), "model"
        if not self.supports_tools:
            raise TemplateError(
                "this model's chat template cannot render tools or tool messages; start limbic with "
                "--chat-template FILE (a tool-capable Jinja template) and --tool-call-parser NAME"
            )
        ids = hf_model.chat_ids(
            self.tokenizer, messages, add_generation_prompt=True, tools=tools, chat_template=self.tool_template
        )
        return ids, self.tool_template_name
