"""docs/configuration.md is the rendering of the configuration models, current and complete."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from serve_app import config, config_reference

ROOT = Path(__file__).resolve().parents[3]
PAGE = ROOT / "docs" / "configuration.md"
SECTIONS = config_reference.sections()


def configuration_models() -> set[type[BaseModel]]:
    """Every pydantic model serve_app/config.py defines, but their common base."""
    return {
        obj
        for obj in vars(config).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == config.__name__
        and obj is not config.StrictModel
    }


def test_the_page_is_current():
    assert PAGE.read_text() == config_reference.render(), (
        "docs/configuration.md is stale: python -m serve_app.config_reference > "
        "docs/configuration.md"
    )


def test_every_model_has_a_section():
    assert {model for _, model in SECTIONS} == configuration_models()


@pytest.mark.parametrize(("path", "model"), SECTIONS, ids=[path for path, _ in SECTIONS])
def test_every_field_of_every_model_has_a_row(path, model):
    page = config_reference.render()
    section = page.split(f"## `{path}`\n", 1)[1].split("\n## ", 1)[0]
    for name, field in model.model_fields.items():
        rows = [line for line in section.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1, f"{path}.{name}"
        if field.description:
            assert config_reference._cell(field.description) in rows[0]


def test_check_exits_1_on_a_stale_page_and_0_on_a_current_one(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text(config_reference.render() + "an edit by hand\n")
    assert config_reference.main(["--check", str(page)]) == 1
    assert "stale" in capsys.readouterr().err
    page.write_text(config_reference.render())
    assert config_reference.main(["--check", str(page)]) == 0
    assert config_reference.main(["--check", str(tmp_path / "missing.md")]) == 1
