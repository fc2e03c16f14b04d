"""The published schema, docs/reference.md and docs/index.md must match what generates them."""

import json
from pathlib import Path

from proxy.config import schema_text
from proxy.docs import END, START, render_reference, site_index

ROOT = Path(__file__).resolve().parent.parent


def test_schema_file_is_current():
    stored = (ROOT / "policies" / "schema.json").read_text()
    assert stored == schema_text(), "policies/schema.json is stale: run `make schema`"


def test_policy_reference_is_current():
    page = (ROOT / "docs" / "reference.md").read_text()
    section = page.split(START, 1)[1].split(END, 1)[0]
    assert section == "\n" + render_reference(), "docs/reference.md is stale: run `make schema`"


def test_site_index_is_the_readme():
    index = (ROOT / "docs" / "index.md").read_text()
    assert index == site_index((ROOT / "README.md").read_text()), "docs/index.md is stale: run `make schema`"


def test_reference_documents_every_field():
    schema = json.loads(schema_text())
    reference = render_reference(schema)
    for name, definition in schema["$defs"].items():
        for key, prop in definition.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{key} has no description"
            assert f"| `{key}` |" in reference, f"{name}.{key} missing from the reference"
