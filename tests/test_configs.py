"""The shipped training configs: they parse, and at the issue-17 shape (a 25,000-bin worker
of 29 tracks) their regime leaves every model enough optimiser steps to learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from epiray.config import load_config
from epiray.loop import regime
from epiray.models import Vocabulary, chrom_data_from_numpy, get_model
from epiray.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TRAIN_CONFIGS = sorted(
    p.name
    for p in (ROOT / "configs").glob("*.yaml")
    if p.name.startswith(("train_avocado", "edice"))
)


def test_every_model_has_a_shipped_config():
    assert {
        "train_avocado.yaml",
        "train_avocado_cross_species.yaml",
        "train_avocado_concat.yaml",
        "train_avocado_paper.yaml",
        "edice.yaml",
        "edice_cross_species.yaml",
        "edice_paper.yaml",
    } <= set(TRAIN_CONFIGS)


def _slab(n_bins: int = 25_000, n_biosamples: int = 6, n_assays: int = 5):
    rng = np.random.default_rng(0)
    pairs = [(b, a) for b in range(n_biosamples) for a in range(n_assays)][:29]
    vocab = Vocabulary.from_records(
        [(f"e{b}{a}", f"b{b}", f"a{a}", "mouse") for b, a in pairs], chrom="chrT", n_bins=n_bins
    )
    data = chrom_data_from_numpy(
        rng.random((len(pairs), n_bins), dtype=np.float32),
        [b for b, _ in pairs],
        [a for _, a in pairs],
        chrom="chrT",
        n_bins=n_bins,
        device="cpu",
    )
    return vocab, data


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_shipped_config_trains_long_enough(name):
    cfg = load_config(TrainConfig, ROOT / "configs" / name)
    assert cfg.folds.scheme in ("all", "none")  # a new user's run: train on every track
    # early stopping on validation cells: the final model withholds no experiment whole
    assert cfg.validation.scheme == "cells" and not cfg.validation.refit
    # Avocado calibrates against average activity (a calibration model withholds whole
    # experiments for the weight alone); eDICE is shipped without (not measured with it)
    assert cfg.validation.calibrate == (cfg.model.name == "avocado")
    params = dict(cfg.model.params)
    if params.get("variant") in ("cross_species", "concat"):
        # the regime of the target species' slab; the other species only adds examples
        params["variant"] = "mouse_only"
    vocab, data = _slab()
    klass = get_model(cfg.model.name)
    model = klass.build(klass.Params.model_validate(params), vocab, data)
    r = regime(cfg.train, model, data)
    assert r.warning is None, r.warning
    assert r.steps_per_epoch >= 8 and r.max_steps >= cfg.train.min_steps
    if cfg.train.patience is not None:
        # early stopping cannot end the run before it has taken min_steps / 4 steps
        assert r.steps_per_epoch * cfg.train.patience >= cfg.train.min_steps // 4


def test_quickstart_trains_at_the_shipped_defaults(tmp_path):
    """The quickstart's models are the shipped configs' (model params, train and validation
    sections), so the README's quickstart table is what those configs give."""
    from epiray.quickstart import MODELS, QuickstartConfig, _train_config

    qs = QuickstartConfig(out=str(tmp_path))
    for label, (_, _, aux, file) in MODELS.items():
        shipped = load_config(TrainConfig, ROOT / "configs" / file)
        ours = _train_config(qs, tmp_path, label)
        assert ours.model.name == shipped.model.name, label
        assert dict(ours.model.params) == dict(shipped.model.params), label
        assert ours.aux_species == shipped.aux_species == aux, label
        assert ours.synteny == shipped.synteny, label
        assert ours.validation == shipped.validation.model_copy(update={"seed": qs.seed})
        assert ours.train == shipped.train.model_copy(update={"seed": qs.seed}), label
