"""SynCLR-style in-context prompts: an instruction, k examples, then the input to caption."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..config import read_yaml
from ..errors import SynrepError
from .requests import TEMPLATES, CaptionRequest

# One instruction per template, as SynCLR's synthesis script has (our wording).
INSTRUCTIONS = {
    "c": "Write a one-sentence image description that shows the given object category.",
    "c+bg": "Write a one-sentence image description that shows the given object category in the given environment.",
    "c+rel": "Write a one-sentence image description that shows the given object category in the given spatial relation.",
    "bg": "Write a one-sentence image description of the given environment category.",
}
MIN_POOL = {"c": 50, "c+bg": 45, "c+rel": 20, "bg": 30}  # at least SynCLR's pool sizes (52, 50, 20, 33)


class ExamplesError(SynrepError, ValueError):
    """An examples file (``examples_file``) is missing or does not hold a list of examples per template."""


def load_example_pools(path: str | Path | None = None) -> dict[str, list[str]]:
    """Example pools per template (shipped ``data/prompts/examples.yaml`` unless ``path`` is given)."""
    source = Path(path) if path else Path(str(resources.files("synrep") / "data" / "prompts" / "examples.yaml"))
    data = read_yaml(source, "examples file", ExamplesError)
    if not isinstance(data, dict):
        raise ExamplesError(f"examples file {source} must map each template ({', '.join(TEMPLATES)}) to a list of examples")
    pools = {}
    for template in TEMPLATES:
        items = data.get(template)
        if not isinstance(items, list) or not items or not all(isinstance(x, str) and "=>" in x for x in items):
            raise ExamplesError(f"{source}: '{template}' must be a list of 'input => caption' strings")
        pools[template] = items
    return pools


def prompt_input(request: CaptionRequest) -> str:
    """The left-hand side of the prompt's last line: ``concept``, ``concept, background``, ``concept, relation``
    or ``background``."""
    name = request.concept.name
    if request.template == "bg":
        return str(request.background)
    if request.template == "c+bg":
        return f"{name}, {request.background}"
    if request.template == "c+rel":
        return f"{name}, {request.relation}"
    return name


def build_prompt(request: CaptionRequest) -> str:
    """Completion-style prompt; the model continues after the final ``=>``."""
    lines = [INSTRUCTIONS[request.template], ""] + list(request.examples) + [f"{prompt_input(request)} =>"]
    return "\n".join(lines)


def build_chat(request: CaptionRequest) -> list[dict]:
    """The same prompt as chat messages for instruction-tuned models with a chat template."""
    examples = "\n".join(request.examples)
    user = f"{INSTRUCTIONS[request.template]}\nExamples:\n{examples}\n\nNow write the caption for: {prompt_input(request)}\nAnswer with the caption only."
    return [{"role": "user", "content": user}]
