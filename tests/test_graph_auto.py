"""``--knn auto``: exact while cheap, else an IVF graph tuned to its recall target; below it warns."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from helpers import clustered_data
from knn_oracle import TIE, brute_force
from labelled import labelled, write

from aqe_retrieval import artifact
from aqe_retrieval.aqe import normalize_rows
from index_builder.cli import _parser, main
from index_builder.graph_auto import GRAPH_NPROBE_LADDER, graph_knn
from index_builder.knn import KnnSpec, sample_rows, self_knn, set_recall


def test_auto_is_exact_while_small_and_a_tuned_ivf_graph_above():
    u, _ = normalize_rows(clustered_data(5000, 32, seed=31))
    exact = graph_knn(u, 10, KnnSpec(method="auto"), 1024)
    assert exact.spec is not None and exact.spec.exact and exact.recall is None
    tuned = graph_knn(u, 10, KnnSpec(method="auto", recall_sample=500), 1024, exact_max_n=1000)
    assert tuned.spec is not None and tuned.spec.method == "IVF128,Flat"
    assert tuned.spec.nprobe in (*GRAPH_NPROBE_LADDER, 128) and tuned.recall >= 0.95
    assert [t["nprobe"] for t in tuned.tried][-1] == tuned.spec.nprobe
    assert all(t["recall"] < 0.95 for t in tuned.tried[:-1])  # the smallest that meets it
    # oracle: the whole graph against brute force, on other rows than the tuning sample
    rows = sample_rows(5000, 800, seed=77)
    truth = np.argsort(-brute_force(u)[rows], axis=1, kind="stable")[:, :10]
    assert set_recall(tuned.ids[rows], truth) >= 0.95 - 0.02


def test_the_default_list_by_list_route_finds_what_row_by_row_search_finds():
    u, _ = normalize_rows(clustered_data(3000, 32, seed=32))
    default = self_knn(u, 10, KnnSpec(method="IVF32,Flat", nprobe=4), 512)
    rows = self_knn(u, 10, KnnSpec(method="IVF32,Flat", nprobe=4, batch_lists=False), 512)
    np.testing.assert_allclose(default.sims, rows.sims, atol=TIE)
    assert default.recall == pytest.approx(rows.recall, abs=0.002)
    assert _parser().parse_args(["expand", "a", "b"]).batch_lists is None  # on where it is exact
    assert _parser().parse_args(["expand", "a", "b", "--no-batch-lists"]).batch_lists is False
    assert _parser().parse_args(["expand", "a", "b"]).knn == "auto"
    with pytest.raises(ValueError, match="IVF<nlist>,Flat"):
        self_knn(u, 10, KnnSpec(method="HNSW16", batch_lists=True), 512)


def test_a_graph_below_its_target_warns_is_recorded_and_fails_the_gate(tmp_path, caplog):
    x, lab = labelled(n_ids=150, per_id=4, noise=0.5, seed=33)
    feats, meta = write(tmp_path, x, lab)
    base = ["build", "--gallery", str(feats), "--metadata", str(meta), "--no-progress", "--qe-k", "4"]
    weak = ["--knn", "IVF16,Flat", "--nprobe", "1", "--recall-sample", "300"]
    with caplog.at_level(logging.WARNING):
        assert main([*base, "--root", str(tmp_path / "open"), *weak]) == 0
    assert "below its target 0.95" in caplog.text
    m = artifact.read_manifest(tmp_path / "open", artifact.current_version(tmp_path / "open"))
    assert m.graph_below_target and m.graph_recall_target == 0.95 and m.graph_recall < 0.95
    assert m.knn["batch_lists"] and m.knn["recall_target"] == 0.95
    # the same graph with the quality gate on: refused, nothing published
    gated = tmp_path / "gated"
    assert main([*base, "--root", str(gated), *weak, "--quality-sample", "100"]) == 4
    assert "below its target" in caplog.text and artifact.current_version(gated) is None
    # an exact graph (auto on a small gallery) meets any target
    assert main([*base, "--root", str(gated), "--quality-sample", "100"]) == 0
    m = artifact.read_manifest(gated, artifact.current_version(gated))
    assert not m.graph_below_target and m.knn["method"] == "exact" and m.knn["requested"] == "auto"
