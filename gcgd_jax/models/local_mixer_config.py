"""The LocalMixer sizes of Ren et al.'s Table 2 (no JAX: configuration checks read them)."""

from __future__ import annotations

import dataclasses

__all__ = ["LOCAL_MIXER_CONFIGS", "LocalMixerConfig"]


@dataclasses.dataclass(frozen=True)
class LocalMixerConfig:
    """A LocalMixer size: ``features`` channels (``D``, also the hidden width),
    ``num_blocks`` blocks, ``patches_per_side`` (``n``: ``n x n`` tokens) and
    ``num_groups`` (``G``, dividing ``D``)."""

    features: int
    num_blocks: int
    patches_per_side: int
    num_groups: int


# Ren et al., Table 2 (size/patches per side/groups).
LOCAL_MIXER_CONFIGS: dict[str, LocalMixerConfig] = {
    "S/1/1": LocalMixerConfig(features=256, num_blocks=1, patches_per_side=1, num_groups=1),
    "M/1/16": LocalMixerConfig(features=512, num_blocks=1, patches_per_side=1, num_groups=16),
    "M/8/16": LocalMixerConfig(features=512, num_blocks=4, patches_per_side=8, num_groups=16),
    "L/32/64": LocalMixerConfig(features=2048, num_blocks=4, patches_per_side=32, num_groups=64),
}
