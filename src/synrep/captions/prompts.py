"""SynCLR-style in-context prompts: an instruction, k examples, then the input to caption."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..config import read_yaml
from ..errors import SynrepError
from .requests import TEMPLATES, CaptionRequest

INSTRUCTION = "Write one short, natural sentence describing a photo of the given subject."
MIN_POOL = {"c": 40, "c+bg": 30, "c+rel": 15}


class ExamplesError(SynrepError, ValueError):
    """An examples file (``examples_file``) is missing or does not hold a list of examples per template."""


def load_example_pools(path: str | Path | None = None) -> dict[str, list[str]]:
    """Example pools per template (shipped ``data/prompts/examples.yaml`` unless ``path`` is given)."""
    source = Path(path) if path else Path(str(resources.files("synrep") / "data" / "prompts" / "examples.yaml"))
    data = read_yaml(source, "examples file", ExamplesError)
    if not isinstance(data, dict):
        raise ExamplesError(f"examples file {source} must map each template (c, c+bg, c+rel) to a list of examples")
    pools = {}
    for template in TEMPLATES:
        items = data.get(template)
        if not isinstance(items, list) or not items or not all(isinstance(x, str) and "=>" in x for x in items):
            raise ExamplesError(f"{source}: '{template}' must be a list of 'input => caption' strings")
        pools[template] = items
    return pools


def prompt_input(request: CaptionRequest) -> str:
    """The left-hand side of the prompt's last line: ``concept``, ``concept, background`` or ``concept, relation``."""
    name = request.concept.name
    if request.template == "c+bg":
        return f"{name}, {request.background}"
    if request.template == "c+rel":
        return f"{name}, {request.relation}"
    return name


def build_prompt(request: CaptionRequest) -> str:
    """Completion-style prompt; the model continues after the final ``=>``."""
    lines = [INSTRUCTION, ""] + list(request.examples) + [f"{prompt_input(request)} =>"]
    return "\n".join(lines)


def build_chat(request: CaptionRequest) -> list[dict]:
    """The same prompt as chat messages for instruction-tuned models with a chat template."""
    examples = "\n".join(request.examples)
    user = f"{INSTRUCTION}\nExamples:\n{examples}\n\nNow write the caption for: {prompt_input(request)}\nAnswer with the caption only."
    return [{"role": "user", "content": user}]
