"""--delta_scaling input_channel: each delta entry on input channel j trained as s_j x theta, with
s_j = median_i ||x_i|| / ||x_j|| over the layer's input channels (norms over the calibration tokens).

Why: under Adam a trained entry moves about lr per step whatever its gradient, so its effect on the output
is about lr x ||x_j||: entries on the loudest channels (where a gradient mask crowds) change every token's
output most. With the reparametrisation each entry's effect is about lr x the median norm instead. Scaling
the gradient alone would do nothing under Adam, whose steps do not depend on the gradient's scale; here
the scales multiply the values in the forward pass and are folded into the saved adapter's values.
"""

from __future__ import annotations

import torch

from ...config import ConfigError

# A channel at least this many times quieter than the median gets the scale of one this quiet: a channel
# that is silent on the calibration tokens must not turn a small step into an unbounded change elsewhere.
MAX_SCALE = 100.0


def channel_scales(norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per targeted layer, s_j = median norm / ||x_j|| for each input channel (fp32, on the host)."""
    scales = {}
    for name, norm in norms.items():
        norm = norm.double().cpu()
        median = norm.median()
        if median <= 0:
            raise ConfigError(f"--delta_scaling input_channel: most input channels of {name} are silent on the "
                              "calibration examples, so their scale is undefined: drop --delta_scaling")
        scales[name] = (median / norm.clamp_min(median / MAX_SCALE)).float()
    return scales


def entry_scales(scales: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Each flat (row-major) index's input-channel scale."""
    return scales[indices.long().cpu() % scales.numel()]
