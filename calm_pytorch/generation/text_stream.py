from __future__ import annotations

import torch
from torch import Tensor

from calm_pytorch.composition.injection import AugmentContext
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.generation.kv_buffers import RowKeysValues
from calm_pytorch.generation.lockstep import Lockstep
from calm_pytorch.models.adapter import DecodeState
from calm_pytorch.models.precision import to_model
from calm_pytorch.text.alignment import common_prefix_len, real_rows
from calm_pytorch.text.commit import committed_text

# cached generation with an augment aligned across tokenizers (see text/alignment.py): each new
# anchor token extends the text; per row, the augment's cache is rolled back to the tokens it
# shares with the new committed text, and the rest is decoded

class TextStream:
    """One augment aligned across tokenizers, during one cached `generate` call: per row, the
    augment tokens in its own cache (batch 1: rows re-tokenize at different places), and the keys
    and values of each cross-attention. The anchor's newest position sees every one of them."""

    def __init__(self, calm: Composition, index: int, batch: int, lockstep: Lockstep):
        self.calm, self.index, self.lockstep = calm, index, lockstep
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.states = [DecodeState(rollback = True) for _ in range(batch)]
        self.kv = {block: RowKeysValues(batch, block.heads, block.to_q.out_features // block.heads, block.to_kv.weight) for block in calm.cross_attns[index]}

    def context(self, seq: Tensor, mask: Tensor | None) -> AugmentContext:
        calm = self.calm
        reals, _ = real_rows(seq, mask)
        texts = [committed_text(text) for text in calm.anchor_text.decode_batch(reals)]

        targets = calm.augment_texts[self.index].encode_batch(texts)
        keeps = [common_prefix_len(tokens, target) for tokens, target in zip(self.tokens, targets)]

        # with sharded models every process runs as many augment forwards as the busiest one
        forwards = sum(self.forwards(row, target, keep) for row, (target, keep) in enumerate(zip(targets, keeps)))
        idle = self.lockstep.most(forwards) - forwards

        for row, (target, keep) in enumerate(zip(targets, keeps)):
            if keep < len(self.tokens[row]):
                calm.augment_adapters[self.index].crop(self.states[row], keep)

            if len(target) > keep:
                self.extend(row, target, keep)

            self.tokens[row] = target
            for buffer in self.kv.values():
                buffer.lengths[row] = len(target)

        adapter = calm.augment_adapters[self.index]
        for _ in range(idle):
            adapter.decode(adapter.dummy_input(seq_len = 1), None, None)

        kv = {block: buffer.view() for block, buffer in self.kv.items()}
        length = next(iter(kv.values()))[0].shape[-2]
        lengths = torch.tensor([len(tokens) for tokens in self.tokens], device = seq.device)
        return AugmentContext({}, torch.arange(length, device = seq.device) < lengths[:, None], causal = False, kv = kv)

    def forwards(self, row: int, target: list[int], keep: int) -> int:
        # how many augment forwards `extend` runs
        if len(target) <= keep:
            return 0

        cached = min(self.states[row].length, keep)
        return 1 if cached == 0 or not self.calm.augment_adapters[self.index].can_cache else len(target) - keep

    def extend(self, row: int, target: list[int], keep: int):
        calm, index = self.calm, self.index
        adapter, recorder, state = calm.augment_adapters[index], calm.recorders[index], self.states[row]

        ids = to_model(torch.tensor([target], dtype = torch.long), adapter.model, 'seq')
        adapter.check_length(ids, f'the augment tokenization of the generated text (augment {index})')
        adapter.check_token_ids(ids, f'the augment tokenization of the generated text (augment {index})')

        if not adapter.can_cache:
            # recomputes every position
            hiddens = recorder(lambda: adapter.decode(ids, None, state), len(target))
            hiddens = {key: hidden[:, keep:] for key, hidden in hiddens.items()}
        else:
            # an empty cache reads the tokens at once; a filled one one token per call, the only
            # way x-transformers' cache places several new tokens right (measured: 1.6 off otherwise)
            ends = [len(target)] if state.length == 0 else range(keep + 1, len(target) + 1)
            steps = [recorder(lambda: adapter.decode(ids[:, :end], None, state), end - state.length) for end in ends]
            hiddens = {key: torch.cat([step[key] for step in steps], dim = -2)[:, -(len(target) - keep):] for key in steps[0]}

        for block, key in zip(calm.cross_attns[index], calm.augment_keys[index]):
            self.kv[block].write(row, keep, *block.project_context(hiddens[key]))
