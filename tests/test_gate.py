"""The build's quality gate: refusals publish nothing, passes record their figures."""

from __future__ import annotations

import numpy as np
import pytest
from labelled import labelled, write

from aqe_retrieval import artifact
from index_builder.cli import main
from index_builder.config import GateSpec
from index_builder.evaluation import ReidMetrics
from index_builder.gate import gate_check
from index_builder.quality import Labels


def metrics(mean_ap: float) -> ReidMetrics:
    return ReidMetrics(mean_ap=mean_ap, mean_inp=mean_ap, cmc=np.ones(3), num_valid=10, num_skipped=0)


def test_gate_check_names_every_threshold_missed():
    raw, better = metrics(0.5), metrics(0.6)
    record = gate_check(raw, better, None, GateSpec())
    assert record["passed"] and record["reasons"] == [] and record["map_gain"] == pytest.approx(0.1)
    assert record["raw"]["cmc"] is None and record["aqe"]["mAP"] == pytest.approx(0.6)
    assert gate_check(raw, better, None, GateSpec(min_map_gain=0.05, min_graph_recall=0.99))["passed"]
    refused = gate_check(better, raw, 0.9, GateSpec(min_map_gain=0.0, min_graph_recall=0.95))
    assert not refused["passed"] and len(refused["reasons"]) == 2
    assert "AQE changes mAP by -0.1000" in refused["reasons"][0]
    assert refused["reasons"][1] == "graph recall 0.9000 is below the required 0.9500"


def test_gate_refuses_a_build_whose_aqe_lowers_map(tmp_path, caplog):
    # 2 noisy samples per identity: averaging 10 neighbours drowns each row in other identities
    x, lab = labelled(n_ids=150, per_id=2, noise=0.8, seed=3)
    feats, meta = write(tmp_path, x, lab)
    root = tmp_path / "root"
    args = [
        "build",
        "--gallery",
        str(feats),
        "--metadata",
        str(meta),
        "--root",
        str(root),
        "--quality-sample",
        "100",
        "--qe-k",
        "10",
        "--min-map-gain",
        "0",
        "--no-progress",
    ]
    assert main(args) == 4
    assert "quality gate refused the build: AQE changes mAP by -" in caplog.text
    assert artifact.current_version(root) is None and artifact.version_ids(root) == []
    # with 3 samples per identity the same setting raises mAP: published, figures recorded
    x3, lab3 = labelled(n_ids=150, per_id=3, noise=0.8, seed=3)
    write(tmp_path, x3, lab3)
    assert main(args) == 0
    m = artifact.read_manifest(root, artifact.current_version(root))
    assert m.quality["passed"] and m.quality["map_gain"] > 0 and m.quality["queries"] == 100
    assert 0.3 < m.quality["raw"]["mAP"] < m.quality["aqe"]["mAP"]


def test_gate_on_graph_recall_and_separate_validation_queries(tmp_path, caplog):
    x, lab = labelled(n_ids=100, per_id=4, noise=0.5, seed=4)
    feats, meta = write(tmp_path, x, lab)
    vq, vlab = labelled(n_ids=100, per_id=1, noise=0.5, seed=4)  # same centres, new samples
    vfeats, vmeta = write(tmp_path, vq + 0.01, Labels(vlab.pids, vlab.camids + 9), "val")
    root = tmp_path / "root"
    base = [
        "build",
        "--gallery",
        str(feats),
        "--metadata",
        str(meta),
        "--root",
        str(root),
        "--quality-queries",
        str(vfeats),
        "--quality-labels",
        str(vmeta),
        "--no-progress",
    ]
    assert main([*base, "--knn", "IVF16,Flat", "--nprobe", "1", "--min-graph-recall", "0.99"]) == 4
    assert "graph recall" in caplog.text and artifact.current_version(root) is None
    assert main([*base, "--qe-k", "3", "--min-graph-recall", "0.99"]) == 0
    assert (
        main(
            ["build", "--gallery", str(feats), "--root", str(root), "--quality-sample", "5", "--no-progress"]
        )
        == 2
    )  # the gate needs labels: a clear error
