"""recstack.bench.quant at toy sizes: the coarse paths run, agree, and report what they measured."""
import numpy as np

from recstack.bench import quant as Q


def test_bench_coarse_reports_every_path_and_the_parity(one_thread):
    r = Q.bench_coarse(n_items=3000, n_candidates=600, dim=32, repeats=2, parity_requests=4, parity_candidates=1000)
    assert set(r["timings_ms"]) == {"fp32_fused_faiss", "int8_fused", "int8_shortlist_fp32_rescore", "fp16_numpy_gather_matvec",
                                    "int8_numpy_gather_matvec", "memory_scan_fp32_bytes"}
    assert all(v["median"] > 0 and v["repeats"] == 2 for v in r["timings_ms"].values())
    assert r["bytes"]["int8_with_scales"] == 3000 * 32 + 3000 * 4 and r["bytes"]["fp32"] == 3000 * 32 * 4
    assert all(np.isfinite(x) and x > 0 for x in r["ratios"].values())
    p = r["parity_top500"]
    assert p["requests"] == 4 and p["candidates"] == 1000 and 0.0 <= p["min"] <= p["mean"] <= 1.0
    # the served cut keeps at least what the int8 scores' own top-500 keeps of float32's
    assert p["min"] <= p["served_min"] <= p["served_mean"] <= 1.0 and p["served_mean"] >= p["mean"]


def test_unit_rows_have_the_scale_as_norm():
    v = Q._unit_rows(np.random.default_rng(0), 250, 8, 5.0, chunk=100)  # several chunks
    assert v.dtype == np.float32 and np.allclose(np.linalg.norm(v, axis=1), 5.0, atol=1e-4)
