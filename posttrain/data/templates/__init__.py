"""Chat templates shipped with posttrain, by name, for ``data.chat_template: <name>``: tool-calling templates in
three common styles, for base models whose own template cannot render tools (SmolLM2's ChatML one among them).

Each keeps the prefix property the loss mask relies on (rendering ``messages[:k]`` is a prefix of rendering
``messages[:k+1]``) and supports ``add_generation_prompt``; ``posttrain.data.toolcalls`` parses what a model
trained on one writes back into tool calls.

Layer 1 (part of posttrain.data). May import: posttrain.errors.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from posttrain.errors import ConfigError, TemplateError

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


def resolve_template(template: str | None) -> str | None:
    """A ``data.chat_template`` setting as template text: a shipped one by name, the text of a ``.jinja`` file, or
    an inline template as given. The recipes and every reader of a finished run's config resolve it here, so a
    scorer renders with the template its run trained with."""
    if template in TEMPLATES:
        return template_text(template)
    if template and template.endswith(".jinja") and Path(template).is_file():
        return Path(template).read_text()
    if template and template.endswith(".jinja"):
        raise ConfigError(f"data.chat_template: no file {template!r} (shipped templates by name: "
                          f"{', '.join(TEMPLATES)})")
    return template
