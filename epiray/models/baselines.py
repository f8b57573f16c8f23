"""Baselines evaluated like models.

:class:`AverageActivity` (METHODS.md §4; cross-species paper §2.4): the imputation of assay
``a`` at bin ``i`` is the mean, over the *training* experiments of assay ``a``, of their value
at ``i`` — whatever the biosample. In cross-validation it is rebuilt per fold from that fold's
training tracks. It has the ``predict(data, biosample, assay)`` of
:class:`~epiray.models.ImputationModel`, so evaluation code treats it like any trained model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from epiray.errors import EpirayError
from epiray.models import ChromData, Vocabulary

__all__ = ["AverageActivity"]


class AverageActivity:
    """Per-assay mean of the training tracks at every bin.

    Parameters
    ----------
    means
        ``[n_assays, hi-lo]`` float32: mean track of each assay (rows of assays without a
        training track are unused).
    counts
        ``[n_assays]`` int64: training tracks behind each row (0 = no training experiment).
    lo, hi
        The bins ``[lo, hi)`` the means cover.
    vocab
        Names for error messages, or None.
    """

    name = "average_activity"

    def __init__(
        self, means: Tensor, counts: Tensor, lo: int, hi: int, vocab: Vocabulary | None = None
    ) -> None:
        self.means = means
        self.counts = counts
        self.lo, self.hi = int(lo), int(hi)
        self.vocab = vocab

    @classmethod
    def fit(cls, data: ChromData, vocab: Vocabulary | None = None) -> AverageActivity:
        """Average the training tracks of ``data`` per assay.

        Parameters
        ----------
        data
            The slab; only ``values`` ``[E, hi-lo]`` and ``assay`` ``[E]`` are used (the
            target species' training tracks; other-species and validation tracks are not).
        vocab
            The vocabulary, to size the table (default: the largest assay index + 1) and to
            name assays in errors.

        Returns
        -------
        AverageActivity
            Means on ``data.device`` in float32 (accumulated in float64).
        """
        n_assays = len(vocab.assays) if vocab is not None else int(data.assay.max()) + 1
        dev = data.device
        sums = torch.zeros(n_assays, data.n_local, dtype=torch.float64, device=dev)
        # one track at a time: no [E, bins] float64 copy of the slab
        for j in range(data.n_experiments):
            sums[int(data.assay[j])] += data.values[j].double()
        counts = torch.bincount(data.assay, minlength=n_assays)
        means = (sums / counts.clamp(min=1).unsqueeze(1).double()).float()
        return cls(means, counts, data.lo, data.hi, vocab)

    def predict(self, data: ChromData, biosample: int, assay: int) -> Tensor:
        """Average activity of ``assay`` over the slab (``biosample`` is ignored).

        Parameters
        ----------
        data
            The slab it was fitted on (bins ``[lo, hi)``).
        biosample, assay
            Vocabulary indices.

        Returns
        -------
        Tensor
            ``[hi-lo]`` float32 on the device of the means.

        Raises
        ------
        EpirayError
            If the assay has no training experiment, or ``data`` covers other bins.
        """
        if (data.lo, data.hi) != (self.lo, self.hi):
            raise EpirayError(
                f"average activity chrom {data.chrom!r}: data covers bins [{data.lo}, "
                f"{data.hi}); expected [{self.lo}, {self.hi}). Fit it on the same slab."
            )
        if not 0 <= assay < self.counts.shape[0] or int(self.counts[assay]) == 0:
            name = (
                repr(self.vocab.assays[assay])
                if self.vocab is not None and 0 <= assay < len(self.vocab.assays)
                else f"index {assay}"
            )
            raise EpirayError(
                f"average activity chrom {data.chrom!r}: assay {name} has no training "
                "experiment; expected at least one track of that assay in the training set, "
                "got 0. Average activity cannot impute an assay never observed (zero-shot); "
                "leave it out of the baseline comparison."
            )
        return self.means[assay]

    def to(self, device: torch.device | str) -> AverageActivity:
        """A copy with the means on ``device``."""
        return AverageActivity(
            self.means.to(device), self.counts.to(device), self.lo, self.hi, self.vocab
        )
