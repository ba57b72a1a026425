"""Recording attention: running sums per layer, so memory does not grow with the number of steps.

`AttentionStore` is a controller that never changes attention. It keeps, for every recorded layer, the sum over steps
of the conditional half's probabilities (cross-attention with its heads, self-attention averaged over heads) and how
many steps went in, on the device the UNet runs on. Optionally it also keeps a per-step series (head mean) for the
layers a `series` predicate picks. `maps()` and `self_maps()` turn the sums into the small result objects of `maps.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .routing import AttentionController, LayerInfo, RunInfo, Site


@dataclass(frozen=True)
class RecordOptions:
    cross: bool = True  # record cross-attention
    cross_res: tuple[int, ...] | None = None  # map sides (longer side) to record cross-attention at; None: all
    self_attention: bool = True  # record self-attention (head mean) ...
    self_res: tuple[int, ...] | None = None  # ... at these map sides (longer side); None: the model's map side only
    # when it is small (RunInfo.self_map_side: 16 at SD's 64x64 latents and on shapes; none for a large MM-DiT grid)
    steps: tuple[int, int] | None = None  # [start, end) denoising steps to sum over; None: all
    places: tuple[str, ...] | None = None  # places to record (UNet: down, mid, up; MM-DiT: joint, single, image)


class AttentionStore(AttentionController):
    def __init__(self, options: RecordOptions = RecordOptions(), series: Callable[[Site], bool] | None = None):
        self.options = options
        self.series_filter = series
        self.sums: dict[str, torch.Tensor] = {}  # cross: (prompts, heads, pixels, tokens); self: (prompts, p, p)
        self.counts: dict[str, int] = {}
        self.layers: dict[str, LayerInfo] = {}
        self.res: dict[str, tuple[int, int]] = {}
        self.series: dict[str, list[torch.Tensor]] = {}  # per-step head means, for layers series() picks
        self.run: RunInfo | None = None
        self._self_sides: tuple[int, ...] = ()

    def clear(self) -> None:
        """Forget everything recorded (a new generation in the same `control` block)."""
        for recorded in (self.sums, self.counts, self.layers, self.res, self.series):
            recorded.clear()
        self.run = None

    def begin(self, run: RunInfo) -> None:
        self.run = run
        self._self_sides = self.options.self_res or ((run.self_map_side,) if run.self_map_side else ())

    def wants(self, site: Site) -> bool:
        o = self.options
        if o.places is not None and site.layer.place not in o.places:
            return False
        if o.steps is not None and not o.steps[0] <= site.step < o.steps[1]:
            return bool(self.series_filter and self.series_filter(site))
        side = max(site.res)
        if site.layer.is_cross:
            recorded = o.cross and (o.cross_res is None or side in o.cross_res)
        else:
            recorded = o.self_attention and side in self._self_sides
        return recorded or bool(self.series_filter and self.series_filter(site))

    def attention(self, probs: torch.Tensor, site: Site) -> None:
        # probs: (prompts, heads, queries, keys)
        name = site.layer.name
        o = self.options
        in_steps = o.steps is None or o.steps[0] <= site.step < o.steps[1]
        if in_steps and (site.layer.is_cross or max(site.res) in self._self_sides):
            value = probs.detach() if probs.requires_grad else probs
            value = value if site.layer.is_cross else value.mean(dim=1)
            if name in self.sums:
                self.sums[name] += value  # float32 sums, whatever the model's dtype
                self.counts[name] += 1
            else:
                # a cross map is the model's own tensor (a later controller may change it in place): copied
                own = value.float() if value.dtype != torch.float32 else value if not site.layer.is_cross \
                    else value.clone()
                self.sums[name] = own
                self.counts[name] = 1
                self.layers[name] = site.layer
                self.res[name] = site.res
        if self.series_filter is not None and self.series_filter(site):
            self.series.setdefault(name, []).append(probs.detach().float().mean(dim=1))
            self.layers[name] = site.layer
            self.res[name] = site.res
        return None

    # -- results -------------------------------------------------------------------------------------------------------
    def mean(self, name: str) -> torch.Tensor:
        """The step-averaged probabilities of one layer."""
        return self.sums[name] / self.counts[name]

    def select(
        self, cross: bool, res: int | tuple[int, ...] | None = None, places: tuple[str, ...] | None = None
    ) -> list[str]:
        """Names of recorded layers of one kind, at the given map sides and places."""
        sides = (res,) if isinstance(res, int) else res
        names = []
        for name in self.sums:
            layer = self.layers[name]
            if layer.is_cross != cross:
                continue
            if sides is not None and max(self.res[name]) not in sides:
                continue
            if places is not None and layer.place not in places:
                continue
            names.append(name)
        return names

    def resolutions(self, cross: bool = True) -> list[int]:
        return sorted({max(self.res[n]) for n in self.select(cross)})

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values()) + sum(
            t.numel() * t.element_size() for ts in self.series.values() for t in ts
        )
