"""benchmarks/gpu_check.py without a GPU: its command line, reports, batch search, timing helper and
no-CUDA exit, and a CPU smoke run of its sections with tiny models (the hidden ``--device cpu``)."""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


# ----------------------------------------------------------------------------- command line


def test_out_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args([])
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_sections_run_in_a_fixed_order_whatever_order_they_are_named_in():
    assert gpu_check.parse_args(["--out", "x"]).sections == ("env", "correctness", "speed", "fit")
    assert gpu_check.parse_args(["--out", "x", "--sections", "fit, env"]).sections == ("env", "fit")


@pytest.mark.parametrize("sections", ["env,gpu", ","])
def test_an_unknown_section_is_an_error_that_lists_the_valid_ones(sections, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--out", "x", "--sections", sections])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown section(s)" in err and "valid sections: env,correctness,speed,fit" in err
    assert "gpu" in err or sections == ","


def test_a_training_batch_of_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--batch", "1"])
    assert "PWCA" in capsys.readouterr().err


def test_quick_and_cpu_plans_are_smaller_than_the_full_one():
    plan = lambda *extra: gpu_check.make_plan(gpu_check.parse_args(["--out", "x", *extra]))  # noqa: E731
    full, quick, cpu = plan(), plan("--quick"), plan("--device", "cpu")
    assert [m.backbone for m in full.speed_models] == ["vit_base_patch16_224", "deit_tiny_patch16_224"]
    assert {m.img_size for m in full.speed_models} == {
        448
    } and full.fit_model.backbone == "vit_base_patch16_224"
    assert (full.batch, full.inference_batch, full.iters, full.fit_cap) == (8, 64, 10, 256)
    assert full.fit_limits_gib == (16.0, 24.0) and full.demo_epochs == (2, 3)
    assert quick.iters < full.iters and quick.fit_cap == 64 and quick.demo_epochs == (1, 2)
    assert quick.speed_models == full.speed_models
    assert cpu.speed_models == (gpu_check.TINY,) and cpu.fit_cap == 4 and cpu.demo_min_top1 is None
    assert plan("--fit-cap", "32", "--batch", "4").fit_cap == 32 and plan("--batch", "4").batch == 4


# ----------------------------------------------------------------------------- batch search


def test_the_search_finds_the_largest_batch_that_fits():
    found = gpu_check.largest_fitting(lambda b: b <= 37, cap=256, start=2)
    assert found.largest == 37 and found.complete
    assert [b for b, _ in found.probes] == [2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert gpu_check.probes_monotone(found.probes)


def test_the_search_gives_0_when_nothing_fits_and_the_cap_when_everything_does():
    nothing = gpu_check.largest_fitting(lambda b: False, cap=256, start=2)
    assert nothing.largest == 0 and nothing.probes == [(2, False)]
    everything = gpu_check.largest_fitting(lambda b: True, cap=256, start=2)
    assert everything.largest == 256 and everything.probes[-1] == (256, True)


@pytest.mark.parametrize("start", [1, 2, 5])
def test_the_search_is_right_for_every_threshold_in_few_probes(start):
    cap = 64
    for threshold in range(0, cap + 10):
        found = gpu_check.largest_fitting(lambda b, t=threshold: b <= t, cap=cap, start=start)
        assert found.largest == (0 if threshold < start else min(threshold, cap)), threshold
        assert len(found.probes) <= 2 * math.ceil(math.log2(cap)) + 1, (threshold, found.probes)
        assert gpu_check.probes_monotone(found.probes)


def test_a_stopped_search_returns_a_batch_that_fit():
    calls = []
    found = gpu_check.largest_fitting(
        lambda b: calls.append(b) or b <= 37, cap=256, start=2, should_stop=lambda: len(calls) >= 4
    )
    assert not found.complete and found.largest == 16 and len(calls) == 4


def test_monotone_probes_have_every_fit_below_every_failure():
    assert gpu_check.probes_monotone([(2, True), (4, True), (8, False), (6, True), (7, False)])
    assert not gpu_check.probes_monotone([(2, True), (8, False), (16, True)])
    assert gpu_check.probes_monotone([(2, False)]) and gpu_check.probes_monotone([])


def test_fits_is_false_on_out_of_memory_and_frees_the_failed_step_before_cleanup():
    class Activations:
        pass

    alive_at_cleanup = []

    def step(batch: int) -> None:
        activations = Activations()  # what a failed forward leaves behind in its frame
        held.append(weakref.ref(activations))
        if batch > 10:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} GiB")

    def cleanup() -> None:
        gc.collect()
        alive_at_cleanup.append(held[-1]() is not None)

    held: list[weakref.ref] = []
    fits = gpu_check.fits_from_step(step, cleanup)
    assert fits(10) is True and fits(11) is False
    assert alive_at_cleanup == [False, False]  # the exception's frames no longer hold the step's tensors


@pytest.mark.parametrize(
    "error, fits",
    [
        (RuntimeError("CUDA error: out of memory"), False),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None),
        (ValueError("PWCA needs 2 images"), None),
    ],
)
def test_only_out_of_memory_errors_mean_does_not_fit(error, fits):
    def step(batch: int) -> None:
        raise error

    probe = gpu_check.fits_from_step(step, lambda: None)
    if fits is None:
        with pytest.raises(type(error)):
            probe(4)
    else:
        assert probe(4) is fits


# ----------------------------------------------------------------------------- timing


def test_interleaved_medians_alternate_the_steps_sync_around_each_and_skip_warmup():
    now = [0.0]
    events: list[str] = []
    durations = {"dcal": iter([100.0, 1.0, 3.0, 2.0]), "plain": iter([50.0, 10.0, 30.0, 20.0])}

    def clock() -> float:
        events.append("clock")
        return now[0]

    def make_step(name: str):
        def step() -> None:
            events.append(name)
            now[0] += next(durations[name])

        return step

    medians = gpu_check.interleaved_medians(
        {name: make_step(name) for name in durations}, warmup=1, iters=3, sync=lambda: events.append("sync"),
        clock=clock,
    )  # fmt: skip
    assert medians == {"dcal": 2.0, "plain": 20.0}
    assert [e for e in events if e in durations] == ["dcal", "plain"] * 4
    assert events[:4] == ["sync", "clock", "dcal", "sync"]  # warm-up: not timed
    assert events[8:13] == ["sync", "clock", "dcal", "sync", "clock"]
    with pytest.raises(ValueError):
        gpu_check.interleaved_medians({"a": lambda: None}, warmup=0, iters=0)


# ----------------------------------------------------------------------------- correctness helpers


def test_selections_may_differ_only_by_near_ties():
    rollout = torch.tensor([[0.5, 0.3, 0.2, 0.19999, 0.0]])
    ref = torch.tensor([[0, 1, 2]])
    assert gpu_check.selection_mismatches(rollout, ref, torch.tensor([[2, 0, 1]]), 1e-4) == []
    assert gpu_check.selection_mismatches(rollout, ref, torch.tensor([[0, 1, 3]]), 1e-4) == []
    assert gpu_check.selection_mismatches(rollout, ref, torch.tensor([[0, 1, 4]]), 1e-4) == [0]
    assert gpu_check.selection_mismatches(rollout, ref, torch.tensor([[0, 1, 3]]), 1e-6) == [0]
    overlap = gpu_check.selection_overlap(
        torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([[2, 1, 5], [1, 2, 0]])
    )
    assert torch.allclose(overlap, torch.tensor([2 / 3, 1.0]))


def test_forward_differences_compare_glca_only_where_the_selections_agree():
    torch.manual_seed(0)
    ref = SimpleNamespace(
        sa_logits=torch.randn(2, 5), glca_logits=torch.randn(2, 5), rollout=torch.rand(2, 6).softmax(-1),
        local_index=torch.tensor([[0, 1], [2, 3]]),
    )  # fmt: skip
    out = copy.deepcopy(ref)
    assert gpu_check.forward_differences(ref, out)["sa_logits_max_abs"] == 0.0
    out.sa_logits[1, 2] += 0.5
    out.rollout[0, 4] += 1e-3
    out.local_index = torch.tensor([[1, 0], [2, 5]])  # image 0: same set, other order; image 1: differs
    out.glca_logits[1] += 9.0  # a different selection: not compared
    out.glca_logits[0, 0] += 0.25
    d = gpu_check.forward_differences(ref, out)
    assert d["sa_logits_max_abs"] == pytest.approx(0.5)
    assert d["glca_logits_max_abs"] == pytest.approx(0.25) and d["glca_images_compared"] == 1
    assert d["rollout_max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert d["selection_overlap_min"] == 0.5 and d["selection_mismatches"] == [1]


def test_gradient_health_names_missing_and_non_finite_gradients():
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    net(torch.randn(4, 3)).sum().backward()
    assert gpu_check.gradient_health(net) == ([], [])
    net[1].bias.grad = None
    net[0].weight.grad[0, 1] = math.inf
    assert gpu_check.gradient_health(net) == (["1.bias"], ["0.weight"])


def test_gradient_difference_is_relative_to_the_largest_reference_gradient():
    net = nn.Linear(3, 2)
    net(torch.randn(4, 3)).sum().backward()
    other = copy.deepcopy(net)
    for p, q in zip(net.parameters(), other.parameters(), strict=True):
        q.grad = p.grad.clone()
    assert gpu_check.gradient_difference(net, other)["relative"] == 0.0
    other.bias.grad += 0.1 * net.weight.grad.abs().max().clamp(min=net.bias.grad.abs().max())
    other.weight.grad = None
    d = gpu_check.gradient_difference(net, other)
    assert d["relative"] == pytest.approx(0.1, rel=1e-5) and d["missing"] == ["weight"]


# ----------------------------------------------------------------------------- report


def results_for(*extra: str) -> dict:
    args = gpu_check.parse_args(["--out", "x", *extra])
    return gpu_check.new_results(["--out", "x", *extra], torch.device("cuda"), gpu_check.make_plan(args))


def full_results() -> dict:
    """Results as a full GPU run writes them (values invented)."""
    results = results_for()
    sections = results["sections"]
    sdpa = {b: {d: {"hd24": "ok", "hd64": "ok"} for d in gpu_check.DTYPES} for b in gpu_check.SDPA_BACKENDS}
    sdpa["flash"]["fp32"] = dict.fromkeys(("hd24", "hd64"), "RuntimeError: No available kernel.")
    sections["env"] = {
        "status": "ok", "seconds": 2.0, "gpu": "NVIDIA H200", "total_memory_gib": 139.8,
        "compute_capability": "9.0", "torch": "2.11.0", "git": {"commit": "abc", "dirty": False},
        "sdpa": sdpa,
    }  # fmt: skip
    checks = [
        {"name": "forward.hd24.no_grad.sa_logits", "passed": True, "measured": "max |GPU - CPU| 1e-06",
         "expected": "<= 0.001"},
        {"name": "gradients_fp32.hd24", "passed": None, "measured": "GLCA selections differ", "expected": ""},
    ]  # fmt: skip
    demo = {
        "epochs": [2, 3], "steps": [{"name": "train", "rc": 0, "seconds": 20.0}],
        "last_epoch": {"epoch": 2.0, "eval_top1_sa_glca": 99.0},
        "eval_top1": {"sa": 98.0, "glca": 97.0, "sa+glca": 99.0},
    }  # fmt: skip
    sections["correctness"] = {
        "status": "ok", "seconds": 60.0, "models": {"hd24": "deit_tiny"}, "checks": checks, "demo": demo,
    }  # fmt: skip
    dcal = {"step_ms": 40.0, "images_per_s": 200.0, "peak_allocated_mib": 6000.0, "peak_reserved_mib": 6500.0}
    plain = {key: value / 2 if key != "images_per_s" else value * 2 for key, value in dcal.items()}
    ok = {"model": "vit_base_patch16_224 @448px", "status": "ok", "dcal": dcal, "plain": plain,
          "ratio": dict.fromkeys(gpu_check.RATIO_KEYS, 2.0)}  # fmt: skip
    error = {
        "model": ok["model"],
        "checkpointing": True,
        "status": "error",
        "error": "OutOfMemoryError: CUDA out",
    }
    sections["speed"] = {
        "status": "ok", "seconds": 40.0, "batch": 8, "inference_batch": 64, "warmup": 3, "iters": 10,
        "train": [{**ok, "checkpointing": False}, error], "inference": [ok],
    }  # fmt: skip
    searches = [
        {"limit_gib": 16.0, "checkpointing": False, "status": "ok", "largest_batch": 17, "at_cap": False,
         "probes": [(2, True), (32, False), (17, True)], "monotone": True, "seconds": 9.0},
        {"limit_gib": 16.0, "checkpointing": True, "status": "ok", "largest_batch": 256, "at_cap": True,
         "probes": [(256, True)], "monotone": True, "seconds": 9.0},
        {"limit_gib": 24.0, "checkpointing": False, "status": "skipped", "reason": "time budget"},
    ]  # fmt: skip
    sections["fit"] = {"status": "ok", "seconds": 80.0, "model": ok["model"], "cap": 256, "margin_gib": 0.5,
                       "searches": searches}  # fmt: skip
    results["passed"] = True
    return results


def table_after(markdown: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the first table after the line that starts with ``heading``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    table = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").replace("\\|", "\0").split("|")])
    return table[0], table[2:]


def test_the_reports_hold_every_section_in_tables(tmp_path):
    results = full_results()
    gpu_check.write_reports(results, tmp_path)
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(results))
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown.startswith("# dcal GPU check: no correctness failure")
    headers, rows = table_after(markdown, "| section")
    assert headers == ["section", "status", "seconds"] and [r[0] for r in rows] == list(gpu_check.SECTIONS)

    headers, rows = table_after(markdown, "SDPA backends")
    assert headers == ["backend"] + [f"{d} hd{hd}" for d in ("fp32", "bf16", "fp16") for hd in (24, 64)]
    assert [r[0] for r in rows] == ["flash", "efficient", "cudnn", "math"]
    assert rows[0][1:3] == ["no (1)", "no (1)"] and rows[0][3] == "ok"
    assert "1. RuntimeError: No available kernel." in markdown and "\n2. " not in markdown

    headers, rows = table_after(markdown, "Models:")
    assert headers == ["check", "measured", "expected", "result"]
    assert rows[0][1] == "max \0GPU - CPU\0 1e-06" and [r[3] for r in rows] == ["PASS", "SKIP"]
    headers, rows = table_after(markdown, "Demo:")
    assert rows == [["train", "0", "20.0"]]
    assert table_after(markdown, "evaluate.py, test top-1")[1] == [["98.0", "97.0", "99.0"]]

    headers, rows = table_after(markdown, "Training step, batch 8")
    assert len(headers) == 13 and headers[:5] == ["model", "checkpointing", "DCAL ms", "plain ms", "ratio"]
    assert rows[0][1:5] == ["off", "40.00", "20.00", "2.00x"] and rows[0][-1] == "2.00x"
    assert rows[1][1] == "on" and rows[1][2].startswith("error: OutOfMemoryError") and len(rows[1]) == 13
    headers, rows = table_after(markdown, "SA+GLCA inference")
    assert len(headers) == 12 and rows[0][1:4] == ["40.00", "20.00", "2.00x"]

    headers, rows = table_after(markdown, "vit_base_patch16_224 @448px: DCAL training step")
    assert headers[:3] == ["memory", "checkpointing", "largest batch"]
    assert rows[0][:3] == ["16 GiB", "off", "17"] and rows[0][4] == "2+ 32- 17+"
    assert rows[1][2] == ">= 256 (the cap)" and rows[2][3] == "time budget"


def test_partial_results_render(tmp_path):
    results = results_for()
    results["sections"]["env"] = {"status": "ok", "seconds": 1.0, "torch": "2.11.0"}
    failed = {"name": "amp_bf16.hd24.gradients", "passed": False, "measured": "inf", "expected": "finite"}
    results["sections"]["correctness"].update(status="running", checks=[failed])
    results["sections"]["speed"].update(status="error", error="RuntimeError: boom", train=[])
    gpu_check.write_reports(results, tmp_path)
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown.startswith("# dcal GPU check: incomplete")
    assert "_running_" in markdown and "Failed checks: amp_bf16.hd24.gradients" in markdown
    assert "_error_: RuntimeError: boom" in markdown
    fit = markdown.split("## Will batch N fit?")[1]
    assert "_not run_" in fit and "|" not in fit
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["fit"] == {"status": "not run"}


def test_the_exit_code_is_1_only_for_correctness_failures():
    results = results_for()
    correctness = results["sections"]["correctness"]
    assert gpu_check.exit_code(results) == 0
    correctness["checks"] = [{"name": "a", "passed": True}, {"name": "b", "passed": None}]
    results["sections"]["speed"]["status"] = "error"
    assert gpu_check.exit_code(results) == 0
    correctness["checks"].append({"name": "c", "passed": False})
    assert gpu_check.exit_code(results) == 1 and [c["name"] for c in gpu_check.failed_checks(results)] == [
        "c"
    ]
    correctness.update(status="error", checks=[])
    assert gpu_check.exit_code(results) == 1


# ----------------------------------------------------------------------------- the script


def test_without_cuda_it_says_so_on_one_line_and_exits_1(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "gc")], capture_output=True, text=True, env=env,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr == "error: no CUDA device\n" and done.stdout == ""
    assert not (tmp_path / "gc").exists()


def test_a_broken_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(ctx, section):
        section["partial"] = 1
        raise RuntimeError("boom")

    def speed(ctx, section):
        section["train"] = []

    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "correctness", broken)
    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "speed", speed)
    argv = ["--out", str(tmp_path), "--device", "cpu", "--sections", "correctness,speed"]
    assert gpu_check.main(argv) == 1
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["correctness"]["status"] == "error" and sections["correctness"]["partial"] == 1
    assert (
        sections["correctness"]["error"] == "RuntimeError: boom"
        and "boom" in sections["correctness"]["traceback"]
    )
    assert sections["speed"]["status"] == "ok" and sections["env"]["status"] == "not requested"
    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "correctness", speed)
    assert gpu_check.main(argv) == 0


def test_nothing_starts_after_the_time_budget(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--budget-s", "0"]) == 0
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert {s["status"] for s in sections.values()} == {"skipped (time budget)"}


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models run many times faster on one thread when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the scripts run in subprocesses
    yield
    torch.set_num_threads(threads)


def test_cpu_smoke_run_of_every_in_process_section(tmp_path, one_thread):
    argv = ["--out", str(tmp_path), "--device", "cpu", "--skip-demo"]
    assert gpu_check.main(argv) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = results["sections"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(gpu_check.SECTIONS, "ok")
    assert results["passed"] is True
    assert sections["env"]["sdpa"]["math"]["fp32"] == {"hd24": "ok", "hd64": "ok"}
    checks = sections["correctness"]["checks"]
    assert len(checks) == 16 and all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    rows = sections["speed"]["train"] + sections["speed"]["inference"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all(r["dcal"]["step_ms"] > 0 and r["ratio"]["step_ms"] > 0 for r in rows)
    searches = sections["fit"]["searches"]
    assert [(s["checkpointing"], s["largest_batch"]) for s in searches] == [(False, 4), (True, 4)]
    assert (tmp_path / "gpu_check.md").read_text().startswith("# dcal GPU check: no correctness failure")


def test_the_demo_trains_resumes_and_evaluates_through_the_scripts(cub_root, tmp_path, one_thread):
    overrides = [
        "data.dataset=cub", f"data.root={cub_root}", "data.img_size=32", "data.resize_size=32",
        "data.num_workers=0", "model.backbone_kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}",
        "train.batch_size=4", "train.warmup_epochs=1", "train.device=cpu",
    ]  # fmt: skip
    args = gpu_check.parse_args(["--out", str(tmp_path), "--device", "cpu", "--demo-set", *overrides])
    ctx = gpu_check.Context(
        gpu_check.make_plan(args), torch.device("cpu"), tmp_path, time.monotonic() + 300, lambda: None
    )
    section: dict = {}
    gpu_check.check_demo(ctx, section)
    assert [(c["name"], c["passed"]) for c in section["checks"]] == [
        ("demo.train", True), ("demo.resume", True), ("demo.evaluate", True), ("demo.epochs", True),
    ]  # fmt: skip
    demo = section["demo"]
    assert [s["rc"] for s in demo["steps"]] == [0, 0, 0] and demo["last_epoch"]["epoch"] == 1.0
    assert set(demo["eval_top1"]) == {"sa", "glca", "sa+glca"} and demo["eval_top1"]["sa"] is not None


def test_the_demo_is_skipped_not_failed_without_the_training_dependencies(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "DEMO_MODULES", ("yaml", "no_such_module_for_gpu_check"))
    args = gpu_check.parse_args(["--out", str(tmp_path), "--device", "cpu"])
    ctx = gpu_check.Context(gpu_check.make_plan(args), torch.device("cpu"), tmp_path, math.inf, lambda: None)
    section: dict = {}
    gpu_check.check_demo(ctx, section)
    assert [(c["name"], c["passed"]) for c in section["checks"]] == [("demo", None)]
    assert "no_such_module_for_gpu_check not installed" in section["checks"][0]["measured"]
    assert "demo" not in section and not (tmp_path / "runs").exists()
