from __future__ import annotations

import torch
from torch import Tensor

from calm_pytorch.composition.contexts import read_alignment, text_aligned_context
from calm_pytorch.composition.cross_attention import ContextMemory
from calm_pytorch.composition.injection import AugmentContext
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.generation.kv_buffers import RowKeysValues
from calm_pytorch.generation.lockstep import Lockstep
from calm_pytorch.models.adapter import DecodeState
from calm_pytorch.models.precision import to_model
from calm_pytorch.text.alignment import align, common_prefix_len, real_tokens
from calm_pytorch.text.commit import committed_text

# cached generation with an augment aligned across tokenizers (see text/alignment.py): each new
# anchor token extends the text; per row, the augment tokens of the new committed text that it
# does not share with the tokens already read are decoded (a row whose text re-tokenized first
# drops the tokens it no longer shares)
#
# two ways to keep the augment's cache, chosen by what the model can do:
#   one cache for the batch (SharedStream): row r's tokens sit in slots of one cache, one call a
#       step reads the new tokens of every row; a row with fewer new tokens, or dropped ones,
#       leaves masked gaps. Needs a model whose positions count real tokens and that attends to
#       all earlier positions (`decodes_with_gaps`: transformers models without windows)
#   a cache per row (RowStreams): rows decode one by one (x-transformers, windowed attention)

class TextStream:
    """One augment aligned across tokenizers, during one cached `generate` call: per row, the
    augment tokens read so far and each cross-attention's memory of them. The anchor's newest
    position sees every one of them. `capacity`: the anchor's final length, an estimate of the
    augment's (it decides how the memory is kept, not what it holds)."""

    def __init__(self, calm: Composition, index: int, batch: int, capacity: int, lockstep: Lockstep):
        self.calm, self.index, self.lockstep = calm, index, lockstep
        self.adapter = calm.augment_adapters[index]
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.texts: list[str | None] = [None] * batch  # the committed text of `tokens`, once known
        # per row, its last four committed texts and their tokens: a new text that extends one of
        # them by words encodes only those words (a word then a comma extends the text before it)
        self.earlier: list[list[tuple[str, list[int]]]] = [[] for _ in range(batch)]
        # per row, anchor tokens that begin it and their text, which ends a character: decoding
        # reads only the tokens after them, where the anchor's tokenizer decodes by bytes
        self.decoded: list[tuple[list[int], str]] = [([], '')] * batch
        self.memory = {block: RowKeysValues(block, batch, batch * capacity) for block in calm.cross_attns[index]}

    def first(self, seq: Tensor, mask: Tensor | None) -> AugmentContext:
        """The prompt: each anchor position reads the augment tokens of its own committed prefix."""
        return text_aligned_context(self.calm, self.index, seq, mask)

    def context(self, seq: Tensor, mask: Tensor | None) -> AugmentContext:
        """Every later step: the newest anchor position sees the tokens of the committed text."""
        texts = self.committed(seq, mask)

        # most steps commit nothing new (the anchor is inside a word): only changed texts are
        # encoded, and a text that grew by words only in the words it added
        changed = [row for row, text in enumerate(texts) if text != self.texts[row]]
        targets = self.tokens[:]
        for row, tokens in zip(changed, self.calm.augment_texts[self.index].encode_extending([texts[row] for row in changed], [self.earlier[row] for row in changed])):
            targets[row] = tokens
            self.earlier[row] = [*self.earlier[row][-3:], (texts[row], tokens)]

        keeps = [common_prefix_len(tokens, target) for tokens, target in zip(self.tokens, targets)]

        self.adapter.check_length(max(map(len, targets), default = 0), f'the augment tokenization of the generated text (augment {self.index})')

        # with sharded models every process runs as many augment forwards (each gathering the
        # shards) as the busiest one: agreed on before any of them runs
        forwards = self.forwards(targets, keeps)
        idle = self.lockstep.most(forwards) - forwards
        self.read(targets, keeps)

        for _ in range(idle):
            self.adapter.decode(self.adapter.dummy_input(seq_len = 1), None, None)

        self.tokens, self.texts = targets, texts
        for buffer in self.memory.values():
            buffer.lengths = [len(target) for target in targets]

        memory = {block: buffer.view() for block, buffer in self.memory.items()}
        length = next(iter(memory.values())).length

        if all(len(tokens) == length for tokens in self.tokens):
            return AugmentContext({}, None, causal = False, memory = memory)  # no row has a masked slot

        lengths = torch.tensor([len(tokens) for tokens in self.tokens], device = seq.device)
        return AugmentContext({}, torch.arange(length, device = seq.device) < lengths[:, None], causal = False, memory = memory)

    def committed(self, seq: Tensor, mask: Tensor | None) -> list[str]:
        return [committed_text(text) for text in self.calm.anchor_text.decode_extending(real_tokens(seq, mask), self.decoded)]

    def forwards(self, targets: list[list[int]], keeps: list[int]) -> int:
        """How many augment forwards `read` runs."""
        raise NotImplementedError

    def read(self, targets: list[list[int]], keeps: list[int]):
        """Reads each row's target tokens past its first `keeps`."""
        raise NotImplementedError

    def check_ids(self, ids: Tensor):
        self.adapter.check_token_ids(ids, f'the augment tokenization of the generated text (augment {self.index})')

class SharedStream(TextStream):
    """One augment cache for the whole batch (see the top of this file)."""

    def __init__(self, calm: Composition, index: int, batch: int, capacity: int, lockstep: Lockstep):
        super().__init__(calm, index, batch, capacity, lockstep)
        self.state = DecodeState()
        self.slots: list[list[int]] = [[] for _ in range(batch)]  # the cache slot of each token read
        self.ids = to_model(torch.zeros((batch, 0), dtype = torch.long), self.adapter.model, 'seq')  # (b, slots) the cache's tokens
        self.real = torch.zeros((batch, 0), dtype = torch.bool, device = self.ids.device)           # (b, slots) False for gaps

    def first(self, seq: Tensor, mask: Tensor | None) -> AugmentContext:
        alignment = align(seq, mask, self.calm.anchor_text, self.calm.augment_texts[self.index])

        # a prompt that re-tokenized across a committed piece reads some rows several times, and
        # an empty text reads a placeholder: the cache then starts at the next step
        if alignment.runs > 1 or not all(alignment.texts):
            return super().first(seq, mask)

        hiddens = read_alignment(self.calm, self.index, alignment, self.state)

        # each row's tokens are what the cache holds from now on, right-padded: the padding is a gap
        self.ids = to_model(alignment.ids, self.adapter.model, 'seq')
        self.real = alignment.mask.to(self.ids.device)
        self.tokens = [list(tokens) for tokens in alignment.texts]
        self.texts = self.committed(seq, mask)
        self.earlier = [[(text, tokens)] for text, tokens in zip(self.texts, self.tokens)]
        self.slots = [list(range(len(tokens))) for tokens in self.tokens]
        lengths = [len(tokens) for tokens in self.tokens]

        memory = {}
        for block, key in zip(self.calm.cross_attns[self.index], self.calm.augment_keys[self.index]):
            buffer = self.memory[block]
            states = buffer.remember(hiddens[key])
            memory[block] = ContextMemory(states, buffer.folded)
            for row, length in enumerate(lengths):
                buffer.write(row, 0, tuple(t[row:row + 1, :, :length] for t in states))

        return AugmentContext({}, None, causal = False, memory = memory, visible = alignment.visible)

    def forwards(self, targets: list[list[int]], keeps: list[int]) -> int:
        return int(any(len(target) > keep for target, keep in zip(targets, keeps)))

    def read(self, targets: list[list[int]], keeps: list[int]):
        # tokens a row no longer shares stay in the cache, masked from now on
        for row, keep in enumerate(keeps):
            if keep < len(self.slots[row]):
                self.real[row, self.slots[row][keep:]] = False
                del self.slots[row][keep:]

        new = [target[keep:] for target, keep in zip(targets, keeps)]
        width = max(map(len, new), default = 0)

        if width == 0:
            return

        start = self.ids.shape[-1]
        ids = torch.tensor([tokens + [0] * (width - len(tokens)) for tokens in new], dtype = torch.long)
        real = torch.tensor([[True] * len(tokens) + [False] * (width - len(tokens)) for tokens in new])

        for row, tokens in enumerate(new):
            self.slots[row].extend(range(start, start + len(tokens)))

        ids = to_model(ids, self.adapter.model, 'seq')
        self.check_ids(ids)
        self.ids, self.real = torch.cat((self.ids, ids), dim = -1), torch.cat((self.real, real.to(ids.device)), dim = -1)
        hiddens = self.calm.recorders[self.index](lambda: self.adapter.decode(self.ids, self.real, self.state), width)

        # projected once for the batch, then written row by row
        for block, key in zip(self.calm.cross_attns[self.index], self.calm.augment_keys[self.index]):
            buffer = self.memory[block]
            states = buffer.remember(hiddens[key])
            for row, (tokens, keep) in enumerate(zip(new, keeps)):
                if tokens:
                    buffer.write(row, keep, tuple(t[row:row + 1, :, :len(tokens)] for t in states))

class RowStreams(TextStream):
    """A cache per row, each row decoded alone (see the top of this file)."""

    def __init__(self, calm: Composition, index: int, batch: int, capacity: int, lockstep: Lockstep):
        super().__init__(calm, index, batch, capacity, lockstep)
        self.states = [DecodeState(rollback = True) for _ in range(batch)]

    def forwards(self, targets: list[list[int]], keeps: list[int]) -> int:
        count = 0

        for row, (target, keep) in enumerate(zip(targets, keeps)):
            if len(target) > keep:
                cached = min(self.states[row].length, keep)
                count += 1 if cached == 0 or not self.adapter.can_cache else len(target) - keep

        return count

    def read(self, targets: list[list[int]], keeps: list[int]):
        for row, (target, keep) in enumerate(zip(targets, keeps)):
            if keep < len(self.tokens[row]):
                self.adapter.crop(self.states[row], keep)

            if len(target) > keep:
                self.extend(row, target, keep)

    def write(self, row: int, start: int, hiddens: dict, count: int):
        # hiddens (1, >= count, d): the first `count` positions are the row's tokens from `start` on
        for block, key in zip(self.calm.cross_attns[self.index], self.calm.augment_keys[self.index]):
            buffer = self.memory[block]
            buffer.write(row, start, buffer.remember(hiddens[key][:, :count]))

    def extend(self, row: int, target: list[int], keep: int):
        adapter, recorder, state = self.adapter, self.calm.recorders[self.index], self.states[row]
        ids = to_model(torch.tensor([target], dtype = torch.long), adapter.model, 'seq')
        self.check_ids(ids)

        if not adapter.can_cache:
            # recomputes every position
            hiddens = recorder(lambda: adapter.decode(ids, None, state), len(target))
            self.write(row, keep, {key: hidden[:, keep:] for key, hidden in hiddens.items()}, len(target) - keep)
            return

        # an empty cache reads the tokens at once; a filled one one token per call, the only way
        # x-transformers' cache places several new tokens right (measured: 1.6 off otherwise)
        ends = [len(target)] if state.length == 0 else range(keep + 1, len(target) + 1)
        steps = [recorder(lambda: adapter.decode(ids[:, :end], None, state), end - state.length) for end in ends]
        hiddens = {key: torch.cat([step[key] for step in steps], dim = -2)[:, -(len(target) - keep):] for key in steps[0]}
        self.write(row, keep, hiddens, len(target) - keep)

def text_stream(calm: Composition, index: int, batch: int, capacity: int, lockstep: Lockstep) -> TextStream:
    kind = SharedStream if calm.augment_adapters[index].decodes_with_gaps else RowStreams
    return kind(calm, index, batch, capacity, lockstep)
