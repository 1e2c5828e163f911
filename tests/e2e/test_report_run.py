"""`pretrain report` on real runs: two sources, in-loop validation, an eval hook and `pretrain eval
--watch`; a second run with another learning rate and a third identical to the first."""

from __future__ import annotations

import json
import re

import pytest

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.observability.report import load_runs
from pretrain.observability.report_plots import MIX, TRAIN, VAL, VAL_SOURCES, build_figure, source_colours
from pretrain.trainer import Trainer
from tests.conftest import pydoc_documents, read_metrics, tiny_overrides

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_file):
    """out_dirs of `base` (lr 3e-3, also evaluated by `pretrain eval --watch`), `same` (its copy)
    and `low_lr` (lr 1e-3): 20 steps on two sources weighted 0.3 / 0.7, validation and a
    checkpoint every 10 steps, each checkpoint scored by the perplexity hook."""
    root = tmp_path_factory.mktemp("report")
    docs = pydoc_documents()
    topics, paragraphs, heldout = root / "topics.txt", root / "paragraphs.jsonl", root / "heldout.txt"
    topics.write_text("\n\n".join(" ".join(doc.split()) for doc in docs[: len(docs) // 2]) + "\n")
    paragraphs.write_text("".join(json.dumps({"text": p.strip()}) + "\n" for doc in docs[len(docs) // 2:]
                                  for p in doc.split("\n\n") if p.strip()))
    heldout.write_text("\n\n".join(docs[:2]))
    sources = (f"[{{name: topics, path: '{topics}', weight: 0.3}}, "
               f"{{name: paragraphs, path: '{paragraphs}', weight: 0.7}}]")
    hook_options = f"{{'pretrain.hooks:perplexity': {{text_file: '{heldout}', max_tokens: 256}}}}"
    dirs = {}
    for name, lr in (("base", 3e-3), ("same", 3e-3), ("low_lr", 1e-3)):
        dirs[name] = root / name
        overrides = tiny_overrides(dirs[name], topics, tokenizer_file, data__sources=sources, train__max_steps=20,
                                   optim__lr=lr, eval__every=10, eval__batches=4, checkpoint__every=10,
                                   eval__hooks="[pretrain.hooks:perplexity]",
                                   eval__hook_options=hook_options)
        assert Trainer(load_config(None, overrides, world_size=1)).train() == 0
    assert main(["eval", "--watch", str(dirs["base"]), "--once"]) == 0
    return dirs


def test_report_command_writes_both_files(runs, capsys, tmp_path):
    assert main(["report", str(runs["base"]), str(runs["low_lr"]), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "report.png"), str(tmp_path / "report.html")]
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_SIGNATURE)
    assert main(["report", str(runs["base"])]) == 0  # default: into the first OUT_DIR
    assert (runs["base"] / "report.png").is_file() and (runs["base"] / "report.html").is_file()


def test_figure_has_labelled_panels_source_colours_and_a_legend_off_the_data(runs):
    figure = build_figure(load_runs([str(runs[n]) for n in ("base", "same", "low_lr")]))
    axes = figure.axes
    hooks = [title for title in axes if title.startswith("eval hook perplexity: ")]
    assert {TRAIN, VAL, VAL_SOURCES, MIX, "learning rate", "throughput"} <= set(axes) and hooks
    for title, ax in axes.items():
        assert ax.get_xlabel() == "tokens seen" and ax.get_ylabel(), title
    for title in (TRAIN, VAL, VAL_SOURCES):
        assert "nats/token" in axes[title].get_ylabel() and axes[title].get_yscale() == "linear"
    # training loss starts near ln(512) = 6.2; the axis is zoomed onto where the runs differ
    assert axes[VAL].get_ylim()[1] < read_metrics(runs["base"])[0]["val_loss"]

    colours = source_colours(load_runs([str(runs["base"])]))
    assert set(colours) == {"topics", "paragraphs"} and len(set(colours.values())) == 2
    for title in (VAL_SOURCES, MIX):
        drawn = {line.get_color() for line in axes[title].get_lines() if line.get_linestyle() != "--"}
        assert drawn == set(colours.values()), title  # each source its colour, the same in both panels
    # base, same and low_lr differ in line style and marker
    styles = {(line.get_linestyle(), line.get_marker()) for line in axes[VAL_SOURCES].get_lines()
              if line.get_color() == colours["topics"] and line.get_linestyle() != "None"}
    assert len(styles) == 3
    configured = sorted(line.get_ydata()[0] for line in axes[MIX].get_lines() if line.get_linestyle() == "--")
    assert configured == pytest.approx([0.3, 0.7])
    hollow = [line for line in axes[VAL].get_lines() if line.get_markerfacecolor() == "none"]
    assert len(hollow) == 1 and len(hollow[0].get_xdata()) == 2  # `pretrain eval` of the checkpoints 10 and 20
    figure.figure.canvas.draw()
    legend_box = figure.legend.get_window_extent()
    for title, ax in axes.items():
        assert not legend_box.overlaps(ax.get_window_extent()), title
    assert figure.notes[0].startswith("runs base and same have identical curves in every panel but throughput")
    assert figure.notes[1].startswith("runs base, same and low_lr have identical data mixture:")


def test_html_compares_the_runs(runs, tmp_path):
    assert main(["report", *(str(runs[n]) for n in ("base", "same", "low_lr")), "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    table = page[page.index('<table id="comparison">'):]
    table = table[: table.index("</table>")]
    assert all(f"<th>{name}</th>" in table for name in ("base", "same", "low_lr"))
    for name in ("base", "low_lr"):
        records = read_metrics(runs[name])
        loss = [r for r in records if "loss" in r][-1]
        val = [r for r in records if "val_loss" in r][-1]
        assert f"{loss['loss']:.4f} (step 20)" in table and f"{val['val_loss']:.4f} (step 20)" in table
    assert re.search(r"<th>backend / world size</th>(<td>none / 1 rank</td>){3}", table)
    assert "share of training tokens: topics" in table and "(configured 0.300)" in table
    assert "pretrain eval: final validation loss" in table and "eval hook perplexity: ppl" in table
    differences = page[page.index("<h2>Config differences</h2>"):page.index("<h2>Notes</h2>")]
    assert re.search(r"<code>optim\.lr</code></th><td>0\.003</td><td>0\.003</td><td>0\.001</td>", differences)
    assert "out_dir" not in differences and "data.sources" not in differences
    assert "runs base and same have identical curves in every panel but throughput" in page
    assert "data:image/png;base64," in page and "http://" not in page and "<script" not in page
