"""The configuration reference (docs/configuration.md), generated from the config classes: every
field of both stages with its default in each preset and the comment beside it in the source,
so the page cannot drift from the code.

    python -m mixcl_ray.config.docs > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from mixcl_ray.config.base import _sections, to_dict
from mixcl_ray.config.stages import PRESETS


def field_comments(cls) -> dict[str, str]:
    """Field name -> the comment on its line and the comment lines right above it."""
    lines, _ = inspect.getsourcelines(cls)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    out = {}
    for node in tree.body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.lineno - 1
        text = []
        above = row - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            text.insert(0, lines[above].strip().lstrip("#").strip())
            above -= 1
        end = node.end_lineno - 1
        if "#" in lines[end]:
            text.append(lines[end].split("#", 1)[1].strip())
        out[node.target.id] = " ".join(text)
    return out


def _value(value) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _rows(cls, values: dict, prefix: str, presets: list[dict]) -> list[str]:
    rows = []
    sections = _sections(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in sections:
            rows += _rows(
                sections[f.name], values[f.name], f"{prefix}{f.name}.", [p[f.name] for p in presets]
            )
            continue
        defaults = " / ".join(f"`{_value(p[f.name])}`" for p in presets)
        what = comments.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {defaults} | {what} |")
    return rows


def markdown() -> str:
    names = list(PRESETS)
    parts = [
        "# Configuration",
        "",
        "Every setting of both training stages, with its default in each preset "
        f"({' / '.join(f'`{n}`' for n in names)}). A YAML file (`--config FILE.yaml`, or a "
        "space file's `pretrain:` and `finetune:` sections) overrides any of them by section, "
        "e.g. `optim: {epochs: 20, lr: 5.0e-4}`; an unknown key is an error that names it. "
        "This page is generated from the config classes "
        "(`python -m mixcl_ray.config.docs > docs/configuration.md`).",
    ]
    for stage in ("pretrain", "finetune"):
        configs = [to_dict(PRESETS[n][stage]) for n in names]
        cls = type(PRESETS[names[0]][stage])
        parts += [
            "",
            f"## {stage} (`{cls.__name__}`)",
            "",
            "| setting | default | what |",
            "|---|---|---|",
            *_rows(cls, configs[0], "", configs),
        ]
    from mixcl_ray.dimensions import markdown as dimensions

    parts += [
        "",
        "## Sweep dimensions",
        "",
        "A space file's `space:` searches these (Ray Tune); each is also the MLflow param of "
        "the same name on every trial.",
        "",
        dimensions(),
    ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
