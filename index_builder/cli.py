"""``index-builder``: expand features, build and publish indexes, manage versions.

Exit status: 0 success, 2 bad input or arguments (nothing written or published), 1 any other
failure (nothing published), 3 another build, nightly or rollback holds the root's lock (nothing
changed), 4 the quality gate refused the build (nothing published).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from aqe_retrieval import artifact
from aqe_retrieval.errors import EXIT_BAD_INPUT, AqeError, ArtifactError, InputError, exit_code
from aqe_retrieval.incremental import Outcome
from aqe_retrieval.manifest import LEVEL_DTYPES
from index_builder import incremental, nightly
from index_builder.budget import bound_malloc, detect_budget, parse_size, plan_build
from index_builder.build import build, workload
from index_builder.cluster import ClusterSpec
from index_builder.config import (
    AUTO,
    AUTO_EXACT_MAX_N,
    EXPANSION_INDEXES,
    SERVING_KINDS,
    SERVING_RECALL_TARGET,
    BuildConfig,
    GateSpec,
    QualitySpec,
    ServingSpec,
)
from index_builder.expansion import DEFAULT_BLOCK_SIZE, AqeParams, expand_source
from index_builder.graph_auto import GRAPH_EXACT_MAX_N
from index_builder.inputs import ParquetColumns, open_embeddings, read_metadata
from index_builder.knn import EXACT_KERNELS, GRAPH_RECALL_TARGET, SYMMETRIC_MIN_N, KnnSpec
from index_builder.storage import ArrayStore
from index_builder.urls import location

logger = logging.getLogger("index_builder")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(SERVING_KINDS))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kinds {unknown}; choose among {','.join(SERVING_KINDS)}")
    return kinds


def _cluster(text: str) -> ClusterSpec:
    try:
        return ClusterSpec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_aqe_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("query expansion")
    g.add_argument(
        "--qe-k",
        type=_positive_int,
        default=10,
        help="neighbours averaged per row, the row itself included (default 10)",
    )
    g.add_argument("--alpha", type=float, default=3.0, help="weight exponent (default 3.0)")
    g.add_argument("--qe-times", type=_positive_int, default=1, help="expansion rounds (default 1)")
    g = p.add_argument_group("kNN graph")
    g.add_argument(
        "--knn",
        default=AUTO,
        help=f"'auto' (default: exact up to {GRAPH_EXACT_MAX_N} rows, else an IVF graph with nprobe "
        "tuned to --graph-recall-target), 'exact', or a FAISS factory string, e.g. 'IVF4096,Flat'",
    )
    g.add_argument(
        "--graph-recall-target",
        type=float,
        default=GRAPH_RECALL_TARGET,
        help="graph recall (top-qe_k sets vs exact kNN on --recall-sample rows) --knn auto tunes "
        "for; any graph below it is a warning, and a refusal with the quality gate on "
        f"(default {GRAPH_RECALL_TARGET})",
    )
    g.add_argument("--nprobe", type=_positive_int, help="IVF lists probed per search")
    g.add_argument("--ef-search", type=_positive_int, help="HNSW efSearch")
    g.add_argument(
        "--train-size",
        type=_positive_int,
        help="rows sampled to train an approximate index (default: 50 x nlist)",
    )
    g.add_argument(
        "--recall-sample",
        type=_positive_int,
        default=1000,
        help="rows whose approximate neighbour sets are checked against exact kNN",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of every sample (default 0)")
    g.add_argument(
        "--exact-kernel",
        choices=EXACT_KERNELS,
        default="auto",
        help="exact kNN: 'symmetric' (one GEMM per tile pair, both sides' top-k), "
        f"'faiss' (faiss.knn per block), 'auto' (symmetric from {SYMMETRIC_MIN_N} rows)",
    )
    g.add_argument(
        "--batch-lists",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with an 'IVF<nlist>,Flat' graph: search list by list, one GEMM per inverted list "
        "(same neighbours as row-by-row search at the same --nprobe, faster; the default for "
        "such graphs); --no-batch-lists searches row by row",
    )
    g = p.add_argument_group("resources")
    g.add_argument(
        "--block-size",
        type=_positive_int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"rows per block; memory grows with it (default {DEFAULT_BLOCK_SIZE})",
    )
    g.add_argument("--threads", type=_positive_int, help="FAISS/OpenMP threads (default: all cores)")
    g.add_argument(
        "--memory-budget",
        type=_size,
        help="memory the job may use, e.g. 512MiB or 4GiB (default: the container's limit or the "
        "machine's available memory); arrays that do not fit are memory-mapped files",
    )
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")


def _add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gallery",
        type=location,
        required=True,
        help=".npy or Parquet file, or a directory of either's shards; a path or an fsspec URL "
        "(s3://bucket/prefix, file:///..., any protocol whose package is installed)",
    )
    p.add_argument("--ids", type=Path, help="external ids, one per line (default: row numbers)")
    p.add_argument("--metadata", type=Path, help="CSV with a header, one row per embedding")
    _add_parquet_options(p)
    p.add_argument("--root", type=Path, required=True, help="index root to publish into")
    p.add_argument(
        "--cluster",
        type=_cluster,
        help="run the heavy phases on a Dask cluster: a scheduler address (tcp://HOST:8786) or "
        "local:N (N single-threaded worker processes here); needs the 'distributed' extra",
    )
    p.add_argument(
        "--serving-index",
        default=AUTO,
        help="'auto' (default: exact up to "
        f"{AUTO_EXACT_MAX_N} rows, else the fastest of --serving-candidates whose recall@10 "
        "on held-out, online-expanded queries meets --serving-recall-target within "
        "--serving-memory-budget-gib), 'exact' (flat search at any size) or a FAISS factory "
        "string for the served index",
    )
    p.add_argument(
        "--serving-candidates",
        type=_kinds,
        default=SERVING_KINDS,
        help=f"--serving-index auto: comma-separated kinds to try (default {','.join(SERVING_KINDS)})",
    )
    p.add_argument("--serving-nprobe", type=_positive_int, help="nprobe of the served index")
    p.add_argument("--serving-ef-search", type=_positive_int, help="efSearch of the served index")
    p.add_argument(
        "--serving-memory-budget-gib",
        type=float,
        default=4.0,
        help="--serving-index auto: the served index's size limit (default 4)",
    )
    p.add_argument(
        "--serving-recall-target",
        type=float,
        default=SERVING_RECALL_TARGET,
        help="--serving-index auto: the recall@10 the chosen index must reach "
        f"(default {SERVING_RECALL_TARGET})",
    )
    p.add_argument(
        "--expansion-index",
        choices=EXPANSION_INDEXES,
        default="auto",
        help="what online expansion searches after an exact graph: 'auto' (default: "
        "exact when small, else the index --serving-index auto would build, nprobe "
        "tuned for the top qe_k - 1) or 'exact' (scan every row per query)",
    )
    p.add_argument(
        "--level-dtype",
        choices=LEVEL_DTYPES,
        default="float32",
        help="dtype of the stored levels online expansion reads (float16: half the disk and page "
        "cache; the build itself computes in float32)",
    )
    p.add_argument("--keep", type=_positive_int, default=3, help="versions kept (default 3)")
    p.add_argument(
        "--no-changes",
        action="store_true",
        help="ignore the root's change log (logged add/delete) for this run; see 'changes'",
    )
    _add_aqe_options(p)
    _add_quality_options(p)


def _add_parquet_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Parquet input", "which columns of a Parquet gallery hold what")
    g.add_argument(
        "--embedding-column", help="list of float32/float16 (default: the only list column, else 'embedding')"
    )
    g.add_argument("--id-column", help="string or integer ids (default: 'id' if present; '' for none)")
    g.add_argument(
        "--metadata-columns",
        type=lambda text: tuple(c.strip() for c in text.split(",") if c.strip()),
        help="comma-separated (default: every other int, float or string column; '' for none)",
    )


def _add_quality_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "quality gate",
        "measure mAP with and without expansion before publishing; refuse to "
        "publish (exit 4) below a threshold. Needs --metadata with pid and camid columns.",
    )
    g.add_argument(
        "--quality-sample", type=_positive_int, help="use this many gallery rows as labelled queries"
    )
    g.add_argument("--quality-queries", type=Path, help="labelled validation queries (.npy)")
    g.add_argument("--quality-labels", type=Path, help="CSV with pid,camid per validation query")
    g.add_argument("--pid-column", default="pid", help="metadata column of the identity")
    g.add_argument("--camid-column", default="camid", help="metadata column of the camera")
    g.add_argument(
        "--min-map-gain",
        type=float,
        help="refuse unless AQE mAP - raw mAP >= this (0: AQE must not lower mAP)",
    )
    g.add_argument(
        "--min-graph-recall", type=float, help="refuse unless the kNN graph recall is at least this"
    )


def _quality_spec(args: argparse.Namespace) -> QualitySpec | None:
    gate = GateSpec(min_map_gain=args.min_map_gain, min_graph_recall=args.min_graph_recall)
    wanted = (
        args.quality_sample
        or args.quality_queries
        or gate.min_map_gain is not None
        or gate.min_graph_recall is not None
    )
    if not wanted:
        return None
    return QualitySpec(
        gate=gate,
        queries=args.quality_queries,
        query_labels=args.quality_labels,
        sample=args.quality_sample or 500,
        pid_column=args.pid_column,
        camid_column=args.camid_column,
        seed=args.seed,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="index-builder", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("expand", help="write AQE-expanded features (drop-in for fast-reid's aqe)")
    p.add_argument("input", type=Path, help="gallery: .npy or Parquet file, or shard directory")
    p.add_argument("output", type=Path, help="expanded gallery, float32 .npy")
    p.add_argument("--queries", type=Path, help="queries .npy: transductive mode")
    p.add_argument("--queries-out", type=Path, help="expanded queries, float32 .npy")
    _add_aqe_options(p)

    p = sub.add_parser("build", help="expand a gallery, index it and publish a version")
    _add_build_options(p)
    p = sub.add_parser(
        "nightly",
        help="the scheduled build: locked, records its outcome",
        description="A build that holds the root's lock (a concurrent run exits 3 "
        "and changes nothing) and records its outcome in the nightly status file.",
    )
    _add_build_options(p)

    p = sub.add_parser(
        "evaluate",
        help="re-ID quality (mAP, CMC, mINP): raw vs AQE, both modes, "
        "exact vs approximate, the served path; a qe_k x alpha sweep",
    )
    p.add_argument("--features", type=Path, required=True, help="labelled features (.npy)")
    p.add_argument("--metadata", type=Path, required=True, help="CSV with pid and camid columns")
    p.add_argument("--pid-column", default="pid")
    p.add_argument("--camid-column", default="camid")
    p.add_argument("--query-where", help="COLUMN=VALUE selecting query rows (default camid=0)")
    p.add_argument("--query-rows", type=Path, help="file of query row numbers instead")
    p.add_argument(
        "--max-queries",
        type=_positive_int,
        default=1000,
        help="seeded sample of the selected rows (default 1000)",
    )
    p.add_argument("--served-k", type=_positive_int, default=100, help="K of the served mAP@K")
    p.add_argument("--serving-index", default="exact")
    p.add_argument("--serving-nprobe", type=_positive_int)
    p.add_argument("--sweep-qe-k", default="1,2,3,5,10,20", help="qe_k values of the sweep ('' to skip)")
    p.add_argument("--sweep-alpha", default="1,3,5", help="alpha values of the sweep")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plots", type=Path, help="write cmc.png and map_vs_qe_k.png here")
    _add_aqe_options(p)

    p = sub.add_parser("add", help="publish a version with new gallery rows added (exact, in seconds)")
    p.add_argument("--root", type=Path, required=True, help="index root (its current version)")
    p.add_argument("--gallery", type=Path, required=True, help="the new rows: any input build reads")
    p.add_argument("--ids", type=Path, help="their ids, one per line")
    p.add_argument("--metadata", type=Path, help="their metadata (CSV, the version's columns)")
    p.add_argument("--keep", type=_positive_int, default=3, help="versions kept (default 3)")
    _add_parquet_options(p)
    p = sub.add_parser("delete", help="publish a version without the given gallery ids")
    p.add_argument("--root", type=Path, required=True, help="index root (its current version)")
    p.add_argument("--ids", type=Path, required=True, help="ids to delete, one per line")
    p.add_argument("--keep", type=_positive_int, default=3, help="versions kept (default 3)")

    p = sub.add_parser(
        "changes",
        help="the change log of add/delete that build and nightly fold into --gallery",
        description="'list' shows the logged changes; 'clear --through N' drops records up to "
        "N once the upstream gallery holds them (the next build would refuse a re-added id).",
    )
    p.add_argument("action", choices=["list", "clear"])
    p.add_argument("root", type=Path)
    p.add_argument("--through", type=int, help="clear: the last order number to drop")
    p = sub.add_parser("list", help="list published versions")
    p.add_argument("root", type=Path)
    p = sub.add_parser("verify", help="recompute a version's checksums (default: current)")
    p.add_argument("root", type=Path)
    p.add_argument("version", nargs="?")
    p = sub.add_parser("rollback", help="make an older version current (default: the previous)")
    p.add_argument("root", type=Path)
    p.add_argument("version", nargs="?")
    return parser


def _knn_spec(args: argparse.Namespace) -> KnnSpec:
    return KnnSpec(
        method=args.knn,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        train_size=args.train_size,
        recall_sample=args.recall_sample,
        seed=args.seed,
        exact_kernel=args.exact_kernel,
        batch_lists=args.batch_lists,
        recall_target=args.graph_recall_target,
    )


def _params(args: argparse.Namespace) -> AqeParams:
    return AqeParams(qe_k=args.qe_k, alpha=args.alpha, qe_times=args.qe_times)


def cmd_expand(args: argparse.Namespace) -> int:
    """``expand``: AQE over a feature file (and queries), written atomically as .npy; logs the report."""
    if (args.queries is None) != (args.queries_out is None):
        raise InputError("--queries and --queries-out go together")
    gallery = open_embeddings(args.input)
    source = gallery
    nq = 0
    if args.queries is not None:
        queries = open_embeddings(args.queries)
        nq = queries.n
        source = queries.concat(gallery)
    knn = _knn_spec(args)
    plan = plan_build(
        detect_budget(args.memory_budget),
        workload(source.n, source.d, _params(args), knn, args.block_size, None),
    )
    logger.info("%s", plan.describe())
    if not plan.resident:
        bound_malloc()
    tmp = args.output.with_name(f".{args.output.name}.expanding-{os.getpid()}")
    scratch = None if plan.resident else args.output.with_name(f".{args.output.name}.scratch-{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(source.n, source.d))
    try:
        if scratch is not None:
            scratch.mkdir()
        _, report = expand_source(
            source,
            _params(args),
            knn,
            block_size=args.block_size,
            out=out,
            show_progress=False if args.no_progress else None,
            label=str(args.input),
            plan=plan,
            store=ArrayStore(scratch),
        )
        if nq:
            _write_npy(args.queries_out, out[:nq], args.block_size)
            _write_npy(args.output, out[nq:], args.block_size)
            del out
            tmp.unlink()
        else:
            out.flush()
            del out
            os.replace(tmp, args.output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    recall = report.graph_recall
    logger.info(
        "expanded %d x %d (qe_k=%d effective, %d round(s))%s: %s",
        report.n,
        report.d,
        report.effective_qe_k,
        len(report.rounds),
        "" if recall is None else f", graph recall {recall:.4f}",
        args.output,
    )
    return 0


def _write_npy(path: Path, rows: np.ndarray, block_size: int) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=rows.shape)
    for lo in range(0, rows.shape[0], block_size):
        out[lo : lo + block_size] = rows[lo : lo + block_size]
    out.flush()
    del out
    os.replace(tmp, path)


def build_config(args: argparse.Namespace) -> BuildConfig:
    """The :class:`BuildConfig` of parsed ``build``/``nightly`` arguments."""
    return BuildConfig(
        gallery=args.gallery,
        root=args.root,
        ids=args.ids,
        metadata=args.metadata,
        columns=ParquetColumns(args.embedding_column, args.id_column, args.metadata_columns),
        params=_params(args),
        knn=_knn_spec(args),
        serving=ServingSpec(
            method=args.serving_index,
            nprobe=args.serving_nprobe,
            ef_search=args.serving_ef_search,
            seed=args.seed,
            memory_budget_gib=args.serving_memory_budget_gib,
            recall_target=args.serving_recall_target,
            candidates=args.serving_candidates,
        ),
        block_size=args.block_size,
        keep=args.keep,
        threads=args.threads,
        show_progress=False if args.no_progress else None,
        quality=_quality_spec(args),
        expansion_index=args.expansion_index,
        memory_budget=args.memory_budget,
        level_dtype=args.level_dtype,
        cluster=args.cluster,
        changes=not args.no_changes,
    )


def cmd_build(args: argparse.Namespace) -> int:
    """``build``: one build published under ``--root``."""
    config = build_config(args)
    with artifact.build_lock(config.root):  # refused before any work when another writer runs
        manifest = build(config)
    summary = {
        "version": manifest.version,
        "n": manifest.n,
        "d": manifest.d,
        "effective_qe_k": manifest.effective_qe_k,
        "graph_recall": manifest.graph_recall,
        "serving_index": manifest.serving_index.index_type,
        "serving_recall": manifest.serving_index.recall_at_k,
        "timings_s": manifest.timings_s,
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    """``nightly``: one locked, recorded build run; prints its status record."""
    code, status = nightly.run_until_sigterm(build_config(args))
    if status is not None:
        print(json.dumps(status.model_dump(mode="json"), indent=2))
    return code


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``evaluate``: raw vs AQE metrics on labelled features, as a table, JSON and plots."""
    from index_builder import report
    from index_builder.quality import labels_from_columns

    n = open_embeddings(args.features).n
    columns = read_metadata(args.metadata, n)
    labels = labels_from_columns(columns, args.pid_column, args.camid_column)
    split = report.split_rows(columns, n, args.query_where, args.query_rows, args.max_queries, args.seed)
    result = report.evaluate(
        args.features,
        columns,
        labels,
        split,
        _params(args),
        _knn_spec(args),
        ServingSpec(method=args.serving_index, nprobe=args.serving_nprobe, seed=args.seed),
        args.served_k,
        [int(v) for v in args.sweep_qe_k.split(",") if v],
        [float(v) for v in args.sweep_alpha.split(",") if v],
    )
    print(report.format_table(result))
    for path in report.save(result, args.json, args.plots):
        logger.info("wrote %s", path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``list``: the published versions, the current one marked."""
    current = artifact.current_version(args.root)
    versions = artifact.version_ids(args.root)
    if not versions:
        print(f"no versions under {args.root}")
        return 0
    print(f"{'':2}{'version':<34}{'created (UTC)':<21}{'rows':>10}{'dim':>6}  index")
    for v in versions:
        mark = "* " if v == current else "  "
        try:
            m = artifact.read_manifest(args.root, v)
            print(
                f"{mark}{v:<34}{m.created_at:%Y-%m-%d %H:%M:%S}  {m.n:>10}{m.d:>6}  "
                f"{m.serving_index.index_type}"
            )
        except ArtifactError as exc:
            print(f"{mark}{v:<34}UNREADABLE: {exc}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``verify``: check a version's files against its manifest."""
    version = args.version or artifact.current_version(args.root)
    problems = artifact.verify(args.root, version)
    if problems:
        for p in problems:
            print(f"{version}: {p}", file=sys.stderr)
        return 1
    print(f"{version}: OK")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """``rollback``: make an earlier version current."""
    version = artifact.rollback(args.root, args.version)
    print(f"current is now {version}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    """``add``: new rows into the current version, published as a new one."""
    columns = ParquetColumns(args.embedding_column, args.id_column, args.metadata_columns)
    return _changed(incremental.add(args.root, args.gallery, args.ids, args.metadata, columns, args.keep))


def cmd_delete(args: argparse.Namespace) -> int:
    """``delete``: rows out of the current version, published as a new one."""
    return _changed(incremental.delete(args.root, args.ids, args.keep))


def cmd_changes(args: argparse.Namespace) -> int:
    """``changes list|clear``: the logged add/delete records, or drop them up to ``--through``."""
    if args.action == "clear":
        if args.through is None:
            raise InputError("changes clear needs --through N (see 'changes list')")
        gone = artifact.clear_changes(args.root, args.through)
        print(f"cleared {len(gone)} change record(s) through {args.through}")
        return 0
    current = artifact.current_version(args.root)
    history = set(artifact.read_manifest(args.root, current).history) if current else set()
    records = artifact.list_changes(args.root)
    if not records:
        print(f"no logged changes under {args.root}")
        return 0
    print(f"{'order':>8}  {'kind':<7}{'items':>8}  in current  operation")
    for r in records:
        mark = "yes" if r.operation in history else "no"
        print(f"{r.order:>8}  {r.kind:<7}{r.count:>8}  {mark:<10}  {r.operation}")
    return 0


def _changed(outcome: Outcome) -> int:
    m = outcome.manifest
    if not outcome.applied:
        print(f"already applied: version {m.version} holds this operation; nothing published")
        return 0
    summary = {
        "version": m.version,
        "n": m.n,
        "changed_rows": outcome.changed_rows,
        "seconds": outcome.seconds,
    }
    print(json.dumps(summary, indent=2))
    return 0


COMMANDS = {
    "add": cmd_add,
    "changes": cmd_changes,
    "delete": cmd_delete,
    "expand": cmd_expand,
    "build": cmd_build,
    "nightly": cmd_nightly,
    "evaluate": cmd_evaluate,
    "list": cmd_list,
    "verify": cmd_verify,
    "rollback": cmd_rollback,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``index-builder`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "threads", None):
        faiss.omp_set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except (AqeError, ValueError, OSError) as exc:
        code = exit_code(exc)
        logger.error("%s" if code == EXIT_BAD_INPUT else "%s; nothing published", exc)
        return code


if __name__ == "__main__":
    sys.exit(main())
