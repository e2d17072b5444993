"""training.probe: a frame classifier trained from scratch on a run's cache and split."""

import json

import numpy as np
import pytest

from training import probe
from training.cache import CacheWriter
from training.splits import make_split

SIZE = 64


def _write_run(tmp_path, n_cases=10, frames=40):
    """A run folder (args.json, split.json) over a cache whose annotated frames hold a bright
    disc and whose other frames a bright square of the same area, both on speckle."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    w = CacheWriter(tmp_path / "cache", n_cases * frames, SIZE, {"config": {"size": SIZE}})
    for c in range(n_cases):
        lab = np.zeros(frames, np.uint8)
        lab[rng.choice(frames, 8, replace=False)] = 2
        img = rng.integers(20, 90, (frames, SIZE, SIZE)).astype(np.uint8)
        masks = np.zeros_like(img)
        for f in range(frames):
            cy, cx = rng.integers(20, SIZE - 20, 2)
            if lab[f]:
                shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= 81
                masks[f][shape] = lab[f]
            else:
                shape = (abs(yy - cy) <= 7) & (abs(xx - cx) <= 7)
            img[f][shape] = 230
        w.add({"uuid": f"case{c}", "subject_id": f"s{c}"}, img, masks, np.zeros(frames, np.int16),
              np.arange(frames), lab)
    cache = w.close()
    run = tmp_path / "run"
    run.mkdir()
    make_split({c["uuid"]: c["subject_id"] for c in cache.cases}, 5, 0).save(run / "split.json")
    (run / "args.json").write_text(json.dumps({
        "cache": str(cache.root), "data": None, "selection": "all", "image_size": SIZE, "patch_size": 16,
        "backbone": "fetalclip-small", "decoder_width": 16, "label_policy": "any"}))
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("probe"))


def test_cnn_probe_learns_a_separable_label_and_writes_its_report(run, tmp_path, capsys):
    out = tmp_path / "cnn"
    assert probe.main(["--run", str(run), "--arch", "cnn", "--width", "8", "--steps", "60", "--batch-size", "16",
                       "--lr", "3e-3", "--threads", "2", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "probe.json").read_text())
    assert rep["steps"] == 60 and rep["validation_frames"] == 80 and rep["validation_positives"] == 16
    assert rep["auroc"] > 0.95 and rep["f1_best_cut"] > 0.8  # disc vs square of the same area: learnable
    scores = np.load(out / "val_scores.npy")
    assert scores.shape == (80,) and np.all((scores >= 0) & (scores <= 1))
    assert rep["run_model"] is None  # no calibration.json in this run folder
    assert f"AUROC {rep['auroc']:.3f}" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["vit", "vit-conv"])
def test_vit_probes_train_the_runs_geometry(run, tmp_path, arch):
    out = tmp_path / arch
    assert probe.main(["--run", str(run), "--arch", arch, "--steps", "3", "--batch-size", "8",
                       "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "probe.json").read_text())
    assert rep["steps"] == 3 and 0 <= rep["auroc"] <= 1
    net, kind = probe.build_probe(arch, json.loads((run / "args.json").read_text()), 8)
    enc = net.model.encoder
    assert kind == "raw" and all(p.requires_grad for p in net.parameters())
    assert enc.grid_size == ((SIZE // 8,) * 2 if arch == "vit-conv" else (SIZE // 16,) * 2)
    assert isinstance(enc.conv1, probe.nn.Sequential) == (arch == "vit-conv")


def test_stem_probe_is_the_conv_stem_without_its_transformer(run, tmp_path):
    from fetaliqa.model.backbone import ConvStem
    args = json.loads((run / "args.json").read_text())
    net, kind = probe.build_probe("stem", args, 8)
    assert kind == "raw" and isinstance(net.net[0], ConvStem)
    assert not any(isinstance(m, probe.nn.MultiheadAttention) for m in net.modules())
    assert net(probe.torch.full((3, 1, SIZE, SIZE), 128.0)).shape == (3,)
    out = tmp_path / "stem"
    assert probe.main(["--run", str(run), "--arch", "stem", "--steps", "120", "--batch-size", "16", "--lr", "3e-3",
                       "--threads", "2", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "probe.json").read_text())["auroc"] > 0.95  # disc vs square (1.000 on seeds 0-3)


def test_vit_probe_builds_the_runs_own_stem(run):
    from fetaliqa.model.backbone import ConvStem
    args = {**json.loads((run / "args.json").read_text()), "stem": "conv"}  # a run trained with --stem conv
    vit, _ = probe.build_probe("vit", args, 8)
    assert isinstance(vit.model.encoder.conv1, ConvStem) and vit.model.encoder.grid_size == (SIZE // 16,) * 2
    own, _ = probe.build_probe("vit-conv", args, 8)  # the probe's own 8-pixel stem replaces it
    convs = [m for m in own.model.encoder.conv1 if isinstance(m, probe.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1]  # one convolution per stage, not the run's two
    assert own.model.encoder.grid_size == (SIZE // 8,) * 2


def test_probe_reads_the_runs_calibration_and_refuses_a_folder_that_is_not_a_run(run, tmp_path):
    (run / "calibration.json").write_text(json.dumps({
        "f1": 0.22, "calibrated": {"auroc": 0.83, "auprc": 0.1}, "score_decision": {"f1": 0.35}}))
    try:
        assert probe.run_model_figures(run) == {"auroc": 0.83, "auprc": 0.1, "f1_area_cut": 0.22,
                                                "f1_quality_score_cut": 0.35}
    finally:
        (run / "calibration.json").unlink()
    with pytest.raises(SystemExit, match="an epoch holds 192 frames, fewer than the batch size 500: lower --batch-size"):
        probe.main(["--run", str(run), "--batch-size", "500", "--out", str(tmp_path / "o"), "--no-progress"])
    with pytest.raises(SystemExit, match="no args.json"):
        probe.main(["--run", str(tmp_path), "--no-progress"])
    # train.py's default cache location, the image size from the backbone when args.json has none
    assert probe.run_cache(tmp_path, {"data": "d", "backbone": "FetalCLIP", "image_size": None}) == \
        probe.Path("d/.fetaliqa_cache/published-224")
    assert probe.run_cache(tmp_path, {"data": "d", "selection": "all", "image_size": 112}) == \
        probe.Path("d/.fetaliqa_cache/all-112")
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "split.json").write_text((run / "split.json").read_text())
    (gone / "args.json").write_text(json.dumps({"data": str(tmp_path / "nowhere"), "selection": "all",
                                                "image_size": 64, "backbone": "fetalclip-small"}))
    with pytest.raises(SystemExit, match="not a frame cache.*\n.*--cache names the cache"):
        probe.main(["--run", str(gone), "--no-progress"])


def test_mask_supervision_teaches_the_stem_where_the_annotated_section_lies(run, tmp_path):
    """fit_frame_classifier(mask_weight > 0) with a MaskSupervised head: the forward returns
    (frame logits, cell logits) and the cells learn the label mask's coverage, so on annotated frames the cells under the disc
    score above the others; the probe's --mask-weight trains that way and reports both losses."""
    import torch

    from fetaliqa.model.heads import FrameHead
    from training.cache import FrameCache
    from training.frame_head import MaskSupervised, fit_frame_classifier

    cache = FrameCache(json.loads((run / "args.json").read_text())["cache"])
    labels = cache.binary_labels("any")
    rows = np.arange(len(labels))
    torch.manual_seed(0)
    head = FrameHead()
    net = MaskSupervised(head)
    x = torch.rand(2, 3, SIZE, SIZE)
    logits, feats = head.eval().forward_features(x)
    assert feats.shape == (2, 128, SIZE // 16, SIZE // 16) and torch.equal(logits, head(x))
    assert net(x)[1].shape == (2, 1, SIZE // 16, SIZE // 16)

    def forward(grey):
        return net(probe.normalize(grey))

    fit = fit_frame_classifier(net, forward, cache, rows[labels], rows[~labels], steps=150,
                               batch_size=16, lr=3e-3, weight_decay=0.01, warmup=5, neg_ratio=1.0, seed=0,
                               augment=None, mask_weight=1.0, progress=False)
    assert fit["loss_curve"][-1]["mask_loss"] < fit["loss_curve"][0]["mask_loss"]
    pos = rows[labels][:40]
    with torch.no_grad():
        pred = torch.sigmoid(forward(torch.from_numpy(np.array(cache.frames[pos])).float())[1])[:, 0]
    cover = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(np.array(cache.masks[pos]) > 0).float()[:, None],
                                                    SIZE // 16)[:, 0]
    assert pred[cover > 0.3].mean() > pred[cover == 0].mean() + 0.3

    out = tmp_path / "mask"
    assert probe.main(["--run", str(run), "--arch", "stem", "--steps", "50", "--batch-size", "16", "--mask-weight",
                       "1", "--channels-last", "--out", str(out), "--no-progress"]) == 0
    curve = json.loads((out / "probe.json").read_text())["loss_curve"]
    assert {"step", "loss", "mask_loss"} <= set(curve[0])
    for bad, says in ((["--arch", "cnn", "--mask-weight", "1"], "are for --arch stem"),
                      (["--arch", "stem", "--mask-weight", "-1"], "--mask-weight >= 0"),
                      (["--arch", "stem", "--stem-convs", "0"], "--stem-convs must be >= 1")):
        with pytest.raises(SystemExit, match=says):
            probe.main(["--run", str(run), *bad, "--no-progress"])
