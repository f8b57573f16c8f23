"""Avocado: multi-scale deep tensor factorisation (Schreiber et al. 2020), and its cross-species
extension (cross-species paper §2.3).

The tensor biosample × assay × genomic position is factorised into biosample factors (32),
assay factors (256) and genome factors at three resolutions (25 per 25 bp bin, 40 per 250 bp,
45 per 5 kbp); a network (2 × 2,048 ReLU → 1 linear) maps the concatenated factors of a cell to
its value. Trained with MSE and Adam; genome factors are updated sparsely (only the rows a batch
used), so a step costs the same on a 1 Mb pilot and on mouse chr1.

Variants (``AvocadoParams.variant``):

``mouse_only``
    The standard model on one species' experiments (any species).
``cross_species``
    Biosample and assay axes are the union of both species'; genome factors exist only for
    target (mouse) bins; human examples reach them through the synteny alignment rows
    (``ChromData.aux_bin``). A fixed share (half, by default) of every batch is human.
``concat``
    The "+ human, no synteny" baseline: the genome axis is the target bins followed by the
    distinct human positions, each with its own factors at all three scales (human coarse
    scales from human bin coordinates); the alignment is discarded; only assays are shared.
    Half of every batch is human.

Coordinates: the worker owns global bins ``[lo, hi)``; the 250 bp and 5 kbp factors of global
bin ``b`` are rows ``b // 10`` and ``b // 200`` (minus the worker's first such row). A coarse
row straddling two workers exists on both (each worker fits its own copy); shard on multiples of
200 bins to avoid that.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from epiray.config import Section
from epiray.errors import ConfigError, EpirayError
from epiray.models import Batch, ChromData, ImputationModel, SlabSize, Vocabulary, register

__all__ = ["Avocado", "AvocadoParams"]


class AvocadoParams(Section):
    """Avocado hyperparameters; defaults are the paper's.

    Attributes
    ----------
    variant
        ``mouse_only`` (one species), ``cross_species`` (synteny) or ``concat`` (no synteny).
    n_biosample_factors, n_assay_factors
        Factor sizes (32, 256).
    n_genome_factors
        Factors per scale, finest first (25 per 25 bp, 40 per 250 bp, 45 per 5 kbp). A 0 drops
        that scale.
    scale_bins
        Bins per row of each scale, finest first (1, 10, 200) = 25 bp, 250 bp, 5 kbp.
    n_layers, n_nodes
        Hidden ReLU layers and their width (2 × 2,048).
    aux_fraction
        Share of every batch drawn from the other species (cross_species/concat).
    biosample_shrinkage
        Weight ``λ`` of a penalty on how far each biosample moves the network from the mean
        biosample: ``λ · mean_i ‖W_b (b_i − b̄)‖²``, with ``b_i`` the biosample factors, ``b̄``
        their mean and ``W_b`` the first layer's biosample columns (so the network cannot undo
        it by scaling). 0 (the paper) turns it off. With few biosamples — the five cell types of
        the Roadmap pilot — a biosample's factor is fit to a handful of tracks and the network
        extrapolates an unseen (biosample, assay) pair from them freely; the penalty keeps what
        a biosample changes to what its tracks need, so the rest follows the other biosamples.
    init_scale
        Factors start uniform in ``[-init_scale, init_scale]`` (Keras' default embedding init,
        as the original package).
    genome_dropout
        Dropout on the concatenated genome factors of every training example (0, the paper:
        none). With few tracks per bin the factors of a bin can fit its tracks' noise; dropping
        factors at random keeps each one useful alone.
    predict_batch_size
        Positions per forward pass in :meth:`Avocado.predict`.
    """

    variant: Literal["mouse_only", "cross_species", "concat"] = "mouse_only"
    n_biosample_factors: int = Field(32, ge=1)
    n_assay_factors: int = Field(256, ge=1)
    n_genome_factors: tuple[int, int, int] = (25, 40, 45)
    scale_bins: tuple[int, int, int] = (1, 10, 200)
    n_layers: int = Field(2, ge=1)
    n_nodes: int = Field(2048, ge=1)
    aux_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    biosample_shrinkage: float = Field(0.0, ge=0.0)
    init_scale: float = Field(0.05, gt=0.0)
    genome_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    predict_batch_size: int = Field(65536, ge=1)


def _scale_rows(lo: int, hi: int, k: int) -> int:
    """Rows of a scale with ``k`` bins per row covering global bins ``[lo, hi)``."""
    return (hi - 1) // k - lo // k + 1


def _factor_table(n: int, d: int, scale: float, sparse: bool) -> nn.Embedding:
    emb = nn.Embedding(n, d, sparse=sparse)
    nn.init.uniform_(emb.weight, -scale, scale)
    return emb


@register("avocado")
class Avocado(ImputationModel):
    """Avocado on one chromosome slab ``[lo, hi)``; see the module docstring.

    Build it with :meth:`build`; the loop in :mod:`epiray.loop` trains it.
    """

    Params = AvocadoParams
    freezable = frozenset({"network", "biosample", "assay", "genome"})

    def __init__(
        self,
        params: AvocadoParams,
        vocab: Vocabulary,
        lo: int,
        hi: int,
        *,
        n_aux_positions: int = 0,
        aux_groups: tuple[Tensor, Tensor] | None = None,
        biosample_chunks: tuple[int, ...] | None = None,
        assay_chunks: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(params, vocab)
        p = params
        self.lo, self.hi = int(lo), int(hi)
        if p.scale_bins[0] != 1 or list(p.scale_bins) != sorted(p.scale_bins):
            raise ConfigError(
                f"model avocado: scale_bins {p.scale_bins} invalid; expected increasing bins per "
                "row starting at 1, e.g. (1, 10, 200). Fix model.params.scale_bins."
            )
        self.scales = [
            (i, k) for i, (k, d) in enumerate(zip(p.scale_bins, p.n_genome_factors)) if d > 0
        ]
        if not self.scales:
            raise ConfigError(
                "model avocado: every genome scale has 0 factors; expected at least one > 0. "
                "Fix model.params.n_genome_factors."
            )
        s = p.init_scale
        self.genome = nn.ModuleList(
            [
                _factor_table(_scale_rows(self.lo, self.hi, k), p.n_genome_factors[i], s, True)
                for i, k in self.scales
            ]
        )
        # concat: the other species' distinct positions get their own factors at every scale.
        self.n_aux_positions = int(n_aux_positions)
        if p.variant == "concat":
            if aux_groups is None:
                raise EpirayError(
                    "model avocado (concat): no other-species positions; expected ChromData "
                    "with aux_pos, aux_pos_chrom and aux_pos_bin. Load the aligned block."
                )
            self.register_buffer("aux_group_250", aux_groups[0].long())
            self.register_buffer("aux_group_5k", aux_groups[1].long())
            rows = [
                self.n_aux_positions,
                int(aux_groups[0].max().item()) + 1 if aux_groups[0].numel() else 1,
                int(aux_groups[1].max().item()) + 1 if aux_groups[1].numel() else 1,
            ]
            self.aux_genome = nn.ModuleList(
                [
                    _factor_table(max(rows[i], 1), p.n_genome_factors[i], s, True)
                    for i, _ in self.scales
                ]
            )
        else:
            self.aux_genome = None
        # Biosample / assay factors in chunks: chunk 0 from build, one more per extend(), so
        # old rows can stay frozen (and keep their optimiser state) while new rows are fitted.
        biosample_chunks = biosample_chunks or (len(vocab.biosamples),)
        assay_chunks = assay_chunks or (len(vocab.assays),)
        self.biosample_factors = nn.ParameterList(
            [
                nn.Parameter(torch.empty(n, p.n_biosample_factors).uniform_(-s, s))
                for n in biosample_chunks
            ]
        )
        self.assay_factors = nn.ParameterList(
            [nn.Parameter(torch.empty(n, p.n_assay_factors).uniform_(-s, s)) for n in assay_chunks]
        )
        n_pair = p.n_biosample_factors + p.n_assay_factors
        n_genome = sum(p.n_genome_factors[i] for i, _ in self.scales)
        self.n_pair_inputs = n_pair
        layers: list[nn.Linear] = []
        width = n_pair + n_genome
        for _ in range(p.n_layers):
            layers.append(nn.Linear(width, p.n_nodes))
            width = p.n_nodes
        self.hidden = nn.ModuleList(layers)
        self.out = nn.Linear(width, 1)
        for lin in [*self.hidden, self.out]:
            nn.init.xavier_uniform_(lin.weight)  # Keras' glorot_uniform, as the original
            nn.init.zeros_(lin.bias)

    # ---------------------------------------------------------------------------------------
    # construction
    # ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls, params: AvocadoParams, vocab: Vocabulary, data: ChromData) -> Avocado:
        """A freshly initialised model for ``data`` on ``data.device``.

        Parameters
        ----------
        params
            Hyperparameters (a dict is validated into :class:`AvocadoParams`).
        vocab
            Names behind the biosample/assay indices of ``data``.
        data
            The worker's slab; sets the genome factor rows (``hi - lo`` bins) and, for
            ``concat``, the other-species positions.

        Raises
        ------
        EpirayError
            If the variant needs other-species data that ``data`` lacks, or an index in
            ``data`` is outside the vocabulary.
        """
        if not isinstance(params, AvocadoParams):
            params = AvocadoParams.model_validate(params)
        cls._check_data(params, vocab, data)
        aux_groups = None
        if params.variant == "concat":
            aux_groups = cls._aux_groups(params, data)
        model = cls(
            params,
            vocab,
            data.lo,
            data.hi,
            n_aux_positions=data.n_aux_positions,
            aux_groups=aux_groups,
        )
        return model.to(data.device)

    @classmethod
    def from_state(
        cls,
        params: AvocadoParams,
        vocab: Vocabulary,
        data: ChromData,
        state_dict: Mapping[str, Tensor],
    ) -> Avocado:
        """Rebuild a saved model, including factor chunks added by :meth:`extend`."""
        if not isinstance(params, AvocadoParams):
            params = AvocadoParams.model_validate(params)

        def chunks(prefix: str) -> tuple[int, ...]:
            keys = sorted(
                (int(k.rsplit(".", 1)[1]), v.shape[0])
                for k, v in state_dict.items()
                if k.startswith(prefix + ".")
            )
            return tuple(n for _, n in keys)

        aux_groups = None
        n_aux = data.n_aux_positions
        if params.variant == "concat":
            aux_groups = (state_dict["aux_group_250"], state_dict["aux_group_5k"])
            # a slab loaded without its other-species block (prediction needs none) still
            # rebuilds the saved tables
            n_aux = n_aux or int(state_dict["aux_group_250"].shape[0])
        model = cls(
            params,
            vocab,
            data.lo,
            data.hi,
            n_aux_positions=n_aux,
            aux_groups=aux_groups,
            biosample_chunks=chunks("biosample_factors"),
            assay_chunks=chunks("assay_factors"),
        )
        model.load_state_dict(state_dict)
        return model.to(data.device)

    @classmethod
    def transfer(
        cls, trained: Avocado, data: ChromData, vocab: Vocabulary | None = None
    ) -> Avocado:
        """A model for another chromosome (or slab) that fits only genome factors.

        The network and the biosample/assay factors are copied from ``trained`` and frozen;
        the genome factors of ``data``'s bins start fresh. Train it with
        :func:`epiray.loop.fit`; to carry the frozen parts' Adam moments into later phases pass
        ``state.for_new_phase(keep_sparse=False)`` (the new genome rows start at zero).

        Parameters
        ----------
        trained
            A trained Avocado (any chromosome).
        data
            The new slab.
        vocab
            Its vocabulary (default: ``trained.vocab`` for ``data.chrom`` / ``data.n_bins``).
        """
        vocab = vocab or trained.vocab.for_chrom(data.chrom, data.n_bins)
        cls._check_data(trained.params, vocab, data)
        aux_groups = cls._aux_groups(trained.params, data) if trained.aux_genome else None
        model = cls(
            trained.params,
            vocab,
            data.lo,
            data.hi,
            n_aux_positions=data.n_aux_positions,
            aux_groups=aux_groups,
            biosample_chunks=tuple(c.shape[0] for c in trained.biosample_factors),
            assay_chunks=tuple(c.shape[0] for c in trained.assay_factors),
        ).to(data.device)
        model.load_dense_state(trained.state_dict())
        model.freeze({"network", "biosample", "assay"})
        return model

    def load_dense_state(self, state_dict: Mapping[str, Tensor]) -> None:
        """Network and biosample/assay factors from ``state_dict``; genome factors and the
        concat variant's other-species groups (both per chromosome) are kept."""
        keep = {k: v for k, v in state_dict.items() if not k.startswith("aux_group")}
        own = {k: v for k, v in self.state_dict().items() if k.startswith("aux_group")}
        super().load_dense_state({**keep, **own})

    @staticmethod
    def _check_data(params: AvocadoParams, vocab: Vocabulary, data: ChromData) -> None:
        where = f"model avocado ({params.variant}) chrom {data.chrom!r}"
        if data.n_experiments == 0:
            raise EpirayError(f"{where}: no training tracks; expected at least one, got 0.")
        if params.variant != "mouse_only" and data.aux_values is None:
            raise EpirayError(
                f"{where}: no other-species tracks; expected ChromData.aux_values/aux_bin "
                "(the synteny block). Ingest the synteny tracks or use variant mouse_only."
            )
        if params.variant == "concat" and (data.aux_pos is None or data.aux_pos_bin is None):
            raise EpirayError(
                f"{where}: expected aux_pos and aux_pos_bin (other-species positions); got "
                "none. Load the alignment's human bins with the aux block."
            )
        nb, na = len(vocab.biosamples), len(vocab.assays)
        idx = [(data.biosample, nb, "biosample"), (data.assay, na, "assay")]
        if data.aux_biosample is not None:
            idx += [(data.aux_biosample, nb, "aux_biosample"), (data.aux_assay, na, "aux_assay")]
        if data.val_biosample is not None:
            idx += [(data.val_biosample, nb, "val_biosample"), (data.val_assay, na, "val_assay")]
        for t, n, name in idx:
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                raise EpirayError(
                    f"{where}: {name} index out of range; expected 0..{n - 1} (vocabulary "
                    f"size), got {int(t.min())}..{int(t.max())}. Build the vocabulary from the "
                    "same experiments as the data."
                )

    @staticmethod
    def _aux_groups(params: AvocadoParams, data: ChromData) -> tuple[Tensor, Tensor]:
        """Coarse-scale rows of the distinct other-species positions, from their own bins."""
        chrom = data.aux_pos_chrom
        if chrom is None:
            chrom = torch.zeros_like(data.aux_pos_bin)
        out = []
        for k in params.scale_bins[1:]:
            key = torch.stack([chrom, data.aux_pos_bin // k], 1)
            _, inv = torch.unique(key, dim=0, return_inverse=True)
            out.append(inv.long())
        return out[0], out[1]

    # ---------------------------------------------------------------------------------------
    # the contract
    # ---------------------------------------------------------------------------------------
    def dense_parameters(self) -> list[nn.Parameter]:
        """Network weights and biosample/assay factors (shared by all workers)."""
        return [
            *self.biosample_factors,
            *self.assay_factors,
            *(p for lin in self.hidden for p in lin.parameters()),
            *self.out.parameters(),
        ]

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Genome factors of the worker's bins (and, for concat, other-species positions)."""
        tabs = list(self.genome) + (list(self.aux_genome) if self.aux_genome is not None else [])
        return [t.weight for t in tabs]

    @classmethod
    def memory_estimate(
        cls, params: AvocadoParams, vocab: Vocabulary, size: SlabSize, batch_size: int
    ) -> dict[str, int]:
        """Bytes one worker needs to train on a slab of ``size``; see the README's "Memory per
        worker".

        ``data``, ``genome`` (factor rows of the worker's bins and, for ``concat``, of its
        other-species positions, fp32) and ``genome_adam`` (their two Adam moments) are exact
        (for ``concat`` with scale sizes other than ``SlabSize.GROUP_BINS``, an upper bound).
        ``dense`` is the synchronised part: network, biosample and assay factors with gradient
        and two moments (16 bytes each).
        ``working`` is the larger of a training step's activations and gradients (measured
        ≈ ``batch × (2 × n_layers × n_nodes + 3 × genome factors) × 4`` bytes in float32;
        bf16 autocast needs less) and a prediction chunk's.

        Returns
        -------
        dict
            ``data``, ``genome``, ``genome_adam``, ``dense``, ``working`` and ``total`` bytes.
        """
        if not isinstance(params, AvocadoParams):
            params = AvocadoParams.model_validate(params)
        p = params
        scales = [(k, d) for k, d in zip(p.scale_bins, p.n_genome_factors) if d > 0]
        g = sum(d for _, d in scales)
        floats = sum(_scale_rows(size.lo, size.hi, k) * d for k, d in scales)
        if p.variant == "concat" and size.aux_positions:
            groups = dict(size.aux_groups)  # unknown group sizes: one row per position at most
            floats += sum(
                (size.aux_positions if k == 1 else groups.get(k, size.aux_positions)) * d
                for k, d in scales
            )
        n_in = p.n_biosample_factors + p.n_assay_factors + g
        network = n_in * p.n_nodes + p.n_nodes + (p.n_layers - 1) * (p.n_nodes + 1) * p.n_nodes
        network += p.n_nodes + 1
        factors = len(vocab.biosamples) * p.n_biosample_factors
        factors += len(vocab.assays) * p.n_assay_factors
        # examples in a step: an epoch visits each of the worker's bins once (see batches())
        if p.variant == "mouse_only" or size.aux_tracks == 0:
            examples = min(batch_size, size.bins)
        else:
            n_target = max(1, round(batch_size * (1 - p.aux_fraction)))
            b = min(n_target, size.bins)
            examples = (
                batch_size if b == n_target else b + max(1, round(b * (batch_size / n_target - 1)))
            )
        step = examples * (2 * p.n_layers * p.n_nodes + 3 * g + 8) * 4
        chunk = min(p.predict_batch_size, max(size.bins, 1)) * (2 * p.n_nodes + g + 2) * 4
        out = {
            "data": size.data_bytes(),
            "genome": floats * 4,
            "genome_adam": floats * 8,
            "dense": (network + factors) * 16,
            "working": max(step, chunk),
        }
        out["total"] = sum(out.values())
        return out

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """Biosample and assay factors (every chunk, in vocabulary order)."""
        return (
            torch.cat(list(self.biosample_factors)).detach(),
            torch.cat(list(self.assay_factors)).detach(),
        )

    def freeze(self, what: set[str]) -> None:
        """Freeze any of ``network``, ``biosample``, ``assay``, ``genome``.

        Transfer to another chromosome freezes ``{"network", "biosample", "assay"}``.
        """
        self.check_freeze(what)
        groups = {
            "network": [*self.hidden.parameters(), *self.out.parameters()],
            "biosample": list(self.biosample_factors),
            "assay": list(self.assay_factors),
            "genome": self.sparse_parameters(),
        }
        for name in what:
            for prm in groups[name]:
                prm.requires_grad_(False)

    def extend(self, vocab: Vocabulary) -> None:
        """Add factors for biosamples/assays appended to the vocabulary; only they train.

        Everything else (network, genome, existing biosample and assay factors) is frozen, as
        the original package's ``fit_celltypes``/``fit_assays`` do, but the old parameters and
        any optimiser state kept for them are untouched and the new names are kept in the
        model's vocabulary (saved with every checkpoint).

        Parameters
        ----------
        vocab
            A vocabulary whose biosample/assay lists start with this model's (from
            :meth:`Vocabulary.extend`).
        """
        old = self.vocab
        if (
            vocab.biosamples[: len(old.biosamples)] != old.biosamples
            or vocab.assays[: len(old.assays)] != old.assays
        ):
            raise EpirayError(
                f"model avocado chrom {old.chrom!r}: new vocabulary reorders existing names; "
                "expected the old biosamples/assays as a prefix. Use Vocabulary.extend."
            )
        for prm in self.parameters():
            prm.requires_grad_(False)
        s = self.params.init_scale
        dev = self.out.weight.device
        nb = len(vocab.biosamples) - len(old.biosamples)
        na = len(vocab.assays) - len(old.assays)
        if nb:
            t = torch.empty(nb, self.params.n_biosample_factors, device=dev).uniform_(-s, s)
            self.biosample_factors.append(nn.Parameter(t))
        if na:
            t = torch.empty(na, self.params.n_assay_factors, device=dev).uniform_(-s, s)
            self.assay_factors.append(nn.Parameter(t))
        self.vocab = vocab

    # ---------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------
    def _table(self, chunks: nn.ParameterList) -> Tensor:
        return chunks[0] if len(chunks) == 1 else torch.cat(list(chunks), 0)

    def _pair_inputs(self, biosample: Tensor, assay: Tensor) -> Tensor:
        """First-layer contribution of (biosample, assay) pairs, ``[U, n_nodes]``.

        The first layer is linear in the concatenated input, so its biosample/assay part is
        computed once per distinct pair in a batch rather than once per example: identical to
        the concatenating network, ~12 % fewer FLOPs at paper sizes.
        """
        w = self.hidden[0].weight[:, : self.n_pair_inputs]
        x = torch.cat(
            [
                F.embedding(biosample, self._table(self.biosample_factors)),
                F.embedding(assay, self._table(self.assay_factors)),
            ],
            1,
        )
        return F.linear(x, w, self.hidden[0].bias)

    def _genome_inputs(self, local_bin: Tensor, aux: bool = False, dedupe: bool = False) -> Tensor:
        """Concatenated genome factors ``[B, sum(n_genome_factors)]`` of local bins.

        Parameters
        ----------
        local_bin
            ``[B]`` int64 local bins; with ``aux`` (concat) other-species position indices.
        aux
            Read the other-species tables (concat).
        dedupe
            Training: read each table once per distinct row and spread the rows to the
            examples with ``index_select``, so each sparse gradient holds sorted unique rows
            (the optimiser then needs no coalescing sort). Target bins must come sorted.
        """
        if aux:
            groups = (local_bin, self.aux_group_250[local_bin], self.aux_group_5k[local_bin])
            reads = [(tab, groups[i], False) for tab, (i, _) in zip(self.aux_genome, self.scales)]
        else:
            reads = [
                (tab, local_bin if k == 1 else (local_bin + self.lo) // k - self.lo // k, True)
                for tab, (_, k) in zip(self.genome, self.scales)
            ]
        parts = []
        for tab, idx, is_sorted in reads:
            if not dedupe:
                parts.append(tab(idx))
                continue
            if is_sorted:
                rows, inv = torch.unique_consecutive(idx, return_inverse=True)
            else:
                rows, inv = torch.unique(idx, return_inverse=True)
            parts.append(tab(rows).index_select(0, inv))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def forward(self, genome: Tensor, pair: Tensor, pair_index: Tensor | None = None) -> Tensor:
        """Network output for genome inputs and (biosample, assay) first-layer rows.

        Parameters
        ----------
        genome
            ``[B, G]`` concatenated genome factors.
        pair
            ``[U, n_nodes]`` first-layer rows of distinct (biosample, assay) pairs.
        pair_index
            ``[B]`` int64 row of ``pair`` for each example; None when ``U == 1``.

        Returns
        -------
        Tensor
            ``[B]`` predictions (arcsinh scale).
        """
        w = self.hidden[0].weight[:, self.n_pair_inputs :]
        # Without autocast (which casts neither in-place ops nor mv's sum consistently), two
        # CPU shortcuts, the same arithmetic: the first layer adds its product in place to the
        # gathered pair rows (no copy of them), and the one-output layer is a matrix-vector
        # product, whose input gradient is a broadcast multiply rather than a K = 1 matrix
        # multiply (~10x slower on CPU). `benchmarks/bench_avocado.py profile`.
        plain = not torch.is_autocast_enabled(genome.device.type)
        if pair_index is None:
            h = torch.addmm(pair.expand(genome.shape[0], -1), genome, w.t())
        elif plain:
            h = pair.index_select(0, pair_index).addmm_(genome, w.t())
        else:
            h = torch.addmm(pair.index_select(0, pair_index), genome, w.t())
        h = torch.relu_(h)
        for lin in self.hidden[1:]:
            h = torch.relu_(lin(h))
        if plain:
            return torch.mv(h, self.out.weight[0]) + self.out.bias
        return self.out(h).squeeze(1)

    # ---------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------
    def batches(
        self, data: ChromData, generator: torch.Generator, batch_size: int
    ) -> Iterator[Batch]:
        """One epoch: a fresh permutation of the worker's bins, a random track per bin.

        ``mouse_only`` yields ``ceil((hi-lo) / batch_size)`` batches. The other variants fill
        ``aux_fraction`` of every batch with other-species examples (cross_species: random
        alignment rows, whose genome factors are their target bin's; concat: a permutation of
        the distinct other-species positions, cycled as needed), so an epoch visits every
        target bin once and draws ``ceil((hi-lo) / n_target)`` batches. Everything is drawn on
        ``data.device``; the values are gathered there.

        Yields
        ------
        Batch
            ``tensors``: ``bin`` [B] local bin (or, for concat's other-species part, position
            index), ``pair`` [B] row into ``pair_biosample``/``pair_assay`` (the training
            tracks, then the other-species tracks), ``y`` [B] float32 target, ``n_target``
            (0-d, CPU; examples before it are target-species ones) and ``pair_biosample`` /
            ``pair_assay`` (vocabulary indices of those tracks).
        """
        self._check_slab(data)
        dev = data.device
        n = data.n_local
        e = data.n_experiments
        variant = self.params.variant
        pair_b, pair_a = data.biosample, data.assay
        n_units = 0
        if variant != "mouse_only":
            n_units = (
                data.aux_values.shape[1] if variant == "cross_species" else self.n_aux_positions
            )
        if n_units == 0:  # mouse_only, or a slab no alignment row reaches: target examples only
            n_target = batch_size
        else:
            pair_b = torch.cat([data.biosample, data.aux_biosample])
            pair_a = torch.cat([data.assay, data.aux_assay])
            n_target = max(1, round(batch_size * (1 - self.params.aux_fraction)))
        perm = torch.randperm(n, generator=generator, device=dev)
        aux_stream = None
        if n_units > 0:
            n_rows = data.aux_values.shape[1]
            aux_stream = _PermutationStream(n_units, generator, dev)
            if variant == "concat":
                pos_row = torch.empty(self.n_aux_positions, dtype=torch.long, device=dev)
                pos_row[data.aux_pos] = torch.arange(n_rows, device=dev)
        h = 0 if data.aux_values is None else data.aux_values.shape[0]
        for start in range(0, n, n_target):
            bins = perm[start : start + n_target]
            b = bins.shape[0]
            exp = torch.randint(e, (b,), generator=generator, device=dev)
            y = data.values[exp, bins].float()
            # validation cells stay in the batch with weight 0 (fixed shapes, no host sync)
            w = None if data.heldout is None else (~data.is_heldout(exp, bins)).float()
            if aux_stream is None:
                tensors = {"bin": bins, "pair": exp, "y": y, "n_target": torch.tensor(b)}
                if w is not None:
                    tensors["w"] = w
                yield Batch(b, {**tensors, "pair_biosample": pair_b, "pair_assay": pair_a})
                continue
            m = (
                batch_size - n_target
                if b == n_target
                else max(1, round(b * (batch_size / n_target - 1)))
            )
            units = aux_stream.take(m)
            track = torch.randint(h, (m,), generator=generator, device=dev)
            if variant == "cross_species":
                aux_bins = data.aux_bin[units]
                aux_y = data.aux_values[track, units].float()
            else:
                aux_bins = units
                aux_y = data.aux_values[track, pos_row[units]].float()
            tensors = {
                "bin": torch.cat([bins, aux_bins]),
                "pair": torch.cat([exp, track + e]),
                "y": torch.cat([y, aux_y]),
                "n_target": torch.tensor(b),
                "pair_biosample": pair_b,
                "pair_assay": pair_a,
            }
            if w is not None:
                tensors["w"] = torch.cat([w, torch.ones(m, device=dev)])
            yield Batch(b + m, tensors)

    def _n_target(self, data: ChromData, batch_size: int) -> int:
        """Target-species examples per batch (the rest of it is other-species)."""
        if self.params.variant == "mouse_only" or data.aux_values is None:
            return batch_size
        n_units = (
            data.aux_values.shape[1]
            if self.params.variant == "cross_species"
            else self.n_aux_positions
        )
        if n_units == 0:
            return batch_size
        return max(1, round(batch_size * (1 - self.params.aux_fraction)))

    def epoch_examples(self, data: ChromData) -> int:
        """One example per bin, plus the other-species share of every batch."""
        if self._n_target(data, 1 << 30) == 1 << 30:
            return data.n_local
        return round(data.n_local / (1 - self.params.aux_fraction))

    def steps_per_epoch(self, data: ChromData, batch_size: int) -> int:
        """``ceil(bins / target examples per batch)``, exactly as :meth:`batches` draws."""
        return max(1, math.ceil(data.n_local / self._n_target(data, batch_size)))

    def loss(self, batch: Batch) -> Tensor:
        """Mean squared error of the batch (float32 scalar).

        Examples are reordered by bin first (the mean does not care): then every genome table
        is read once per distinct row, and its sparse gradient comes out sorted and unique.
        """
        t = batch.tensors
        bins, pair_idx, y = t["bin"], t["pair"], t["y"]
        w = t.get("w")
        n = bins.shape[0]
        k = int(t["n_target"]) if self.params.variant == "concat" else n
        order = bins[:k].argsort()
        if k < n:
            order = torch.cat([order, bins[k:].argsort() + k])
        bins, pair_idx, y = bins[order], pair_idx[order], y[order]
        parts = [self._genome_inputs(bins[:k], dedupe=True)] if k > 0 else []
        if k < n:
            parts.append(self._genome_inputs(bins[k:], aux=True, dedupe=True))
        genome = parts[0] if len(parts) == 1 else torch.cat(parts)
        pair_b, pair_a = t["pair_biosample"], t["pair_assay"]
        if pair_b.shape[0] <= n:  # first-layer rows of every track: no sort needed
            pair = self._pair_inputs(pair_b, pair_a)
        else:  # more tracks than examples: only the batch's distinct ones
            uniq, pair_idx = torch.unique(pair_idx, return_inverse=True)
            pair = self._pair_inputs(pair_b[uniq], pair_a[uniq])
        if self.training and self.params.genome_dropout > 0:
            genome = F.dropout(genome, self.params.genome_dropout)
        pred = self(genome, pair, pair_idx)
        if w is None:
            return F.mse_loss(pred.float(), y)
        w = w[order]  # 0 for validation cells: they add nothing, not even to the mean
        return ((pred.float() - y).pow(2) * w).sum() / w.sum().clamp(min=1.0)

    def penalty(self) -> Tensor | None:
        """``biosample_shrinkage`` (see :class:`AvocadoParams`), or None when it is 0."""
        lam = self.params.biosample_shrinkage
        if lam == 0.0:
            return None
        b = self._table(self.biosample_factors).float()
        w = self.hidden[0].weight[:, : b.shape[1]].float()
        return lam * ((b - b.mean(0, keepdim=True)) @ w.t()).pow(2).sum(1).mean()

    def _check_slab(self, data: ChromData) -> None:
        if (data.lo, data.hi) != (self.lo, self.hi):
            raise EpirayError(
                f"model avocado chrom {data.chrom!r}: data covers bins [{data.lo}, {data.hi}); "
                f"expected this model's bins [{self.lo}, {self.hi}). Genome factors are per "
                "worker slab: load the same shard, or transfer the model to the new slab."
            )

    # ---------------------------------------------------------------------------------------
    # imputation
    # ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, data: ChromData, biosample: int, assay: int) -> Tensor:
        """Impute (biosample, assay) over the worker's bins.

        Parameters
        ----------
        data
            The slab the model was built for (only ``lo``/``hi``/device are used).
        biosample, assay
            Vocabulary indices; any combination, observed or not.

        Returns
        -------
        Tensor
            ``[hi-lo]`` float32 on ``data.device``, arcsinh scale.
        """
        self._check_slab(data)
        nb, na = (
            sum(c.shape[0] for c in self.biosample_factors),
            sum(c.shape[0] for c in self.assay_factors),
        )
        if not (0 <= biosample < nb and 0 <= assay < na):
            raise EpirayError(
                f"model avocado chrom {data.chrom!r}: cannot impute biosample {biosample}, assay "
                f"{assay}; expected indices below {nb} and {na}. Extend the model first."
            )
        dev = data.device
        pair = self._pair_inputs(
            torch.tensor([biosample], device=dev), torch.tensor([assay], device=dev)
        )
        out = torch.empty(data.n_local, dtype=torch.float32, device=dev)
        step = self.params.predict_batch_size
        for start in range(0, data.n_local, step):
            bins = torch.arange(start, min(start + step, data.n_local), device=dev)
            out[start : start + bins.shape[0]] = self(self._genome_inputs(bins), pair).float()
        return out

    @torch.inference_mode()
    def predict_cells(self, data: ChromData, track: Tensor, bins: Tensor) -> Tensor:
        """Predictions ``[N]`` float32 of the cells (training track ``track[i]``, local bin
        ``bins[i]``); only the genome factors of those bins and the tracks' (biosample, assay)
        are read, so a held-out cell is predicted exactly as an unobserved track would be."""
        self._check_slab(data)
        pair = self._pair_inputs(data.biosample, data.assay)
        out = torch.empty(track.shape[0], dtype=torch.float32, device=data.device)
        step = self.params.predict_batch_size
        for start in range(0, track.shape[0], step):
            sl = slice(start, start + step)
            genome = self._genome_inputs(bins[sl])
            out[sl] = self(genome, pair, track[sl]).float()
        return out

    def n_parameters(self) -> dict[str, int]:
        """Parameter counts: ``genome`` (worker-local), ``factors`` and ``network``."""
        return {
            "genome": sum(p.numel() for p in self.sparse_parameters()),
            "factors": sum(p.numel() for p in [*self.biosample_factors, *self.assay_factors]),
            "network": sum(p.numel() for p in [*self.hidden.parameters(), *self.out.parameters()]),
        }


class _PermutationStream:
    """Draws from successive random permutations of ``range(n)`` (sampling w/o replacement)."""

    def __init__(self, n: int, generator: torch.Generator, device: torch.device) -> None:
        self.n, self.gen, self.dev = n, generator, device
        self.perm = torch.randperm(n, generator=generator, device=device)
        self.at = 0

    def take(self, m: int) -> Tensor:
        out = []
        while m > 0:
            if self.at == self.n:
                self.perm = torch.randperm(self.n, generator=self.gen, device=self.dev)
                self.at = 0
            k = min(m, self.n - self.at)
            out.append(self.perm[self.at : self.at + k])
            self.at += k
            m -= k
        return out[0] if len(out) == 1 else torch.cat(out)
