"""The README's config reference is the schema's own descriptions: they never drift apart."""

from pathlib import Path

from job.config import JobConfig
from launcher.docs import BEGIN, END, reference_markdown, rows

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_matches_schema() -> None:
    text = README.read_text()
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    assert block == reference_markdown(), "run `python -m launcher.docs --write`"


def test_every_field_is_described() -> None:
    missing = [key for key, _, _, desc in rows(JobConfig) if not desc.strip()]
    assert not missing, f"fields without a description: {missing}"


def test_readme_names_the_test_command() -> None:
    text = README.read_text()
    assert "make test" in text and "make run" in text
