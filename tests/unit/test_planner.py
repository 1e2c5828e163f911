"""The shape rule, the planner's decisions, its table/JSON/config outputs and the preset files."""

from __future__ import annotations

import json

import pytest

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.errors import PretrainError
from pretrain.models.args import count_params, flops_per_token
from pretrain.scaling.gpus import GPUS
from pretrain.scaling.laws import BESIROGLU
from pretrain.scaling.planner import PlanRequest, duration, make_plan
from pretrain.scaling.presets import PRESET_SIZES, PRESETS_DIR, preset_text
from pretrain.scaling.shapes import largest_shape, nearby_shapes, shape_for_params, shape_for_width, widths


def test_every_width_of_the_family_is_a_valid_llama_shape_growing_with_width():
    sizes = []
    for d in widths():
        s = shape_for_width(d)
        assert s.d_model % s.n_heads == 0 and s.n_heads % s.n_kv_heads == 0 and s.ffn_hidden >= 2 * d
        # past d16384 depth stays at 128 blocks and the ratio rises to 200 (Megatron-LM's 1T GPT)
        assert 32 <= d / s.n_layers <= 200 or s.n_layers == 2
        sizes.append(count_params(s))
    assert sizes == sorted(sizes)
    llama3_8b = shape_for_width(4096)  # the rule reproduces Llama 3 8B's block (with a 32k vocabulary)
    assert (llama3_8b.n_layers, llama3_8b.n_heads, llama3_8b.n_kv_heads, llama3_8b.ffn_hidden) == (32, 32, 8, 14336)


def test_shapes_past_llama3_405b_widen_at_128_blocks_up_to_megatrons_1t_gpt():
    large = [shape_for_width(d) for d in widths() if d > 16384]
    assert large and all(s.n_layers == 128 and s.head_dim == 128 and s.n_heads % 8 == 0 and s.n_kv_heads == 8
                         and s.ffn_hidden % 1024 == 0 for s in large)
    sizes = [count_params(s) for s in large]
    assert sizes == sorted(sizes) and sizes[0] > count_params(shape_for_width(16384))
    top = largest_shape()
    assert (top.d_model, top.n_layers, top.n_heads) == (25600, 128, 200)  # Narayanan et al. 2021, table 1
    assert 0.95 < count_params(top) / 1.008e12 < 1.1
    for target in (5e11, 7e11, 1e12):
        assert 0.9 < count_params(shape_for_params(target)) / target < 1.1


def test_a_budget_beyond_the_largest_shape_says_the_plan_is_capped_in_the_table_and_json(capsys):
    assert main(["plan", "--flops", "1e27", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    target = BESIROGLU.compute_optimal(1e27)[0]
    assert plan["params"] == count_params(largest_shape()) and plan["capped"] is True
    assert plan["target_params"] == pytest.approx(target)
    per_param, optimal_per_param = plan["tokens"] / plan["params"], 1e27 / (6 * target**2)  # C = 6 N D
    expected = (f"the model is capped at the family's largest shape, 1.05T parameters, "
                f"{target / plan['params']:.1f}x below the compute-optimal 3.31T; the remaining budget goes to tokens "
                f"({per_param:.0f} tokens per parameter instead of ~{optimal_per_param:.0f})")
    assert "3.1x" in expected and "(147 tokens per parameter instead of ~15)" in expected
    assert [w for w in plan["warnings"] if w.startswith(expected)] and plan["budget"].startswith("capped")

    assert main(["plan", "--flops", "1e27"]) == 0
    table = capsys.readouterr().out
    assert "parameters  1.05T CAPPED: 3.1x below the 3.31T asked for" in table
    assert f"WARNING: {expected}" in table and "budget  capped at the family's largest shape" in table
    assert "compute-optimal (Chinchilla" not in table

    asked = make_plan(PlanRequest(params=3e12))  # a size given beyond the family is capped too
    assert asked.capped and any("2.9x below the requested 3T" in w for w in asked.warnings)


@pytest.mark.parametrize("flops", [1e21, 1e26])
def test_a_budget_the_family_covers_is_not_capped(flops, capsys):
    assert main(["plan", "--flops", str(flops), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["capped"] is False and not any("capped" in w for w in plan["warnings"])
    assert plan["budget"].startswith("compute-optimal (Chinchilla allocation)")
    assert main(["plan", "--flops", str(flops)]) == 0
    assert "CAPPED" not in capsys.readouterr().out


def test_compute_optimal_plan_minimises_the_law_over_neighbouring_shapes_with_exact_flops():
    for flops in (1e19, 1e21, 1e23):
        plan = make_plan(PlanRequest(flops=flops))
        assert plan.flops == pytest.approx(flops, rel=0.02)  # whole steps of the batch
        chosen = BESIROGLU.loss(plan.params, flops / flops_per_token(plan.shape, plan.seq_len))
        for other in nearby_shapes(plan.shape, 3):
            assert chosen <= BESIROGLU.loss(count_params(other), flops / flops_per_token(other, plan.seq_len)) + 1e-12


def test_hardware_budget_becomes_flops_days_and_cost():
    plan = make_plan(PlanRequest(gpus=64, gpu="h100", days=21, mfu=0.4, price_per_gpu_hour=2.0))
    budget = 64 * GPUS["h100"].bf16_flops * 0.4 * 21 * 86400
    assert plan.flops == pytest.approx(budget, rel=0.02) and plan.days == pytest.approx(21, rel=0.02)
    assert plan.cost == pytest.approx(64 * plan.days * 24 * 2.0)
    assert plan.chosen is not None and plan.chosen.fits
    assert plan.global_batch_tokens % (plan.seq_len * 64 * plan.micro_batch) == 0
    assert plan.warmup_steps <= 2000 and plan.steps * plan.global_batch_tokens == plan.tokens


def test_any_gpu_count_divides_the_global_batch():
    for gpus in (1, 6, 48, 96):
        plan = make_plan(PlanRequest(flops=1e21, gpus=gpus))
        assert plan.global_batch_tokens % (plan.seq_len * gpus * plan.micro_batch) == 0


def test_layouts_shard_more_when_the_model_grows():
    small = make_plan(PlanRequest(params=125e6, gpus=8))
    assert small.chosen.backend == "ddp" and small.chosen.checkpointing == "none"
    big = make_plan(PlanRequest(params=13e9, gpus=64))
    assert big.chosen.backend in ("fsdp", "deepspeed") and big.chosen.label != "zero1"
    too_big = make_plan(PlanRequest(params=70e9, gpus=8))
    assert too_big.chosen is None and any("does not fit" in w for w in too_big.warnings)


def test_repeated_sources_warn_and_lower_the_predicted_loss_gain():
    fresh = make_plan(PlanRequest(flops=1e21))
    scarce = make_plan(PlanRequest(flops=1e21, source_tokens={"finance": 2e9, "web": 1e13},
                                   source_weights={"finance": 0.5, "web": 0.5}))
    assert any("'finance' would be repeated" in w for w in scarce.warnings)
    assert not any("'web'" in w for w in scarce.warnings)
    assert scarce.effective_tokens < fresh.tokens and scarce.predicted_loss > fresh.predicted_loss


def test_inference_tokens_plan_a_smaller_model_on_more_tokens():
    base = make_plan(PlanRequest(flops=1e22))
    served = make_plan(PlanRequest(flops=1e22, inference_tokens=1e13))
    assert served.params < base.params and served.tokens > base.tokens


@pytest.mark.parametrize("request_kwargs, message", [
    ({}, "nothing to plan from"),
    ({"flops": 1e21, "gpus": 8, "days": 3}, "give the budget once"),
    ({"days": 3}, "needs --gpus and --days"),
    ({"flops": 1e21, "mfu": 1.5}, "--mfu 1.5 must be in"),
    ({"flops": 1e21, "gpu": "tpu"}, "'tpu' is not a known GPU"),
    ({"params": 1e9, "tokens": 2e10, "flops": 1e21}, "fix the compute already"),
])
def test_contradictory_or_missing_inputs_are_errors(request_kwargs, message):
    with pytest.raises(PretrainError, match=message):
        make_plan(PlanRequest(**request_kwargs))


def test_plan_cli_json_table_and_written_config(tmp_path, capsys):
    assert main(["plan", "--flops", "1e21", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("params", "tokens", "flops", "global_batch_tokens", "lr", "steps", "days", "memory_per_gpu_gb"):
        assert isinstance(plan[key], (int, float)), key
    assert 2e9 < plan["params"] < 4e9

    out = tmp_path / "plan.yaml"
    assert main(["plan", "--gpus", "64", "--gpu", "h100", "--days", "21", "--write", str(out)]) == 0
    table = capsys.readouterr().out
    assert "parameters" in table and "fsdp" in table and "<- chosen" in table
    cfg = load_config(str(out), world_size=64)  # what the 64-GPU job will see
    assert cfg.train.global_batch_tokens % (64 * cfg.train.micro_batch_size * cfg.data.seq_len) == 0
    assert "pretrain train plan.yaml --train.max_steps=2" in out.read_text()
    assert main(["plan", "--flops", "1e20", "--write", str(out)]) == 1  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_plan_keeps_the_base_config_and_checks_its_source_names(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("out_dir: runs/bank\ndata:\n  sources:\n    - {name: finance, path: python-docs, weight: 0.5}\n"
                    "    - {name: general, path: python-docs, weight: 0.5}\n  seq_len: 1024\n")
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--base", str(base), "--params", "350M", "--source", "finance=1B", "--write", str(out)]) == 0
    assert "'finance' would be repeated" in capsys.readouterr().out
    cfg = load_config(str(out))
    assert cfg.out_dir == "runs/plan-347m" and [s.name for s in cfg.data.sources] == ["finance", "general"]
    assert cfg.data.seq_len == 1024
    assert main(["plan", "--base", str(base), "--flops", "1e20", "--source", "legal=1B"]) == 1
    assert "['legal'] are not sources of" in capsys.readouterr().err


@pytest.mark.parametrize("name", PRESET_SIZES)
def test_preset_files_are_what_the_rule_generates_and_load(name):
    path = PRESETS_DIR / f"{name}.yaml"
    assert path.read_text() == preset_text(name), f"regenerate with: pretrain presets --write {PRESETS_DIR}"
    cfg = load_config(str(path))
    assert 0.75 < count_params(cfg.model) / PRESET_SIZES[name] < 1.25
    assert shape_for_params(PRESET_SIZES[name]).d_model == cfg.model.d_model


def test_presets_command_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows[2:]] == list(PRESET_SIZES)


def test_a_written_config_that_fails_its_check_is_not_published(tmp_path, monkeypatch):
    import pretrain.scaling.plan_output as plan_output

    out = tmp_path / "plan.yaml"
    out.write_text("# the user's own file\n")
    monkeypatch.setattr(plan_output, "plan_config", lambda plan, base, out_dir: {"train": {"max_steps": -1}})
    with pytest.raises(PretrainError, match="train.max_steps=-1"):
        plan_output.write_plan_config(make_plan(PlanRequest(flops=1e20)), str(out), None, "pretrain plan", force=True)
    assert out.read_text() == "# the user's own file\n" and [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


@pytest.mark.parametrize("asked, planned, rounding, neighbours", [
    ("13B", 14_169_297_920, "13B, rounded +9.0% to the family's nearest shape",
     "d4864 L38 is 11.9B, d5120 L40 is 14.2B; widths step by 256 here, a multiple of the 128-wide heads"),
    ("70B", 66_014_556_672, "70B, rounded -5.7% to the family's nearest shape",
     "d8704 L68 is 66B, d9216 L72 is 79.4B; widths step by 512 here"),
])
def test_a_requested_size_says_it_was_rounded_to_the_familys_shape_and_why(asked, planned, rounding, neighbours,
                                                                           capsys):
    assert main(["plan", "--params", asked, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"] == planned and plan["requested_params"] == pytest.approx(float(asked[:-1]) * 1e9)
    assert plan["shape_rounding"].startswith(rounding) and neighbours in plan["shape_rounding"]
    assert main(["plan", "--params", asked]) == 0
    table = capsys.readouterr().out
    assert f"requested  {rounding} (" in table and neighbours in table

    assert main(["plan", "--flops", "1e21", "--json"]) == 0  # the law's size was not asked for: nothing to explain
    plan = json.loads(capsys.readouterr().out)
    assert plan["requested_params"] is None and plan["shape_rounding"] is None
    assert main(["plan", "--flops", "1e21"]) == 0
    assert "requested" not in capsys.readouterr().out


def test_a_fixed_size_that_wastes_the_budget_warns_and_shows_the_better_plan(capsys):
    budget = ["--gpus", "16", "--gpu", "a100-80gb", "--days", "10"]
    assert main(["plan", "--params", "13B", *budget, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    optimal = make_plan(PlanRequest(gpus=16, gpu="a100-80gb", days=10, seq_len=plan["seq_len"]))
    better = plan["better_plan"]
    assert better["params"] == optimal.params == 3_631_918_080 and better["tokens"] == optimal.tokens
    assert better["predicted_loss"] == pytest.approx(optimal.predicted_loss)
    assert plan["predicted_loss"] - better["predicted_loss"] == pytest.approx(better["loss_gain"])
    assert better["loss_gain"] > 0.05
    warning = ("with --params 13B the plan trains 14.2B parameters on 1.3 tokens per parameter; the compute-optimal "
               "plan for the "
               "same compute, 3.63B parameters on 67.8B tokens (18.7 per parameter), predicts a loss of 2.273 "
               "instead of 2.326: drop --params 13B to plan it")
    assert warning in plan["warnings"]

    assert main(["plan", "--params", "13B", *budget]) == 0
    table = capsys.readouterr().out
    assert ("better plan  3.63B parameters on 67.8B tokens (18.7 per parameter): predicted loss 2.273 for the "
            "same compute") in table and f"WARNING: {warning}" in table

    # a size and token count that fix the compute: the hint names the budget to plan with instead
    small = make_plan(PlanRequest(params=125e6, tokens=1e12))
    assert small.better is not None and small.better.params > small.params
    assert any(w.startswith("with --params 125M and --tokens 1T the plan trains 117M parameters on 8575.8 tokens")
               and "`pretrain plan --flops 9.26e+20 --seq-len 2048` plans it" in w and "--inference-tokens" in w
               for w in small.warnings)


@pytest.mark.parametrize("request_kwargs", [
    {"params": 7e9},  # tokens from the law: already compute-optimal
    {"params": 7e9, "gpus": 8, "days": 26.8},  # the 7b preset's own budget
    {"flops": 1e21},  # the law chose the size
    {"params": 5e9, "flops": 7.32e21}, {"params": 14e9, "flops": 7.32e21},  # within ~2x of the optimum, 7.24B
])
def test_a_plan_near_the_optimum_proposes_no_other(request_kwargs):
    plan = make_plan(PlanRequest(**request_kwargs))
    assert plan.better is None and not any("compute-optimal plan for the same compute" in w for w in plan.warnings)


@pytest.mark.parametrize("params", [4e9, 16e9])
def test_a_size_over_2x_from_the_optimum_is_flagged(params):
    plan = make_plan(PlanRequest(params=params, flops=7.32e21))
    assert plan.better.params == 7_241_732_096 and plan.predicted_loss - plan.better.predicted_loss >= 0.01


def test_a_written_plan_has_its_own_out_dir_and_keeps_non_ascii_text(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("out_dir: /data/runs/bank\ndata:\n  sources:\n    - {name: finance, path: python-docs}\n"
                    "eval:\n  sample_prompts: ['银行的利率是', 'Zürich']\n", encoding="utf-8")
    out = tmp_path / "bank-big.yaml"
    assert main(["plan", "--base", str(base), "--params", "350M", "--write", str(out)]) == 0
    err = capsys.readouterr().err
    cfg = load_config(str(out))
    assert cfg.out_dir == "/data/runs/bank-big-347m"  # beside the base's run, named after the file and the size
    assert cfg.eval.sample_prompts == ["银行的利率是", "Zürich"]
    text = out.read_bytes().decode("utf-8")  # UTF-8, and readable: no \u escapes
    assert "银行的利率是" in text and "Zürich" in text and "\\u" not in text and "\\xFC" not in text
    note = "out_dir /data/runs/bank-big-347m: the plan's own run directory, not the base config's /data/runs/bank"
    assert note in err and f"# {note}" in text

    plain = tmp_path / "plan.yaml"
    assert main(["plan", "--flops", "1e20", "--write", str(plain), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out_dir"] == "runs/plan-760m" == load_config(str(plain)).out_dir


def test_an_existing_write_file_is_refused_before_anything_is_planned(tmp_path, capsys, monkeypatch):
    import pretrain.scaling.planner as planner

    out = tmp_path / "plan.yaml"
    out.write_text("# mine\n")
    monkeypatch.setattr(planner, "make_plan", lambda request: pytest.fail("planned although the file exists"))
    assert main(["plan", "--params", "13B", "--write", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and out.read_text() == "# mine\n"
    assert captured.err == f"error: {out} exists; choose another --write path or add --force to replace it\n"
    monkeypatch.undo()
    assert main(["plan", "--params", "125M", "--write", str(out), "--force"]) == 0
    assert load_config(str(out)).model.d_model == 768


def test_gpu_a100_is_the_80gb_card_and_the_plan_says_so(capsys):
    assert main(["plan", "--flops", "1e21", "--gpu", "a100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    note = "--gpu a100 is read as a100-80gb (80 GiB); give --gpu a100-40gb for the 40 GB card"
    assert plan["gpu"] == "a100-80gb" and plan["gpu_note"] == note
    assert main(["plan", "--flops", "1e21", "--gpu", "a100"]) == 0
    assert f"8 x a100-80gb (312 TFLOP/s bf16, 80 GiB) at 40% MFU; {note}" in capsys.readouterr().out
    assert main(["plan", "--flops", "1e21", "--gpu", "a100-40gb", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_note"] is None


def test_presets_show_wall_clock_in_human_units(capsys):
    assert [duration(d) for d in (0.000244, 0.00414, 0.0788, 0.649, 1.2, 26.78, 1234.5)] == [
        "21.1 s", "5.96 min", "1.89 h", "15.6 h", "1.20 days", "26.8 days", "1,234 days"]
    assert main(["presets"]) == 0
    rows = {row.split()[0]: row for row in capsys.readouterr().out.splitlines()[2:]}
    assert rows["20m"].endswith("  21.1 s") and rows["7b"].endswith("  26.8 days")
    assert "0.000244" not in rows["20m"]
