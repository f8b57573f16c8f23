"""eDICE: imputation from contextualised biosample and assay embeddings (eDICE paper).

At every 25 bp bin the observed ("support") tracks are laid out as a biosample × assay matrix.
Each biosample's row and each assay's column, divided by its number of observed entries, goes
through a dense + ReLU *signal embedder*; a learned *global embedding* of the entity is added
(``h_c = ReLU(W_C y_c) + u_c``, likewise for assays). One Set-Transformer self-attention block
(SAB, 4 heads, no layer norm) over the biosample set and one over the assay set, with entities
that have no observation at the bin masked out as keys, give contextual embeddings; an MLP on
``[c_i ; a_j]`` predicts the value of track (biosample i, assay j) at the bin.

No genome factors: the model has ≈ 6 M parameters at paper sizes whatever the genome length.

Layout of the computation (why it looks the way it does)
--------------------------------------------------------
The dense matrix is never built. A track is a (biosample, assay) pair, so ``W_C y_c`` is the sum
of ``W_C[:, assay(t)] * value(t) / N_c`` over the support tracks ``t`` of biosample ``c``; the
embedders sum over the tracks that can ever be observed (:class:`Slots`), so the cost is
``bins × tracks × dim`` instead of ``bins × biosamples × assays × dim`` — the two differ by 100×
for a cross-species union vocabulary (~1,500 biosamples × ~800 assays, ~8,000 tracks). The
result is identical to the dense formulation (tested).

Attention is computed only for the entities that are queried (the targets' biosamples and
assays), as in the reference implementation's cross-attention block; the keys are all observed
entities at the bin. With one attention block this is exactly the SAB output at the queried
entities.

Cross-species eDICE (novel)
---------------------------
When the worker's :class:`~epiray.models.ChromData` carries ``aux_values`` (other-species
tracks at alignment rows keyed by local target-species bin), the other-species tracks at an
aligned bin join its support set: the vocabulary is the union of both species' biosamples and
assays, so an assay never run in the target species is imputed from its other-species context
at that bin. A bin aligned several times takes, per other-species track, the **mean** over its
alignment rows (at most ``aux_max_alignments`` of them, in alignment-table order;
``aux_reduce="first"`` takes the first row instead) — one support set per bin, so the mean
uses every alignment without an arbitrary choice; a bin with no alignment has every
other-species track unobserved, i.e. masked out exactly as a missing track. Other-species
tracks at aligned bins are also drawn as training targets (``aux_targets``), which is what
teaches the model assays the target species lacks.

Training
--------
Per bin, ``n_targets`` of the observed tracks (a count, or a fraction) are hidden and predicted
from the rest, drawn independently per bin and per epoch with one vectorised ``topk`` over
random scores. The loop's ``batch_size`` counts training examples (target cells), as for every
model; a batch holds ``batch_size // K`` bins.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from epiray.config import Section
from epiray.errors import ConfigError, EpirayError, InputDataError
from epiray.models import Batch, ChromData, ImputationModel, Vocabulary, register

__all__ = [
    "EDice",
    "EDiceParams",
    "Slots",
    "SignalEmbedder",
    "SetAttentionBlock",
    "EDiceNet",
    "build_slots",
    "max_targets",
    "select_targets",
]


# --------------------------------------------------------------------------------------------
# Pure torch building blocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slots:
    """Which tracks feed which entity of a signal embedder.

    Two exact layouts of the same sums ``Σ_t y_t W[:, feature(t)]`` over an entity's tracks:
    a padded ``[n_entities, L]`` table (one batched matmul; fastest when entities have similar
    numbers of tracks, as in Roadmap) and a flat, entity-sorted list summed with
    ``embedding_bag`` (cost and memory ∝ tracks whatever the skew, e.g. a cross-species union
    where one assay has hundreds of biosamples and most have a few).

    Attributes
    ----------
    entity
        ``[T]`` long: entity of every track.
    order
        ``[T]`` long: tracks sorted by entity (stable).
    feature
        ``[T]`` long: the other-axis index (assay for the biosample embedder, biosample for the
        assay embedder) of ``order[i]``.
    offsets
        ``[n_entities]`` long: where each entity's tracks start in ``order``.
    pad_track
        ``[n_entities, L]`` long: value column of each slot, ``T`` (the always-zero padding
        column) for padding; ``[0, 0]`` when the flat layout is used.
    pad_feature
        ``[n_entities, L]`` long: other-axis index of each slot, 0 for padding; ``[0, 0]``
        with the flat layout.
    """

    entity: Tensor
    order: Tensor
    feature: Tensor
    offsets: Tensor
    pad_track: Tensor
    pad_feature: Tensor

    @property
    def padded(self) -> bool:
        """True when the padded table is used."""
        return self.pad_track.numel() > 0

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """The fields as ``{prefix + name: tensor}`` (to travel in a :class:`Batch`)."""
        return {prefix + f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, prefix: str, tensors: Mapping[str, Tensor]) -> Slots:
        """Inverse of :meth:`tensors`."""
        return cls(**{f.name: tensors[prefix + f.name] for f in fields(cls)})


def build_slots(
    entity: Tensor, feature: Tensor, n_entities: int, *, max_padding: float = 4.0
) -> Slots:
    """Group tracks by entity for a :class:`SignalEmbedder`.

    Parameters
    ----------
    entity
        ``[T]`` long: entity (biosample or assay) index of every track, in ``[0, n_entities)``.
    feature
        ``[T]`` long: index on the other axis of every track.
    n_entities
        Size of the entity vocabulary.
    max_padding
        Use the padded table when it has at most ``max_padding × T`` slots, else the flat
        layout (0 forces flat, ``inf`` forces padded).

    Returns
    -------
    Slots
        Tracks keep their order within an entity.
    """
    n_tracks = int(entity.numel())
    device = entity.device
    counts = torch.bincount(entity, minlength=n_entities)
    order = torch.argsort(entity, stable=True)
    sorted_entity = entity[order]
    starts = torch.cumsum(counts, 0) - counts
    width = max(1, int(counts.max())) if n_tracks else 1
    if n_entities * width <= max_padding * max(n_tracks, 1):
        track = torch.full((n_entities, width), n_tracks, dtype=torch.long, device=device)
        feat = torch.zeros((n_entities, width), dtype=torch.long, device=device)
        rank = torch.arange(n_tracks, device=device) - starts[sorted_entity]
        track[sorted_entity, rank] = order
        feat[sorted_entity, rank] = feature[order]
    else:
        track = feat = torch.zeros((0, 0), dtype=torch.long, device=device)
    return Slots(
        entity=entity,
        order=order,
        feature=feature[order],
        offsets=starts,
        pad_track=track,
        pad_feature=feat,
    )


class SignalEmbedder(nn.Module):
    """``h_e = ReLU(W y_e + b) + u_e`` for every entity ``e`` of one axis.

    ``y_e`` is the entity's vector over the other axis holding its support values divided by
    ``N_e``, its number of support values at the bin (0 where unobserved); ``u_e`` is the
    entity's learned global embedding.

    Parameters
    ----------
    n_entities
        Entities on this axis (biosamples for the biosample embedder).
    n_features
        Entities on the other axis (the length of ``y_e``).
    dim
        Embedding size.
    """

    def __init__(self, n_entities: int, n_features: int, dim: int) -> None:
        super().__init__()
        self.signal = nn.Linear(n_features, dim)
        # Keras' "uniform" initialiser, as in the reference implementation.
        self.global_embedding = nn.Parameter(torch.empty(n_entities, dim).uniform_(-0.05, 0.05))
        # Rows appended by `grow` live in their own parameter so that fitting only them is a
        # matter of requires_grad (no gradient masking that a reused optimizer could undo).
        self.new_embedding = nn.Parameter(torch.empty(0, dim), requires_grad=False)

    @property
    def n_entities(self) -> int:
        """Number of entities (rows of the global embedding table, new rows included)."""
        return self.global_embedding.shape[0] + self.new_embedding.shape[0]

    @property
    def embedding(self) -> Tensor:
        """``[n_entities, dim]``: the global embeddings ``u_e``, old rows then new rows."""
        if self.new_embedding.shape[0] == 0:
            return self.global_embedding
        return torch.cat([self.global_embedding, self.new_embedding], 0)

    def grow(self, n_entities: int, n_features: int) -> None:
        """Append entities and features; only the new global embedding rows are trainable.

        Rows added by an earlier call join the old rows. A new feature's column of the signal
        weight starts as the mean of the existing columns (a new biosample's signal feeds the
        assay embeddings like an average biosample's) and is frozen with the rest.

        Parameters
        ----------
        n_entities
            Entities to append (new rows of ``u``).
        n_features
            Features to append (new input columns of the signal layer).
        """
        dim = self.global_embedding.shape[1]
        dev = self.global_embedding.device
        self.global_embedding = nn.Parameter(self.embedding.detach().clone(), requires_grad=False)
        self.new_embedding = nn.Parameter(
            torch.empty(n_entities, dim, device=dev).uniform_(-0.05, 0.05),
            requires_grad=n_entities > 0,
        )
        if n_features:
            w = self.signal.weight.detach()
            mean = w.mean(1, keepdim=True) if w.shape[1] else torch.zeros(dim, 1, device=dev)
            w = torch.cat([w, mean.expand(-1, n_features)], 1)
            self.signal.weight = nn.Parameter(w.clone(), requires_grad=False)
            self.signal.in_features = w.shape[1]

    def split_new(self, n_new: int) -> None:
        """Make the last ``n_new`` rows the "new" rows (to load a state saved after `grow`)."""
        emb = self.embedding.detach()
        n_old = emb.shape[0] - n_new
        self.global_embedding = nn.Parameter(emb[:n_old].clone())
        self.new_embedding = nn.Parameter(emb[n_old:].clone(), requires_grad=n_new > 0)

    def forward(self, values: Tensor, support: Tensor, slots: Slots) -> tuple[Tensor, Tensor]:
        """Embed every entity at every bin.

        Parameters
        ----------
        values
            ``[B, T + 1]`` float: track values at ``B`` bins, already zero where not in the
            support; the last column is the always-zero padding column.
        support
            ``[B, T + 1]`` bool: which values are support (observed and not a target).
        slots
            The entity → track table of this axis.

        Returns
        -------
        h
            ``[B, n_entities, dim]`` float: the local embeddings ``h_e``.
        observed
            ``[B, n_entities]`` bool: entities with at least one support value (attention keys).
        """
        n = self.n_entities
        if slots.padded:
            y = values[:, slots.pad_track]  # [B, n, L]
            n_obs = support[:, slots.pad_track].sum(-1).to(y.dtype)  # [B, n]
            y = y / n_obs.clamp(min=1).unsqueeze(-1)
            weight = self.signal.weight.t()[slots.pad_feature]  # [n, L, dim]
            pre = torch.bmm(y.transpose(0, 1), weight).transpose(0, 1)
        else:
            b, t = values.shape[0], slots.entity.shape[0]
            sup = support[:, :t].to(values.dtype)
            n_obs = values.new_zeros(b, n).index_add_(1, slots.entity, sup)  # [B, n]
            y = values[:, :t] / n_obs.clamp(min=1)[:, slots.entity]  # [B, T]
            offsets = slots.offsets + t * torch.arange(b, device=values.device).unsqueeze(1)
            pre = F.embedding_bag(
                slots.feature.repeat(b),
                self.signal.weight.t().contiguous(),
                offsets.flatten(),
                mode="sum",
                per_sample_weights=y[:, slots.order].flatten(),
            ).view(b, n, -1)
        pre = pre + self.signal.bias
        return torch.relu(pre) + self.embedding, n_obs > 0


class Dropout(nn.Module):
    """Dropout whose CPU mask costs a sixth of ``nn.Dropout``'s.

    On a CPU, ``torch.bernoulli`` draws one random number per element and took 37 % of an
    eDICE training step at CPU size. Here every 64-bit random word gives eight one-byte
    uniforms, each compared with ``round(p · 256)``: the drop rate is ``p`` to within 1/512
    and the kept values are scaled by ``1 / (1 − p')`` for the rate ``p'`` actually used, so
    the expectation is unchanged. On other devices it is ``nn.functional.dropout``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        cut = min(255, max(1, round(self.p * 256)))
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= cut
        return x * keep.to(x.dtype).mul_(256.0 / (256 - cut))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SetAttentionBlock(nn.Module):
    """Set-Transformer SAB without layer norm, evaluated at a subset of query entities.

    ``out = x_q + Dropout(MHA(x_q, x, x))``; ``out = out + Dropout(FFN(out))`` with
    ``FFN = Linear(dim, ffn_hidden) → ReLU → Linear(ffn_hidden, dim)``.

    Parameters
    ----------
    dim
        Embedding size (divisible by ``heads``).
    heads
        Attention heads.
    ffn_hidden
        Hidden units of the feed-forward network.
    dropout
        Dropout on the attention and feed-forward outputs (training only).
    """

    def __init__(self, dim: int, heads: int, ffn_hidden: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(
                f"eDICE attention: dim {dim} is not divisible by heads; expected a divisor, "
                f"got heads={heads}. Change dim or heads."
            )
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_hidden), nn.ReLU(), nn.Linear(ffn_hidden, dim))
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor, query: Tensor | None = None) -> Tensor:
        """Contextualise the queried entities against the observed ones.

        Parameters
        ----------
        x
            ``[B, n, dim]`` float: local embeddings of all entities.
        key_mask
            ``[B, n]`` bool: entities that may be attended to (observed at the bin).
        query
            ``[B, K]`` long: entities to return; ``None`` returns all ``n``.

        Returns
        -------
        Tensor
            ``[B, K, dim]`` float (``K = n`` when ``query`` is None). A bin with no observed
            entity gets no attention update (the attention values are zero).
        """
        b, n, dim = x.shape
        xq = x if query is None else torch.gather(x, 1, query.unsqueeze(-1).expand(-1, -1, dim))
        k_len = xq.shape[1]
        head = dim // self.heads

        def split(t: Tensor, length: int) -> Tensor:
            return t.view(b, length, self.heads, head).transpose(1, 2)

        q = split(self.query(xq), k_len)
        k = split(self.key(x), n)
        v = split(self.value(x), n)
        has_key = key_mask.any(1)
        # A bin with no observed entity would softmax over nothing (NaN); let it attend to
        # everything and zero the result instead.
        mask = (key_mask | ~has_key.unsqueeze(1))[:, None, None, :]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        att = att.transpose(1, 2).reshape(b, k_len, dim) * has_key[:, None, None].to(att.dtype)
        out = xq + self.dropout(self.out(att))
        return out + self.dropout(self.ffn(out))


class EDiceNet(nn.Module):
    """The eDICE network: two signal embedders, two SABs and the output MLP.

    Parameters
    ----------
    n_biosamples, n_assays
        Vocabulary sizes.
    dim
        Embedding size (paper: 256).
    heads
        Attention heads (paper: 4).
    ffn_hidden
        Hidden units of the attention feed-forward network (paper: 128).
    attention_dropout
        Dropout inside the attention blocks (reference implementation: 0.1).
    mlp_hidden, mlp_layers
        Output MLP width and depth (paper: 2 × 2,048).
    mlp_dropout
        Dropout after each hidden layer of the MLP (paper: 0.3).
    """

    def __init__(
        self,
        n_biosamples: int,
        n_assays: int,
        *,
        dim: int = 256,
        heads: int = 4,
        ffn_hidden: int = 128,
        attention_dropout: float = 0.1,
        mlp_hidden: int = 2048,
        mlp_layers: int = 2,
        mlp_dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.biosample_embedder = SignalEmbedder(n_biosamples, n_assays, dim)
        self.assay_embedder = SignalEmbedder(n_assays, n_biosamples, dim)
        self.biosample_attention = SetAttentionBlock(dim, heads, ffn_hidden, attention_dropout)
        self.assay_attention = SetAttentionBlock(dim, heads, ffn_hidden, attention_dropout)
        layers: list[nn.Module] = []
        width = 2 * dim
        for _ in range(mlp_layers):
            layers += [nn.Linear(width, mlp_hidden), nn.ReLU(), Dropout(mlp_dropout)]
            width = mlp_hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(
        self,
        values: Tensor,
        support: Tensor,
        biosample_slots: Slots,
        assay_slots: Slots,
        target_biosample: Tensor,
        target_assay: Tensor,
    ) -> Tensor:
        """Predict target tracks at a batch of bins.

        Parameters
        ----------
        values
            ``[B, T]`` float: values of the ``T`` candidate support tracks at ``B`` bins
            (arcsinh scale); anything outside ``support`` is ignored.
        support
            ``[B, T]`` bool: which values are observed and given as input.
        biosample_slots, assay_slots
            From :func:`build_slots` over the same ``T`` tracks.
        target_biosample, target_assay
            ``[B, K]`` long: the (biosample, assay) of ``K`` targets per bin.

        Returns
        -------
        Tensor
            ``[B, K]`` float: predicted values (arcsinh scale).
        """
        pad = values.new_zeros(values.shape[0], 1)
        support_p = torch.cat([support, pad.bool()], 1)
        values_p = torch.cat([values, pad], 1) * support_p.to(values.dtype)
        hb, keys_b = self.biosample_embedder(values_p, support_p, biosample_slots)
        ha, keys_a = self.assay_embedder(values_p, support_p, assay_slots)
        c = self.biosample_attention(hb, keys_b, target_biosample)
        a = self.assay_attention(ha, keys_a, target_assay)
        return self.mlp(torch.cat([c, a], -1)).squeeze(-1)


def max_targets(n_tracks: int, n_targets: int | float) -> int:
    """Targets drawn per bin at most (the ``K`` of :func:`select_targets`) for ``n_tracks``.

    Parameters
    ----------
    n_tracks
        Candidate tracks ``T`` per bin.
    n_targets
        As in :func:`select_targets`.

    Returns
    -------
    int
        ``min(n_targets, T - 1)`` for a count, ``ceil(n_targets * T)`` (at most ``T - 1``) for a
        fraction; at least 1.
    """
    k = math.ceil(n_targets * n_tracks) if isinstance(n_targets, float) else n_targets
    return max(1, min(k, n_tracks - 1))


def select_targets(
    observed: Tensor, n_targets: int | float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw random target tracks per bin among its observed tracks, vectorised.

    Parameters
    ----------
    observed
        ``[B, T]`` bool: tracks observed at each bin.
    n_targets
        An ``int`` ≥ 1: that many targets per bin; a ``float`` in (0, 1): that fraction of the
        bin's observed tracks, rounded, at least 1. Either way at least one observed track per
        bin is left as support, so a bin with fewer than two observed tracks gets no target.
    generator
        Random generator on ``observed.device``.

    Returns
    -------
    target
        ``[B, K]`` long: track indices; ``K`` depends only on ``T`` and ``n_targets``.
    valid
        ``[B, K]`` bool: which of the ``K`` entries are real targets.
    """
    b, t = observed.shape
    n_obs = observed.sum(1)
    if isinstance(n_targets, float):
        k = torch.round(n_obs.to(torch.float64) * n_targets).long().clamp(min=1)
    else:
        k = torch.full_like(n_obs, n_targets)
    k_max = max_targets(t, n_targets)
    k = torch.minimum(k, n_obs - 1).clamp(min=0)
    scores = torch.rand(b, t, generator=generator, device=observed.device)
    scores = scores.masked_fill(~observed, 2.0)
    target = torch.topk(scores, k_max, dim=1, largest=False).indices
    valid = torch.arange(k_max, device=observed.device) < k.unsqueeze(1)
    return target, valid


# --------------------------------------------------------------------------------------------
# The model behind the contract
# --------------------------------------------------------------------------------------------


class EDiceParams(Section):
    """eDICE hyperparameters; the defaults are the paper's (≈ 6 M parameters on Roadmap).

    Attributes
    ----------
    dim
        Size of every biosample and assay embedding (paper: 256).
    heads
        Attention heads per block (paper: 4).
    ffn_hidden
        Hidden units of the attention block's feed-forward network (paper: 128).
    attention_dropout
        Dropout on the attention and feed-forward outputs (reference implementation: 0.1).
    mlp_hidden, mlp_layers
        Output MLP: ``mlp_layers`` hidden layers of ``mlp_hidden`` units (paper: 2 × 2,048).
    mlp_dropout
        Dropout after each hidden MLP layer (paper: 0.3).
    n_targets
        Tracks masked as targets per training bin: an ``int`` count (paper: 120 of Roadmap's
        ~811 training tracks) or a ``float`` in (0, 1), a fraction of the bin's observed tracks.
        At least one observed track per bin always stays in the support.
    aux_targets
        Cross-species: other-species tracks at aligned bins may also be drawn as targets (needed
        to learn assays that only the other species has).
    aux_reduce
        Cross-species: a target bin aligned several times takes, per other-species track, the
        ``"mean"`` over its alignment rows or the ``"first"`` row (alignment-table order).
    aux_max_alignments
        Cross-species: at most this many alignment rows per bin enter the mean (bounds memory
        in repeats; rows beyond it are ignored).
    predict_batch_size
        Bins per forward pass in :meth:`EDice.predict` at most; fewer when one
        ``[bins, entities, dim]`` activation would exceed 2**26 elements (256 MB in float32),
        e.g. ~1,700 bins at paper sizes on Roadmap, ~110 for a 2,300-entity cross-species
        vocabulary.
    """

    dim: int = Field(256, ge=1)
    heads: int = Field(4, ge=1)
    ffn_hidden: int = Field(128, ge=1)
    attention_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    mlp_hidden: int = Field(2048, ge=1)
    mlp_layers: int = Field(2, ge=1)
    mlp_dropout: float = Field(0.3, ge=0.0, lt=1.0)
    n_targets: int | float = 120
    aux_targets: bool = True
    aux_reduce: Literal["mean", "first"] = "mean"
    aux_max_alignments: int = Field(8, ge=1)
    predict_batch_size: int = Field(4096, ge=1)

    @field_validator("n_targets")
    @classmethod
    def _check_targets(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"n_targets: a fraction must lie in (0, 1); got {v}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"n_targets: a count must be >= 1; got {v}")
        return v

    @field_validator("heads")
    @classmethod
    def _check_heads(cls, v: int, info: ValidationInfo) -> int:
        dim = info.data.get("dim")
        if dim is not None and dim % v:
            raise ValueError(f"heads: dim {dim} must be divisible by heads, got heads={v}")
        return v


#: Largest ``[bins, entities, dim]`` activation of one prediction pass, in elements.
_PREDICT_ELEMENTS = 2**26


@dataclass
class _Tracks:
    """The candidate support tracks of one ChromData (target species first, then aux)."""

    biosample: Tensor  # [T] long
    assay: Tensor  # [T] long
    biosample_slots: Slots
    assay_slots: Slots
    n_primary: int
    # Aux lookup (None without aux): alignment rows sorted by target bin.
    aux_order: Tensor | None = None  # [A] long
    aux_start: Tensor | None = None  # [n_local] long
    aux_count: Tensor | None = None  # [n_local] long
    aux_width: int = 0


@register("edice")
class EDice(ImputationModel):
    """eDICE behind the model contract (see the module docstring for the method).

    Training batches are bin-major: ``values[:, bins]`` gathered on the device; at every bin a
    random subset of the observed tracks (``n_targets``) is hidden and predicted from the rest.
    :meth:`predict` uses every training track (and every aligned other-species track) as
    support. Transfer learning: :meth:`freeze` the ``"global_embeddings"`` and ``"attention"``
    to fine-tune the signal embedders and the MLP (paper: 5 epochs at 1e-5 between individuals,
    20 epochs at 1e-4 from Roadmap); :meth:`extend` adds biosamples or assays by fitting only
    their global embeddings.
    """

    Params: ClassVar[type[Section]] = EDiceParams
    freezable: ClassVar[frozenset[str]] = frozenset(
        {"global_embeddings", "signal_embedders", "attention", "mlp"}
    )
    predicts_from_tracks: ClassVar[bool] = True
    #: Adam learning rate of the paper (the loop reads the rate from its own config).
    default_lr: ClassVar[float] = 3e-4

    def __init__(self, params: EDiceParams, vocab: Vocabulary) -> None:
        super().__init__(params, vocab)
        self.net = EDiceNet(
            len(vocab.biosamples),
            len(vocab.assays),
            dim=params.dim,
            heads=params.heads,
            ffn_hidden=params.ffn_hidden,
            attention_dropout=params.attention_dropout,
            mlp_hidden=params.mlp_hidden,
            mlp_layers=params.mlp_layers,
            mlp_dropout=params.mlp_dropout,
        )
        self._tracks_cache: tuple[tuple[Tensor | None, ...], _Tracks] | None = None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, params: EDiceParams, vocab: Vocabulary, data: ChromData) -> EDice:
        """A freshly initialised eDICE for ``vocab`` on ``data.device``.

        Raises
        ------
        InputDataError
            When a track's biosample/assay index lies outside the vocabulary, or ``data``
            holds no training track.
        """
        cls._check_data(vocab, data)
        return cls(params, vocab).to(data.device)

    @classmethod
    def from_state(
        cls,
        params: EDiceParams,
        vocab: Vocabulary,
        data: ChromData,
        state_dict: Mapping[str, Tensor],
    ) -> EDice:
        """Rebuild a saved model, including rows added by :meth:`extend` as "new" rows.

        A model saved after :meth:`extend` comes back as ``extend`` left it: only the new
        global embedding rows trainable. Other freezing is not saved; apply :meth:`freeze`.
        """
        model = cls.build(params, vocab, data)
        n_new = 0
        for name in ("biosample_embedder", "assay_embedder"):
            rows = state_dict.get(f"net.{name}.new_embedding")
            k = 0 if rows is None else int(rows.shape[0])
            getattr(model.net, name).split_new(k)
            n_new += k
        model.load_state_dict(state_dict)
        if n_new:
            model._train_only_new_rows()
        return model.to(data.device)

    @staticmethod
    def _check_data(vocab: Vocabulary, data: ChromData) -> None:
        where = f"eDICE chrom {data.chrom!r} bins [{data.lo}, {data.hi})"
        problems = []
        if data.n_experiments == 0:
            problems.append("no training track; expected at least one")
        groups = [("", data.biosample, data.assay)]
        if data.aux_biosample is not None:
            groups.append(("aux_", data.aux_biosample, data.aux_assay))
        if data.val_biosample is not None:
            groups.append(("val_", data.val_biosample, data.val_assay))
        for prefix, bio, assay in groups:
            for name, idx, n in (
                ("biosample", bio, len(vocab.biosamples)),
                ("assay", assay, len(vocab.assays)),
            ):
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                    problems.append(
                        f"{prefix}{name} index out of range; expected 0..{n - 1}, got "
                        f"{int(idx.min())}..{int(idx.max())}"
                    )
        if problems:
            raise InputDataError(
                f"{where}: " + "; ".join(problems) + ". Build ChromData and the Vocabulary "
                "from the same experiments."
            )

    # -- data layout -----------------------------------------------------------------------
    def _tracks(self, data: ChromData) -> _Tracks:
        """Slot tables and aux lookup for ``data`` (cached for the last ChromData seen)."""
        # Keyed by the index tensors themselves (held, so their ids cannot be reused).
        key = (data.biosample, data.assay, data.aux_bin, data.aux_biosample, data.aux_assay)
        cached = self._tracks_cache
        if cached is not None and all(x is y for x, y in zip(cached[0], key)):
            return cached[1]
        dev = data.device
        bio, assay = data.biosample.to(dev), data.assay.to(dev)
        has_aux = data.aux_values is not None and data.aux_bin.numel() > 0
        if has_aux:
            bio = torch.cat([bio, data.aux_biosample.to(dev)])
            assay = torch.cat([assay, data.aux_assay.to(dev)])
        n_bio, n_assay = self.net.biosample_embedder.n_entities, self.net.assay_embedder.n_entities
        tracks = _Tracks(
            biosample=bio,
            assay=assay,
            biosample_slots=build_slots(bio, assay, n_bio),
            assay_slots=build_slots(assay, bio, n_assay),
            n_primary=data.n_experiments,
        )
        if has_aux:
            count = torch.bincount(data.aux_bin, minlength=data.n_local)
            tracks.aux_order = torch.argsort(data.aux_bin, stable=True)
            tracks.aux_start = torch.cumsum(count, 0) - count
            tracks.aux_count = count
            tracks.aux_width = (
                1
                if self.params.aux_reduce == "first"
                else max(1, min(self.params.aux_max_alignments, int(count.max())))
            )
        self._tracks_cache = (key, tracks)
        return tracks

    def _gather(self, data: ChromData, tracks: _Tracks, bins: Tensor) -> tuple[Tensor, Tensor]:
        """Values and observed mask of every candidate track at ``bins``.

        Parameters
        ----------
        bins
            ``[B]`` long local bins.

        Returns
        -------
        values
            ``[B, T]`` float32: target-species tracks, then other-species tracks (the mean over
            the bin's alignment rows, 0 where unaligned).
        observed
            ``[B, T]`` bool: target-species tracks except at validation cells
            (``data.heldout``); other-species tracks where aligned.
        """
        values = data.values[:, bins].t().float()
        if data.heldout is None:
            observed = torch.ones_like(values, dtype=torch.bool)
        else:  # validation cells are neither support nor targets
            observed = ~data.heldout[:, data.block_of(bins)].t()
        if tracks.aux_order is None:
            return values, observed
        n_rows = tracks.aux_order.shape[0]
        count = tracks.aux_count[bins].clamp(max=tracks.aux_width)  # [B]
        offset = torch.arange(tracks.aux_width, device=bins.device)
        rows = (tracks.aux_start[bins].unsqueeze(1) + offset).clamp(max=n_rows - 1)  # [B, w]
        rows = tracks.aux_order[rows]
        keep = (offset < count.unsqueeze(1)).float()  # [B, w]
        aux = data.aux_values[:, rows].float()  # [H, B, w]
        aux = (aux * keep).sum(-1) / count.clamp(min=1).float()  # [H, B]
        aux_observed = (count > 0).unsqueeze(1).expand(-1, aux.shape[0])
        return torch.cat([values, aux.t()], 1), torch.cat([observed, aux_observed], 1)

    # -- training --------------------------------------------------------------------------
    def targets_per_bin(self, data: ChromData) -> int:
        """``K``: targets drawn per training bin (at most) for ``data``'s tracks."""
        return max_targets(int(self._tracks(data).biosample.shape[0]), self.params.n_targets)

    def epoch_examples(self, data: ChromData) -> int:
        """``K`` target cells per bin (:meth:`targets_per_bin`)."""
        return data.n_local * self.targets_per_bin(data)

    def steps_per_epoch(self, data: ChromData, batch_size: int) -> int:
        """``ceil(bins / (batch_size // K))``, exactly as :meth:`batches` draws."""
        return max(1, math.ceil(data.n_local / max(1, batch_size // self.targets_per_bin(data))))

    def batches(
        self, data: ChromData, generator: torch.Generator, batch_size: int
    ) -> Iterator[Batch]:
        """One epoch of bin-major batches over the worker's bins in a fresh random order.

        Parameters
        ----------
        data
            The worker's slab; every tensor on one device.
        generator
            Random generator on ``data.device`` (bin order and target draws).
        batch_size
            Training examples (target cells) per batch, as for every model of the loop: a batch
            holds ``max(1, batch_size // K)`` bins, ``K`` = :meth:`targets_per_bin`. E.g. the
            loop's default 40,000 gives 333 bins at Roadmap's 120 targets per bin.

        Yields
        ------
        Batch
            ``size`` = ``B × K`` target cells (exact unless bins differ in their number of
            observed tracks, i.e. cross-species, where some cells are padding);
            tensors ``values`` [B, T] float32, ``support``
            [B, T] bool, ``target`` [B, K] long (track indices), ``valid`` [B, K] bool,
            ``target_biosample`` / ``target_assay`` [B, K] long, and the slot tables of the
            ``T`` tracks (shared, not copied).
        """
        tracks = self._tracks(data)
        k = max_targets(int(tracks.biosample.shape[0]), self.params.n_targets)
        n_bins = max(1, batch_size // k)
        perm = torch.randperm(data.n_local, generator=generator, device=data.device)
        for start in range(0, data.n_local, n_bins):
            bins = perm[start : start + n_bins]
            values, observed = self._gather(data, tracks, bins)
            targetable = observed
            if not self.params.aux_targets and observed.shape[1] > tracks.n_primary:
                targetable = observed.clone()
                targetable[:, tracks.n_primary :] = False
            target, valid = select_targets(targetable, self.params.n_targets, generator)
            hidden = torch.zeros_like(observed).scatter_(1, target, valid)
            yield Batch(
                size=int(bins.shape[0]) * k,
                tensors={
                    "values": values,
                    "support": observed & ~hidden,
                    "target": target,
                    "valid": valid,
                    "target_biosample": tracks.biosample[target],
                    "target_assay": tracks.assay[target],
                    **tracks.biosample_slots.tensors("biosample_slots."),
                    **tracks.assay_slots.tensors("assay_slots."),
                },
            )

    def loss(self, batch: Batch) -> Tensor:
        """Mean squared error over the batch's valid targets (float32 scalar)."""
        t = batch.tensors
        pred = self.net(
            t["values"],
            t["support"],
            Slots.from_tensors("biosample_slots.", t),
            Slots.from_tensors("assay_slots.", t),
            t["target_biosample"],
            t["target_assay"],
        )
        truth = torch.gather(t["values"], 1, t["target"])
        valid = t["valid"].float()
        return ((pred - truth) ** 2 * valid).sum() / valid.sum().clamp(min=1.0)

    # -- inference -------------------------------------------------------------------------
    def predict(self, data: ChromData, biosample: int, assay: int) -> Tensor:
        """Impute track (biosample, assay) over the worker's bins.

        Every training track is support, except a training track of the same (biosample,
        assay), which is hidden so the result is an imputation, not a copy. Cross-species:
        aligned other-species tracks join the support at their bins.

        Parameters
        ----------
        data
            The worker's slab.
        biosample, assay
            Vocabulary indices of the track to impute.

        Returns
        -------
        Tensor
            ``[hi - lo]`` float32 on ``data.device``, arcsinh scale.

        Raises
        ------
        EpirayError
            When an index lies outside the model's vocabulary.
        """
        return self.predict_many(data, [(biosample, assay)])[0]

    @torch.no_grad()
    def predict_many(self, data: ChromData, pairs: list[tuple[int, int]]) -> Tensor:
        """Impute several tracks in one pass over the bins.

        The embedders and the attention keys are computed once per bin for all ``pairs``, so
        imputing ``P`` tracks costs far less than ``P`` calls of :meth:`predict` (at paper
        sizes the attention projections of every entity outweigh one target's MLP ~4×).
        The support is every training track except those of the requested pairs (all of them
        at once: for a leave-one-out of training tracks call :meth:`predict` per track).

        Parameters
        ----------
        data
            The worker's slab.
        pairs
            ``P`` (biosample index, assay index) pairs.

        Returns
        -------
        Tensor
            ``[P, hi - lo]`` float32 on ``data.device``, arcsinh scale.

        Raises
        ------
        EpirayError
            When an index lies outside the model's vocabulary.
        """
        n_bio, n_assay = self.net.biosample_embedder.n_entities, self.net.assay_embedder.n_entities
        bad = [(b, a) for b, a in pairs if not (0 <= b < n_bio and 0 <= a < n_assay)]
        if bad or not pairs:
            raise EpirayError(
                f"eDICE predict chrom {data.chrom!r}: (biosample, assay) pairs {bad or pairs} "
                f"invalid; expected at least one pair with indices below ({n_bio}, {n_assay}). "
                "Extend the model for new biosamples or assays."
            )
        dev = data.device
        tracks = self._tracks(data)
        want_b = torch.tensor([b for b, _ in pairs], device=dev)
        want_a = torch.tensor([a for _, a in pairs], device=dev)
        hidden = ((tracks.biosample[:, None] == want_b) & (tracks.assay[:, None] == want_a)).any(
            1
        )  # [T]
        was_training = self.training
        self.eval()
        try:
            out = torch.empty(len(pairs), data.n_local, dtype=torch.float32, device=dev)
            per_bin = (n_bio + n_assay) * self.params.dim
            step = max(1, min(self.params.predict_batch_size, _PREDICT_ELEMENTS // per_bin))
            for start in range(0, data.n_local, step):
                bins = torch.arange(start, min(start + step, data.n_local), device=dev)
                values, observed = self._gather(data, tracks, bins)
                n = bins.shape[0]
                pred = self.net(
                    values,
                    observed & ~hidden,
                    tracks.biosample_slots,
                    tracks.assay_slots,
                    want_b.expand(n, -1),
                    want_a.expand(n, -1),
                )
                out[:, start : start + n] = pred.t()
        finally:
            self.train(was_training)
        return out

    @torch.no_grad()
    def predict_cells(self, data: ChromData, track: Tensor, bins: Tensor) -> Tensor:
        """Predictions ``[N]`` float32 of the cells (training track ``track[i]``, local bin
        ``bins[i]``), each from the other observed tracks at its bin: the cells asked for at a
        bin are its targets and hidden from its support, as are validation cells."""
        dev = data.device
        n = track.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=dev)
        if n == 0:
            return out
        tracks = self._tracks(data)
        order = torch.argsort(bins, stable=True)
        ub, counts = torch.unique_consecutive(bins[order], return_counts=True)
        row = torch.repeat_interleave(torch.arange(ub.shape[0], device=dev), counts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n, device=dev) - starts[row]
        k = int(counts.max())
        target = torch.zeros(ub.shape[0], k, dtype=torch.long, device=dev)
        valid = torch.zeros(ub.shape[0], k, dtype=torch.bool, device=dev)
        target[row, rank] = track[order]
        valid[row, rank] = True
        n_bio, n_assay = self.net.biosample_embedder.n_entities, self.net.assay_embedder.n_entities
        per_bin = (n_bio + n_assay) * self.params.dim
        step = max(1, min(self.params.predict_batch_size, _PREDICT_ELEMENTS // per_bin))
        pred = torch.empty(ub.shape[0], k, dtype=torch.float32, device=dev)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, ub.shape[0], step):
                sl = slice(start, start + step)
                values, observed = self._gather(data, tracks, ub[sl])
                hidden = torch.zeros_like(observed).scatter_(1, target[sl], valid[sl])
                pred[sl] = self.net(
                    values,
                    observed & ~hidden,
                    tracks.biosample_slots,
                    tracks.assay_slots,
                    tracks.biosample[target[sl]],
                    tracks.assay[target[sl]],
                ).float()
        finally:
            self.train(was_training)
        out[order] = pred[row, rank]
        return out

    # -- parameters and transfer -----------------------------------------------------------
    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter (no genome factors), trainable or not."""
        return list(self.parameters())

    def sparse_parameters(self) -> list[nn.Parameter]:
        """None: eDICE has no worker-local parameters."""
        return []

    def _parts(self) -> dict[str, list[nn.Parameter]]:
        n = self.net
        return {
            "global_embeddings": [
                n.biosample_embedder.global_embedding,
                n.biosample_embedder.new_embedding,
                n.assay_embedder.global_embedding,
                n.assay_embedder.new_embedding,
            ],
            "signal_embedders": [
                *n.biosample_embedder.signal.parameters(),
                *n.assay_embedder.signal.parameters(),
            ],
            "attention": [*n.biosample_attention.parameters(), *n.assay_attention.parameters()],
            "mlp": list(n.mlp.parameters()),
        }

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """The global biosample and assay embeddings ``u`` (new rows included)."""
        return (
            self.net.biosample_embedder.embedding.detach(),
            self.net.assay_embedder.embedding.detach(),
        )

    def freeze(self, what: set[str]) -> None:
        """Stop training the named parts: any of ``freezable``.

        ``{"global_embeddings", "attention"}`` leaves the signal embedders and the output MLP
        trainable (the paper's transfer learning).

        Raises
        ------
        ConfigError
            When ``what`` names an unknown part.
        """
        self._set_trainable(what, False)

    def unfreeze(self, what: set[str]) -> None:
        """Train the named parts again (any of ``freezable``): fine-tuning after
        :meth:`extend`, e.g. ``{"signal_embedders", "mlp"}`` beside the new embedding rows
        (``epiray extend``'s ``finetune``). Empty parameters stay frozen.

        Raises
        ------
        ConfigError
            When ``what`` names an unknown part.
        """
        self._set_trainable(what, True)

    def _set_trainable(self, what: set[str], trainable: bool) -> None:
        """``requires_grad`` of every parameter of the named parts (checked first); empty
        parameters are never trainable."""
        self.check_freeze(what)
        parts = self._parts()
        for name in what:
            for p in parts[name]:
                p.requires_grad_(trainable and p.numel() > 0)

    def extend(self, vocab: Vocabulary) -> None:
        """Grow for biosamples/assays appended to the vocabulary; fit only their embeddings.

        Each new biosample (or donor, or assay) gets one new global embedding row; every other
        parameter is frozen (``requires_grad = False``). The new entity's input column in the
        other axis's signal layer starts as the mean of the existing columns and stays frozen.
        A vocabulary with nothing new (e.g. re-applying ``extend`` when resuming) keeps the
        current new rows and only re-freezes everything else.

        Parameters
        ----------
        vocab
            The model's vocabulary with entries appended (``Vocabulary.extend``).

        Raises
        ------
        EpirayError
            When ``vocab`` does not start with the model's biosamples and assays.
        """
        old = self.vocab
        nb, na = len(old.biosamples), len(old.assays)
        if vocab.biosamples[:nb] != old.biosamples or vocab.assays[:na] != old.assays:
            raise EpirayError(
                f"eDICE extend chrom {old.chrom!r}: the new vocabulary reorders or drops "
                "biosamples/assays; expected the old names first, in order. Build it with "
                "Vocabulary.extend."
            )
        new_b, new_a = len(vocab.biosamples) - nb, len(vocab.assays) - na
        if new_b or new_a:
            self.net.biosample_embedder.grow(new_b, new_a)
            self.net.assay_embedder.grow(new_a, new_b)
        self._train_only_new_rows()
        self.vocab = vocab
        self._tracks_cache = None

    def _train_only_new_rows(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        for emb in (self.net.biosample_embedder, self.net.assay_embedder):
            emb.new_embedding.requires_grad_(emb.new_embedding.shape[0] > 0)

    def n_parameters(self) -> int:
        """Number of parameters (trainable or not)."""
        return sum(p.numel() for p in self.parameters())
