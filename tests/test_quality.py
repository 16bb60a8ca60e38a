"""Quality evaluation and the build's gate, on data with known structure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aqe_retrieval import artifact
from index_builder.cli import main
from index_builder.evaluation import rank_metrics
from index_builder.quality import Labels, combine, cosine_metrics


def labelled(n_ids: int = 60, per_id: int = 4, d: int = 16, noise: float = 0.6, seed: int = 0):
    """Identities seen by ``per_id`` cameras; returns features and labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, d))
    pids = np.repeat(np.arange(n_ids), per_id)
    camids = np.tile(np.arange(per_id), n_ids)
    x = centres[pids] + noise * rng.standard_normal((len(pids), d))
    return x.astype(np.float32), Labels(pids, camids)


def write(tmp_path, x, labels, name="set"):
    np.save(tmp_path / f"{name}.npy", x)
    (tmp_path / f"{name}.csv").write_text(
        "pid,camid\n" + "".join(f"{p},{c}\n" for p, c in zip(labels.pids, labels.camids, strict=True))
    )
    return tmp_path / f"{name}.npy", tmp_path / f"{name}.csv"


def test_blockwise_metrics_equal_one_dense_matrix(monkeypatch):
    import index_builder.quality as quality

    x, lab = labelled(seed=1)
    q, g = np.arange(0, len(x), 4), np.setdiff1d(np.arange(len(x)), np.arange(0, len(x), 4))
    dense = rank_metrics(
        (x[q] / np.linalg.norm(x[q], axis=1, keepdims=True))
        @ (x[g] / np.linalg.norm(x[g], axis=1, keepdims=True)).T,
        lab.pids[q],
        lab.pids[g],
        lab.camids[q],
        lab.camids[g],
    )
    monkeypatch.setattr(quality, "SIM_BLOCK_ELEMENTS", 7 * len(g))  # 7 queries a block
    blocks = cosine_metrics(x[q], x[g], lab[q], lab[g])
    assert blocks.mean_ap == pytest.approx(dense.mean_ap)
    assert blocks.mean_inp == pytest.approx(dense.mean_inp)
    np.testing.assert_allclose(blocks.cmc, dense.cmc)
    assert combine([blocks]).mean_ap == pytest.approx(blocks.mean_ap)


def test_evaluate_reports_every_method_and_writes_json_and_plots(tmp_path, capsys):
    x, lab = labelled(seed=2)
    feats, meta = write(tmp_path, x, lab)
    assert (
        main(
            [
                "evaluate",
                "--features",
                str(feats),
                "--metadata",
                str(meta),
                "--max-queries",
                "40",
                "--qe-k",
                "3",
                "--knn",
                "IVF4,Flat",
                "--nprobe",
                "1",
                "--served-k",
                "20",
                "--sweep-qe-k",
                "1,3",
                "--sweep-alpha",
                "1,3",
                "--json",
                str(tmp_path / "r.json"),
                "--plots",
                str(tmp_path / "plots"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    names = list(report["table"])
    assert names[:3] == ["raw", "aqe-transductive", "aqe-serving (exact)"]
    assert any("IVF4,Flat" in n for n in names) and any(n.startswith("served top-20") for n in names)
    assert report["queries"] == 40 and report["gallery"] == len(x) - 40
    for row in report["table"].values():
        assert 0 <= row["mAP"] <= 1 and 0 <= row["mINP"] <= 1 and 0 <= row["rank1"] <= 1
        assert row["num_valid"] + row["num_skipped"] == 40
    assert len(report["sweep"]) == 4
    # qe_k = 1 is the identity expansion: exactly the raw ranking
    q1 = [s for s in report["sweep"] if s["qe_k"] == 1]
    assert len(q1) == 2  # one per alpha: all() below must not pass on nothing
    assert all(s["mAP"] == pytest.approx(report["table"]["raw"]["mAP"]) for s in q1)
    assert "aqe-serving (exact)" in out and "sweep" in out
    assert (tmp_path / "plots" / "cmc.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "map_vs_qe_k.png").stat().st_size > 1000


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
