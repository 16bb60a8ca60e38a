"""Quality evaluation (raw vs AQE, blockwise metrics, the evaluate command) on labelled data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from labelled import labelled, write

from index_builder.cli import main
from index_builder.evaluation import rank_metrics
from index_builder.quality import combine, cosine_metrics


def test_blockwise_metrics_equal_one_dense_matrix():
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
    blocks = cosine_metrics(x[q], x[g], lab[q], lab[g], block_elements=7 * len(g))  # 7 queries a block
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
