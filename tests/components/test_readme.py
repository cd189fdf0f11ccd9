"""README's configuration reference stays equal to Pulumi.yaml's config schema.

The table between ``<!-- config-reference:start -->`` and
``<!-- config-reference:end -->`` must list every key of Pulumi.yaml, in
its order, with its type, default and description, and nothing else. Keys
without a declared type (objects and lists of objects, which Pulumi.yaml
cannot type) show "object" or "list". Regenerate the table with::

    .venv/bin/python -m tests.components.test_readme
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.components.harness import REPO, project_schema

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
HEADER = "| Key | Type | Default | Description |\n| --- | --- | --- | --- |"


def shown_default(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, str)):
        text = str(value) if value != "" else '""'
    else:
        text = json.dumps(value, separators=(",", ":"))
    return f"`{text}`"


def expected_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for key, decl in project_schema().items():
        default = decl["default"]
        kind = decl.get("type") or ("list" if isinstance(default, list) else "object")
        rows.append((f"`sealnet:{key}`", kind, shown_default(default), " ".join(decl["description"].split())))
    return rows


def reference_table() -> str:
    """The table text to paste between the markers."""
    return "\n".join([START, HEADER, *("| " + " | ".join(row) + " |" for row in expected_rows()), END])


def readme_rows(text: str) -> list[tuple[str, ...]]:
    match = re.search(re.escape(START) + r"(.*?)" + re.escape(END), text, re.S)
    assert match, f"README.md has no {START} ... {END} section (merge docs fragment pulumi.md)"
    lines = [line.strip() for line in match.group(1).splitlines() if line.strip().startswith("|")]
    body = [line for line in lines if not re.fullmatch(r"\|[\s|:-]+\|", line)]
    assert body and [c.strip() for c in body[0].strip("|").split("|")] == ["Key", "Type", "Default", "Description"]
    return [tuple(c.strip() for c in line.strip("|").split("|")) for line in body[1:]]


def test_readme_configuration_reference_matches_pulumi_yaml() -> None:
    assert readme_rows((REPO / "README.md").read_text()) == expected_rows()


def test_generated_table_round_trips() -> None:
    assert readme_rows(reference_table()) == expected_rows()
    assert len(expected_rows()) == len(project_schema())


if __name__ == "__main__":
    print(reference_table())
