"""epiray.plots: valid PNGs, the numbers the figures print, and the PCA projection."""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from epiray import evaluate, plots
from epiray.errors import InputDataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk (always first, at byte 8)."""
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def scores_frame() -> pd.DataFrame:
    rows = []
    mse = {
        "mouse_only": [0.09, 0.10, 0.07, 0.06, 0.003, 0.040],
        "synteny": [0.07, 0.09, 0.07, 0.05, 0.0018, 0.046],
        "average_activity": [0.10, 0.12, 0.09, 0.08, 0.004, 0.05],
    }
    cats = ["histone_modification"] * 2 + ["protein_binding"] * 2 + ["transcription", "other"]
    assays = ["H3K27ac", "H3K27ac", "CTCF", "MYC", "RNA", "X"]
    for model, values in mse.items():
        for i, v in enumerate(values):
            rows.append(
                {"model": model, "experiment": f"E{i}", "assay": assays[i], "category": cats[i],
                 "mse": v}
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_track_view_png_and_mse_in_legend():
    rng = np.random.default_rng(0)
    y = np.arcsinh(rng.gamma(0.5, 2.0, 400))
    aa = np.full(400, y.mean())
    imps = {"mouse only": y * 0.8, "+ synteny": y + 0.05 * rng.standard_normal(400)}
    fig = plots.plot_tracks(
        y, imps, average_activity=aa, chrom="chr11", start=1000, title="H3K27ac in MEL"
    )
    found = texts(fig)
    for name, values in [("average activity", aa), *imps.items()]:
        mse = float(np.mean((values - y) ** 2))
        assert f"{name}  MSE {mse:.4g}" in found
    assert "experimental" in found and "H3K27ac in MEL" in found and "chr11 (bp)" in found
    axes = fig.get_axes()
    assert len(axes) == 4
    assert len({ax.get_ylim() for ax in axes}) == 1  # one scale for every track
    assert axes[-1].get_xlim() == (25_000, 25 * 1400)  # bins [1000, 1400) in bases

    data = plots.figure_to_png(fig, dpi=50)
    width, height = png_size(data)
    w_in, h_in = fig.get_size_inches()
    assert (width, height) == (round(w_in * 50), round(h_in * 50))
    assert len(data) > 5000

    with pytest.raises(
        InputDataError, match="track 'mouse only' has the wrong length; expected 400"
    ):
        plots.plot_tracks(y, {"mouse only": y[:10]})


def test_scatter_counts_wins_and_draws_the_diagonal():
    fig = plots.plot_metric_scatter(scores_frame(), "mouse_only", "synteny")
    # synteny lower on E0, E1, E3, E4; higher on E5; tied on E2.
    assert "synteny better in 4, mouse_only better in 1 of 6 experiments" in texts(fig)
    ax = fig.get_axes()[0]
    assert ax.get_xscale() == "log"
    diagonal = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == list(ln.get_ydata())]
    assert len(diagonal) == 1
    assert "histone modification (2)" in texts(fig)
    assert png_size(plots.figure_to_png(fig, dpi=40)) == (220, 200)


def test_assay_improvement_bars():
    table = evaluate.assay_improvement(scores_frame(), "synteny")
    fig = plots.plot_assay_improvement(table, title="zero-shot")
    ax = fig.get_axes()[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx(sorted(table["pct_improvement"], reverse=True))
    summary = evaluate.improvement_summary(table)
    title = ax.get_title()
    assert title.startswith("zero-shot\n")
    assert f"{summary['n_improved']} of {summary['n_assays']} improve" in title
    assert [t.get_text() for t in ax.get_xticklabels()] == list(table["assay"])
    assert plots.figure_to_png(fig)[:8] == PNG_MAGIC


def test_pca_matches_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 32)) @ np.diag(np.linspace(3, 0.1, 32))
    coords, explained = plots.pca_2d(x)
    ref = PCA(n_components=2).fit(x)
    want = ref.transform(x)
    for k in range(2):
        sign = np.sign(coords[:, k] @ want[:, k])
        np.testing.assert_allclose(coords[:, k], sign * want[:, k], atol=1e-10)
    np.testing.assert_allclose(explained, ref.explained_variance_ratio_)
    # Deterministic sign: the largest loading of each component is positive.
    again, _ = plots.pca_2d(x[::-1])
    np.testing.assert_allclose(again[::-1], coords, atol=1e-10)
    # One row, or one feature: missing components are zeros.
    one, ratio = plots.pca_2d(np.arange(5.0)[:, None])
    assert np.all(one[:, 1] == 0) and ratio[0] == pytest.approx(1.0)
    with pytest.raises(InputDataError, match=r"expected 2 dimensions, got shape \(5,\)"):
        plots.pca_2d(np.arange(5.0))


def test_factor_maps_label_every_point(tmp_path):
    rng = np.random.default_rng(1)
    bios = ["MEL", "CH12", "K562", "HepG2"]
    assays = ["H3K4me3", "H3K27ac", "CTCF", "DNase", "RNA"]
    fig = plots.plot_factors(
        rng.standard_normal((4, 32)),
        bios,
        rng.standard_normal((5, 256)),
        assays,
        biosample_groups=["mouse", "mouse", "human", "human"],
        assay_groups=["histone_modification"] * 2 + ["protein_binding", "accessibility",
                                                     "transcription"],
    )  # fmt: skip
    found = texts(fig)
    assert set(bios + assays) <= set(found)
    assert {"biosamples", "assays", "mouse", "human"} <= set(found)
    assert any(t.startswith("PC1 (") for t in found)
    path = plots.save_png(fig, tmp_path / "plots" / "factors.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["factors.png"]  # no temporary left

    single = plots.plot_embedding(rng.standard_normal((3, 8)), ["a", "b", "c"], title="assays")
    assert {"a", "b", "c", "assays"} <= set(texts(single))
    with pytest.raises(InputDataError, match="expected 3 labels, got 2"):
        plots.plot_embedding(rng.standard_normal((3, 8)), ["a", "b"])
