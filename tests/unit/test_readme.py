"""README's two commands stay true: CI runs exactly its test command."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "pytest" in tests and "torch==2.13.0" in tests
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_main_job_runs_the_demo_config():
    main_job, _ = readme_commands()
    assert "torch==2.13.0" in main_job and main_job.endswith("pretrain train configs/demo.yaml")
    assert (REPO / "configs" / "demo.yaml").is_file()


def test_yaml_examples_use_real_keys_and_types():
    from pretrain.config import Config
    from pretrain.config.parse import build, load_yaml_text

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2  # the config tour and the data mixing example
    for block in blocks:
        problems: list[str] = []
        build(Config, load_yaml_text(block), "", problems)
        assert problems == [], block


SEPARATOR = re.compile(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?")


def markdown_tables(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each run of table lines (starting with `|`) outside code blocks."""
    tables: list[tuple[int, list[str]]] = []
    fenced, previous_was_row = False, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        is_row = not fenced and line.lstrip().startswith("|")
        if is_row and previous_was_row:
            tables[-1][1].append(line)
        elif is_row:
            tables.append((number, [line]))
        previous_was_row = is_row
    return tables


def cells(row: str) -> int:
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


def check_tables(text: str) -> list[str]:
    """Problems with the tables of a markdown text: a run of rows without a header and separator
    line (rows cut off from their table by a paragraph render as raw pipes), or rows whose number
    of cells differs from the header's."""
    problems = []
    for number, rows in markdown_tables(text):
        if len(rows) < 2 or not SEPARATOR.fullmatch(rows[1].strip()):
            problems.append(f"line {number}: table rows without a header and |---| line above them: {rows[0][:60]}")
            continue
        problems += [f"line {number + i}: {cells(row)} cells, the header has {cells(rows[0])}"
                     for i, row in enumerate(rows) if cells(row) != cells(rows[0])]
    return problems


def test_every_readme_table_is_one_contiguous_block():
    assert check_tables((REPO / "README.md").read_text()) == []


def test_the_table_check_sees_a_table_split_by_a_paragraph():
    split = "| a | b |\n|---|---|\n| 1 | 2 |\n\nA paragraph.\n\n| 3 | 4 |\n"
    assert check_tables(split) == ["line 7: table rows without a header and |---| line above them: | 3 | 4 |"]
    assert check_tables("| a | b |\n|---|---|\n| 1 \\| x | 2 |\n\n```\n| not a table |\n```\n") == []
    assert check_tables("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n") == ["line 3: 3 cells, the header has 2"]
