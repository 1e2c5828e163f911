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
    from pretrain.config_parse import build, load_yaml_text

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2  # the config tour and the data mixing example
    for block in blocks:
        problems: list[str] = []
        build(Config, load_yaml_text(block), "", problems)
        assert problems == [], block
