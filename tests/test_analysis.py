"""The analysis layer on a synthetic run store with known numbers (no training)."""
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats as sp
from statsmodels.stats.multitest import multipletests

from hkdbench.analysis.collect import collect_epochs, collect_runs, collect_steps
from hkdbench.analysis.plots import all_plots
from hkdbench.analysis.published import lookup, published_cells
from hkdbench.analysis.report import make_report
from hkdbench.analysis.tables import comparison_tables, published_markdown, published_side_by_side
from hkdbench.benchmark.cli.main import main

FAMILY = {"resnet_mini": "cnn", "vit_mini": "vit", "mixer_mini": "mlp", "swin_tiny": "swin", "resnet18": "cnn",
          "convnext_tiny": "convnext", "resmlp_12": "mlp"}


def _staged(prefix, values, epochs, e):
    """``values`` ({(teacher stage, student stage): CKA}) at the last epoch, 0.1 lower per epoch before it."""
    return {f"{prefix}/t{i}_s{j}": v - 0.1 * (epochs - e) for (i, j), v in values.items()}


def write_run(root: Path, method, teacher, student, seed, best, *, dataset="fashion-mnist", recipe="demo",
              epochs=3, teacher_top1=80.0, conflict=True, status="done", cka=None, teacher_run=None, probes=None,
              method_cfg=None, method_settings=(), teacher_overrides=(), train_subset=0, tag="", method_code=None):
    """A run of the store; ``cka``: its own CKA values (else a 4 x 4 default), ``probes``: {teacher run: values}
    of a student alone probed against named teacher runs (``cka@<run>/linear/...``), see :func:`_staged`.
    ``method_settings``: the hyperparameters away from the method's defaults (None: a run stored before config.json
    had the key); ``tag``: a suffix of the run's name, for runs that differ in nothing the name says."""
    name = f"{method}_{teacher or 'none'}_to_{student}_{dataset}_{epochs}_s{seed}{tag}"
    d = root / name
    d.mkdir(parents=True)
    config = {"kind": "student", "method": method, "method_cfg": method_cfg or {"temperature": 4.0},
              "student": {"name": student, "checkpoint": None, "checkpoint_ema": False},
              "teacher": {"name": teacher, "checkpoint": None, "checkpoint_ema": False} if teacher else None,
              "teacher_recipe": recipe if teacher else None, "teacher_overrides": list(teacher_overrides),
              "recipe": recipe,
              "data": {"dataset": dataset, "img_size": 32, "batch_size": 128, "workers": 4,
                       "train_subset": train_subset},
              "optim": {"name": "adamw", "lr": 0.002},
              "train": {"epochs": epochs, "seed": seed, "probe_every": 1, "conflict_every": 1}}
    if probes:
        config["train"]["probe_teachers"] = list(probes)
    if method_settings is not None:
        config["method_settings"] = list(method_settings)
    if method_code is not None:
        config["method_code"] = method_code
    (d / "config.json").write_text(json.dumps(config))
    (d / "env.json").write_text(json.dumps({"torch": "2.x", "timm": "1.x", "git_sha": "abc123", "device": "cpu",
                                            "python": "3.11", "hkdbench": "0.1.0", "host": "h"}))
    metrics = []
    for e in range(1, epochs + 1):
        r = {"epoch": e, "lr": 1e-3, "loss/ce": 2.0 / e, "train_loss": 2.5 / e, "top1": best - (epochs - e),
             "top5": 99.0, "eval_loss": 1.0 / e, "epoch_time_s": 1.0, "images_per_s": 100.0}
        if teacher:
            r["loss/kd"] = 0.5 / e
            r.update(_staged("cka/linear", cka, epochs, e) if cka else
                     {f"cka/linear/t{i}_s{j}": 0.9 - 0.1 * abs(i - j) for i in range(1, 5) for j in range(1, 5)})
            if conflict:
                r.update({"conflict/cosine": 0.5 - 0.3 * e, "conflict/fraction": min(1.0, 0.3 * e),
                          "conflict/norm_ratio": 0.5 * e, "conflict/steps": 4, "conflict/block/stem": 0.1})
        for run, values in (probes or {}).items():
            r.update(_staged(f"cka@{run}/linear", values, epochs, e))
        metrics.append(r)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    steps = [{"step": s, "epoch": (s + 1) // 2, "lr": 1e-3, "loss/ce": 2.0 / s + 0.01 * seed, "images_per_s": 100.0,
              "train_loss": 2.5 / s + 0.01 * seed, **({"loss/kd": 0.5 / s} if teacher else {})}
             for s in range(1, 2 * epochs + 1)]  # every step of 2 per epoch, logged
    (d / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    if status == "failed":
        (d / "FAILED").write_text(json.dumps({"reason": "non-finite loss at epoch 2"}))
        return d
    summary = {"run": name, "hash": f"h{seed}", "kind": "student", "method": method, "teacher": teacher,
               "student": student, "teacher_family": FAMILY.get(teacher) if teacher else None,
               "student_family": FAMILY[student], "dataset": dataset, "recipe": recipe, "seed": seed,
               "epochs": epochs, "best_top1": best, "best_epoch": epochs, "last_top1": best,
               "last_top5": 99.0, "best_top5": 99.5, "teacher_top1": teacher_top1 if teacher else None,
               "student_params": 1000, "method_extra_params": 10 if method == "fitnet" else 0, "train_time_s": 3.0,
               "images_per_s": 100.0, "global_batch": 128, "device": "cpu", "teacher_run": teacher_run}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "DONE").write_text("")
    return d


def write_teacher(root: Path, name, model, *, dataset="fashion-mnist", epochs=3):
    """A finished teacher run (kind teacher: its model is the config's student) named ``name``."""
    d = root / name
    d.mkdir(parents=True)
    config = {"kind": "teacher", "method": "none", "method_cfg": {}, "recipe": "demo", "teacher": None,
              "student": {"name": model, "checkpoint": None, "checkpoint_ema": False},
              "data": {"dataset": dataset, "img_size": 32, "batch_size": 128}, "optim": {"name": "adamw"},
              "train": {"epochs": epochs, "seed": 0}}
    (d / "config.json").write_text(json.dumps(config))
    (d / "env.json").write_text(json.dumps({"device": "cpu"}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "top1": 80.0 + e}) + "\n"
                                             for e in range(1, epochs + 1)))
    (d / "summary.json").write_text(json.dumps({"run": name, "kind": "teacher", "method": "none", "student": model,
                                                "student_family": FAMILY[model], "dataset": dataset, "seed": 0,
                                                "epochs": epochs, "best_top1": 80.0 + epochs}))
    (d / "DONE").write_text("")
    return d


def write_overhead(root: Path, method, step_ms, extra):
    d = root / f"overhead_{method}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"kind": "overhead", "method": method, "teacher": "resnet_mini",
                                               "student": "vit_mini", "batch_size": 8}))
    (d / "env.json").write_text(json.dumps({"device": "cpu"}))
    summary = {"run": d.name, "kind": "overhead", "method": method, "teacher": "resnet_mini", "student": "vit_mini",
               "overhead_teacher": "resnet_mini", "batch_size": 8, "img_size": 16, "device": "cpu",
               "precision": "fp32", "step_time_ms": step_ms, "images_per_s": 8000 / step_ms,
               "peak_memory_mb": step_ms / 2, "train_gflops_per_image": step_ms / 100, "extra_params": extra,
               "student_params": 1000, "step_time_ms_vs_none": step_ms / 10.0,
               "peak_memory_mb_vs_none": step_ms / 10.0, "train_gflops_per_image_vs_none": step_ms / 10.0,
               "train_params_vs_none": (1000 + extra) / 1000}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "DONE").write_text("")


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "runs"
    # pair A: resnet_mini -> vit_mini; the student alone (teacher None) serves both pairs of vit_mini
    for seed, best in enumerate([60.0, 62.0]):
        write_run(root, "none", None, "vit_mini", seed, best)
    for seed, best in enumerate([64.0, 66.0, 68.0]):
        write_run(root, "kd", "resnet_mini", "vit_mini", seed, best)
    for seed, best in enumerate([70.0, 74.0]):
        write_run(root, "fitnet", "resnet_mini", "vit_mini", seed, best)
    # pair B: mixer_mini -> vit_mini
    for seed, best in enumerate([63.0, 65.0]):
        write_run(root, "kd", "mixer_mini", "vit_mini", seed, best, teacher_top1=85.0)
    write_run(root, "fitnet", "mixer_mini", "vit_mini", 0, 61.0, teacher_top1=85.0)
    # another setting (more epochs): its own table, never pooled with the above
    write_run(root, "kd", "resnet_mini", "vit_mini", 0, 90.0, epochs=5)
    # a failed run: in the tidy table, in no comparison
    write_run(root, "kd", "resnet_mini", "vit_mini", 7, 0.0, status="failed")
    for method, ms, extra in (("none", 10.0, 0), ("kd", 12.0, 0), ("fitnet", 15.0, 5000)):
        write_overhead(root, method, ms, extra)
    return root


def test_collect_one_row_per_run(store):
    runs = collect_runs(store)
    assert len(runs) == 2 + 3 + 2 + 2 + 1 + 1 + 1 + 3
    assert set(runs["status"]) == {"done", "failed"}
    failed = runs[runs["status"] == "failed"].iloc[0]
    assert failed["method"] == "kd" and failed["seed"] == 7 and "non-finite" in failed["failure"]
    for col in ("method", "teacher", "student", "teacher_family", "student_family", "seed", "best_top1",
                "last_top1", "best_top5", "teacher_top1", "epochs", "step_time_ms", "hash", "git_sha", "device",
                "torch", "timm", "setting", "conflict_cosine_mean"):
        assert col in runs.columns, col
    assert (runs[runs["kind"] == "overhead"]["step_time_ms"].notna()).all()
    students = runs[(runs["kind"] == "student") & (runs["status"] == "done")]
    assert students[students["epochs"] == 3]["setting"].nunique() == 1
    assert students["setting"].nunique() == 2
    epochs = collect_epochs(store, runs)
    assert len(epochs) == 10 * 3 + 1 * 5  # finished student runs only
    assert "cka/linear/t1_s1" in epochs.columns and "conflict/cosine" in epochs.columns


def test_comparison_table_numbers(store, tmp_path):
    tables = comparison_tables(collect_runs(store))
    assert len(tables) == 2
    table = next(t for t in tables if t.key["epochs"] == 3)
    assert table.methods == ["kd", "fitnet"]
    assert table.rows == [("mixer_mini", "vit_mini"), ("resnet_mini", "vit_mini")]
    a, b = ("resnet_mini", "vit_mini"), ("mixer_mini", "vit_mini")
    alone = table.student_alone["vit_mini"]
    assert alone.mean == pytest.approx(61.0) and alone.std == pytest.approx(math.sqrt(2.0)) and alone.n == 2
    kd, fitnet = table.cells[(a, "kd")], table.cells[(a, "fitnet")]
    assert (kd.mean, kd.std, kd.n) == (pytest.approx(66.0), pytest.approx(2.0), 3)
    assert (fitnet.mean, fitnet.std, fitnet.n) == (pytest.approx(72.0), pytest.approx(math.sqrt(8.0)), 2)
    # gains are paired by seed: kd's seed 2 has no student-alone run (tests/test_stats.py has the intervals)
    assert kd.gain == pytest.approx(4.0) and fitnet.gain == pytest.approx(11.0)
    fitnet_b = table.cells[(b, "fitnet")]
    assert fitnet_b.std is None and fitnet_b.gain == pytest.approx(61.0 - 60.0)  # seed 0 alone: 61 - 60
    assert table.teacher_acc[a][""].mean == 80.0 and table.teacher_acc[b][""].mean == 85.0

    md = table.to_markdown()
    for part in ("Accuracy:", "Paired difference from the student alone:", "Paired difference from KD:",
                 "Ranks across pairs:", "paired by seed only"):
        assert part in md
    tex = table.to_latex()
    assert "\\textbf" not in tex and "resnet\\_mini" in tex and tex.count("\\\\") >= 3  # no tested gain
    paths = table.write(tmp_path / "tables")
    assert [p.suffix for p in paths] == [".md", ".tex", ".csv", ".csv", ".csv"]
    assert all(p.stat().st_size for p in paths)
    frame = pd.read_csv(paths[2])
    row = frame[(frame["teacher"] == "resnet_mini") & (frame["column"] == "fitnet")].iloc[0]
    assert row["mean"] == pytest.approx(72.0) and row["vs_none"] == pytest.approx(11.0) and not row["beats_none"]
    ranks = pd.read_csv(paths[3]).set_index("method")
    assert ranks.loc["kd", "mean_rank"] == pytest.approx(1.5) and ranks.loc["kd", "wtl_vs_none"] == "0/2/0"
    test = pd.read_csv(paths[4]).iloc[0]
    assert (test["methods"], test["pairs"]) == (3, 2) and test["chi2"] == pytest.approx(2.0)
    other = next(t for t in tables if t.key["epochs"] == 5)
    assert other.student_alone == {} and other.cells[(a, "kd")].gain is None  # no 'none' run in that setting
    assert other.ranks().empty and "no ranks" in other.to_markdown()


def test_shipped_published_cells_cite_who_states_them():
    pub = published_cells()
    assert (pub["value"] > 0).all() and (pub["source"] != "").all() and (pub["quoted_by"] != "").all()
    assert not pub.duplicated(["dataset", "teacher", "student", "method", "source"]).any()
    # the cells no public source states (Mixer-B/16 rows, the DKD column, ...) are not kept
    assert "mixer_b16" not in set(pub["teacher"]) and "dkd" not in set(pub["method"])
    ofa = lookup(pub, "cifar100", "convnext_tiny", "resmlp_12", "ofa").iloc[0]
    assert ofa["value"] == pytest.approx(75.21) and "2410.12342" in ofa["source"] and "81.22" in ofa["note"]
    assert lookup(pub, "cifar100", "swin_tiny", "anything", "teacher").iloc[0]["value"] == pytest.approx(89.26)
    assert lookup(pub, "imagenet", "deit_tiny", "resnet18", "ofa").iloc[0]["value"] == pytest.approx(71.34)
    assert lookup(pub, "cifar100", "deit_tiny", "resnet18", "ofa").empty
    # OFAKD #14 and #19: a user (liguopeng0923) quotes the paper there, not its author
    for dataset, teacher, student, method in (("cifar100", "", "resnet18", "none"),
                                              ("cifar100", "convnext_tiny", "deit_tiny", "kd"),
                                              ("cifar100", "convnext_tiny", "swin_pico", "kd")):
        row = lookup(pub, dataset, teacher, student, method).iloc[0]
        assert row["quoted_by"].startswith("a user (liguopeng0923)") and "author" not in row["quoted_by"]
    # FBT's reprint (23 cells) could not be re-read: every one of its cells says so
    fbt = pub[pub["source"].str.contains("2410.12342")]
    assert len(fbt) == 23 and fbt["note"].str.contains("not re-read").all()


def test_published_numbers_side_by_side(tmp_path):
    root = tmp_path / "runs"
    for seed, (kd, dkd, alone) in enumerate([(78.0, 79.0, 74.5), (79.0, 79.5, 73.5), (80.0, 80.0, 74.0)]):
        write_run(root, "kd", "swin_tiny", "resnet18", seed, kd, dataset="cifar100", recipe="cifar-cnn")
        write_run(root, "dkd", "swin_tiny", "resnet18", seed, dkd, dataset="cifar100", recipe="cifar-cnn")
        write_run(root, "none", None, "resnet18", seed, alone, dataset="cifar100", recipe="cifar-cnn")
    table = comparison_tables(collect_runs(root))[0]
    side = published_side_by_side(table).set_index("column")
    # kd: 79.0 +- 1.0 over 3 seeds, t(0.975, 2) = 4.303: [76.52, 81.48] holds FBT's 78.74
    kd = side.loc["kd"]
    assert (kd["ours"], kd["ours_std"], kd["ours_n"]) == (pytest.approx(79.0), pytest.approx(1.0), 3)
    assert (kd["ours_low"], kd["ours_high"]) == (pytest.approx(79.0 - 4.302653 / 3 ** 0.5, abs=1e-5),
                                                 pytest.approx(79.0 + 4.302653 / 3 ** 0.5, abs=1e-5))
    assert kd["published"] == pytest.approx(78.74) and kd["delta"] == pytest.approx(79.0 - 78.74)
    assert kd["in_seed_interval"] == "inside" and "2410.12342" in kd["source"]
    # the student alone: 74.0 +- 0.5, [72.76, 75.24] holds the paper's 74.01; the teacher is one run (80.0)
    assert side.loc["none", "in_seed_interval"] == "inside"
    assert (side.loc["teacher", "ours"], side.loc["teacher", "in_seed_interval"]) == (80.0, "one seed: no interval")
    assert set(side.index) == {"teacher", "none", "kd"}  # no sourced DKD cell: not shown
    md = published_markdown(side.reset_index())
    assert "79.00 ± 1.00 [76.52, 81.48] (n=3) | 78.74 | +0.26 | inside | [" in md
    assert "as stated by a user (liguopeng0923)" in md and "<https://github.com/Hao840/OFAKD/issues/14>" in md
    assert md.count("not re-read") == 1  # one note, cited by each FBT cell
    index = make_report(root, tmp_path / "results")
    assert "Published numbers side by side" in index.read_text()
    written = pd.read_csv(next((tmp_path / "results" / "tables").glob("published_vs_ours_*.csv")))
    assert set(written["in_seed_interval"]) == {"inside", "one seed: no interval"}


def test_seed_band_says_where_the_published_value_lies():
    from hkdbench.analysis.stats import mean_interval
    from hkdbench.analysis.tables import seed_band

    acc = mean_interval([70.0, 71.0, 72.0])  # [68.52, 73.48]
    assert [seed_band(acc, v) for v in (68.0, 71.0, 74.0)] == ["below", "inside", "above"]
    assert seed_band(mean_interval([70.0]), 70.0) == "one seed: no interval"
    assert seed_band(None, 70.0) == "not run"


def test_published_note_shown_where_a_reprint_disagrees(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "ofa", "convnext_tiny", "resmlp_12", 0, 77.0, dataset="cifar100", recipe="cifar-vit")
    side = published_side_by_side(comparison_tables(collect_runs(root))[0])
    md = published_markdown(side)
    assert "| 77.00 (1 seed) | 75.21 | +1.79 | one seed: no interval | [1] (note 1) |" in md
    assert "note 1: this project used to list 81.22" in md


USER_TABLE = """dataset,teacher,student,method,value,source,quoted_by
cifar100,swin_tiny,resnet18,kd,81.50,My paper (2026) Table 3,its authors
cifar100,swin_tiny,resnet18,dkd,77.00,https://example.org/table,a blog post reprinting it
cifar100,,resnet18,none,70.25,My paper (2026) Table 3,its authors
"""


def test_report_takes_a_users_published_table(tmp_path):
    root = tmp_path / "runs"
    for seed, (kd, dkd, alone) in enumerate([(78.0, 79.0, 74.5), (79.0, 79.5, 73.5), (80.0, 80.0, 74.0)]):
        write_run(root, "kd", "swin_tiny", "resnet18", seed, kd, dataset="cifar100", recipe="cifar-cnn")
        write_run(root, "dkd", "swin_tiny", "resnet18", seed, dkd, dataset="cifar100", recipe="cifar-cnn")
        write_run(root, "none", None, "resnet18", seed, alone, dataset="cifar100", recipe="cifar-cnn")
    mine = tmp_path / "mine.csv"
    mine.write_text(USER_TABLE)
    assert main(["report", "--runs-dir", str(root), "--out", str(tmp_path / "out"), "--published", str(mine)]) == 0
    md = next((tmp_path / "out" / "tables").glob("published_vs_ours_*.md")).read_text()
    assert "| swin_tiny → resnet18 | kd | 79.00 ± 1.00 [76.52, 81.48] (n=3) | 81.50 | -2.50 | above | [1] |" in md
    assert "| dkd | 79.50 ± 0.50 [78.26, 80.74] (n=3) | 77.00 | +2.50 | below | [2] |" in md
    assert "| none | 74.00 ± 0.50 [72.76, 75.24] (n=3) | 70.25 | +3.75 | below | [1] |" in md
    assert "78.74" not in md  # the shipped cells are not there unless named
    assert main(["report", "--runs-dir", str(root), "--out", str(tmp_path / "both"), "--published", "ofa-kd",
                 "--published", str(mine)]) == 0
    both = pd.read_csv(next((tmp_path / "both" / "tables").glob("published_vs_ours_*.csv")))
    assert sorted(both.loc[both["column"] == "kd", "published"]) == [78.74, 81.5]  # one row per source


@pytest.mark.parametrize("text,message", [
    ("dataset,teacher,student,method,value,source\n", r"missing column\(s\) quoted_by; the columns are dataset"),
    ("dataset,teacher,student,method,value,source,quoted_by,year\n", r"unknown column\(s\) 'year'"),
    ("", r"is empty: its first line must name the columns"),
    ("dataset,teacher,student,method,value,source,quoted_by\n", r"holds no cells"),
    (USER_TABLE + "cifar100,swin_tiny,resnet18,ofa,8o.1,x,y\n", r"row 4, field value: '8o.1' is not a number"),
    (USER_TABLE + "cifar100,swin_tiny,resnet18,ofa,180,x,y\n", r"row 4, field value: 180 is not a top-1 in percent"),
    (USER_TABLE + "cifar100,swin_tiny,resnet18,ofa,80,,y\n", r"row 4, field source: empty; where the value"),
    (USER_TABLE + "cifar100,swin_tiny,resnet18,ofa,80,x,\n", r"row 4, field quoted_by: empty"),
    (USER_TABLE + "cifar100,,resnet18,ofa,80,x,y\n", r"row 4, field teacher: empty; method ofa needs the teacher"),
    (USER_TABLE + "cifar100,swin_tiny,resnet18,none,80,x,y\n", r"row 4, field teacher: 'swin_tiny', but method none"),
    (USER_TABLE + "cifar100,swin_tiny,,kd,80,x,y\n", r"row 4, field student: empty"),
    (USER_TABLE + "cifar100,swin_tiny,resnet18,kd,80,x\n", r"row 4: 6 fields, the header names 7"),
    (USER_TABLE + "cifar100,swin_tiny,resnet18,kd,80.0,My paper (2026) Table 3,again\n",
     r"cifar100 swin_tiny -> resnet18 kd from My paper \(2026\) Table 3 is given twice \(.*mine.csv, row 1 and "
     r".*mine.csv, row 4\)"),
])
def test_a_bad_published_table_is_refused_naming_file_row_and_field_before_any_write(tmp_path, capsys, text,
                                                                                       message):
    root = tmp_path / "runs"
    write_run(root, "kd", "swin_tiny", "resnet18", 0, 78.0, dataset="cifar100", recipe="cifar-cnn")
    mine = tmp_path / "mine.csv"
    mine.write_text(text)
    out = tmp_path / "out"
    assert main(["report", "--runs-dir", str(root), "--out", str(out), "--published", str(mine)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert f"published table {mine}" in err or "given twice" in err
    assert not out.exists()


def test_a_missing_published_table_is_named(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "kd", "swin_tiny", "resnet18", 0, 78.0, dataset="cifar100", recipe="cifar-cnn")
    assert main(["report", "--runs-dir", str(root), "--out", str(tmp_path / "out"), "--published", "nope.csv"]) == 2
    assert "published table nope.csv: no such file" in capsys.readouterr().err


def test_plots_written(store, tmp_path, monkeypatch):
    from hkdbench.analysis import plots

    drawn = {}
    save = plots._save

    def recording_save(fig, out_dir, stem):
        drawn[stem] = {"title": fig._suptitle.get_text() if fig._suptitle else "",
                       "axes": [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.get_xscale(), ax.get_yscale())
                                for ax in fig.axes]}
        return save(fig, out_dir, stem)

    monkeypatch.setattr(plots, "_save", recording_save)
    runs = collect_runs(store)
    figures = all_plots(runs, collect_epochs(store, runs), tmp_path / "figs", steps=collect_steps(store, runs))
    assert set(figures) == {f.kind for f in plots.FIGURES}
    for kind, paths in figures.items():
        if kind == "cost_flops":
            continue  # the overhead records of this store measure resnet_mini -> vit_mini: checked below
        assert {p.suffix for p in paths} == {".png", ".pdf"}, kind
        assert all(p.exists() and p.stat().st_size > 1000 for p in paths), kind
    assert len(figures["cka_epochs"]) == 2 * 3  # two pairs (setting 3 ep) + one (5 ep), PNG + PDF each
    assert len(figures["cka_change"]) == 2 * 2  # the 5-epoch setting has KD alone: nothing to take it from
    assert len(figures["cost_time"]) == len(figures["cost_flops"]) == 2  # no student alone at 5 epochs: no gains
    setting = runs[runs["epochs"] == 3]["setting"].iloc[0]
    gain = drawn[f"gain_heatmap_fashion-mnist_demo_3ep_{setting}"]
    assert "seed-paired difference" in gain["title"] and "2 seeds per cell" in gain["title"]
    assert [a[0] for a in gain["axes"][:2]] == ["kd", "fitnet"]
    ranks = drawn[f"ranks_fashion-mnist_demo_3ep_{setting}"]
    assert "bootstrap" in ranks["axes"][0][0] and "average rank over 2" in ranks["axes"][0][1]
    cost = drawn[f"cost_time_fashion-mnist_demo_3ep_{setting}"]
    # the cost is the overhead benchmark's step time, not the runs' wall time: only the measured pair, at its x
    assert [a[0] for a in cost["axes"] if a[0]] == ["resnet_mini → vit_mini"]
    assert "train step time (ms" in cost["axes"][0][1] and cost["axes"][0][3] == "log"
    assert "batch 8, 16 px, cpu" in cost["title"]
    flops = drawn[f"cost_flops_fashion-mnist_demo_3ep_{setting}"]
    assert [a[0] for a in flops["axes"] if a[0]] == ["resnet_mini → vit_mini"]  # the measured pair only
    over = drawn["overhead_resnet_mini_to_vit_mini_b8_16px_cpu"]
    assert [a[0] for a in over["axes"]] == ["train step time (ms, median)", "step time ÷ student alone (×)",
                                            "train GFLOPs / image", "peak memory (MiB)",
                                            "extra trainable params (M)"]
    change = drawn["cka_change_linear_resnet_mini_to_vit_mini_fashion-mnist_" + setting]
    assert "from kd (no student-alone run was probed against this teacher run)" in change["title"]
    conflict = drawn["conflict_resnet_mini_to_vit_mini_fashion-mnist_" + setting]
    assert conflict["axes"][2][4] == "log" and "one point per run and epoch" in conflict["title"]
    conv = drawn["convergence_resnet_mini_to_vit_mini_fashion-mnist_" + setting]
    assert [a[2] for a in conv["axes"]] == ["test top-1 (%)", "test cross-entropy (task loss)"]
    assert "3 points per line (one per evaluated epoch)" in conv["title"] and "band: lowest to highest seed" in \
        conv["title"] and "too few" not in conv["title"]
    assert "(4 probed steps an epoch: multiples of 1/4)" in conflict["axes"][1][2]
    loss = drawn["loss_curve_resnet_mini_to_vit_mini_fashion-mnist_" + setting]
    assert [a[1:3] for a in loss["axes"]] == [("step (optimiser steps done)",
                                               "training loss (the sum of the method's terms)"),
                                              ("step (optimiser steps done)", "its task term (loss/ce)")]
    assert "6 logged steps, 2-3 seeds per series" in loss["title"]


def test_report_index_and_cli(store, tmp_path):
    out = tmp_path / "results"
    assert main(["report", "--runs-dir", str(store), "--out", str(out)]) == 0
    index = (out / "README.md").read_text()
    assert (out / "runs.csv").exists() and (out / "epochs.csv").exists()
    steps = pd.read_csv(out / "steps.csv")  # every finished training run's steps.jsonl, with its identity
    assert {"run", "method_label", "setting", "seed", "step", "epoch", "train_loss", "loss/ce"} <= set(steps.columns)
    assert len(steps) == sum(2 * r.epochs for r in collect_runs(store).itertuples()
                             if r.kind in ("student", "teacher") and r.status == "done")
    assert "[steps.csv](steps.csv)" in index and "loss_curve_resnet_mini_to_vit_mini" in index
    figures = sorted((out / "figures").glob("*.png"))
    tables = sorted((out / "tables").glob("*.md"))
    assert figures and tables
    for f in figures:
        assert f"figures/{f.name}" in index and f"figures/{f.with_suffix('.pdf').name}" in index
    for t in tables:
        assert f"tables/{t.name}" in index
    assert "| 66.00 ± 2.00 [61.03, 70.97] (n=3) |" in index  # the tables are inline (kd's +4, +4: no test, not bold)
    assert "Friedman's test over 2 pairs and 3 methods" in index and "figures/cd_diagram_" in index
    # the other commands
    assert main(["collect", "--runs-dir", str(store), "--out", str(tmp_path / "c")]) == 0
    assert len(pd.read_csv(tmp_path / "c" / "runs.csv")) == 15
    assert main(["table", "--runs-dir", str(store), "--out", str(tmp_path / "t")]) == 0
    assert len(list((tmp_path / "t").glob("*.tex"))) == 2
    assert main(["plot", "--runs-dir", str(store), "--out", str(tmp_path / "p")]) == 0
    assert len(list((tmp_path / "p").glob("*.pdf"))) == len(figures)


def test_missing_store_fails_loudly(tmp_path, capsys):
    assert main(["collect", "--runs-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_provenance_hardware_command_and_wall_time(store):
    """The index says on what the runs ran, how the sweep was invoked, and its wall time: from the first
    submission to the last finish of the runs it submitted (start + training time where no finish is stored)."""
    kd_runs = sorted(p for p in store.iterdir() if p.name.startswith("kd_resnet_mini_to_vit_mini_fashion-mnist_3_"))
    for i, run in enumerate(kd_runs[:2]):
        env = json.loads((run / "env.json").read_text())
        env.update({"cpu": "Test CPU 9000", "cpu_count": 2, "cpu_threads": 1, "time": "2026-01-01T10:00:00+0000"})
        (run / "env.json").write_text(json.dumps(env))
        summary = json.loads((run / "summary.json").read_text())
        summary["finished"] = f"2026-01-01T1{i}:05:00+0000"  # 10:05 and 11:05
        (run / "summary.json").write_text(json.dumps(summary))
    sweep = store / "_sweeps" / "demo-abc"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({
        "sweep": "demo-abc", "preset": {"name": "demo", "description": "a test"},
        "invocations": [{"time": "2026-01-01T10:00:00+0000", "executor": "local",
                         "command": "hkdbench sweep demo --executor local"}]}))
    (sweep / "submissions.jsonl").write_text("".join(
        json.dumps({"run": run.name, "time": "2026-01-01T10:00:00+0000"}) + "\n" for run in kd_runs[:2]))
    index = make_report(store, store.parent / "out").read_text()
    assert "Test CPU 9000 CPU, 2 cores, 1 thread(s) per run (2 runs)" in index
    assert "CPU (model not recorded) (9 runs)" in index
    assert ("sweep `demo-abc`, preset `demo` (a test): `hkdbench sweep demo --executor local` (local, "
            "2026-01-01T10:00:00+0000). It trained 2 runs from 2026-01-01 10:00 to 11:05 UTC: wall time 1 h 05 min."
            in index)
    # without a stored finish time: estimated as start + training time (3 s here), and said so
    summary = json.loads((kd_runs[1] / "summary.json").read_text())
    del summary["finished"]
    (kd_runs[1] / "summary.json").write_text(json.dumps(summary))
    index = make_report(store, store.parent / "out").read_text()
    assert "to 10:05 UTC: wall time 5 min (some finish times estimated as start + training time)." in index


def test_gain_heatmap_one_per_setting_with_a_baseline(store, tmp_path):
    from hkdbench.analysis.plots import gain_heatmaps

    runs = collect_runs(store)
    paths = gain_heatmaps(comparison_tables(runs), tmp_path)
    # the 5-epoch setting has no student-alone run: no gains, no figure
    assert [p.name for p in paths if p.suffix == ".png"] == [f"gain_heatmap_fashion-mnist_demo_3ep_"
                                                            f"{runs[runs['epochs'] == 3]['setting'].iloc[0]}.png"]


def test_report_drops_what_the_store_no_longer_has(store, tmp_path):
    out = tmp_path / "results"
    make_report(store, out)
    stale = [out / "figures" / "gain_heatmap_old_setting.png", out / "tables" / "comparison_old.md"]
    for f in stale:
        f.write_text("from a run that was deleted")
    keep = out / "figures" / "notes.txt"
    keep.write_text("not the report's")
    make_report(store, out)
    assert not any(f.exists() for f in stale) and keep.exists()
    assert sorted((out / "figures").glob("*.png"))  # everything the store supports is drawn again
    index = (out / "README.md").read_text()
    assert ("`hkdbench overhead --teacher resnet_mini --student vit_mini --batch-size 8 --img-size 16" in index
            and "(3 methods, " in index)


def test_figures_are_byte_identical_when_redrawn(store, tmp_path):
    runs = collect_runs(store)
    epochs = collect_epochs(store, runs)
    first = {p.name: p.read_bytes() for paths in all_plots(runs, epochs, tmp_path / "a").values() for p in paths}
    second = {p.name: p.read_bytes() for paths in all_plots(runs, epochs, tmp_path / "b").values() for p in paths}
    assert any(name.endswith(".pdf") for name in first) and first == second


def test_read_sweeps_through_the_store(tmp_path):
    """Each sweep folder's manifest and submissions come back, in folder order; a folder without its sweep.json
    (a sweep being created) is left out."""
    from hkdbench.analysis.report import read_sweeps
    from hkdbench.benchmark.core.store import RunStore

    store = RunStore(tmp_path)
    for sweep_id, runs in (("b-2", ["r3"]), ("a-1", ["r1", "r2"])):
        sweep = store.sweep_dir(sweep_id)
        sweep.write_manifest({"sweep": sweep_id, "preset": {"name": "demo"}})
        for run in runs:
            sweep.record_submission({"run": run})
    (tmp_path / "_sweeps" / "c-3").mkdir()
    assert read_sweeps(tmp_path) == [
        {"sweep": "a-1", "preset": {"name": "demo"}, "submissions": [{"run": "r1"}, {"run": "r2"}]},
        {"sweep": "b-2", "preset": {"name": "demo"}, "submissions": [{"run": "r3"}]}]


# ---- CKA against the student alone: runs probed against named teacher runs ----------------------------------------
T1 = "teacher_resnet_mini_fashion-mnist_s0_111111111111"  # pair A's teacher run, in the store
T2 = "teacher_mixer_mini_fashion-mnist_s0_222222222222"  # pair B's teacher run, in the store
T5 = "teacher_mixer_mini_fashion-mnist_s0_555555555555"  # another training of mixer_mini, not in the store
# last-epoch CKA per (teacher stage, student stage), per seed 0 and 1
ALONE_T1 = [{(1, 1): 0.50, (1, 2): 0.30, (2, 1): 0.40, (2, 2): 0.60},
            {(1, 1): 0.56, (1, 2): 0.34, (2, 1): 0.40, (2, 2): 0.70}]
ALONE_T5 = [{k: 0.10 for k in ALONE_T1[0]}, {k: 0.20 for k in ALONE_T1[0]}]
KD = [{(1, 1): 0.80, (1, 2): 0.50, (2, 1): 0.40, (2, 2): 0.70},
      {(1, 1): 0.84, (1, 2): 0.30, (2, 1): 0.50, (2, 2): 0.70}]
FITNET = [{(1, 1): 0.60, (1, 2): 0.40, (2, 1): 0.70, (2, 2): 0.85},
          {(1, 1): 0.70, (1, 2): 0.40, (2, 1): 0.60, (2, 2): 0.95}]


@pytest.fixture
def probed_store(tmp_path):
    """Pair A (resnet_mini -> vit_mini, teacher run T1) and pair B (mixer_mini -> vit_mini, T2); the student alone was
    probed against T1 and against T5, a mixer_mini teacher run that pair B did not use."""
    root = tmp_path / "runs"
    write_teacher(root, T1, "resnet_mini")
    write_teacher(root, T2, "mixer_mini")
    for seed in (0, 1):
        write_run(root, "none", None, "vit_mini", seed, 60.0 + seed, probes={T1: ALONE_T1[seed], T5: ALONE_T5[seed]})
        for teacher, teacher_run in (("resnet_mini", T1), ("mixer_mini", T2)):
            write_run(root, "kd", teacher, "vit_mini", seed, 64.0 + seed, cka=KD[seed], teacher_run=teacher_run)
            write_run(root, "fitnet", teacher, "vit_mini", seed, 66.0 + seed, cka=FITNET[seed],
                      teacher_run=teacher_run)
    return root


def test_cka_long_table(probed_store):
    from hkdbench.analysis.collect import CKA_COLUMNS, collect_cka

    runs = collect_runs(probed_store)
    cka = collect_cka(probed_store, runs)
    assert list(cka.columns) == CKA_COLUMNS
    # 2 student-alone runs x 2 teacher runs + 8 distilled runs, x 3 epochs x 4 stage pairs; teacher runs: none
    assert len(cka) == (2 * 2 + 8) * 3 * 4 and set(cka["method"]) == {"none", "kd", "fitnet"}
    alone = cka[cka["method"] == "none"]
    assert set(alone["probe"]) == {"named run"} and set(alone["teacher_run"]) == {T1, T5}
    row = alone[(alone["seed"] == 1) & (alone["epoch"] == 2) & (alone["teacher_run"] == T1)
                & (alone["teacher_stage"] == 1) & (alone["student_stage"] == 1)]
    assert len(row) == 1 and row["cka"].iloc[0] == pytest.approx(0.56 - 0.1)
    assert row["teacher"].iloc[0] == "resnet_mini" and row["kernel"].iloc[0] == "linear"  # from the store
    assert set(alone[alone["teacher_run"] == T5]["teacher"]) == {"mixer_mini"}  # not in the store: from its name
    kd = cka[(cka["method"] == "kd") & (cka["teacher"] == "mixer_mini") & (cka["seed"] == 0) & (cka["epoch"] == 3)]
    assert set(kd["probe"]) == {"own teacher"} and set(kd["teacher_run"]) == {T2}
    assert dict(zip(zip(kd["teacher_stage"], kd["student_stage"]), kd["cka"])) == pytest.approx(KD[0])
    # probe_teachers does not split the setting: the probed student alone stays the distilled runs' baseline
    assert runs[runs["kind"] == "student"]["setting"].nunique() == 1 == cka["setting"].nunique()
    epochs = collect_epochs(probed_store, runs)
    assert not [c for c in epochs.columns if c.startswith("cka@")] and "cka/linear/t1_s1" in epochs.columns


def test_cka_probe_of_an_unknown_teacher_run_is_left_out_with_a_warning(tmp_path):
    from hkdbench.analysis.collect import collect_cka

    root = tmp_path / "runs"
    write_run(root, "none", None, "vit_mini", 0, 60.0, probes={"my_old_teacher": {(1, 1): 0.5}, T5: {(1, 1): 0.4}})
    with pytest.warns(UserWarning, match="my_old_teacher"):
        cka = collect_cka(root)
    assert list(cka["teacher_run"].unique()) == [T5] and len(cka) == 3


def test_cka_change_from_the_student_alone_probed_against_the_same_teacher_run(probed_store):
    from hkdbench.analysis.collect import collect_cka
    from hkdbench.analysis.plots import cka_change

    cka = collect_cka(probed_store)
    pair_a = cka[(cka["teacher"] == "resnet_mini") & (cka["method"] != "none")]
    change, ref = cka_change(pair_a, cka[(cka["method"] == "none") & (cka["teacher_run"] == T1)])
    assert ref == "none"
    got = {(r.method_label, r.teacher_stage, r.student_stage): (r.change, r.n, r.significant)
           for r in change.itertuples()}
    # last epoch, mean over the two seeds: e.g. kd (1, 1): (0.80 + 0.84) / 2 - (0.50 + 0.56) / 2 = 0.82 - 0.53;
    # kd (1, 1)'s seed-paired differences 0.30, 0.28 alone would reject (raw p 0.022), but not after Holm over the
    # figure's tested cells; fitnet (2, 2)'s 0.25, 0.25 have no spread: no test
    want = {("kd", 1, 1): 0.29, ("kd", 1, 2): 0.08, ("kd", 2, 1): 0.05, ("kd", 2, 2): 0.05, ("fitnet", 1, 1): 0.12,
            ("fitnet", 1, 2): 0.08, ("fitnet", 2, 1): 0.25, ("fitnet", 2, 2): 0.25}
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key][0] == pytest.approx(value) and got[key][1:] == (2, False), key
    p = {(r.method_label, r.teacher_stage, r.student_stage): (r.p, r.p_holm) for r in change.itertuples()}
    assert p[("kd", 1, 1)][0] == pytest.approx(sp.ttest_1samp([0.30, 0.28], 0.0).pvalue, rel=1e-6)
    assert pd.isna(p[("fitnet", 2, 2)][0]) and pd.isna(p[("fitnet", 2, 2)][1])
    tested = {k: v for k, v in p.items() if not pd.isna(v[0])}
    _, adjusted, _, _ = multipletests([raw for raw, _ in tested.values()], method="holm")
    assert [h for _, h in tested.values()] == pytest.approx(list(adjusted)) and min(adjusted) > 0.05


def test_cka_figures_take_the_student_alone_of_the_same_teacher_run(probed_store, tmp_path, monkeypatch):
    from hkdbench.analysis import plots
    from hkdbench.analysis.collect import collect_cka

    drawn = {}
    save = plots._save

    def recording_save(fig, out_dir, stem):
        drawn[stem] = {"title": fig._suptitle.get_text(),
                       "axes": [(ax.get_title(), ax.get_ylabel(), [t.get_text() for t in ax.texts],
                                 [(ln.get_linestyle(), list(ln.get_ydata())) for ln in ax.lines]) for ax in fig.axes]}
        return save(fig, out_dir, stem)

    monkeypatch.setattr(plots, "_save", recording_save)
    runs = collect_runs(probed_store)
    cka = collect_cka(probed_store, runs)
    setting = runs["setting"].dropna().iloc[0]
    plots.cka_change_heatmaps(cka, tmp_path)
    a = drawn[f"cka_change_linear_resnet_mini_to_vit_mini_fashion-mnist_{setting}"]
    assert a["title"].startswith("Change in CKA (linear, unbiased HSIC) from the student alone (none, probed "
                                 "against the same teacher run)")
    (kd_title, _, kd_text, _), (fitnet_title, _, fitnet_text, _), colorbar = a["axes"]
    assert (kd_title, fitnet_title, colorbar[1]) == ("kd (n=2)", "fitnet (n=2)", "CKA − CKA of none")
    assert kd_text == ["+0.29", "+0.08", "+0.05", "+0.05"]  # T1-S1, T1-S2, T2-S1, T2-S2: none survives Holm
    assert fitnet_text == ["+0.12", "+0.08", "+0.25", "+0.25"]
    # pair B's student alone was probed against T5, another mixer_mini run, not T2: KD is the reference
    b = drawn[f"cka_change_linear_mixer_mini_to_vit_mini_fashion-mnist_{setting}"]
    assert "from kd (no student-alone run was probed against this teacher run)" in b["title"]
    (title, _, text, _), colorbar = b["axes"]
    assert (title, colorbar[1]) == ("fitnet (n=2)", "CKA − CKA of kd")
    assert text == ["-0.17", "0.00", "+0.20", "+0.20"]  # fitnet - kd: 0.65 - 0.82, 0.40 - 0.40, 0.65 - 0.45, ...
    # one colour scale for both figures: the largest change of either (0.29 of pair A's kd)
    limits = {stem: d["title"].split("colour scale ±")[1][:4] for stem, d in drawn.items()}
    assert set(limits.values()) == {"0.29"}

    plots.cka_epoch_curves(cka, tmp_path)
    a = drawn[f"cka_epochs_linear_resnet_mini_to_vit_mini_fashion-mnist_{setting}"]
    assert "dashed with open squares, drawn on top: the student alone, probed against the same teacher run" in \
        a["title"]
    dashed = [y for _, _, _, lines in a["axes"][:1] for style, y in lines if style == "--"]
    assert dashed == [pytest.approx([0.53 - 0.2, 0.53 - 0.1, 0.53])]  # T1-S1: mean of the alone's T1 probes
    b = drawn[f"cka_epochs_linear_mixer_mini_to_vit_mini_fashion-mnist_{setting}"]
    assert "dashed" not in b["title"]
    assert not [s for _, _, _, lines in b["axes"] for s, _ in lines if s == "--"]


def test_report_writes_cka_csv(probed_store, tmp_path):
    from hkdbench.analysis.collect import CKA_COLUMNS

    out = tmp_path / "results"
    index = make_report(probed_store, out).read_text()
    cka = pd.read_csv(out / "cka.csv")
    assert list(cka.columns) == CKA_COLUMNS and len(cka) == (2 * 2 + 8) * 3 * 4
    assert set(cka[cka["method"] == "none"]["teacher_run"]) == {T1, T5}
    epochs = pd.read_csv(out / "epochs.csv")
    assert not [c for c in epochs.columns if c.startswith("cka@")] and "cka/linear/t2_s2" in epochs.columns
    assert "[cka.csv](cka.csv)" in index and "cka_change_linear_resnet_mini_to_vit_mini" in index
    assert main(["collect", "--runs-dir", str(probed_store), "--out", str(tmp_path / "c")]) == 0
    assert len(pd.read_csv(tmp_path / "c" / "cka.csv")) == len(cka)


# ---- one cell, one setting: method labels and setting titles ------------------------------------------------------
HOT = {"temperature": 2.0}  # kd away from its default temperature (the fixture's kd runs are at their defaults)


def add_hot_kd(root):
    """kd[temperature=2] on pair A (resnet_mini -> vit_mini), 3 epochs: 50 and 53 on seeds 0 and 1, against the
    student alone's 60 and 62 and the default kd's 64 and 66."""
    for seed, best in enumerate([50.0, 53.0]):
        write_run(root, "kd", "resnet_mini", "vit_mini", seed, best, method_cfg=HOT,
                  method_settings=["temperature=2"], tag="_hot")


def test_two_settings_of_kd_are_two_columns_with_their_own_values(store, tmp_path):
    add_hot_kd(store)
    runs = collect_runs(store)
    table = next(t for t in comparison_tables(runs) if t.key["epochs"] == 3)
    assert table.methods == ["kd", "kd[temperature=2]", "fitnet"]
    a = ("resnet_mini", "vit_mini")
    kd, hot = table.cells[(a, "kd")], table.cells[(a, "kd[temperature=2]")]
    assert (kd.mean, kd.n) == (pytest.approx(66.0), 3)                  # the default kd alone, as without the variant
    assert (hot.mean, hot.std, hot.n) == (pytest.approx(51.5), pytest.approx(math.sqrt(4.5)), 2)
    assert hot.gain == pytest.approx(-9.5) and hot.vs_kd.mean == pytest.approx(-13.5)  # 50 - 64, 53 - 66
    assert (("mixer_mini", "vit_mini"), "kd[temperature=2]") not in table.cells
    md = table.to_markdown()
    assert "| Teacher → Student | T | S (alone) | kd | kd[temperature=2] | fitnet |" in md
    assert "51.50 ± 2.12" in md and "in brackets what sets its runs apart" in md
    assert "kd[temperature=2]" in table.to_latex()
    frame = pd.read_csv(table.write(tmp_path / "tables")[2])
    row = frame[(frame["teacher"] == "resnet_mini") & (frame["column"] == "kd[temperature=2]")].iloc[0]
    assert (row["method"], row["mean"], row["n"]) == ("kd", pytest.approx(51.5), 2)
    assert frame[(frame["teacher"] == "resnet_mini") & (frame["column"] == "kd")]["mean"].item() == pytest.approx(66.0)
    hot = runs[runs["run"].str.endswith("_hot")]  # the label is a column of the tidy table
    assert set(hot["method_label"]) == {"kd[temperature=2]"} and set(hot["method_settings"]) == {"temperature=2"}


def test_a_plugin_method_with_two_weights_is_two_columns(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "none", None, "vit_mini", 0, 10.0)
    for weight, best in ((2, 11.75), (-1, 9.0)):
        write_run(root, "logit_mse", "resnet_mini", "vit_mini", 0, best, method_cfg={"weight": float(weight)},
                  method_settings=[f"weight={weight}"], tag=f"_w{weight}")
    runs = collect_runs(root)
    table = comparison_tables(runs)[0]
    assert table.methods == ["logit_mse[weight=-1]", "logit_mse[weight=2]"]  # after their method's order, by label
    a = ("resnet_mini", "vit_mini")
    assert table.cells[(a, "logit_mse[weight=2]")].mean == 11.75
    assert table.cells[(a, "logit_mse[weight=-1]")].mean == 9.0
    assert "| logit_mse[weight=-1] | logit_mse[weight=2] |" in table.to_markdown()
    assert "| 9.00 (1 seed) | 11.75 (1 seed) |" in table.to_markdown()
    frame = table.to_frame()
    assert dict(zip(frame["column"], frame["mean"])) == {"teacher": 80.0, "none": 10.0, "logit_mse[weight=-1]": 9.0,
                                                          "logit_mse[weight=2]": 11.75}
    # a method names all its labels, a label itself
    assert comparison_tables(runs, methods=["logit_mse"])[0].methods == table.methods
    assert comparison_tables(runs, methods=["logit_mse[weight=2]"])[0].methods == ["logit_mse[weight=2]"]


def test_runs_of_an_edited_method_are_kept_apart_by_their_code(tmp_path):
    """The same plugin settings before and after its loss was edited: two computations, two columns."""
    root = tmp_path / "runs"
    write_run(root, "none", None, "vit_mini", 0, 10.0, method_code="v1")
    for code, best in (("src-aaaaaaaaaaaa", 11.75), ("src-bbbbbbbbbbbb", 9.0)):
        write_run(root, "logit_mse", "resnet_mini", "vit_mini", 0, best, method_cfg={"weight": 2.0},
                  method_settings=["weight=2"], method_code=code, tag=f"_{code}")
    table = comparison_tables(collect_runs(root))[0]
    a = ("resnet_mini", "vit_mini")
    assert table.methods == ["logit_mse[weight=2, code=src-aaaaaaaaaaaa]", "logit_mse[weight=2, code=src-bbbbbbbbbbbb]"]
    assert table.cells[(a, "logit_mse[weight=2, code=src-aaaaaaaaaaaa]")].mean == 11.75
    assert table.cells[(a, "logit_mse[weight=2, code=src-bbbbbbbbbbbb]")].mean == 9.0


def test_a_teacher_trained_otherwise_is_its_own_column(store):
    for seed, best in enumerate([70.0, 71.0]):
        write_run(store, "kd", "resnet_mini", "vit_mini", seed, best, teacher_overrides=["train.epochs=7"],
                  teacher_top1=88.0, tag="_t7")
    table = next(t for t in comparison_tables(collect_runs(store)) if t.key["epochs"] == 3)
    assert table.methods == ["kd", "kd[teacher: train.epochs=7]", "fitnet"]
    a, b = ("resnet_mini", "vit_mini"), ("mixer_mini", "vit_mini")
    assert table.cells[(a, "kd[teacher: train.epochs=7]")].mean == pytest.approx(70.5)
    assert table.cells[(a, "kd")].mean == pytest.approx(66.0)
    # the teachers' accuracies apart too: the one the pair's other runs had, and the one trained for 7 epochs
    assert table.teacher_text(a) == "80.00; train.epochs=7: 88.00" and table.teacher_text(b) == "85.00"
    frame = table.to_frame()
    teachers = frame[(frame["teacher"] == "resnet_mini") & frame["method"].isna()]
    assert dict(zip(teachers["column"], teachers["mean"])) == {"teacher": 80.0, "teacher[train.epochs=7]": 88.0}


def test_runs_stored_before_method_settings(tmp_path):
    """No method_settings in config.json: labelled by the method, and where another run of that label has other
    hyperparameters, by the ones that differ: never pooled."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, "kd", "resnet_mini", "vit_mini", seed, 64.0, method_settings=None)
    assert set(collect_runs(root)["method_label"]) == {"kd"}
    write_run(root, "kd", "resnet_mini", "vit_mini", 0, 50.0, method_settings=None, method_cfg=HOT, tag="_hot")
    runs = collect_runs(root)
    assert sorted(runs["method_label"]) == ["kd[temperature=2]", "kd[temperature=4]", "kd[temperature=4]"]
    assert runs["method_settings"].isna().all()
    table = comparison_tables(runs)[0]
    assert table.cells[(("resnet_mini", "vit_mini"), "kd[temperature=2]")].mean == 50.0


def test_figures_draw_each_setting_apart(store, tmp_path, monkeypatch):
    from hkdbench.analysis import plots

    drawn = {}
    save = plots._save

    def recording_save(fig, out_dir, stem):
        drawn[stem] = {"title": fig._suptitle.get_text(), "panels": [ax.get_title() for ax in fig.axes],
                       "texts": {ax.get_title(): [t.get_text() for t in ax.texts] for ax in fig.axes},
                       "legend": [t.get_text() for legend in fig.legends for t in legend.get_texts()],
                       "lines": [list(ln.get_ydata()) for ln in fig.axes[0].lines]}
        return save(fig, out_dir, stem)

    monkeypatch.setattr(plots, "_save", recording_save)
    add_hot_kd(store)
    runs = collect_runs(store)
    setting = runs[runs["epochs"] == 3]["setting"].iloc[0]
    plots.gain_heatmaps(comparison_tables(runs), tmp_path)
    gain = drawn[f"gain_heatmap_fashion-mnist_demo_3ep_{setting}"]
    assert gain["panels"][:3] == ["kd", "kd[temperature=2]", "fitnet"]
    # rows mixer_mini, resnet_mini: no variant run for mixer_mini; -9.5 for resnet_mini (the default kd: +4.0)
    assert [t.split("\n")[0] for t in gain["texts"]["kd[temperature=2]"]] == ["no run", "-9.5"]
    assert gain["texts"]["kd"][1].startswith("+4.0")
    plots.convergence_curves(collect_epochs(store, runs), tmp_path)
    conv = drawn[f"convergence_resnet_mini_to_vit_mini_fashion-mnist_{setting}"]
    assert conv["legend"] == ["none (alone)", "kd", "kd[temperature=2]", "fitnet"]
    # top-1 over 3 epochs, mean over seeds (best - (3 - epoch)): kd 66, kd[temperature=2] 51.5, never their mean
    assert [64.0, 65.0, 66.0] in conv["lines"] and [49.5, 50.5, 51.5] in conv["lines"]


def test_a_table_title_names_the_differing_data_field_not_a_hash(store):
    titles = sorted(t.title for t in comparison_tables(collect_runs(store)))
    # one setting per (dataset, recipe, epochs): nothing else to say
    assert titles == ["fashion-mnist, recipe demo, 3 epochs", "fashion-mnist, recipe demo, 5 epochs"]
    for seed, best in enumerate([55.0, 57.0]):
        write_run(store, "none", None, "vit_mini", seed, best, train_subset=256, tag="_sub")
        write_run(store, "kd", "resnet_mini", "vit_mini", seed, best + 3, train_subset=256, tag="_sub")
    runs = collect_runs(store)
    tables = comparison_tables(runs)
    assert sorted(t.title for t in tables) == ["fashion-mnist, recipe demo, 3 epochs; data.train_subset=0",
                                               "fashion-mnist, recipe demo, 3 epochs; data.train_subset=256",
                                               "fashion-mnist, recipe demo, 5 epochs; data.train_subset=0"]
    assert not any(s in t.title for t in tables for s in runs["setting"].dropna())
    small = next(t for t in tables if t.setting_label == "data.train_subset=256")
    assert small.student_alone["vit_mini"].mean == 56.0 and small.cells[(("resnet_mini", "vit_mini"), "kd")].gain == 3
    assert "**fashion-mnist, recipe demo, 3 epochs; data.train_subset=256**" in small.to_markdown()
    assert set(small.to_frame()["setting_label"]) == {"data.train_subset=256"}


def _text_boxes(fig):
    """(owner, extent) of the figure's suptitle and each visible panel's title, x label and x tick labels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [("suptitle", fig._suptitle.get_window_extent(renderer))] if fig._suptitle else []
    for i, ax in enumerate(fig.axes):
        if not ax.axison:
            continue
        texts = [ax.title, ax.xaxis.label, *ax.get_xticklabels()]
        boxes += [(f"panel {i}", t.get_window_extent(renderer)) for t in texts if t.get_text()]
    return boxes


@pytest.mark.parametrize("methods", [1, 5])
def test_a_gain_heatmap_with_one_teacher_row_has_no_overlapping_text(tmp_path, monkeypatch, methods):
    """One teacher makes panels one cell tall: with two rows of panels the first row's student labels ran into the
    second row's titles."""
    import itertools

    from hkdbench.analysis import plots

    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, "none", None, "vit_mini", seed, 60.0 + seed)
        for m in ["kd", "fitnet", "dkd", "ofa", "rkd"][:methods]:
            write_run(root, m, "resnet_mini", "vit_mini", seed, 62.0 + seed)
    clashes = []
    save = plots._save

    def checking_save(fig, out_dir, stem):
        clashes.extend((a, b) for (a, x), (b, y) in itertools.combinations(_text_boxes(fig), 2)
                       if a != b and x.overlaps(y))
        return save(fig, out_dir, stem)

    monkeypatch.setattr(plots, "_save", checking_save)
    assert len(plots.gain_heatmaps(comparison_tables(collect_runs(root)), tmp_path / "figures")) == 2
    assert clashes == []
