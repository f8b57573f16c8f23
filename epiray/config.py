"""Typed, frozen configuration loaded from YAML.

Every section is a pydantic model with ``extra="forbid"``: an unknown key is an error naming the
file and the dotted key. Relative paths resolve against the directory of the YAML file.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)
