from __future__ import annotations

from collections import defaultdict
from functools import partial
from collections.abc import Callable

import torch
from torch import Tensor

from calm_pytorch.adapters import ModelAdapter
from calm_pytorch.params import HiddenPosition
from calm_pytorch.sites import register_read_hook

# recording an augment's hidden states: hooks sit only on the connected sites, record only while
# a composed forward asks for them, and stop the augment right after the deepest one

LayerKey = tuple[int, HiddenPosition]  # (0-based layer in execution order, 'input' | 'output')

class StopForward(Exception):
    """Raised from the deepest recording hook: nothing above it is needed."""

class HiddenRecorder:
    def __init__(
        self,
        adapter: ModelAdapter,
        layer_keys: list[LayerKey]
    ):
        self.adapter = adapter
        self.layer_keys = list(dict.fromkeys(layer_keys))
        self.recording: dict[LayerKey, list[Tensor]] | None = None
        self.handles = []
        self.stop_site = None

        if adapter.returns_hiddens:
            return

        sites = {}
        readers = defaultdict(list)  # site key -> the layer keys it serves (an x-transformers site can serve two)

        for layer, position in self.layer_keys:
            site = adapter.layers[layer].site(position)
            sites[site.key] = site
            readers[site.key].append((layer, position))

        # early stop is safe when each recorded site fires once per forward;
        # segment-recurrent blocks run several times, and then the whole forward runs

        probe = adapter.probe(list(sites.values()))
        fires_once = all(probe.firing.count(key) == 1 for key in sites)

        if fires_once:
            self.stop_site = probe.firing[-1]

        for key, site in sites.items():
            self.handles.append(register_read_hook(site, partial(self.record, key, tuple(readers[key]))))

    def record(self, site_key, layer_keys: tuple[LayerKey, ...], hidden: Tensor):
        if self.recording is None:
            return  # the augment called on its own: a guest leaves no trace

        for layer_key in layer_keys:
            self.recording[layer_key].append(hidden)

        if site_key == self.stop_site:
            raise StopForward

    def __call__(self, run: Callable[[], object]) -> dict[LayerKey, Tensor]:
        """Runs the augment through `run` and returns the hidden state of every recorded layer,
        the calls of a block run several times concatenated along the sequence."""

        if self.adapter.returns_hiddens:
            hiddens = run()
            return {(layer, position): hiddens[layer] for layer, position in self.layer_keys}

        self.recording = defaultdict(list)

        try:
            run()
        except StopForward:
            pass
        finally:
            recording, self.recording = self.recording, None

        return {key: torch.cat(hiddens, dim = -2) if len(hiddens) > 1 else hiddens[0] for key, hiddens in recording.items()}

    def remove(self):
        for handle in self.handles:
            handle.remove()

        self.handles.clear()


