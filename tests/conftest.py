"""Shared fixtures: one `tiny` world per session, fake bundles, thread and state hygiene.

Test modules never import each other: what two modules share lives here, or in their
package's own conftest.py, as fixtures (a helper is a fixture that returns the callable).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

# One math-library thread unless the caller says otherwise (set before torch, numpy or faiss
# start a pool): the suite's models are tiny, and on a shared 2-core machine a second thread
# mostly spins against the other processes (a tiny coarse training: 11 s of CPU with one
# thread, 70 s with two). `OMP_NUM_THREADS=2 make test` runs the suite with two.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import onnx  # noqa: E402
from onnx import compose, helper  # noqa: E402

from recstack import bundle as B  # noqa: E402
from recstack.training import checkpoint  # noqa: E402
from recstack import features as FE  # noqa: E402
from recstack.training.checkpoint import TrainingState  # noqa: E402
from recstack.pipeline.export import write_feature_snapshot  # noqa: E402
from recstack.training.onnx import export_onnx  # noqa: E402
from retrieval import index as index_lib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # a hung collective fails the test instead of the CI job


# --- test order ------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter, config):
    """A shuffled run (`make test-shuffled`, or `-p randomly`) names its seed even under -q,
    so that a failure in one order can be replayed: `-p randomly --randomly-seed=SEED`."""
    if config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"test order shuffled by pytest-randomly, seed {config.getoption('randomly_seed')}"
                                    f" (replay: -p randomly --randomly-seed={config.getoption('randomly_seed')})")


# --- process-wide state: every test starts and ends with the same ---------------------------


def _global_state() -> dict:
    return {"torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
            "cwd": os.getcwd(), "env": dict(os.environ)}


def _restore(before: dict) -> None:
    """Put back what library code may have changed for the whole process: torch's and FAISS's
    thread counts (the trainers, benches and the serving cascade set them), the working
    directory and the environment. Leaked, they make a test's numbers depend on which tests
    ran before it."""
    if torch.get_num_threads() != before["torch_threads"]:
        torch.set_num_threads(before["torch_threads"])
    if faiss.omp_get_max_threads() != before["faiss_threads"]:
        faiss.omp_set_num_threads(before["faiss_threads"])
    if os.getcwd() != before["cwd"]:
        os.chdir(before["cwd"])
    if dict(os.environ) != before["env"]:
        os.environ.clear()
        os.environ.update(before["env"])


_THREADS_AT_START = (torch.get_num_threads(), faiss.omp_get_max_threads())


@pytest.hookimpl(wrapper=True)  # around pytest's own hooks, so that they count the error
def pytest_collectreport(report):
    """A test module that sets torch's or FAISS's thread count when imported would set it for
    the whole session (the per-test restore below starts from the count collection left): it
    is a collection error that names the module."""
    now = (torch.get_num_threads(), faiss.omp_get_max_threads())
    if now != _THREADS_AT_START and report.passed:
        torch.set_num_threads(_THREADS_AT_START[0])
        faiss.omp_set_num_threads(_THREADS_AT_START[1])
        report.outcome = "failed"
        report.longrepr = (f"{report.nodeid}: importing it changed the (torch, faiss) thread counts from "
                           f"{_THREADS_AT_START} to {now} for the whole session; set them in a fixture instead")
    return (yield)


@pytest.fixture(scope="module", autouse=True)
def _module_state():
    """What a module's fixtures change is given back when the module ends."""
    before = _global_state()
    yield
    _restore(before)


@pytest.fixture(autouse=True)
def _test_state():
    """What a test changes is given back when it ends (its module's settings stay in force)."""
    before = _global_state()
    yield
    _restore(before)


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for the module's tests (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- data ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """Path to a simulated `tiny` world (seed 0)."""
    from recstack.world import preset, simulate

    out = tmp_path_factory.mktemp("tiny_world")
    simulate(preset("tiny"), seed=0, out=out, preset="tiny", progress=False)
    return str(out)


@pytest.fixture(scope="session")
def consent_world(tmp_path_factory) -> str:
    """Path to a `tiny` world (seed 0) where half the users consent to conversion tracking
    (read-only: the signal-loss fits and experiments read it, their outputs go elsewhere)."""
    from recstack.config import apply_overrides
    from recstack.world import preset, simulate

    out = tmp_path_factory.mktemp("tiny_consent")
    simulate(apply_overrides(preset("tiny"), ["consent_rate=0.5"]), seed=0, out=out, preset="tiny", progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny4_world(tmp_path_factory) -> str:
    """Path to a `tiny` world of 4 days (scored days 2-4), seed 0, consent at 0.5 following the
    age bucket: the streaming protocol's smallest world (read-only)."""
    from recstack.config import apply_overrides
    from recstack.world import preset, simulate

    out = tmp_path_factory.mktemp("tiny4")
    cfg = apply_overrides(preset("tiny"), ["n_days=4", "consent_rate=0.5", "consent_age_slope=1.5"])
    simulate(cfg, seed=0, out=out, preset="tiny", progress=False)
    return str(out)


# --- a fake serving bundle: tiny random ONNX models over a 300-item corpus -------------------

FAKE_VOCAB = FE.Vocab(n_users=30, n_items=300, n_categories=8, n_shops=20, n_brands=12, n_price_buckets=5,
                     n_age_buckets=4, n_genders=2, n_activity_levels=3, log_price_mean=3.0, log_price_std=1.0)
N_SNAPSHOT_USERS = 20  # users 20..29 have a profile but no behaviours; ids >= 30 are unknown


class FakeTower(nn.Module):
    """user_feats (B, 4), seq_items (B, L, 5), seq_extras (B, L, 3) -> (B, D)."""

    def __init__(self, dim: int, normalise: bool):
        super().__init__()
        self.user = nn.ModuleList(nn.Embedding(n, 8) for n in FAKE_VOCAB.user_sizes())
        self.item = nn.ModuleList(nn.Embedding(n, 8) for n in FAKE_VOCAB.item_sizes())
        self.extras = nn.Linear(3, 8)
        self.out = nn.Linear(16, dim)
        self.normalise = normalise

    def forward(self, user_feats, seq_items, seq_extras):
        u = sum(e(user_feats[:, i]) for i, e in enumerate(self.user))  # (B, 8)
        s = sum(e(seq_items[..., i]) for i, e in enumerate(self.item)) + self.extras(seq_extras)  # (B, L, 8)
        mask = (seq_items[..., :1] > 0).float()  # (B, L, 1)
        s = (s * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, 8)
        out = self.out(torch.cat([u, s], dim=1))
        return nn.functional.normalize(out, dim=1) if self.normalise else out


class FakeFine(nn.Module):
    """user_feats (B, 4), item_feats (B, 5), item_dense (B, 1), interacted (B, X) -> prob (B,)."""

    def __init__(self):
        super().__init__()
        self.user = nn.ModuleList(nn.Embedding(n, 4) for n in FAKE_VOCAB.user_sizes())
        self.item = nn.ModuleList(nn.Embedding(n, 4) for n in FAKE_VOCAB.item_sizes())
        self.head = nn.Linear(4 + 4 + 1 + len(FE.INTERACTED_FIELDS), 1)

    def forward(self, user_feats, item_feats, item_dense, interacted):
        u = sum(e(user_feats[:, i]) for i, e in enumerate(self.user))
        it = sum(e(item_feats[:, i]) for i, e in enumerate(self.item))
        return torch.sigmoid(self.head(torch.cat([u, it, item_dense, interacted], dim=1))).squeeze(1)


def _fake_inputs(rng, b=3):
    items = np.stack([rng.integers(1, n, (b, FE.SEQ_LEN)) for n in FAKE_VOCAB.item_sizes()], -1).astype(np.int64)
    return {
        "user_feats": np.stack([rng.integers(0, n, b) for n in FAKE_VOCAB.user_sizes()], 1).astype(np.int64),
        "seq_items": items,
        "seq_extras": rng.random((b, FE.SEQ_LEN, 3)).astype(np.float32),
        "item_feats": items[:, 0],
        "item_dense": rng.standard_normal((b, 1)).astype(np.float32),
        "interacted": rng.random((b, len(FE.INTERACTED_FIELDS))).astype(np.float32),
    }


def _make_fake_bundle(root: Path, version: str = "v20260101-000000", seed: int = 0) -> Path:
    """Write a complete bundle (ONNX models, FAISS index, vectors, snapshot, manifest) + `current`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    bdir = root / version
    x = _fake_inputs(rng)
    tower_in = {k: x[k] for k in ("user_feats", "seq_items", "seq_extras")}
    fine_in = {k: x[k] for k in ("user_feats", "item_feats", "item_dense", "interacted")}
    export_onnx(FakeTower(16, False), tower_in, bdir / "retrieval/user_tower.onnx", ["user_emb"])
    export_onnx(FakeTower(128, True), tower_in, bdir / "coarse/user_tower.onnx", ["user_vec"])
    export_onnx(FakeFine(), fine_in, bdir / "fine/ctr.onnx", ["prob"])
    export_onnx(FakeFine(), fine_in, bdir / "fine/cvr.onnx", ["prob"])
    item_emb = rng.standard_normal((FAKE_VOCAB.n_items, 16)).astype(np.float32)
    np.save(bdir / "retrieval/item_emb.npy", item_emb)
    index = faiss.IndexFlatIP(16)
    index.add(item_emb)
    faiss.write_index(index, str(bdir / "retrieval/index.faiss"))
    vecs = rng.standard_normal((FAKE_VOCAB.n_items, 128)).astype(np.float32)
    np.save(bdir / "coarse/item_vectors.npy", 5.0 * vecs / np.linalg.norm(vecs, axis=1, keepdims=True))

    n_beh = rng.integers(0, 70, N_SNAPSHOT_USERS)  # some users above the 50-slot sequence
    n_beh[0] = 60
    user = np.repeat(np.arange(N_SNAPSHOT_USERS), n_beh)
    snap_files = write_feature_snapshot(
        bdir,
        users={"age_bucket": rng.integers(0, FAKE_VOCAB.n_age_buckets, FAKE_VOCAB.n_users),
               "gender": rng.integers(0, FAKE_VOCAB.n_genders, FAKE_VOCAB.n_users),
               "activity": rng.integers(0, FAKE_VOCAB.n_activity_levels, FAKE_VOCAB.n_users)},
        items={"category": rng.integers(0, FAKE_VOCAB.n_categories, FAKE_VOCAB.n_items),
               "shop": rng.integers(0, FAKE_VOCAB.n_shops, FAKE_VOCAB.n_items),
               "brand": rng.integers(0, FAKE_VOCAB.n_brands, FAKE_VOCAB.n_items),
               "price_bucket": rng.integers(0, FAKE_VOCAB.n_price_buckets, FAKE_VOCAB.n_items),
               "price": np.exp(rng.normal(3.0, 1.0, FAKE_VOCAB.n_items))},
        behaviours={"user_id": user, "seconds_ago": rng.uniform(0, 8 * 86400, len(user)),
                    "item_id": rng.integers(0, 40, len(user)),  # a small pool, so interacted counts are non-zero
                    "kind": (rng.random(len(user)) < 0.2).astype(np.int8),
                    "dwell": rng.exponential(30.0, len(user))},
    )
    files = ["retrieval/user_tower.onnx", "retrieval/index.faiss", "retrieval/item_emb.npy", "coarse/user_tower.onnx",
             "coarse/item_vectors.npy", "fine/ctr.onnx", "fine/cvr.onnx", *snap_files]
    B.write_manifest(
        bdir, version=version, files=files, configs={"retrieval": {}, "coarse": {}, "fine": {}},
        feature_schema=FE.feature_schema(), vocab=FAKE_VOCAB.to_dict(),
        stages={"retrieval": {"meta": {"dim": 16}}, "coarse": {"meta": {"dim": 128}}, "fine": {"meta": {}}},
        extra={"snapshot": {"time": 8 * 86400.0}},
    )
    B.write_current(root, version)
    return bdir


@pytest.fixture(scope="session")
def fake_vocab() -> FE.Vocab:
    """The vocabulary of `make_fake_bundle`'s bundles."""
    return FAKE_VOCAB


@pytest.fixture(scope="session")
def make_fake_bundle():
    """Callable (root, version="v20260101-000000", seed=0) -> bundle dir: a complete bundle with
    random models under root/version, and root/current pointing at it. Users 0..19 have
    behaviours (user 0: 60), 20..29 a profile only; the index is an exact IndexFlatIP."""
    return _make_fake_bundle


# --- a fake cascade bundle: clustered item embeddings (i2i neighbours are cluster mates) ------

CASCADE_VOCAB = FE.Vocab(n_users=20, n_items=400, n_categories=8, n_shops=20, n_brands=12, n_price_buckets=5,
                        n_age_buckets=4, n_genders=2, n_activity_levels=3, log_price_mean=3.0, log_price_std=1.0)
CASCADE_DIM = 16


class MeanTower(nn.Module):
    """user_feats (B, 4), seq_items (B, L, 5), seq_extras (B, L, 3) -> (B, D): a mean of behaviour embeddings."""

    def __init__(self, vocab: FE.Vocab, dim: int, normalise: bool):
        super().__init__()
        self.user = nn.ModuleList(nn.Embedding(n, 8) for n in vocab.user_sizes())
        self.item = nn.ModuleList(nn.Embedding(n, 8) for n in vocab.item_sizes())
        self.out = nn.Linear(16 + 3, dim)
        self.normalise = normalise

    def forward(self, user_feats, seq_items, seq_extras):
        u = sum(e(user_feats[:, i]) for i, e in enumerate(self.user))  # (B, 8)
        mask = (seq_items[..., :1] > 0).float()  # (B, L, 1)
        s = sum(e(seq_items[..., i]) for i, e in enumerate(self.item))  # (B, L, 8)
        s = (s * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        x = (seq_extras * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out = self.out(torch.cat([u, s, x], dim=1))
        return nn.functional.normalize(out, dim=1) if self.normalise else out


class ItemFine(nn.Module):
    """user_feats (B, 4), item_feats (B, 5), item_dense (B, 1), interacted (B, X) -> prob (B,)."""

    def __init__(self, vocab: FE.Vocab):
        super().__init__()
        self.item = nn.ModuleList(nn.Embedding(n, 4) for n in vocab.item_sizes())
        self.head = nn.Linear(4 + 1 + len(FE.INTERACTED_FIELDS), 1)

    def forward(self, user_feats, item_feats, item_dense, interacted):
        it = sum(e(item_feats[:, i]) for i, e in enumerate(self.item))
        return torch.sigmoid(self.head(torch.cat([it, item_dense, interacted], dim=1)) + 0 * user_feats[:, :1]).squeeze(1)


def clustered_embeddings(n: int, dim: int, rng, clusters: int = 20) -> np.ndarray:
    """Unit vectors in tight clusters: an item's nearest neighbours are its cluster mates."""
    centres = rng.standard_normal((clusters, dim))
    emb = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def _make_cascade_bundle(root: Path, *, vocab: FE.Vocab = CASCADE_VOCAB, factory: str = "Flat", nprobe: int | None = None,
                snapshot: dict | None = None, items: dict | None = None, seed: int = 0, version: str = "v1") -> Path:
    """A complete bundle with random models; `snapshot`/`items` default to random behaviours / items."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    bdir = root / version
    b = 2
    tower_in = {"user_feats": np.ones((b, 4), np.int64), "seq_items": np.ones((b, FE.SEQ_LEN, 5), np.int64),
                "seq_extras": np.zeros((b, FE.SEQ_LEN, 3), np.float32)}
    fine_in = {"user_feats": np.ones((b, 4), np.int64), "item_feats": np.ones((b, 5), np.int64),
               "item_dense": np.zeros((b, 1), np.float32), "interacted": np.zeros((b, len(FE.INTERACTED_FIELDS)), np.float32)}
    export_onnx(MeanTower(vocab, CASCADE_DIM, True), tower_in, bdir / "retrieval/user_tower.onnx", ["user_emb"])
    export_onnx(MeanTower(vocab, 32, True), tower_in, bdir / "coarse/user_tower.onnx", ["user_vec"])
    export_onnx(ItemFine(vocab), fine_in, bdir / "fine/ctr.onnx", ["prob"])
    export_onnx(ItemFine(vocab), fine_in, bdir / "fine/cvr.onnx", ["prob"])
    item_emb = clustered_embeddings(vocab.n_items, CASCADE_DIM, rng)
    np.save(bdir / "retrieval/item_emb.npy", item_emb)
    index = index_lib.build(item_emb, factory, nprobe=nprobe)
    faiss.write_index(index, str(bdir / "retrieval/index.faiss"))
    np.save(bdir / "coarse/item_vectors.npy", 5.0 * clustered_embeddings(vocab.n_items, 32, rng))
    if snapshot is None:
        n_beh = rng.integers(0, 30, vocab.n_users)
        n_beh[0] = 20
        n_beh[1] = 0  # a known user without behaviours
        user = np.repeat(np.arange(vocab.n_users), n_beh)
        snapshot = {"user_id": user, "seconds_ago": rng.uniform(0, 8 * 86400, len(user)),
                    "item_id": rng.integers(0, vocab.n_items, len(user)), "kind": np.zeros(len(user), np.int8),
                    "dwell": rng.exponential(30.0, len(user))}
    if items is None:
        items = {"category": rng.integers(0, vocab.n_categories, vocab.n_items), "shop": rng.integers(0, vocab.n_shops, vocab.n_items),
                 "brand": rng.integers(0, vocab.n_brands, vocab.n_items),
                 "price_bucket": rng.integers(0, vocab.n_price_buckets, vocab.n_items),
                 "price": np.exp(rng.normal(3.0, 1.0, vocab.n_items))}
    snap_files = write_feature_snapshot(
        bdir,
        users={"age_bucket": rng.integers(0, vocab.n_age_buckets, vocab.n_users), "gender": rng.integers(0, vocab.n_genders, vocab.n_users),
               "activity": rng.integers(0, vocab.n_activity_levels, vocab.n_users)},
        items=items, behaviours=snapshot,
    )
    files = ["retrieval/user_tower.onnx", "retrieval/index.faiss", "retrieval/item_emb.npy", "coarse/user_tower.onnx",
             "coarse/item_vectors.npy", "fine/ctr.onnx", "fine/cvr.onnx", *snap_files]
    B.write_manifest(
        bdir, version=version, files=files, configs={"retrieval": {}, "coarse": {}, "fine": {}},
        feature_schema=FE.feature_schema(), vocab=vocab.to_dict(),
        stages={"retrieval": {"meta": {"dim": CASCADE_DIM, **index_lib.search_params(index)}}, "coarse": {"meta": {"dim": 32}},
                "fine": {"meta": {}}},
        extra={"snapshot": {"time": 8 * 86400.0}},
    )
    B.write_current(root, version)
    return bdir


@pytest.fixture(scope="session")
def cascade_vocab() -> FE.Vocab:
    """The default vocabulary of `make_cascade_bundle`'s bundles."""
    return CASCADE_VOCAB


@pytest.fixture(scope="session")
def make_cascade_bundle():
    """Callable (root, *, vocab, factory="Flat", nprobe, snapshot, items, seed=0, version="v1") ->
    bundle dir: random models, clustered item embeddings in a `factory` index."""
    return _make_cascade_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tiny_data, tmp_path_factory) -> Path:
    """A fake bundle (random models) over the `tiny` world's corpus and vocabulary (read-only)."""
    import pyarrow.parquet as pq

    from recstack.data import load

    data = load(tiny_data)
    items = pq.read_table(Path(tiny_data) / "items.parquet").to_pydict()
    item_cols = {k: np.asarray(items[k]) for k in ("category", "shop", "brand", "price_bucket", "price")}
    snap = {"user_id": np.zeros(0, np.int64), "seconds_ago": np.zeros(0), "item_id": np.zeros(0, np.int64),
            "kind": np.zeros(0, np.int8), "dwell": np.zeros(0, np.float32)}
    vocab = FE.Vocab.from_dict(data.world["vocab"])
    return _make_cascade_bundle(tmp_path_factory.mktemp("tiny_bundle"), vocab=vocab, snapshot=snap, items=item_cols)


# --- a data folder through the README's commands: train -> export -> serve -> rank ----------

# a few steps of small models: checks that a folder trains, exports and serves, not model quality
TINY_TRAIN_SETTINGS = {
    "retrieval": ("epochs=1", "max_steps=8", "batch_size=256", "dim=8", "user_hidden=16", "item_hidden=16",
                  "ann_eval_queries=50"),
    "coarse": ("max_steps=8", "batch_size=256", "hidden=32", "eval_max_rows=1000"),
    "fine": ("ctr_hidden=16", "cvr_hidden=16", "ctr_max_steps=8", "cvr_max_steps=8", "ctr_batch_size=256",
             "cvr_batch_size=128"),
}


def _train_export_serve(data_dir, work: Path, value_column: str | None = None, user_id: int = 0, k: int = 5):
    """`recstack train` each stage on `data_dir`, `recstack export` (with --value-column), then
    serve the bundle in process and Rank `user_id` over gRPC -> (manifest, response)."""
    import grpc

    from recstack.cli import main
    from recstack.serving import client
    from recstack.serving.server import build_server
    from recstack.v1 import ranking_pb2_grpc as pb_grpc

    runs, artifacts = work / "runs", work / "artifacts"
    for stage, settings in TINY_TRAIN_SETTINGS.items():
        sets = [a for s in settings for a in ("--set", s)]
        assert main(["train", stage, "--data", str(data_dir), "--out", str(runs), *sets]) == 0, stage
    assert main(["export", "--runs", str(runs), "--out", str(artifacts),
                 *(["--value-column", value_column] if value_column else [])]) == 0
    manifest = B.verify_bundle(B.resolve_bundle(artifacts))
    server, port, _ = build_server(artifacts, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = pb_grpc.RankingServiceStub(channel).Rank(client.make_request(user_id, k), timeout=60)
    finally:
        server.stop(None)
    return manifest, response


@pytest.fixture(scope="session")
def tiny_train_settings() -> MappingProxyType:
    """{stage: ("key=value", ...)}: a few training steps of small models per stage (read-only)."""
    return MappingProxyType(TINY_TRAIN_SETTINGS)


@pytest.fixture(scope="session")
def train_export_serve():
    """Callable (data_dir, work_dir, value_column=None, user_id=0, k=5) -> (manifest, Rank
    response): a data folder through train (all stages, a few steps) -> export -> serve -> rank."""
    return _train_export_serve


# --- a served bundle with a gated stage: a test holds a call inside the cascade ---------------


def _servicer_context():
    """The gRPC context of the RPC whose handler thread calls this (from the handler's frame)."""
    import grpc

    frame = sys._getframe(1)
    while frame is not None:
        ctx = frame.f_locals.get("context")
        if isinstance(ctx, grpc.ServicerContext):
            return ctx
        frame = frame.f_back
    return None


class Gate:
    """Wraps a cascade stage model so a test can hold a call inside it: a call sets `entered`,
    then waits (20 s at most) for `release`; `calls` counts the calls, `context` is the last
    call's gRPC context."""

    def __init__(self, model):
        import threading

        self.model, self.entered, self.release, self.calls = model, threading.Event(), threading.Event(), 0
        self.context = None

    def __call__(self, feeds):
        self.calls += 1
        self.context = _servicer_context()
        self.entered.set()
        assert self.release.wait(20)
        return self.model(feeds)


class GatedServer:
    """A started in-process server (`servicer`, a `channel` to it, its Rank `stub`) whose stage
    model `gate` wraps; `gate_stage(name)` gates one more stage."""

    STAGES = ("retrieval", "coarse", "ctr", "cvr")

    def __init__(self, channel, servicer):
        from recstack.v1 import ranking_pb2_grpc as pb_grpc

        self.channel, self.servicer, self.gates = channel, servicer, []
        self.stub = pb_grpc.RankingServiceStub(channel)

    def gate_stage(self, stage: str) -> Gate:
        """Wrap the model of `stage` (retrieval, coarse, or ctr / cvr of the two-graph fine layout)."""
        cascade = self.servicer.cascade
        if stage in ("retrieval", "coarse"):
            gate = Gate(getattr(cascade, f"{stage}_tower"))
            setattr(cascade, f"{stage}_tower", gate)
        elif stage in ("ctr", "cvr"):
            i = ("ctr", "cvr").index(stage)
            gate = cascade.fine.models[i] = Gate(cascade.fine.models[i])
        else:
            raise ValueError(f"stage: {stage!r} is not one of {self.STAGES}")
        self.gates.append(gate)
        return gate

    @property
    def gate(self) -> Gate:
        return self.gates[0]


def _gated_server(artifacts, stage: str = "retrieval", **server_args):
    """build_server(artifacts, **server_args) with `stage` gated -> a context of GatedServer;
    on the way out every gate is released and the server stopped."""
    import contextlib

    import grpc

    from recstack.serving.server import build_server

    @contextlib.contextmanager
    def served():
        server, port, servicer = build_server(artifacts, **server_args)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            gated = GatedServer(channel, servicer)
            try:
                gated.gate_stage(stage)
                yield gated
            finally:
                for g in gated.gates:
                    g.release.set()
                server.stop(None)

    return served()


@pytest.fixture(scope="session")
def gated_server():
    """Callable (artifacts, stage="retrieval", **build_server_args) -> a context manager of a
    GatedServer: an in-process server whose `stage` model holds each call until the test sets
    `.gate.release` (`.gate.entered` says a call is in); `.gate_stage(name)` gates another stage."""
    return _gated_server


# --- subprocesses and training -------------------------------------------------------------


def _launch(args: list[str], tmp_path: Path, n: int = 2, timeout: float = TIMEOUT_S) -> list[str]:
    """Run `python ARGS` as n ranks (torchrun's environment, file:// rendezvous); -> outputs.
    Fails the test if a rank fails or the job outlives `timeout`."""
    rdzv = tmp_path / f"rendezvous-{os.getpid()}-{len(list(tmp_path.iterdir()))}"
    env = dict(os.environ, WORLD_SIZE=str(n), RECSTACK_DIST_INIT_METHOD=f"file://{rdzv}", GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    procs = [subprocess.Popen([sys.executable, *args], cwd=REPO, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{out[-4000:]}"
    return outs


@pytest.fixture(scope="session")
def launch():
    """Callable (args, tmp_path, n=2, timeout=TIMEOUT_S) -> outputs: `python ARGS` as n DDP ranks."""
    return _launch


class Killed(Exception):
    """A training run stopped by the `kill_at` fixture, as if the process had been killed."""


def _same_tensors(a: dict, b: dict) -> bool:
    flat = lambda d: {f"{k}/{kk}": vv for k, v in d.items() for kk, vv in v.items()} if isinstance(
        next(iter(d.values())), dict) else d
    a, b = flat(a), flat(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _final_model(out: Path, stage: str) -> dict:
    return checkpoint.load(out / "checkpoint.pt", stage=stage)["model"]


@pytest.fixture
def kill_at(monkeypatch):
    """Callable (phase, step) -> the (phase, step) log: training raises `kill_at.Killed` right
    after optimiser step `step` of phase `phase` (no snapshot is written there, as in a real kill)."""

    def at(phase: int, step: int) -> list:
        seen = []

        def hook(ph, s):
            seen.append((ph.index, s))
            if (ph.index, s) == (phase, step):
                raise Killed

        monkeypatch.setattr(TrainingState, "on_step", hook)
        return seen

    at.Killed = Killed
    return at


@pytest.fixture(scope="session")
def same_tensors():
    """Callable (a, b) -> True when two state dicts (or dicts of them) hold bit-identical tensors."""
    return _same_tensors


@pytest.fixture(scope="session")
def final_model():
    """Callable (run_dir, stage) -> the model state dict of run_dir/checkpoint.pt."""
    return _final_model


# --- a real redis-server (the feature store's Redis backend) ---------------------------------


class RedisServer:
    """A redis-server on a unix socket in its own directory, with AOF fsynced on every write
    (an acknowledged event survives a restart). `stop()` / `start()` restart it on the same
    socket and data, as an outage and its recovery."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.socket = workdir / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        import shutil
        import time

        exe = shutil.which("redis-server")
        self.proc = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        import redis

        while True:  # ready once it answers on the socket (polling the server, not timing it)
            try:
                redis.Redis(unix_socket_path=str(self.socket)).ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (exit {self.proc.poll()})")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path_factory):
    """A started RedisServer (function scope: each test gets an empty one); skipped, saying why,
    when redis-server is not installed (`.ci/run` installs it)."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


class RedisCluster:
    """Three cluster-enabled redis-servers on 127.0.0.1 (0 replicas, AOF fsynced on every write),
    each in its own directory, joined with `redis-cli --cluster create`. Ports: candidates
    come from binding port 0, and one is kept only when its cluster bus port (+10000) is free
    too and neither is a port or bus port of another node; a start that still loses a port to another process is retried whole on fresh ports.
    `stop(i)` / `start(i, ...)` restart nodes on their ports and data (a nodes.conf keeps its node
    identity and slots), as a node's outage and its recovery."""

    def __init__(self, workdir: Path, n: int = 3):
        self.dir, self.n = workdir, n
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen | None] = []

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    @staticmethod
    def _free_ports(n: int) -> list[int]:
        import socket

        held, ports = [], []
        try:
            while len(ports) < n:
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                held.append(s)
                port = s.getsockname()[1]
                taken = {q + d for q in ports for d in (0, 10000)}
                if port + 10000 > 65535 or {port, port + 10000} & taken:  # nor one node's port another's bus
                    continue
                bus = socket.socket()
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
                finally:
                    bus.close()
                ports.append(port)
        finally:
            for s in held:
                s.close()
        return ports

    def _launch(self, i: int) -> subprocess.Popen:
        import shutil

        d = self.dir / f"node{i}"
        d.mkdir(exist_ok=True)
        return subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.ports[i]), "--bind", "127.0.0.1", "--dir", str(d),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait(self, i: int, ready, what: str, deadline: float) -> None:
        """Poll node i until `ready(client)` (never a fixed sleep)."""
        import time

        import redis

        while True:
            proc = self.procs[i]
            try:
                with redis.Redis("127.0.0.1", self.ports[i], socket_timeout=2) as r:
                    if ready(r):
                        return
            except (redis.ConnectionError, redis.TimeoutError):  # not up yet, or another process on the port
                pass
            if proc is None or proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster node {i} (port {self.ports[i]}): {what} "
                                   f"(exit {None if proc is None else proc.poll()})")
            time.sleep(0.05)

    def _wait_ok(self, deadline: float) -> None:
        for i in range(self.n):
            self._wait(i, lambda r: r.cluster("info").get("cluster_state") == "ok", "cluster_state never ok", deadline)

    def create(self, attempts: int = 5) -> "RedisCluster":
        import shutil
        import time

        for attempt in range(attempts):
            self.ports = self._free_ports(self.n)
            self.procs = [self._launch(i) for i in range(self.n)]
            try:
                deadline = time.monotonic() + 60
                for i in range(self.n):
                    self._wait(i, lambda r: r.ping(), "did not start", deadline)
                subprocess.run([shutil.which("redis-cli"), "--cluster", "create",
                                *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0", "--cluster-yes"],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
                self._wait_ok(deadline)
                return self
            except (RuntimeError, subprocess.CalledProcessError):  # most likely a port taken meanwhile: afresh
                self.close()
                for d in self.dir.glob("node*"):
                    shutil.rmtree(d)
                if attempt == attempts - 1:
                    raise
        return self

    def stop(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        self.procs[i] = None

    def start(self, *nodes: int) -> None:
        """Restart the stopped `nodes` and wait until every node says the cluster is ok again."""
        import time

        for i in nodes:
            self.procs[i] = self._launch(i)
        self._wait_ok(time.monotonic() + 60)

    def node_of(self, key: str) -> int:
        """The index of the node serving `key`'s slot."""
        import redis

        with redis.Redis("127.0.0.1", self.ports[0]) as r:
            slot = r.execute_command("CLUSTER KEYSLOT", key)
            for lo, hi, (host, port, *_), *_ in r.execute_command("CLUSTER SLOTS"):
                if lo <= slot <= hi:
                    return self.ports.index(int(port))
        raise LookupError(f"no node serves slot {slot}")

    def close(self) -> None:
        for i in range(len(self.procs)):
            self.stop(i)


@pytest.fixture
def redis_cluster(tmp_path_factory):
    """A created RedisCluster of three nodes (function scope: each test gets an empty one);
    skipped, saying why, when redis-server is not installed (`.ci/run` installs it)."""
    import shutil

    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed (apt-get install redis-server; .ci/run does it)")
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).create()
    yield cluster
    cluster.close()


# --- retrieval backends ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def milvus_lite():
    """Callable (bundle_dir, db_dir, collection="items") -> a `milvus:///DB/COLLECTION` URI whose
    milvus-lite file holds the bundle's embeddings (published as `recstack export --publish`
    does); and `.stop(uri)`: stop that file's in-process server (the backend becomes
    unreachable). Every server started is stopped at the session's end."""
    from milvus_lite.server_manager import server_manager_instance

    from recstack.pipeline.publish import publish_bundle

    started: list[str] = []

    class MilvusLite:
        def __call__(self, bundle_dir: Path, db_dir: Path, collection: str = "items") -> str:
            db = str(Path(db_dir) / "vectors.db")
            uri = f"milvus://{db}/{collection}"
            publish_bundle(bundle_dir, uri)
            started.append(db)
            return uri

        def stop(self, uri: str) -> None:
            server_manager_instance.release_server(uri[len("milvus://"):].rpartition("/")[0])

    yield MilvusLite()
    for db in started:
        server_manager_instance.release_server(db)


# --- quantised / merged stage files on a fake bundle ------------------------------------

def _relist(bdir: Path, add: list[str], drop: tuple[str, ...] = ()) -> None:
    """Rewrite the bundle's manifest listing `add` and not `drop`."""
    m = B.read_manifest(bdir)
    files = [f for f in m["files"] if f not in drop] + add
    B.write_manifest(bdir, version=m["version"], files=files, configs=m["configs"], feature_schema=m["feature_schema"],
                     vocab=m["vocab"], stages=m["stages"], extra={"snapshot": m["snapshot"]})


def _merge_fine(bdir: Path, outputs=("pctr", "pcvr"), name="fine/ranker.onnx") -> None:
    """fine/ctr.onnx and fine/cvr.onnx side by side in one graph on shared inputs."""
    ctr = compose.add_prefix(onnx.load(str(bdir / "fine/ctr.onnx")), "ctr_", rename_inputs=False)
    cvr = compose.add_prefix(onnx.load(str(bdir / "fine/cvr.onnx")), "cvr_", rename_inputs=False)
    g1, g2 = ctr.graph, cvr.graph
    nodes = list(g1.node) + list(g2.node) + [helper.make_node("Identity", [g1.output[0].name], [outputs[0]]),
                                              helper.make_node("Identity", [g2.output[0].name], [outputs[1]])]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, ["batch"]) for o in outputs]
    graph = helper.make_graph(nodes, "fine", list(g1.input), outs, list(g1.initializer) + list(g2.initializer))
    model = helper.make_model(graph, opset_imports=ctr.opset_import)
    model.ir_version = ctr.ir_version
    onnx.save(model, str(bdir / name))


def _install_fine(bdir: Path, result: dict, files: list[str] | None = None, meta: dict | None = None) -> None:
    """List a fine export written into bdir/fine (`fine_rank.export.export`'s result) as the
    bundle's fine stage: its files (or `files`, names under fine/) and its meta (or `meta`), in
    place of the fake two-graph layout."""
    m = B.read_manifest(bdir)
    names = [f"fine/{f}" for f in (result["files"] if files is None else files)]
    stages = {**m["stages"], "fine": {**m["stages"].get("fine", {}), "files": names,
                                      "meta": result["meta"] if meta is None else meta}}
    kept = [f for f in m["files"] if f not in ("fine/ctr.onnx", "fine/cvr.onnx")]
    B.write_manifest(bdir, version=m["version"], files=kept + names, configs=m["configs"],
                     feature_schema=m["feature_schema"], vocab=m["vocab"], stages=stages,
                     extra={"snapshot": m["snapshot"]})


@pytest.fixture(scope="session")
def install_fine():
    """Callable (bundle_dir, export_result, files=None, meta=None): list a real fine export as
    the bundle's fine stage (files and meta), replacing the fake two-graph layout."""
    return _install_fine


@pytest.fixture(scope="session")
def relist():
    """Callable (bundle_dir, add, drop=()) -> None: rewrite the manifest listing `add`, not `drop`."""
    return _relist


@pytest.fixture(scope="session")
def merge_fine():
    """Callable (bundle_dir, outputs=("pctr", "pcvr"), name="fine/ranker.onnx"): write the fake
    bundle's fine/ctr.onnx and fine/cvr.onnx as one graph on shared inputs."""
    return _merge_fine


# --- a fine graph that reads the behaviour sequence -------------------------------------------

def _write_din_fine(bdir: Path, vocab: FE.Vocab, seq_len: int = FE.SEQ_LEN, name: str = "fine/ranker.onnx") -> None:
    """Write bdir/name: a small merged CTR + CVR graph with target attention over the sequence
    (fine_rank `sequence="din"`), random weights, its sequence inputs on their own axis."""
    from fine_rank.export import _Both
    from fine_rank.model import Ranker

    torch.manual_seed(0)
    models = [Ranker.build(vocab, emb_dim=4, hidden=(8,), sequence="din", attention_dim=4) for _ in range(2)]
    for m in models:
        with torch.no_grad():
            m.head.linear.weight.normal_(std=0.5)  # heads start at zero weights: give the output a slope
        m.eval()
    rng = np.random.default_rng(0)
    b = 3
    x = {"user_feats": np.ones((b, 4), np.int64), "item_feats": np.ones((b, 5), np.int64),
         "item_dense": np.zeros((b, 1), np.float32), "interacted": np.zeros((b, len(FE.INTERACTED_FIELDS)), np.float32),
         "seq_items": rng.integers(0, 5, (b, seq_len, 5)).astype(np.int64),
         "seq_extras": rng.random((b, seq_len, 3)).astype(np.float32)}
    export_onnx(_Both(*models), x, bdir / name, ["pctr", "pcvr"], axes={"seq_items": "sequences", "seq_extras": "sequences"})


@pytest.fixture(scope="session")
def write_din_fine():
    """Callable (bundle_dir, vocab, seq_len=50, name="fine/ranker.onnx"): write a random fine graph
    that reads the behaviour sequence (the bundle's manifest is left as it is)."""
    return _write_din_fine
