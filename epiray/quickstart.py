"""The quickstart: the whole epiray story on a generated human + mouse compendium.

Every step reuses what an earlier run left in the output folder (the synthetic data, the store,
finished parts), so re-running is cheap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from epiray.config import Section

log = logging.getLogger(__name__)


class QuickstartConfig(Section):
    """Embedded defaults of the quickstart (``configs/quickstart.yaml`` holds the same)."""

    out: str = "quickstart"
    seed: int = 0
    preset: Literal["default", "tiny"] = "default"
    dtype: Literal["float16", "float32"] = "float16"
    num_cpus: int | None = None


def run(cfg: QuickstartConfig, say: Callable[[str], None] = log.info) -> dict:
    """Run the quickstart; ``say`` receives one line per step (the CLI prints them)."""
    from epiray import synthetic
    from epiray.ingest import IngestConfig, ingest

    out = Path(cfg.out).resolve()
    data = out / "data"
    params = synthetic.SynthParams.preset(cfg.preset)
    info = data / "synth.json"
    fresh = True
    if info.is_file():
        rec = json.loads(info.read_text())
        fresh = rec.get("seed") != cfg.seed or rec.get("params") != params.model_dump(mode="json")
    if fresh:
        say(f"[1/3] generating the synthetic compendium in {data}")
        res = synthetic.generate(data, seed=cfg.seed, params=params, overwrite=True)
        say(res.describe())
    else:
        say(f"[1/3] reusing the synthetic compendium in {data}")

    say("[2/3] ingesting the tracks into the Parquet store (Ray Data)")
    icfg = IngestConfig(
        manifest=str(data / "manifest.tsv"),
        store=str(out / "store"),
        chroms="all",
        dtype=cfg.dtype,
        assemblies={},
        num_cpus=cfg.num_cpus,
    )
    store = ingest(icfg, resume=True)

    say("[3/3] store summary")
    say(store.describe())
    return {"out": str(out), "store": str(store.root)}
