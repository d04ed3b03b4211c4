"""Chat templates shipped with posttrain, by name, for ``data.chat_template: <name>``: tool-calling templates in
three common styles, for base models whose own template cannot render tools (SmolLM2's ChatML one among them).

Each keeps the prefix property the loss mask relies on (rendering ``messages[:k]`` is a prefix of rendering
``messages[:k+1]``) and supports ``add_generation_prompt``; ``posttrain.data.toolcalls`` parses what a model
trained on one writes back into tool calls.

Layer 1 (part of posttrain.data). May import: posttrain.errors.
"""

from __future__ import annotations

from importlib import resources

from posttrain.errors import TemplateError

# name -> file in this package; the style is how posttrain.data.toolcalls parses the calls.
TEMPLATES = {
    "hermes-tools": "hermes-tools.jinja",  # ChatML tokens, <tool_call> JSON (Qwen2.5's style)
    "llama31-tools": "llama31-tools.jinja",  # Llama 3.1 headers, JSON calls, ipython results
    "mistral-tools": "mistral-tools.jinja",  # [INST], [AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS]
}


def template_text(name: str) -> str:
    """The Jinja text of the shipped template ``name`` (a key of ``TEMPLATES``)."""
    if name not in TEMPLATES:
        raise TemplateError(f"no shipped chat template named {name!r}; shipped: {', '.join(TEMPLATES)}")
    return resources.files(__name__).joinpath(TEMPLATES[name]).read_text(encoding="utf-8")
