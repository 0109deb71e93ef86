"""The GPU check (scripts/gpu-check.sh, benchmark/tools/gpu_check.py) and the cohort speed benchmark it runs
(benchmark/tools/cohort_speed.py): the whole check at toy sizes on the CPU, the files it writes and their fields; a
failing and a timed-out part recorded without stopping the check, a timed-out one with what it had measured; the
budget passed on from part to part; the parts' order; the data stream part (images/s with and without the overlap,
the stream's host syncs), written as it goes; the resume part's two straight runs and its verdict; what
the script requires of the machine's python; the comparisons and the arithmetic of the time shares against
hand-computed values."""
import hashlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hkdbench.benchmark.tools import cohort_speed

from hkdbench.benchmark.tools import gpu_check
from hkdbench.benchmark.core.config import PIPELINE_VERSION
from hkdbench.benchmark.tools.overhead import OverheadConfig, measure_method

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SKIP_INSTALL": "1", "GPU_CHECK_TINY": "1",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_the_tiny_check_runs_every_part_and_writes_its_files(tiny_check):
    out, summary = tiny_check
    parts = {p["name"]: p for p in summary["parts"]}
    assert list(parts) == ["env", "overhead_eager_swin_mini_resnet_mini", "stream_resnet_mini_vit_mini",
                           "cohort_resnet_mini_vit_mini", "resume", "teacher_outputs_ofa_resnet_mini",
                           "teacher_outputs_logits_resnet_mini", "overhead_compile"]
    assert all(parts[n]["status"] == "ok" for n in list(parts)[:-1]), {n: p.get("error") for n, p in parts.items()}
    assert parts["overhead_compile"]["status"] == "skipped"
    assert summary["tiny"] is True and summary["install"].startswith("skipped")
    ran = list(parts.values())[:-1]
    for record in ran:  # the time a part leaves passes on: every part but the first gets more than its share
        assert record["budget_s"] > 0 and record["seconds"] < record["budget_s"]
    assert all(r["budget_s"] > r["planned_s"] for r in ran[1:]), [(r["budget_s"], r["planned_s"]) for r in ran]
    assert sum(r["planned_s"] for r in ran) == pytest.approx(summary["budget_s"], abs=0.5)
    for name in list(parts)[:-1]:
        assert (out / "raw" / f"{name}.json").is_file() and (out / "raw" / f"{name}.log").is_file()
    assert parts["env"]["result"]["device"] == "cpu" and parts["env"]["result"]["torch"] == torch.__version__
    md = (out / "summary.md").read_text()
    for heading in ("# GPU check (tiny sizes)", "## Overhead: swin_mini -> resnet_mini, 32 px, batch 8, fp32, cpu",
                    "## Data stream: cifar-vit, kd resnet_mini -> vit_mini, 32 px, batch 16, float32, cpu",
                    "## Cohort against separate runs (kd, dkd)", "## Stop and resume: kd resnet_mini -> vit_mini",
                    "## Teacher outputs: separate runs, cohorts, stored (kd, fitnet)",
                    "## Teacher outputs: separate runs, cohorts, stored (kd, dkd)"):
        assert heading in md


@pytest.mark.slow
def test_the_stream_part_times_every_contender_and_counts_the_streams_syncs(tiny_check):
    out, summary = tiny_check
    r = next(p for p in summary["parts"] if p["kind"] == "stream")["result"]
    assert (r["teacher"], r["student"], r["img_size"], r["batch_size"], r["steps"]) == ("resnet_mini", "vit_mini",
                                                                                       32, 16, 2)
    assert r["device"] == "cpu" and r["precision"] == "float32"
    assert r["repeats"] == r["repeats_done"] == 2  # the CPU's budget fits both
    assert list(r["images_per_s"]) == ["stream", "step", "serial", "overlap"]
    for name, rates in r["images_per_s"].items():
        assert len(rates) == 2 and min(rates) > 0
        assert r["median_images_per_s"][name] == pytest.approx(statistics.median(rates))
    per_repeat = list(zip(*r["images_per_s"].values()))
    assert r["overlap_over_serial"] == pytest.approx(statistics.median(o / s for _, _, s, o in per_repeat))
    assert r["serial_over_parts"] == pytest.approx(statistics.median(s * (1 / a + 1 / b)
                                                                     for a, b, s, _ in per_repeat))
    assert r["stream_host_syncs_per_batch"] == 0 and r["stream_host_syncs"] == []  # the CPU's host-read counter
    md = (out / "summary.md").read_text()
    assert "Host syncs of one batch of the stream: **0** (host reads, the CPU's counter)." in md
    row = (f"| {r['median_images_per_s']['stream']:.1f} | {r['median_images_per_s']['step']:.1f} | "
           f"{r['median_images_per_s']['serial']:.1f} | {r['median_images_per_s']['overlap']:.1f} | "
           f"{r['overlap_over_serial']:.3f} |")
    assert row in md and "Medians of 2 of 2 repeats" in md


@pytest.mark.slow
def test_the_overhead_part_has_every_method_with_consistent_numbers(tiny_check):
    _, summary = tiny_check
    result = next(p for p in summary["parts"] if p["name"].startswith("overhead_eager"))["result"]
    assert result["config"]["img_size"] == 32 and result["config"]["batch_size"] == 8
    methods = result["methods"]
    assert list(methods) == ["none", "kd", "dkd", "fitnet", "ofa"]
    for r in methods.values():
        assert r["step_time_ms"] > 0 and r["images_per_s"] == pytest.approx(8 / (r["step_time_ms"] / 1000))
        assert len(r["step_times_ms"]) == 2
        assert r["step_time_ms"] == pytest.approx(statistics.median(r["step_times_ms"]))
        assert r["step_time_ms_vs_none"] == pytest.approx(r["step_time_ms"] / methods["none"]["step_time_ms"])
        assert "peak_memory_mb" in r and r["train_gflops_per_image"] > 0
    assert methods["none"]["teacher_params"] is None and methods["kd"]["teacher_params"] > 0
    assert methods["ofa"]["extra_params"] > 0 and methods["kd"]["extra_params"] == 0


@pytest.mark.slow
def test_the_cohort_part_reports_its_ratio_and_where_the_time_goes(tiny_check):
    _, summary = tiny_check
    r = next(p for p in summary["parts"] if p["name"].startswith("cohort"))["result"]
    assert (r["teacher"], r["student"], r["img_size"], r["batch_size"], r["steps"]) == ("resnet_mini", "vit_mini",
                                                                                       32, 16, 2)
    assert len(r["cohort_s"]) == len(r["separate_s"]) == r["repeats"] == r["repeats_done"] == 1
    assert r["ratio"] == pytest.approx(r["cohort_s"][0] / r["separate_s"][0])
    parts = r["parts"]
    assert parts["methods_with_teacher"] == ["kd", "dkd"]
    t, steps = parts["teacher_forward_ms"], parts["step_ms"]
    assert parts["expected_step_ratio"] == pytest.approx(  # one teacher pass instead of two
        (steps["kd"] + steps["dkd"] - t) / (steps["kd"] + steps["dkd"]))
    assert 0 < parts["expected_step_ratio"] < 1
    assert parts["teacher_over_student_none"] is None  # no 'none' among the members: nothing to compare with


@pytest.mark.slow
def test_the_resume_part_stops_mid_epoch_and_matches_two_straight_runs_on_cpu(tiny_check):
    out, summary = tiny_check
    r = next(p for p in summary["parts"] if p["name"] == "resume")["result"]
    assert (r["straight"], r["stopped"], r["resumed"]) == (["done", "done"], "interrupted", "done")
    assert r["stopped_at"] == {"epoch": 2, "step": 2}  # 3 steps an epoch, the stop after the 5th
    for key in ("resumed_vs_straight", "resumed_vs_second_straight", "straight_vs_straight"):
        c = r[key]  # CPU: bit for bit, all three ways
        assert c["metrics_equal"] is True and c["metrics_max_abs_diff"] == {}, key
        assert c["weights_equal"] is True and c["weights_tensors_differing"] == 0 and c["weights_tensors"] > 10
    assert r["verdict"] == "equal"
    md = (out / "summary.md").read_text()
    assert "- the two straight runs against each other: metrics equal; final weights equal bit for bit" in md
    assert "Verdict: **equal**" in md


def test_a_failing_part_is_recorded_with_its_error(tmp_path):
    part = gpu_check.Part("overhead_bad", "overhead", dict(device="cpu", teacher="resnet_mini",
                          student="no_such_model", methods=["none"], batch_size=2, img_size=32, warmup=0, repeats=1,
                          precision="fp32", compile=False), 60)
    record = gpu_check.run_part(part, tmp_path, timeout_s=120)
    assert record["status"] == "failed" and record["exit_code"] == 1
    assert "no_such_model" in record["error"] and "result" not in record
    assert (tmp_path / "overhead_bad.log").is_file()


def test_a_method_that_fails_is_recorded_and_the_others_measured(tmp_path, monkeypatch):
    from hkdbench.benchmark.tools import overhead

    real = overhead.measure_method

    def measure(cfg):
        if cfg.method == "kd":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(cfg)

    monkeypatch.setattr(overhead, "measure_method", measure)
    out = tmp_path / "o.json"
    with pytest.raises(RuntimeError, match="not measured: kd"):
        gpu_check.part_overhead(out, "cpu", "resnet_mini", "resnet_mini", ["none", "kd"], 2, 32, 0, 1, "fp32",
                                compile=False)
    methods = json.loads(out.read_text())["methods"]
    assert methods["kd"] == {"error": "OutOfMemoryError: CUDA out of memory (simulated)"}
    assert methods["none"]["step_time_ms"] > 0 and methods["none"]["step_time_ms_vs_none"] == 1.0
    assert methods["none"]["step_time_ms_vs_kd"] is None  # no kd to compare with


def test_a_part_past_its_budget_is_killed_and_recorded(tmp_path):
    part = gpu_check.Part("env", "env", {"device": "cpu"}, 1)
    record = gpu_check.run_part(part, tmp_path, timeout_s=0.5)  # the child is still importing torch
    assert record["status"] == "timeout" and record["seconds"] < 30
    assert record["error"].endswith("killed at its budget of 0 s")
    assert not (tmp_path / "env.json").exists()


@pytest.mark.skipif(gpu_check.overhead_compile_available(), reason="this version's setup_training compiles")
def test_compile_without_the_setting_says_so_before_measuring(tmp_path):
    with pytest.raises(RuntimeError, match="train.compile not available"):
        gpu_check.part_overhead(tmp_path / "x.json", "cpu", "resnet_mini", "vit_mini", ["none"], 2, 32, 0, 1,
                                "fp32", compile=True)
    assert not (tmp_path / "x.json").exists()


def test_the_parts_run_in_order_with_the_compiled_baselines_before_the_other_compiled_methods():
    parts = gpu_check.plan(gpu_check.FULL, "cuda", "/data", compile_parts=True)
    names = [p.name for p in parts]
    assert names == ["env", "overhead_eager_swin_tiny_resnet18", "overhead_eager_convnext_tiny_deit_tiny",
                     "stream_resnet18_deit_tiny", "cohort_swin_tiny_resnet18", "cohort_resnet_mini_vit_mini", "resume",
                     "teacher_outputs_ofa_swin_tiny", "teacher_outputs_logits_swin_tiny",
                     "overhead_compile_baselines_swin_tiny_resnet18",
                     "overhead_compile_baselines_convnext_tiny_deit_tiny",
                     "overhead_compile_methods_swin_tiny_resnet18", "overhead_compile_methods_convnext_tiny_deit_tiny"]
    methods = {p.name: p.args.get("methods") for p in parts}
    assert methods["overhead_eager_swin_tiny_resnet18"] == ["none", "kd", "dkd", "fitnet", "ofa"]
    assert methods["overhead_compile_baselines_swin_tiny_resnet18"] == ["none", "kd"]
    assert methods["overhead_compile_methods_convnext_tiny_deit_tiny"] == ["dkd", "fitnet", "ofa"]
    assert [p.args["compile"] for p in parts if p.kind == "overhead"] == [False] * 2 + [True] * 4
    assert gpu_check.BASELINES == overhead_baselines()
    assert parts[1].args["batch_size"] == 128 and parts[1].args["img_size"] == 224
    assert parts[1].args["precision"] == "bf16"
    stream = parts[3].args
    assert (stream["img_size"], stream["batch_size"], stream["steps"], stream["precision"]) == (224, 128, 8, "bf16")
    assert stream["data_root"] == "/data"
    assert parts[4].args["batch_size"] == 32 and parts[5].args["batch_size"] == 128
    ofa, logits = (p.args for p in parts[7:9])
    assert ofa["students"] == logits["students"] == ["resnet18", "mobilenetv2_100", "deit_tiny"]
    assert ofa["methods"] == ["none", "kd", "dkd", "fitnet", "ofa"] and logits["methods"] == ["kd", "dkd", "dist",
                                                                                             "ofa", "crd"]
    assert (ofa["teacher"], ofa["batch_size"], ofa["data_root"]) == ("swin_tiny", 32, "/data")
    assert "overhead_compile" not in " ".join(p.name for p in gpu_check.plan(gpu_check.FULL, None, None, False))


def overhead_baselines():
    from hkdbench.benchmark.tools.overhead import BASELINES

    return BASELINES


def test_a_part_gets_its_share_of_what_is_left():
    assert gpu_check.part_budget(300, [10, 20]) == pytest.approx(100)
    assert gpu_check.part_budget(300, [20]) == pytest.approx(300)  # the last part: all that is left
    assert gpu_check.part_budget(0, [10, 20]) == 0


def test_the_budget_a_part_leaves_passes_on_to_the_next(tmp_path, monkeypatch):
    given = []

    def instant_part(part, raw, timeout_s):  # every part ends at once: each leaves all of its budget
        given.append((part.name, timeout_s))
        return {"name": part.name, "kind": part.kind, "status": "ok", "seconds": 0.0, "budget_s": timeout_s}

    monkeypatch.setattr(gpu_check, "run_part", instant_part)
    summary = gpu_check.run_check(tmp_path, gpu_check.FULL, 400, "cpu", None, compile_parts=True, tiny=False)
    shares = [p.share_s for p in gpu_check.plan(gpu_check.FULL, "cpu", None, True)]
    planned = [r["planned_s"] for r in summary["parts"]]
    assert planned == pytest.approx([400 * s / sum(shares) for s in shares], abs=0.1)
    budgets = [b for _, b in given]
    assert budgets[0] == pytest.approx(planned[0], abs=0.1)
    for i, budget in enumerate(budgets):  # what is left (~400 s) shared among the parts still to run
        assert budget == pytest.approx(400 * shares[i] / sum(shares[i:]), rel=0.01)
    assert budgets[-1] == pytest.approx(400, rel=0.01) and all(b > p for b, p in zip(budgets[1:], planned[1:]))
    assert json.loads((tmp_path / "summary.json").read_text())["parts"][-1]["budget_s"] == budgets[-1]


def test_a_part_given_too_little_is_skipped_and_its_time_passes_on(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(gpu_check, "run_part", lambda part, raw, timeout_s: ran.append(part.name) or {
        "name": part.name, "kind": part.kind, "status": "ok", "seconds": 0.0})
    summary = gpu_check.run_check(tmp_path, gpu_check.FULL, 30, "cpu", None, compile_parts=True, tiny=False)
    statuses = [p["status"] for p in summary["parts"]]
    assert statuses[0] == "skipped" and summary["parts"][0]["error"] == "no time left in the budget"
    assert statuses[-1] == "ok" and ran[-1] == "overhead_compile_methods_convnext_tiny_deit_tiny"


def test_a_part_that_times_out_keeps_what_it_had_measured(tmp_path, monkeypatch):
    """The budget runs out (here: as soon as the part has written its first method) while the part is still
    measuring: the child is killed, and the methods it measured before are in its record."""
    def budget_ends_after_first_write(child, out, timeout_s):
        end = time.monotonic() + 300
        while time.monotonic() < end and child.poll() is None:
            if out.exists() and json.loads(out.read_text())["methods"]:
                raise subprocess.TimeoutExpired(child.args, timeout_s)
            time.sleep(0.02)
        raise AssertionError("the part ended, or wrote nothing, before its budget ran out")

    monkeypatch.setattr(gpu_check, "wait_for_part", budget_ends_after_first_write)
    methods = ["none", "kd", "dkd", "fitnet", "ofa"]
    part = gpu_check.Part("overhead_cut", "overhead", dict(device="cpu", teacher="resnet_mini", student="vit_mini",
                          methods=methods, batch_size=2, img_size=32, warmup=1, repeats=30, precision="fp32",
                          compile=False), 60)
    record = gpu_check.run_part(part, tmp_path, timeout_s=60)
    assert record["status"] == "timeout" and record["error"].endswith("killed at its budget of 60 s")
    measured = list(record["result"]["methods"])
    assert 1 <= len(measured) < len(methods) and measured == methods[:len(measured)]  # in order, the first kept
    assert record["result"]["methods"]["none"]["step_time_ms"] > 0
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # atomic writes: no temp file left


def test_the_cohort_part_measures_only_the_repeats_that_fit_and_writes_each(tmp_path, monkeypatch):
    from hkdbench.benchmark.tools import cohort_speed as cs

    written = []
    real_write = gpu_check._write_json
    monkeypatch.setattr(gpu_check, "_write_json", lambda path, body: written.append(dict(body)) or real_write(
        path, body))
    out = tmp_path / "cohort.json"
    # a deadline already passed: the first repeat and the parts are measured all the same, nothing after them
    gpu_check.part_cohort(out, "cpu", "resnet_mini", "vit_mini", ["kd", "dkd"], 8, 1, 3, None,
                          deadline=time.time())
    r = json.loads(out.read_text())
    assert (r["repeats"], r["repeats_done"], len(r["ratios"])) == (3, 1, 1) and "parts" in r and "shares" in r
    assert [w["repeats_done"] for w in written] == [1]
    assert cs.MARGIN > 1


def test_the_stream_part_writes_its_syncs_then_each_repeat_that_fits(tmp_path, monkeypatch, fmnist_available):
    written = []
    real_write = gpu_check._write_json
    monkeypatch.setattr(gpu_check, "_write_json", lambda path, body: written.append(
        (body["repeats_done"], "stream_host_syncs_per_batch" in body, "images_per_s" in body)) or real_write(
        path, body))
    out = tmp_path / "stream.json"
    # a deadline already passed: the syncs and the first repeat are measured all the same, nothing after them; one
    # step a turn (the syncs are counted on the stream's only batch, drawn a second time)
    gpu_check.part_stream(out, "cpu", "resnet_mini", "vit_mini", 16, 8, 1, 3, "fp32", None, deadline=time.time())
    assert written == [(0, True, False), (1, True, True)]
    r = json.loads(out.read_text())
    assert (r["repeats"], r["repeats_done"], r["stream_host_syncs_per_batch"]) == (3, 1, 0)
    assert all(len(rates) == 1 and rates[0] > 0 for rates in r["images_per_s"].values())
    from hkdbench.benchmark.tools import stream_speed

    with pytest.raises(TypeError, match="no option img"):
        stream_speed.options(img=16)


def test_the_stream_summary_names_the_gpus_syncs_and_a_part_cut_before_its_first_repeat():
    base = {"teacher": "resnet18", "student": "deit_tiny", "img_size": 224, "batch_size": 128, "steps": 8,
            "precision": "bfloat16", "device": "cuda", "device_name": "NVIDIA H100", "repeats": 5}
    sync = "called a synchronizing CUDA operation"
    cut = {**base, "repeats_done": 0, "stream_host_syncs_per_batch": 3, "stream_host_syncs": [sync] * 2 + ["other"]}
    md = "\n".join(gpu_check._stream_markdown([{"kind": "stream", "result": cut}]))
    assert "## Data stream: cifar-vit, kd resnet18 -> deit_tiny, 224 px, batch 128, bfloat16, NVIDIA H100" in md
    assert (f"Host syncs of one batch of the stream: **3** (torch's sync debug mode); 2 x {sync}; 1 x other."
            in md)
    assert "No repeat measured within the budget." in md and "| stream img/s |" not in md


def test_the_cohort_part_goes_on_while_a_repeat_fits(tmp_path, monkeypatch):
    from hkdbench.benchmark.tools import cohort_speed as cs

    reports = []
    result = cs.measure_pair(cs.pair_setting("resnet_mini", "vit_mini", 8), ["kd"], 1, 2, tmp_path, "cpu",
                             part_repeats=0, deadline=time.time() + 600, on_progress=lambda r: reports.append(
                                 r["repeats_done"]))
    assert reports == [1, 2] and result["repeats_done"] == 2 and len(result["cohort_s"]) == 2
    assert "parts" not in result


def test_the_teacher_outputs_part_measures_the_first_repeat_and_writes_it(tmp_path, monkeypatch):
    written = []
    real_write = gpu_check._write_json
    monkeypatch.setattr(gpu_check, "_write_json", lambda path, body: written.append(body["repeats_done"]) or real_write(
        path, body))
    out = tmp_path / "outputs.json"
    # a deadline already passed: the first repeat of the three ways is measured all the same, nothing after it
    gpu_check.part_teacher_outputs(out, "cpu", "resnet_mini", ["vit_mini", "mixer_mini"], ["kd", "dkd"], 8, 1, 3,
                                   None, deadline=time.time())
    r = json.loads(out.read_text())
    assert written == [0, 1] and (r["repeats"], r["repeats_done"]) == (3, 1) and r["warmup_s"] > 0
    assert r["teacher_passes_per_step"] == {"separate": 4, "cohorts": 2, "stored": 1}  # one crop: one stream
    assert all(len(r[f"{w}_s"]) == 1 and r[f"{w}_s"][0] > 0 for w in ("separate", "cohorts", "stored"))
    assert r["stored_over_separate"] == pytest.approx(r["stored_s"][0] / r["separate_s"][0])
    assert r["outputs_s"][0] > 0 and r["teacher_forward_ms"] > 0
    md = "\n".join(gpu_check._teacher_outputs_markdown([{"kind": "teacher_outputs", "result": r}]))
    assert "## Teacher outputs: separate runs, cohorts, stored (kd, dkd)" in md
    assert "1 of 3 repeats, cpu" in md and "| separate |" in md and "| stored |" in md
    cut = {k: v for k, v in r.items() if k in ("teacher", "students", "methods", "img_size", "batch_size")}
    md = "\n".join(gpu_check._teacher_outputs_markdown([{"kind": "teacher_outputs", "result": {
        **cut, "repeats_done": 0, "warmup_s": 12.0}}]))
    assert "no repeat measured within the budget (the warm-up, one cohort of one step, took 12.0 s)" in md


def test_the_teacher_outputs_timing_rotates_the_ways_and_reports_each_repeat(tmp_path, monkeypatch):
    from hkdbench.benchmark.tools import teacher_outputs_speed as tos

    order = []

    def instant_way(way, plans, work, device, result):  # no training: only the order and the bookkeeping
        order.append(way)
        result[way].append({"separate": 4.0, "cohorts": 2.0, "stored": 1.0}[way])
        if way == "stored":
            result["outputs_s"].append(0.5)

    monkeypatch.setattr(tos, "time_way", instant_way)
    monkeypatch.setattr(tos, "_teacher_forward_ms", lambda setting, cfg, device: 100.0)
    reports = []
    r = tos.measure("resnet_mini", ["vit_mini"], ["kd"], 2, 3, tmp_path, "cpu", 8, deadline=time.time() + 600,
                    on_progress=lambda result: reports.append(result["repeats_done"]))
    assert order[1:] == ["separate", "cohorts", "stored", "cohorts", "stored", "separate", "stored", "separate",
                         "cohorts"]  # order[0]: the untimed warm-up
    assert reports == [0, 1, 2, 3] and r["cohorts_over_separate"] == 0.5 and r["stored_over_separate"] == 0.25
    # the teacher's share: 0.1 s a pass x 2 steps x passes a step (kd: 1 each way) over the way's time
    assert r["teacher_share"] == pytest.approx({"separate": 0.05, "cohorts": 0.1, "stored": 0.2})


def test_the_logit_readers_can_all_read_stored_outputs():
    from hkdbench.methods import LOGITS, PRE_LOGITS, get_method
    from hkdbench.benchmark.tools.teacher_outputs_speed import LOGIT_READERS

    assert all(get_method(m).teacher_reads in (LOGITS, PRE_LOGITS) for m in LOGIT_READERS)
    assert get_method("fitnet").teacher_reads not in (LOGITS, PRE_LOGITS)


def _comparison(weights=0.0, metrics=None, note=None):
    c = {"metrics_equal": not (metrics or note), "metrics_max_abs_diff": metrics or {}, "weights_equal": weights == 0.0,
         "weights_tensors": 4, "weights_tensors_differing": int(weights > 0), "weights_max_abs_diff": weights}
    if note:
        c["metrics_note"] = note
    return c


def test_the_resume_verdict_tells_a_bug_from_nondeterminism():
    verdict = gpu_check.resume_verdict
    same = _comparison()
    assert verdict({"resumed_vs_straight": same})["verdict"] == "equal"
    assert verdict({"resumed_vs_straight": _comparison(1e-3)})["verdict"] == "undecided"  # no second straight run
    noisy = {"straight_vs_straight": _comparison(2e-3, {"loss/ce": 1e-4})}
    assert verdict({**noisy, "resumed_vs_straight": _comparison(3e-3, {"loss/ce": 2e-4}),
                    "resumed_vs_second_straight": _comparison(1e-3)})["verdict"] == "nondeterminism"
    far = verdict({**noisy, "resumed_vs_straight": _comparison(2e-3), "resumed_vs_second_straight":
                   _comparison(9e-3)})  # more than NOISE_FACTOR (4) times the straight runs' difference
    assert far["verdict"] == "resume_bug" and far["verdict_note"].startswith("weights: ")
    # the straight runs agree bit for bit: any difference of the resumed run is the resume's
    exact = {"straight_vs_straight": same, "resumed_vs_second_straight": _comparison(1e-7)}
    assert verdict({**exact, "resumed_vs_straight": _comparison(1e-7)})["verdict"] == "resume_bug"
    metrics = verdict({**exact, "resumed_vs_straight": _comparison(metrics={"top1": "1.0 against None"}),
                       "resumed_vs_second_straight": same})
    assert metrics["verdict"] == "resume_bug" and metrics["verdict_note"].startswith("metrics: ")
    assert verdict({**noisy, "resumed_vs_straight": _comparison(note="2 epochs against 1"),
                    "resumed_vs_second_straight": same})["verdict"] == "resume_bug"


def _fake_python(tmp_path: Path, modules, dists) -> Path:
    """A python that sees only ``modules`` (empty packages) and ``dists`` (name -> version metadata)."""
    site = tmp_path / "site"
    for name in modules:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
    for name, version in dists.items():
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    wrapper = tmp_path / "python"
    base = getattr(sys, "_base_executable", sys.executable)
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{base}" -S "$@"\n')  # -S: no site-packages
    wrapper.chmod(0o755)
    return wrapper


def _requirements(python: Path, bundle: Path):
    env = {**os.environ, "PYTHON": str(python), "GPU_BUNDLE": str(bundle)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--requirements"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_script_needs_only_torch_torchvision_numpy_and_pyyaml_and_brings_the_rest(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    for wheel in ("timm-1.0.31", "submitit-1.5.4", "cloudpickle-3.1.3", "tqdm-4.70.1", "setuptools-84.2.1"):
        (bundle / "wheels" / f"{wheel}-py3-none-any.whl").write_text("")
    # no pandas, matplotlib, seaborn, huggingface_hub, safetensors; timm of another version; tqdm of the same
    bare = _fake_python(tmp_path / "bare", ["torch", "torchvision", "numpy", "yaml", "timm", "tqdm"],
                        {"timm": "0.9.2", "tqdm": "4.70.1"})
    proc = _requirements(bare, bundle)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("to install from the bundle: timm-1.0.31-py3-none-any.whl "
                                        "submitit-1.5.4-py3-none-any.whl cloudpickle-3.1.3-py3-none-any.whl")
    no_torch = _fake_python(tmp_path / "no_torch", ["torchvision", "numpy"], {})
    proc = _requirements(no_torch, bundle)
    assert proc.returncode == 1 and "the check needs torch, yaml installed in" in proc.stderr
    (bundle / "wheels" / "timm-1.0.31-py3-none-any.whl").unlink()
    proc = _requirements(bare, bundle)
    assert proc.returncode == 1 and "has no wheel of timm: run scripts/gpu-check.sh --prepare" in proc.stderr


@pytest.mark.parametrize("sizes", [gpu_check.FULL, gpu_check.TINY], ids=["full", "tiny"])
def test_every_planned_part_fits_its_function(sizes, tmp_path):
    for part in gpu_check.plan(sizes, None, None, compile_parts=True):
        inspect.signature(gpu_check.PARTS[part.kind]).bind(tmp_path / "x.json", **part.args)


def test_compare_metrics_and_weights_name_the_differences():
    a = [{"epoch": 1, "loss/ce": 2.0, "top1": 10.0, "epoch_time_s": 3.0}]
    b = [{"epoch": 1, "loss/ce": 2.5, "top1": 10.0, "epoch_time_s": 9.0}]
    assert gpu_check.compare_metrics(a, a) == {"metrics_equal": True, "metrics_max_abs_diff": {}}
    assert gpu_check.compare_metrics(a, b) == {"metrics_equal": False, "metrics_max_abs_diff": {"loss/ce": 0.5}}
    assert gpu_check.compare_metrics(a, a + a)["metrics_equal"] is False
    c = [{"epoch": 1, "loss/ce": 2.0, "epoch_time_s": 1.0}]  # no top1 on one side
    assert gpu_check.compare_metrics(a, c)["metrics_max_abs_diff"] == {"top1": "10.0 against None"}
    w = {"a": torch.zeros(3), "b": torch.ones(2)}
    v = {"a": torch.tensor([0.0, 0.25, 0.0]), "b": torch.ones(2)}
    assert gpu_check.compare_weights(w, w)["weights_equal"] is True
    assert gpu_check.compare_weights(w, v) == {"weights_equal": False, "weights_tensors": 2,
                                               "weights_tensors_differing": 1, "weights_max_abs_diff": 0.25}


def test_pairs_and_their_settings():
    assert cohort_speed.parse_pairs(["demo", "swin_tiny -> resnet18"]) == [("resnet_mini", "vit_mini"),
                                                                          ("swin_tiny", "resnet18")]
    assert len(cohort_speed.parse_pairs(["demo-preset"])) == 6
    with pytest.raises(ValueError, match="TEACHER->STUDENT"):
        cohort_speed.parse_pairs(["swin_tiny"])
    with pytest.raises(Exception, match="no_such"):
        cohort_speed.parse_pairs(["no_such->resnet18"])
    assert cohort_speed.pair_setting("swin_tiny", "resnet18") == cohort_speed.PairSetting(
        "swin_tiny", "resnet18", 224, 8, "cifar-cnn")
    assert cohort_speed.pair_setting("convnext_tiny", "deit_tiny", 4).recipe == "cifar-vit"
    assert cohort_speed.pair_setting("resnet_mini", "vit_mini") == cohort_speed.PairSetting(
        "resnet_mini", "vit_mini", 32, 64, "demo")


def test_run_configs_are_one_short_epoch_on_the_checkpoint_teacher(tmp_path):
    setting = cohort_speed.pair_setting("resnet_mini", "vit_mini", 16)
    cfgs = cohort_speed.run_configs(setting, tmp_path / "t.pt", ["none", "kd"], steps=3)
    none, kd = cfgs
    assert none.teacher is None and kd.teacher.checkpoint == str(tmp_path / "t.pt") and kd.teacher_recipe is None
    assert kd.data.train_subset == 48 and kd.data.eval_subset == 16 and kd.train.epochs == 1
    with pytest.raises(ValueError, match="steps"):
        cohort_speed.run_configs(setting, tmp_path / "t.pt", ["kd"], steps=0)


def test_time_shares_split_each_way_into_teacher_students_and_the_rest():
    parts = {"teacher_forward_ms": 100.0, "student_step_ms": {"none": 200.0, "kd": 300.0},
             "methods_with_teacher": ["kd"]}
    timing = {"separate_s_median": 10.0, "cohort_s_median": 8.0}
    shares = cohort_speed.time_shares(parts, timing, steps=10)  # teacher 1 s, students 5 s over the 10 steps
    assert shares == pytest.approx({"separate_teacher": 0.1, "separate_student_steps": 0.5, "separate_other": 0.4,
                                    "cohort_teacher_if_shared": 1 / 8, "cohort_student_steps": 5 / 8,
                                    "cohort_other": 2 / 8})


def test_the_script_says_how_to_call_it():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: bash scripts/gpu-check.sh --prepare | --requirements" in proc.stderr


def test_cohort_speed_rejects_bad_options_before_any_work(capsys):
    assert cohort_speed.main(["--pairs", "resnet_mini"]) == 2
    assert "TEACHER->STUDENT" in capsys.readouterr().err
    assert cohort_speed.main(["--steps", "0"]) == 2
    assert "--steps and --repeats must be >= 1" in capsys.readouterr().err


def test_an_overhead_hash_follows_the_identity_rule_and_differs_with_compile():
    base = OverheadConfig(teacher="resnet_mini", student="vit_mini", method="kd", batch_size=8, method_code="v1")
    body = {"kind": "overhead", "teacher": "resnet_mini", "student": "vit_mini", "method": "kd", "batch_size": 8,
            "method_code": "v1", "pipeline": PIPELINE_VERSION}  # every field away from its default, and the code
    body = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert base.run_hash() == hashlib.sha256(body.encode()).hexdigest()[:12]
    assert OverheadConfig(teacher="resnet_mini", student="vit_mini", method="kd", batch_size=8, method_code="v1",
                          compile=True).run_hash() != base.run_hash()


@pytest.mark.skipif(not gpu_check.overhead_compile_available(), reason="this version's setup_training cannot compile")
def test_overhead_measures_a_compiled_step(monkeypatch):
    from hkdbench.benchmark.engine import step

    monkeypatch.setenv("HKDBENCH_COMPILE_BACKEND", "aot_eager")  # inductor's C++ build would take minutes here
    seen = []
    real = step.setup_training
    monkeypatch.setattr(step, "setup_training", lambda *a, **k: seen.append(k.get("compile")) or real(*a, **k))
    cfg = OverheadConfig(teacher="resnet_mini", student="resnet_mini", method="none", batch_size=2, warmup=0,
                         repeats=1, compile=True)
    assert measure_method(cfg)["step_time_ms"] > 0 and seen == [True]
