"""Benchmark CLI end to end on tiny hand-made GT cases (both layouts) with good, weak and broken teams."""

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from fetaliqa.benchmark import (TeamCase, Violation, bootstrap, discover_ground_truth, load_team_case, main,
                                permutation_test)
from fetaliqa.metrics import score_case

F, R, C = 24, 40, 50  # 6 sweeps x 4 frames
UUIDS = ["case-a", "case-b", "case-c"]


def disk(cy, cx, r):
    yy, xx = np.mgrid[:R, :C]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def gt_volume(i):
    gt = np.zeros((F, R, C), np.uint8)
    gt[5 + i][disk(20, 25, 10) > 0] = 1      # optimal in sweep 2
    gt[6 + i][disk(20, 24, 9) > 0] = 2       # suboptimal next to it
    return gt


def write_img(arr, path, spacing=0.28):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((spacing, spacing, 1.0)[: arr.ndim])
    sitk.WriteImage(img, str(path), True)


def write_gt(root, layout):
    acs = {u: [None, 16.0 + i, None, None, None, None] for i, u in enumerate(UUIDS)}  # mm (tiny frames)
    if layout == "training":
        for i, u in enumerate(UUIDS):
            write_img(gt_volume(i), root / "masks" / "stacked_fetal_abdomen" / f"{u}.mha")
            stack = np.random.default_rng(i).integers(1, 255, (F, R, C), dtype=np.uint8)
            write_img(stack, root / "images" / "stacked_fetal_ultrasound" / f"{u}.mha")
        (root / "circumferences").mkdir(parents=True)
        with open(root / "circumferences" / "fetal_abdominal_circumferences_per_sweep.csv", "w") as fh:
            fh.write("uuid,subject_id," + ",".join(f"sweep_{k}_ac_mm" for k in range(1, 7)) + "\n")
            for u, ac in acs.items():
                fh.write(f"{u},s-{u}," + ",".join("" if a is None else str(a) for a in ac) + "\n")
    else:
        for i, u in enumerate(UUIDS):
            write_img(gt_volume(i), root / u / "fetal_abdomen_stacked_masks" / f"{u}.mha")
            (root / u / "fetal_abdominal_circumference.json").write_text(
                json.dumps({f"sweep_{k + 1}_ac_mm": a for k, a in enumerate(acs[u])}))
    return acs


def write_output(case_dir, frame, vol, seg_name="output.mha"):
    write_img(vol, case_dir / "images" / "fetal-abdomen-segmentation" / seg_name)
    (case_dir / "fetal-abdomen-frame-number.json").write_text(json.dumps(frame))


def make_teams(root):
    good, weak, broken, gc = root / "good", root / "weak", root / "broken", root / "gc"
    jobs = []
    for i, u in enumerate(UUIDS):
        gt = gt_volume(i)
        vol = np.zeros_like(gt)
        vol[5 + i] = gt[5 + i] > 0
        write_output(good / u, 5 + i, vol)
        weak_vol = np.zeros_like(gt)
        weak_vol[6 + i] = disk(22, 28, 7)
        write_output(weak / u, 6 + i, weak_vol)
        # the same weak outputs again, as a grand-challenge predictions.json with <pk>/output folders
        pk = f"job-{i}"
        write_output(gc / pk / "output", 6 + i, weak_vol, seg_name=f"{u}.mha")
        jobs.append({"pk": pk, "inputs": [{"image": {"name": f"{u}.mha"}, "interface": {
            "slug": "stacked-fetal-ultrasound", "relative_path": "images/stacked-fetal-ultrasound"}}],
            "outputs": [{"image": {"name": f"{u}.mha"}, "interface": {
                "slug": "fetal-abdomen-segmentation", "relative_path": "images/fetal-abdomen-segmentation"}},
                {"value": None, "interface": {"slug": "fetal-abdomen-frame-number",
                                              "relative_path": "fetal-abdomen-frame-number.json"}}]})
    (gc / "predictions.json").write_text(json.dumps(jobs))
    # broken team: a float frame, a 2D mask, a value 255; one good case; an extra uuid
    write_output(broken / "case-a", 64.0, np.zeros((F, R, C), np.uint8))
    write_output(broken / "case-b", 6, disk(20, 25, 10))
    vol = np.zeros((F, R, C), np.uint8)
    vol[7] = disk(20, 25, 10) * 255
    write_output(broken / "case-c", 7, vol)
    write_output(broken / "case-zzz", 1, np.zeros((F, R, C), np.uint8))
    # partial team: the good output on case-a only, nothing for the others
    vol = np.zeros((F, R, C), np.uint8)
    vol[5] = gt_volume(0)[5] > 0
    write_output(root / "partial" / "case-a", 5, vol)
    return {"good": good, "weak": weak, "gc": gc, "broken": broken, "partial": root / "partial"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    acs = write_gt(root / "gt_train", "training")
    write_gt(root / "gt_eval", "evaluator")
    teams = make_teams(root)
    args = ["--ground-truth", str(root / "gt_train"), "--out", str(root / "report"), "--bootstrap", "1000",
            "--seed", "3"] + ["--predictions"] + [f"{k}={v}" for k, v in teams.items()]
    assert main(args) == 0
    args_eval = ["--ground-truth", str(root / "gt_eval"), "--out", str(root / "report_eval"), *args[4:]]
    assert main(args_eval + ["--workers", "2"]) == 0
    return root, acs


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_per_case_rows_match_score_case(report):
    root, acs = report
    rows = read_csv(root / "report" / "per_case.csv")
    assert {r["team"] for r in rows} == {"good", "weak", "gc", "broken", "partial"}
    good = {r["case"]: r for r in rows if r["team"] == "good"}
    assert set(good) == set(UUIDS)
    for i, u in enumerate(UUIDS):
        gt = gt_volume(i)
        vol = np.zeros_like(gt)
        vol[5 + i] = gt[5 + i] > 0
        s = score_case(gt, acs[u], 5 + i, vol, frames_per_sweep=4)
        assert float(good[u]["dice"]) == pytest.approx(s.dice, abs=1e-6) == 1.0
        assert float(good[u]["wfss"]) == 1.0
        assert float(good[u]["score"]) == pytest.approx(s.score, abs=1e-6)
        assert float(good[u]["ac_ref_mm"]) == acs[u][1]
    weak = {r["case"]: r for r in rows if r["team"] == "weak"}
    gc = {r["case"]: r for r in rows if r["team"] == "gc"}
    for u in UUIDS:  # the predictions.json layout reads the same outputs
        assert float(weak[u]["wfss"]) == 0.6
        for k in ("dice", "nae_ac", "hausdorff", "score"):
            assert weak[u][k] == gc[u][k]


def test_violations_reported_with_reasons(report):
    root, _ = report
    broken = {r["case"]: r for r in read_csv(root / "report" / "per_case.csv") if r["team"] == "broken"}
    assert "64.0" in broken["case-a"]["violation"] and "integer" in broken["case-a"]["violation"]
    assert "2D" in broken["case-b"]["violation"]
    assert "values outside" in broken["case-c"]["violation"]
    assert "extra output" in broken["case-zzz"]["violation"]
    assert broken["case-a"]["dice"] == ""
    md = (root / "report" / "leaderboard.md").read_text()
    assert "broken / case-b" in md and "Contract violations" in md
    assert "not hold (not scored)\n\n- broken / case-zzz" in md


def test_load_team_case_rejects_what_the_evaluator_cannot_read(tmp_path):
    vol = np.zeros((F, R, C), np.uint8)
    write_output(tmp_path / "ok", 5, vol)
    seg = tmp_path / "ok" / "images" / "fetal-abdomen-segmentation"
    assert load_team_case(TeamCase(seg, tmp_path / "ok" / "fetal-abdomen-frame-number.json"), vol.shape)[0] == 5
    # a predictions.json job carrying the frame inline: a JSON string is not an integer
    with pytest.raises(Violation, match="is a str"):
        load_team_case(TeamCase(seg, None, "5"), vol.shape)
    assert load_team_case(TeamCase(seg, None, 5), vol.shape)[0] == 5
    # the evaluator globs *.mha and *.tiff only: a .tif (or .MHA) output is not found there
    for name in ("output.tif", "output.MHA"):
        write_output(tmp_path / name, 5, vol, seg_name=name.lower())  # SimpleITK will not write a .MHA
        seg = tmp_path / name / "images" / "fetal-abdomen-segmentation"
        (seg / name.lower()).rename(seg / name)
        with pytest.raises(Violation, match=r"only \*\.mha and \*\.tiff"):
            load_team_case(TeamCase(seg, None, 5), vol.shape)


def test_leaderboard_bootstrap_and_files(report):
    root, _ = report
    out = root / "report"
    board = read_csv(out / "leaderboard.csv")
    assert [b["team"] for b in board][0] == "good"
    assert [int(b["rank"]) for b in board] == [1, 2, 3, 4, 5]
    for b in board[:3]:
        freq = [float(x) for x in b["rank_freq"].split()]
        assert len(freq) == 3 and sum(freq) == pytest.approx(1.0, abs=1e-3)
        assert b["fails_submission"] == "False"
    # partial scores as high as good on its one case, but would fail on grand-challenge: after the valid teams
    partial = board[3]
    assert partial["team"] == "partial" and partial["fails_submission"] == "True" and partial["rank_freq"] == ""
    assert partial["n_scored"] == "1" and partial["n_violations"] == "2"
    assert float(partial["score_mean"]) > float(board[1]["score_mean"])
    assert float(partial["score_ci_low"]) == float(partial["score_mean"]) == float(partial["score_ci_high"])
    assert board[4]["team"] == "broken" and board[4]["rank_freq"] == "" and board[4]["score_ci_low"] == "nan"
    assert float(board[0]["score_ci_low"]) <= float(board[0]["score_mean"]) <= float(board[0]["score_ci_high"])
    broken = board[4]
    assert broken["n_violations"] == "3" and broken["n_extra"] == "1" and broken["n_scored"] == "0"
    m = json.loads((out / "good" / "metrics.json").read_text())
    assert set(m) == {"case", "aggregates"} and set(m["case"]) == set(UUIDS)
    assert m["aggregates"]["dice"]["mean"] == 1.0 and m["aggregates"]["wfss"]["mean"] == 1.0
    for png in ("score_distribution.png", "bland_altman.png", "wfss_outcomes.png"):
        assert (out / png).stat().st_size > 5000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bootstrap"]["resamples"] == 1000 and len(summary["permutation_tests"]) == 2
    assert summary["bootstrap"]["paired_cases"] == 3 and summary["bootstrap"]["paired_teams"] == ["good", "weak", "gc"]


def test_infinite_scores_are_explained_and_json_stays_strict(tmp_path, capsys):
    write_gt(tmp_path / "gt", "training")
    for u in UUIDS:  # frame -1 and an empty volume: scored against the empty last GT frame -> Dice +inf
        write_output(tmp_path / "none" / u, -1, np.zeros((F, R, C), np.uint8))
    assert main(["--ground-truth", str(tmp_path / "gt"), "--out", str(tmp_path / "r"), "--bootstrap", "100",
                 "--predictions", f"none={tmp_path / 'none'}"]) == 0
    assert "none                     score inf" in capsys.readouterr().out
    md = (tmp_path / "r" / "leaderboard.md").read_text()
    assert "## Infinite scores" in md and "none (3 cases)" in md

    def strict(token):
        raise AssertionError(f"non-standard JSON token {token}")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text(), parse_constant=strict)
    assert summary["leaderboard"][0]["score_mean"] == "inf" and summary["leaderboard"][0]["hausdorff_mean"] == 11160.0
    m = json.loads((tmp_path / "r" / "none" / "metrics.json").read_text(), parse_constant=strict)
    assert m["aggregates"]["dice"]["mean"] == "inf" and m["case"]["case-a"]["wfss"] == 0.0


def test_layouts_and_workers_agree(report):
    root, _ = report
    a = read_csv(root / "report" / "per_case.csv")
    b = read_csv(root / "report_eval" / "per_case.csv")
    assert a == b
    assert discover_ground_truth(root / "gt_eval").keys() == discover_ground_truth(root / "gt_train").keys()


def test_bootstrap_and_permutation_hand_cases():
    s = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    b = bootstrap(s, 1000, seed=0)
    assert b["low"][0] == b["high"][0] == 1.0
    assert b["rank_freq"][0, 0] == 1.0 and b["rank_freq"][1, 1] == 1.0
    # 5 paired differences of +1: the sign-flip null reaches |mean| = 1 with probability 2/32
    p = permutation_test(np.ones(5), np.zeros(5), 20000, seed=0)
    assert p == pytest.approx(2 / 32, abs=0.01)
    assert permutation_test(np.ones(3), np.ones(3), 1000, 0) == 1.0
    assert math.isnan(permutation_test(np.array([math.inf]), np.zeros(1), 100, 0))


def test_cli_errors(tmp_path, capsys):
    assert main(["--ground-truth", str(tmp_path), "--out", str(tmp_path / "r"), "--predictions", "x"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["--ground-truth", str(tmp_path), "--out", str(tmp_path / "r"), "--predictions", f"a={tmp_path}"]) == 2
    assert "layout" in capsys.readouterr().err
    # a GT CSV row it would misread (a decimal comma shifts the later ACs): one line naming the line
    gt = tmp_path / "gt"
    write_gt(gt, "training")
    csv_path = gt / "circumferences" / "fetal_abdominal_circumferences_per_sweep.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([lines[0], lines[1].replace(",16.0,", ",16,5,")] + lines[2:]) + "\n")
    assert main(["--ground-truth", str(gt), "--out", str(tmp_path / "r"), "--predictions", f"a={tmp_path}"]) == 2
    assert "line 2: 9 fields, the header has 8" in capsys.readouterr().err
    for bad in (["--bootstrap", "0"], ["--workers", "0"], ["--frames-per-sweep", "0"]):
        with pytest.raises(SystemExit):  # refused before any case is scored
            main(["--ground-truth", str(tmp_path), "--out", str(tmp_path / "r"), "--predictions", f"a={tmp_path}", *bad])
        assert "must be >= 1" in capsys.readouterr().err


def test_methods_run_an_exported_model(tmp_path):
    from fetaliqa.model import ModelConfig, build_model, export_model

    # one case of 6 frames (1 per sweep): a random-weights model runs once over it (~2 s/frame-pass on CPU)
    gt = tmp_path / "gt"
    write_img(gt_volume(0)[3:9], gt / "masks" / "stacked_fetal_abdomen" / "one.mha")
    write_img(np.random.default_rng(0).integers(1, 255, (6, R, C), dtype=np.uint8),
              gt / "images" / "stacked_fetal_ultrasound" / "one.mha")
    (gt / "circumferences").mkdir()
    (gt / "circumferences" / "fetal_abdominal_circumferences_per_sweep.csv").write_text(
        "uuid,subject_id,sweep_1_ac_mm,sweep_2_ac_mm,sweep_3_ac_mm,sweep_4_ac_mm,sweep_5_ac_mm,sweep_6_ac_mm\n"
        "one,s1,,,17.0,,,\n")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    # calibrated thresholds differ from the published ones: a third team uses those
    export_model(build_model(ModelConfig(backbone="fetalclip-small", decoder_width=8, pixel_threshold=0.6,
                                         area_threshold=0.2)).eval(), model_dir,
                 {"note": "random weights, benchmark test"})
    out = tmp_path / "report"
    assert main(["--ground-truth", str(gt), "--out", str(out), "--methods", str(model_dir),
                 "--bootstrap", "1000"]) == 0
    rows = read_csv(out / "per_case.csv")
    assert {r["team"] for r in rows} == {"tiny", "tiny-published", "tiny-largest-area"}
    for r in rows:
        assert r["violation"] == "" and 0 <= int(r["frame"]) < 6
    assert (out / "tiny" / "metrics.json").is_file()
