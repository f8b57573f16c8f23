"""The per-bin chromatin states of a synthetic compendium (``truth/<asm>/<chrom>.states.npy``)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from epiray import synthetic as S
from epiray.errors import InputDataError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> S.SynthResult:
    out = tmp_path_factory.mktemp("states") / "tiny"
    return S.generate(out, seed=3, params=S.SynthParams.tiny())


def test_states_written_for_every_chromosome(tiny):
    index = S.read_truth_index(tiny.out)
    for sp in S.SPECIES:
        entry = index["species"][sp]
        seen = set()
        for chrom, c in entry["chroms"].items():
            path = tiny.out / "truth" / entry["assembly"] / f"{chrom}.states.npy"
            assert path.is_file()
            st = S.read_states(tiny.out, sp, chrom, truth_index=index)
            assert st.dtype == np.int8
            assert st.shape == (c["n_bins"],)
            assert st.min() >= 0 and st.max() < len(S.STATES)
            seen |= set(np.unique(st).tolist())
        assert len(seen) >= 5, (sp, seen)  # a Markov chain over 7 states: most appear
    # the truth index is unchanged: the states live beside the arrays, not in truth.json
    assert "states" not in index["species"]["mouse"]["chroms"]["chr1"]


def test_states_drive_the_signal(tiny):
    """Each state's own mark is far higher on its bins than elsewhere (noiseless signal,
    averaged over biosamples)."""
    entry = S.read_truth_index(tiny.out)["species"]["mouse"]
    assays = entry["assays"]
    st = np.concatenate([S.read_states(tiny.out, "mouse", c) for c in entry["chroms"]])
    clean = [S.read_truth(tiny.out, "mouse", c, clean=True) for c in entry["chroms"]]
    clean = np.concatenate(clean, axis=2).astype(np.float32).mean(0)
    for assay, state in (
        ("H3K9me3", S.HET),
        ("H3K36me3", S.TX),
        ("H3K27me3", S.PC),
        ("H3K4me3", S.PROM),
    ):
        v = clean[assays.index(assay)]
        on, off = v[st == state], v[st != state]
        assert on.size and on.mean() > 3 * off.mean(), (assay, on.mean(), off.mean())


def test_aligned_bins_share_their_state(tiny):
    """Aligned human and mouse bins lie in the same merged segment: their states agree except
    at segment edges and where a regulatory element turned over (to quiescent)."""
    pairs = differ = to_quiescent = 0
    for chrom in tiny.layout.chroms("mouse"):
        al = S.read_truth_alignment(tiny.out, chrom)
        mouse = S.read_states(tiny.out, "mouse", chrom)[al["mouse_bin"]]
        human = np.empty_like(mouse)
        for hc in np.unique(al["human_chrom"]):
            sel = al["human_chrom"] == hc
            human[sel] = S.read_states(tiny.out, "human", str(hc))[al["human_bin"][sel]]
        d = human != mouse
        pairs += len(mouse)
        differ += int(d.sum())
        to_quiescent += int((d & ((human == S.QUIES) | (mouse == S.QUIES))).sum())
    assert pairs > 1000
    assert differ / pairs < 0.1
    assert to_quiescent >= differ / 2


def test_same_seed_same_states(tiny, tmp_path):
    again = S.generate(tmp_path / "again", seed=3, params=S.SynthParams.tiny())
    for chrom in tiny.layout.chroms("mouse"):
        assert np.array_equal(
            S.read_states(again.out, "mouse", chrom), S.read_states(tiny.out, "mouse", chrom)
        )


def test_read_states_errors(tiny, tmp_path):
    with pytest.raises(InputDataError, match="unknown species"):
        S.read_states(tiny.out, "rat", "chr1")
    with pytest.raises(InputDataError, match="chromosome 'chr9' not in mmSyn1"):
        S.read_states(tiny.out, "mouse", "chr9")
    old = tmp_path / "old"
    shutil.copytree(tiny.out / "truth", old / "truth")
    (old / "truth" / "mmSyn1" / "chr1.states.npy").unlink()
    with pytest.raises(InputDataError, match="no chromatin states for 'chr1'.*--overwrite"):
        S.read_states(old, "mouse", "chr1")
