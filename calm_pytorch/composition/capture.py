from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from calm_pytorch.helpers import PerThread
from calm_pytorch.models.adapter import ModelAdapter
from calm_pytorch.models.recurrent import register_state_hook
from calm_pytorch.models.sites import HiddenPosition, register_read_hook

# recording an augment's hidden states: hooks sit only on the connected sites, record only while
# a composed forward asks for them, and stop the augment right after the deepest one

LayerKey = tuple[int, HiddenPosition]  # (0-based layer in execution order, 'input' | 'output')

class StopForward(Exception):
    """Raised from the deepest recording hook: nothing above it is needed."""

class RecordingState(PerThread):
    """What one recording of this thread collects: a call in another thread records its own."""

    def __init__(self):
        self.recording: dict[LayerKey, list[Tensor]] | None = None
        self.positions: dict[tuple, int] = {}  # hidden positions each site has returned in this forward
        self.expected_len: int | None = None
        self.traced = False  # torch.compile traces the caller: a stop raised inside is caught inside

class HiddenRecorder:
    def __init__(
        self,
        adapter: ModelAdapter,
        layer_keys: list[LayerKey],
        *,
        final_state: bool = False
    ):
        self.adapter = adapter
        self.layer_keys = list(dict.fromkeys(layer_keys))
        self.final_state = final_state  # record the state tokens a recurrent block returns, keep the last
        self.call = RecordingState()  # the calling thread's
        self.handles = []
        self.stop_site = None
        self.fires_once = False
        self.stop_early = True  # False runs the augment to its end (FSDP: see training/fsdp.py)

        if adapter.returns_hiddens:
            return

        sites = {}
        readers = defaultdict(list)  # site key -> the layer keys it serves (an x-transformers site can serve two)

        for layer, position in self.layer_keys:
            site = adapter.layers[layer].site(position)
            sites[site.key] = site
            readers[site.key].append((layer, position))

        # the deepest connected site fires last: in the forward, or in each segment of a
        # segment-recurrent model. A 2-token probe cannot tell whether a longer input is cut into
        # segments, so the forward stops there only once that site has returned as many positions
        # as the input has (see `should_stop`)

        probe = adapter.probe(list(sites.values()))
        self.fires_once = all(probe.firing.count(key) == 1 for key in sites)
        self.stop_site = probe.firing[-1]

        register = register_state_hook if final_state else register_read_hook

        for key, site in sites.items():
            self.handles.append(register(site, partial(self.record, key, tuple(readers[key]))))

    def record(self, site_key, layer_keys: tuple[LayerKey, ...], hidden: Tensor, state: Tensor | None = None):
        call = self.call

        if call.recording is None:
            return  # the augment called on its own: a guest leaves no trace

        for layer_key in layer_keys:
            call.recording[layer_key].append(state if self.final_state else hidden)

        call.positions[site_key] = call.positions.get(site_key, 0) + hidden.shape[-2]

        if site_key != self.stop_site or not self.stop_early or not self.should_stop(call):
            return

        # torch.export's default (non-strict) tracer keeps a stack of the modules it is inside and
        # fails when an exception unwinds through them: while exporting, the augment runs to its
        # end (as it does in a strict export's graph). So does an augment compiled on its own
        # (`augment.forward = torch.compile(...)`), called by an eager composition: a stop would
        # leave its graph by an exception, an error with fullgraph = True, a recompile per call without
        if torch.compiler.is_exporting() or (torch.compiler.is_compiling() and not call.traced):
            return

        raise StopForward

    def should_stop(self, call: RecordingState) -> bool:
        if call.expected_len is None:
            # inputs of a fixed shape: the probe ran on that very shape
            return self.fires_once

        # token inputs: a segment-recurrent model is done once its segments cover the input;
        # a model whose hidden length differs from its input length runs to the end (still correct)
        return call.positions[self.stop_site] == call.expected_len

    def __call__(self, run: Callable[[], object], expected_len: int | None = None) -> dict[LayerKey, Tensor]:
        """Runs the augment through `run` and returns the hidden state of every recorded layer,
        the calls of a block run several times concatenated along the sequence (with
        `final_state`, the state tokens of its last call). `expected_len`: the number of input
        positions when the input is a token sequence, which may be cut into segments."""

        if self.adapter.returns_hiddens:
            hiddens = run()
            return {(layer, position): hiddens[layer] for layer, position in self.layer_keys}

        call = self.call
        call.recording, call.positions, call.expected_len = defaultdict(list), {}, expected_len
        call.traced = torch.compiler.is_compiling()

        try:
            run()
        except StopForward:
            pass
        finally:
            recording = call.recording
            call.recording, call.positions, call.expected_len = None, {}, None

        if self.final_state:
            return {key: states[-1] for key, states in recording.items()}

        return {key: torch.cat(hiddens, dim = -2) if len(hiddens) > 1 else hiddens[0] for key, hiddens in recording.items()}

    def remove(self):
        for handle in self.handles:
            handle.remove()

        self.handles.clear()
