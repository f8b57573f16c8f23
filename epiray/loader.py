"""Store -> device: the slab of one chromosome a worker trains on.

A worker of ``W`` owns a contiguous range of bins. Range boundaries are multiples of
``ALIGN_BINS`` (200 bins = 5 kbp, the coarsest genome-factor scale), so no genome factor is
shared by two workers and the workers' factor shards concatenate into the whole chromosome's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from epiray.errors import EpirayError
from epiray.models import ChromData, SlabSize, Vocabulary
from epiray.store import Store

ALIGN_BINS = 200


def shard_bounds(
    n_bins: int, world_size: int, rank: int, align: int = ALIGN_BINS
) -> tuple[int, int]:
    """Bins ``[lo, hi)`` owned by ``rank`` of ``world_size`` workers.

    Boundaries are multiples of ``align`` (except the chromosome end); the shares differ by at
    most ``align`` bins.

    Raises
    ------
    EpirayError
        More workers than ``align``-bin units in the chromosome (a worker would own nothing).
    """
    units = -(-n_bins // align)
    if world_size > units:
        raise EpirayError(
            f"sharding: {world_size} workers for {n_bins} bins ({units} units of {align} bins); "
            f"expected at most {units} workers. Use fewer workers for this chromosome."
        )
    lo_u = units * rank // world_size
    hi_u = units * (rank + 1) // world_size
    return lo_u * align, min(hi_u * align, n_bins)


@dataclass(frozen=True)
class Aux:
    """Other-species tracks at the alignment rows of a target chromosome (synteny)."""

    name: str
    experiments: Sequence[str]


def _alignment_slice(
    store: Store, name: str, chrom: str, lo: int, hi: int
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Alignment rows of target bins ``[lo, hi)`` (the table is sorted by target bin): their
    range ``r0, r1``, target bins, other-species chromosome codes and bins (int64)."""
    table = store.read_alignment(name, chrom)
    mb = table["mouse_bin"].to_numpy()
    r0, r1 = int(np.searchsorted(mb, lo, "left")), int(np.searchsorted(mb, hi, "left"))
    rows = table.iloc[r0:r1]
    codes = rows["human_chrom"].astype("category").cat.codes.to_numpy().astype(np.int64)
    return r0, r1, mb[r0:r1], codes, rows["human_bin"].to_numpy().astype(np.int64)


def _position_key(codes: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """One int64 per (chromosome code, bin): equal keys are the same position."""
    return codes * (int(bins.max()) + 1 if len(bins) else 1) + bins


def slab_size(
    store: Store,
    assembly: str,
    chrom: str,
    lo: int,
    hi: int,
    train: Sequence[str],
    *,
    validate: Sequence[str] = (),
    aux: Aux | None = None,
    value_dtype: torch.dtype = torch.float32,
) -> SlabSize:
    """The sizes :func:`load_chrom_data` would load, without reading any values.

    Only the alignment table is read (for the rows and distinct other-species positions of
    ``[lo, hi)``), so a worker can check its memory before it loads the slab.
    """
    rows = positions = 0
    groups: tuple[tuple[int, int], ...] = ()
    n_aux = len(aux.experiments) if aux is not None else 0
    if n_aux:
        r0, r1, _, codes, hb = _alignment_slice(store, aux.name, chrom, lo, hi)
        rows = int(r1 - r0)
        positions = len(np.unique(_position_key(codes, hb)))
        if rows:
            groups = tuple(
                (k, len(np.unique(_position_key(codes, hb // k)))) for k in SlabSize.GROUP_BINS
            )
    return SlabSize(
        lo=lo,
        hi=hi,
        experiments=len(train),
        val_experiments=len(validate),
        aux_tracks=n_aux,
        aux_rows=rows,
        aux_positions=positions,
        value_bytes=2 if value_dtype == torch.float16 else 4,
        aux_groups=groups,
    )


def load_chrom_data(
    store: Store,
    assembly: str,
    chrom: str,
    lo: int,
    hi: int,
    vocab: Vocabulary,
    train: Sequence[str],
    *,
    validate: Sequence[str] = (),
    aux: Aux | None = None,
    device: torch.device | str = "cpu",
    value_dtype: torch.dtype = torch.float32,
    heldout_fraction: float = 0.0,
    heldout_block: int = 200,
    heldout_seed: int = 0,
) -> ChromData:
    """Read a worker's slab from the store straight into device tensors.

    Parameters
    ----------
    store
        The store.
    assembly, chrom
        Target assembly and chromosome.
    lo, hi
        The worker's bins (see :func:`shard_bounds`).
    vocab
        Gives the biosample/assay index of every experiment.
    train, validate
        Target-species experiments to train on / to validate on.
    aux
        Other-species experiments and the synteny name: their values at the alignment rows
        whose target bin lies in ``[lo, hi)`` (rows are sorted by target bin, so that is one
        contiguous row range), with ``aux_pos`` = distinct other-species positions.
    device, value_dtype
        Where the tensors live and the dtype of the values (float16 halves the memory).
    heldout_fraction, heldout_block, heldout_seed
        Validation cells: with a fraction > 0, blocks of ``heldout_block`` bins of every
        training track are held out with that probability
        (:func:`epiray.folds.heldout_blocks`; ``ChromData.heldout``).

    Returns
    -------
    ChromData
    """
    n_bins = store.n_bins(assembly, chrom)
    np_dtype = np.float16 if value_dtype == torch.float16 else np.float32

    def read(exps):
        arr = store.read(assembly, chrom, list(exps), lo, hi, dtype=np_dtype)
        return torch.from_numpy(arr).to(device, value_dtype)

    def idx(exps, which):
        return torch.tensor(
            [getattr(vocab.experiment_index(e), which) for e in exps],
            dtype=torch.long,
            device=device,
        )

    if not train:
        raise EpirayError(f"{assembly} {chrom}: no training experiments; expected at least one.")
    kw = {}
    if validate:
        kw.update(
            val_values=read(validate),
            val_biosample=idx(validate, "biosample"),
            val_assay=idx(validate, "assay"),
        )
    if aux is not None and aux.experiments:
        r0, r1, mb, codes, hb = _alignment_slice(store, aux.name, chrom, lo, hi)
        if r1 > r0:
            vals = store.read_aligned(
                aux.name, chrom, list(aux.experiments), int(r0), int(r1), dtype=np_dtype
            )
        else:
            vals = np.zeros((len(aux.experiments), 0), np_dtype)
        uniq, first, inverse = np.unique(
            _position_key(codes, hb), return_index=True, return_inverse=True
        )
        kw.update(
            aux_values=torch.from_numpy(vals).to(device, value_dtype),
            aux_bin=torch.from_numpy(mb - lo).to(device),
            aux_pos=torch.from_numpy(inverse.astype(np.int64)).to(device),
            aux_pos_chrom=torch.from_numpy(codes[first]).to(device),
            aux_pos_bin=torch.from_numpy(hb[first]).to(device),
            aux_biosample=idx(aux.experiments, "biosample"),
            aux_assay=idx(aux.experiments, "assay"),
        )
        del uniq
    if heldout_fraction > 0:
        from epiray.folds import heldout_blocks

        mask = heldout_blocks(
            list(train), chrom, n_bins, lo, hi, heldout_fraction, heldout_block, heldout_seed
        )
        kw.update(heldout=torch.from_numpy(mask).to(device), heldout_block=heldout_block)
    return ChromData(
        chrom=chrom,
        lo=lo,
        hi=hi,
        n_bins=n_bins,
        values=read(train),
        biosample=idx(train, "biosample"),
        assay=idx(train, "assay"),
        **kw,
    )
