from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from torch import Tensor

from calm_pytorch.calm import CALM
from calm_pytorch.helpers import default, exists

# A composition in EleutherAI's lm-evaluation-harness. lm_eval's HFLM cannot take a CALM: it calls
# `model(ids).logits` on right-padded batches without a mask and `model.generate(input_ids, attention_mask)`
# with transformers' keywords, so a subclass must translate every call, and one that forgets to
# hand lm_eval's attention mask to CALM as its `mask` silently changes left-padded generations.
# This class calls CALM itself:
#
# - loglikelihood: (context + continuation)[:-1], right-padded with a mask, one forward; the
#   log-probabilities of the continuation tokens summed, and whether each was the argmax
# - loglikelihood_rolling: lm_eval's disjoint windows of max_length tokens, scored the same way
# - generate_until: contexts left-padded with their mask as the `mask` of `calm.generate`,
#   greedy unless the task samples, cut at the first stop sequence
#
# Modes. 'aligned' (default): every augment reads the tokens the anchor reads. 'context': the
# augments read a separate text, tokenized and right-padded with its mask: the document field
# `prompt_field` when given, else the request's context (the text before the scored
# continuation). A rolling loglikelihood has no context: in context mode it needs `prompt_field`,
# else the augment would read the very text being scored. A text longer than an augment reads is
# cut on the left, as lm_eval cuts the anchor's context.

logger = logging.getLogger(__name__)

MODES = ('aligned', 'context')
GENERATION_KEYWORDS = {'until', 'max_gen_toks', 'do_sample', 'temperature', 'top_k', 'top_p', 'min_p'}
DEFAULT_MAX_LENGTH = 2048

def load_calm(pretrained: str | CALM, load_kwargs: dict[str, Any]) -> CALM:
    if isinstance(pretrained, CALM):
        if len(load_kwargs) > 0:
            raise TypeError(f'{sorted(load_kwargs)} are arguments for loading a composition, but a built CALM was given; leave them out')
        return pretrained

    # a directory written by `calm.save_pretrained`, or a Hub repo id
    try:
        return CALM.from_pretrained(pretrained, **load_kwargs)
    except TypeError as error:
        # a misspelt model argument reaches the frozen models' constructors
        if len(load_kwargs) == 0:
            raise
        own = [name for name in inspect.signature(CALMEvalModel.__init__).parameters if name not in ('self', 'load_kwargs')]
        raise TypeError(f'{error}\nThe model arguments {sorted(load_kwargs)} are not CALMEvalModel\'s own ({", ".join(own)}), so they went to CALM.from_pretrained: is one misspelt?') from error

def positive_int(value: Any, name: str) -> int:
    # lm_eval's command line gives strings; 2.7 or -1 would be a wrong batch, not an error
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, str) and value.strip().isdigit()) or int(value) < 1:
        raise ValueError(f'`{name}` must be a positive integer, got {value!r}')

    return int(value)

def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ('tokenizer.json', 'tokenizer_config.json'))

def load_tokenizer(tokenizer: Any, pretrained: str | CALM, calm: CALM, name: str) -> Any:
    if not exists(tokenizer) and exists(calm.anchor_text):
        tokenizer = calm.anchor_text.tokenizer  # given to CALM at construction

    # save_pretrained writes the anchor's tokenizer beside the composition, when it was given one
    if not exists(tokenizer) and isinstance(pretrained, str) and not (Path(pretrained).is_dir() and not has_tokenizer_files(Path(pretrained))):
        tokenizer = pretrained

    if not exists(tokenizer):
        raise ValueError(
            f'`{name}` is needed: lm_eval gives text, and the CALM has no anchor tokenizer (nor was one saved with it: '
            'calm.save_pretrained(dir, tokenizer = ...)); pass a transformers tokenizer or its name or path'
        )

    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    if not callable(getattr(tokenizer, 'batch_decode', None)):
        raise TypeError(f'`{name}` must be a transformers tokenizer (or its name or path), got {type(tokenizer).__name__}')

    return tokenizer

def pad_rows(rows: list[list[int]], pad_id: int, side: str, device) -> tuple[Tensor, Tensor]:
    """(b, n) ids and their mask, True for real tokens; padded on the given side to the longest row
    (at least one position: a row may be empty)."""

    length = max(1, max(len(row) for row in rows))
    ids = torch.full((len(rows), length), pad_id, dtype = torch.long)
    mask = torch.zeros((len(rows), length), dtype = torch.bool)

    for index, row in enumerate(rows):
        span = slice(0, len(row)) if side == 'right' else slice(length - len(row), length)
        ids[index, span] = torch.tensor(row, dtype = torch.long)
        mask[index, span] = True

    return ids.to(device), mask.to(device)

@register_model('calm')
class CALMEvalModel(TemplateLM):
    """A CALM as an lm_eval model (registered as `calm`).

    From Python:  `lm_eval.simple_evaluate(model = CALMEvalModel(calm, tokenizer = tok), tasks = [...])`
    From a shell: `python -m calm_pytorch.evaluation --model calm --model_args pretrained=DIR --tasks ...`

    pretrained:        a built CALM, or a directory (or Hub repo id) written by `calm.save_pretrained`
    tokenizer:         the anchor's tokenizer (a transformers tokenizer, name or path); by default
                       the CALM's `anchor_tokenizer`, else the one saved in `pretrained`
    mode:              'aligned' (the augments read the anchor's tokens) or 'context' (they read
                       `prompt_field` of the task's document, else the request's context)
    prompt_field:      context mode: the document field the augments read
    augment_tokenizer: context mode: tokenizes what the augments read (default: each augment's own
                       tokenizer, given to the CALM in `AugmentParams(tokenizer = ...)`, else `tokenizer`)
    batch_size:        requests per forward or generation (an int; 'auto' is not supported)
    max_length:        the longest sequence the anchor reads (default: its config's, else 2048)
    max_gen_toks:      new tokens per generation when the task does not say
    device:            moves the CALM there (default: where it is; CUDA asked for but absent: CPU)
    add_bos_token:     whether the tokenizer adds its special tokens (default: its own setting)
    load_kwargs:       passed to `CALM.from_pretrained` (e.g. `dtype`, `revision`)"""

    def __init__(
        self,
        pretrained: str | CALM,
        tokenizer: Any = None,
        mode: str = 'aligned',
        prompt_field: str | None = None,
        augment_tokenizer: Any = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
        add_bos_token: bool | None = None,
        max_batch_size: int | None = None,  # lm_eval's command line passes it; used with 'auto' only
        **load_kwargs
    ):
        super().__init__()

        if mode not in MODES:
            raise ValueError(f'mode = {mode!r}; expected one of {MODES}')

        if exists(prompt_field) and mode != 'context':
            raise ValueError(f'prompt_field = {prompt_field!r} is what the augments read in context mode; pass mode = "context" too')

        if str(batch_size).startswith('auto'):
            raise ValueError('batch_size = "auto" is not supported for a CALM; give a number')

        # before loading anything
        batch_size = positive_int(batch_size, 'batch_size')
        max_length = positive_int(max_length, 'max_length') if exists(max_length) else None

        self.calm = load_calm(pretrained, load_kwargs)
        self.calm.eval()

        if exists(device):
            if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
                logger.warning('device %r was asked for, but CUDA is not available: evaluating on the CPU', device)
                device = 'cpu'
            self.calm.to(device)

        self.tokenizer = load_tokenizer(tokenizer, pretrained, self.calm, 'tokenizer')
        self.augment_tokenizer = load_tokenizer(augment_tokenizer, pretrained, self.calm, 'augment_tokenizer') if exists(augment_tokenizer) else None

        self.mode = mode
        self.prompt_field = prompt_field
        self.batch_size = batch_size
        self.max_gen_toks = positive_int(max_gen_toks, 'max_gen_toks')
        self.add_bos_token = add_bos_token
        self._max_length = max_length

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> CALMEvalModel:
        # lm_eval's command line adds its own `--batch_size` (1 unless given) and device to the
        # model arguments: one given in `--model_args` too is the more specific, and wins
        extra = {key: value for key, value in (additional_config or {}).items() if exists(value) and key not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> CALMEvalModel:
        return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string), additional_config)

    # what lm_eval reads

    @property
    def device(self) -> torch.device:
        return self.calm.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if exists(bos) else self.eot_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if exists(pad) else self.eot_token_id

    @property
    def max_length(self) -> int:
        if exists(self._max_length):
            return int(self._max_length)

        # the anchor's, as `calm.config` reports it
        found = getattr(self.calm.config, 'max_position_embeddings', None)
        return found if isinstance(found, int) and found > 0 else DEFAULT_MAX_LENGTH

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, 'name_or_path', 'calm')).replace('/', '__')

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if not exists(add_special_tokens):
            add_special_tokens = self.add_bos_token

        special = {} if not exists(add_special_tokens) else dict(add_special_tokens = add_special_tokens)
        return self.tokenizer.encode(string, **special)

    # chat templates (`--apply_chat_template`): the anchor tokenizer's, as lm_eval's HFLM applies them

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None

        template = getattr(self.tokenizer, 'chat_template', None)

        if isinstance(template, dict):
            template = template.get(chat_template if isinstance(chat_template, str) else 'default')

        if not exists(template):
            raise ValueError(f'a chat template was asked for ({chat_template!r}), but the anchor\'s tokenizer has none of that name')

        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize = False, add_generation_prompt = add_generation_prompt, continue_final_message = not add_generation_prompt)

    # what the augments read

    def augment_texts(self, requests: list, contexts: list[str] | None) -> list[str] | None:
        if self.mode == 'aligned':
            return None

        if exists(self.prompt_field):
            missing = [index for index, request in enumerate(requests) if self.prompt_field not in (request.doc or {})]

            if len(missing) > 0:
                raise KeyError(f'prompt_field = {self.prompt_field!r}: the documents of requests {missing[:5]} have no such field (task {requests[missing[0]].task_name!r})')

            return [str(request.doc[self.prompt_field]) for request in requests]

        if not exists(contexts):
            raise ValueError('a rolling loglikelihood in context mode needs `prompt_field`: without it the augments would read the very text being scored')

        return contexts

    def augment_inputs(self, texts: list[str] | None) -> dict[str, Tensor]:
        if not exists(texts):
            return dict()

        # each augment reads the texts in its own tokens: those of `augment_tokenizer` if given, else
        # of the tokenizer the CALM holds for it (as in aligned mode), else the anchor's
        prompts, masks = [], []

        for index, adapter in enumerate(self.calm.augment_adapters):
            own = self.calm.augment_texts[index]

            if exists(self.augment_tokenizer) or not exists(own):
                tokenizer = default(self.augment_tokenizer, self.tokenizer)
                rows, pad_id = [tokenizer.encode(text) for text in texts], tokenizer.pad_token_id
            else:
                rows, pad_id = own.encode_batch(texts), getattr(own.tokenizer, 'pad_token_id', None)

            # cut on the left to what the augment reads, as the anchor's context is cut to max_length
            rows = [row[-adapter.configured_len:] for row in rows] if exists(adapter.configured_len) else rows
            prompt, prompt_mask = pad_rows(rows, pad_id or 0, 'right', self.device)
            prompts.append(prompt)
            masks.append(prompt_mask)

        return dict(prompt = prompts, prompt_mask = masks)

    # scoring

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # lm_eval's own encoding of (context, continuation), with the augments' texts beside it
        encoded = []

        for context, continuation in (request.args for request in requests):
            if context == '':
                continuation_enc = self.tok_encode(continuation, add_special_tokens = False)
                starts_with_prefix = len(continuation_enc) > 0 and continuation_enc[0] == self.prefix_token_id
                context_enc, continuation_enc = (continuation_enc[:1], continuation_enc[1:]) if starts_with_prefix else ([self.prefix_token_id], continuation_enc)
            else:
                context_enc, continuation_enc = self._encode_pair(context, continuation)

            encoded.append(((context, continuation), context_enc, continuation_enc))

        texts = self.augment_texts(requests, [context for context, _ in (request.args for request in requests)])
        return self._loglikelihood_tokens(encoded, augment_texts = texts)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, augment_texts: list[str] | None = None) -> list[tuple[float, bool]]:
        results = self.score([context + continuation for _, context, continuation in requests], [len(continuation) for _, _, continuation in requests], augment_texts)

        for (request_args, _, _), result in zip(requests, results):
            if exists(request_args):
                self.cache_hook.add_partial('loglikelihood', request_args, result)

        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        texts = self.augment_texts(requests, None)
        sequences, counts, augment_texts, owners = [], [], [], []

        for index, (string,) in enumerate(request.args for request in requests):
            windows = lm_eval_utils.get_rolling_token_windows(token_list = self.tok_encode(string), prefix_token = self.prefix_token_id, max_seq_len = self.max_length, context_len = 1)

            for context, continuation in map(lm_eval_utils.make_disjoint_window, windows):
                sequences.append(context + continuation)
                counts.append(len(continuation))
                augment_texts.append(texts[index] if exists(texts) else None)
                owners.append(index)

        scores = self.score(sequences, counts, augment_texts if exists(texts) else None)
        totals = [0.] * len(requests)

        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob

        for request, total in zip(requests, totals):
            self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)

        return totals

    @torch.no_grad()
    def score(self, sequences: list[list[int]], num_scored: list[int], augment_texts: list[str] | None) -> list[tuple[float, bool]]:
        """Per sequence, the summed log-probability of its last `num_scored` tokens given the ones
        before, and whether each of them was the argmax. Longest first in batches of `batch_size`."""

        results: list[tuple[float, bool] | None] = [None] * len(sequences)

        for tokens, count in zip(sequences, num_scored):
            if count > self.max_length:
                raise ValueError(
                    f'a continuation of {count} tokens cannot be scored within max_length = {self.max_length} '
                    f'(the model reads at most max_length tokens before each one it scores); raise max_length or shorten the continuation'
                )

        order = sorted(range(len(sequences)), key = lambda index: -len(sequences[index]))

        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]

            # the model reads all but the last token, at most max_length of them (cut on the left)
            inputs = [sequences[index][-(self.max_length + 1):][:-1] for index in batch]
            seq, mask = pad_rows(inputs, self.pad_token_id, 'right', self.device)
            augment = self.augment_inputs([augment_texts[index] for index in batch] if exists(augment_texts) else None)

            logits = self.calm(seq, mask = mask, return_loss = False, **augment)
            logprobs = F.log_softmax(logits.float(), dim = -1)

            for row, index in enumerate(batch):
                count, length = num_scored[index], len(inputs[row])

                if count == 0:
                    results[index] = (0., True)  # the log-probability of no tokens; none of them missed
                    continue

                targets = torch.tensor(sequences[index][-count:], device = logprobs.device)
                scored = logprobs[row, length - count:length]

                picked = scored.gather(-1, targets[:, None]).squeeze(-1)
                results[index] = (float(picked.sum()), bool((scored.argmax(-1) == targets).all()))

        return results

    # generation

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        texts = self.augment_texts(requests, [request.args[0] for request in requests])

        # requests with the same generation settings are batched together, longest first
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)

        eos = self.tokenizer.decode([self.eot_token_id]) if exists(self.eot_token_id) else None

        for indices in groups.values():
            settings = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            unknown = set(settings) - GENERATION_KEYWORDS

            if len(unknown) > 0:
                raise ValueError(f'generation settings {sorted(unknown)} of task {requests[indices[0]].task_name!r} are not supported by CALM; supported: {sorted(GENERATION_KEYWORDS)}')

            until = handle_stop_sequences(settings.pop('until', None), eos = eos)
            max_new = settings.pop('max_gen_toks')
            # lm_eval leaves out a temperature the task does not set: sampling then draws at 1, as transformers' generate
            sampling = dict(temperature = float(settings.get('temperature', 1.)) if settings.get('do_sample') else 0.)
            sampling |= {key: settings[key] for key in ('top_k', 'top_p', 'min_p') if exists(settings.get(key)) and settings.get('do_sample')}

            if max_new >= self.max_length:
                raise ValueError(f'max_gen_toks = {max_new} leaves no room for a context within max_length = {self.max_length}')

            # an empty context starts from the prefix token, as loglikelihood's does
            encoded = {index: self.tok_encode(requests[index].args[0])[-(self.max_length - max_new):] or [self.prefix_token_id] for index in indices}
            ordered = sorted(indices, key = lambda index: -len(encoded[index]))

            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start:start + self.batch_size]

                # left-padded, and the mask tells CALM which positions are padding
                prompt, prompt_mask = pad_rows([encoded[index] for index in batch], self.pad_token_id, 'left', self.device)
                augment = self.augment_inputs([texts[index] for index in batch] if exists(texts) else None)

                new_tokens = self.calm.generate(
                    prompt,
                    max_new_tokens = max_new,
                    mask = prompt_mask,
                    prompt = augment.get('prompt'),
                    prompt_mask = augment.get('prompt_mask'),
                    eos_id = self.eot_token_id,
                    pad_id = self.pad_token_id,
                    show_progress = False,
                    **sampling
                )

                for index, row in zip(batch, new_tokens.tolist()):
                    if exists(self.eot_token_id) and self.eot_token_id in row:
                        row = row[:row.index(self.eot_token_id)]

                    text = postprocess_generated_text(self.tokenizer.decode(row, skip_special_tokens = True), stop = until, think_end_token = None)
                    results[index] = text
                    self.cache_hook.add_partial('generate_until', requests[index].args, text)

        return results

__all__ = ['CALMEvalModel']
