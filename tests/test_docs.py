"""The key reference in docs/hierarchy-file.md is generated from the schema and must match."""

from pathlib import Path

from mlsgd_dsl.docgen import (
    BEGIN,
    END,
    KIND_KEYS,
    OPTIONS_BEGIN,
    OPTIONS_END,
    embed,
    reference_markdown,
)

PAGE = Path(__file__).resolve().parents[1] / "docs" / "hierarchy-file.md"


def test_reference_page_matches_schema() -> None:
    page = PAGE.read_text()
    assert page == embed(page), (
        "docs/hierarchy-file.md is out of date: regenerate it with\n"
        "python -c \"from mlsgd_dsl.docgen import embed; p='docs/hierarchy-file.md'; "
        "s=open(p).read(); open(p,'w').write(embed(s))\"")


def test_every_schema_key_is_documented() -> None:
    from mlsgd_dsl.schema import Hierarchy, MLSGDSpec

    text = PAGE.read_text().split(BEGIN)[1].split(END)[0]
    for model in (Hierarchy, MLSGDSpec):
        for key in model.model_fields:
            assert f"| `{key}` |" in text, key
    assert reference_markdown() in text


def test_every_builtin_option_is_documented() -> None:
    from mlsgd_dsl.registry import build_registry

    text = PAGE.read_text().split(OPTIONS_BEGIN)[1].split(OPTIONS_END)[0]
    reg = build_registry(autoload=False)
    for kind in KIND_KEYS:
        for name in reg.names(kind):
            assert f"#### `{name}`" in text, (kind, name)
            for key in reg.items[kind][name].record.options.model_fields:
                assert f"| `{key}` |" in text, (name, key)
