"""New tokens per second when generating from a composition, on the README's model sizes.

    python benchmarks/generation.py --quick     # 64 total tokens only, about a minute on one core
    python benchmarks/generation.py            # 64, 256 and 1024 total tokens (several minutes)
    python benchmarks/generation.py --tokenizers --totals 256   # with and without a cross-tokenizer augment
    python benchmarks/generation.py --hf       # transformers models against their own `generate`

Columns, for each mode (aligned: the augments read the generated sequence; context: they read a
prompt once) and each number of augments:
    (a) the bare anchor decoding with its own KV cache (x-transformers' AutoregressiveWrapper)
    (b) the composition with caches: `calm.generate(..., use_cache = True)`
    (c) the composition recomputed every step: `calm.generate(..., use_cache = False)`
    (d) `CALM-Pytorch`'s `generate` (context mode: its augments read the anchor's prompt), when
        that package is importable; it is never a dependency of calm_pytorch
`--tokenizers` instead compares aligned generation with one augment reading the anchor's tokens against
one reading the same text through its own tokenizer (docs/tokenizers.md): a byte-level BPE anchor and
a WordPiece augment, both trained here on a random English-like text whose tokens every step is made to
write, and reports the time spent decoding, committing and re-tokenizing text per generated token.
`--hf` compares the composition of two transformers Llamas (anchor width 256, 6 layers, or
`--anchor WIDTH DEPTH`; augment width 128, 4 layers; 256 prompt tokens + 64 new, batch 1 and 8;
the cross-attention's shape `--attn HEADS DIM_HEAD`) with each model's own `generate`
(its own cache, no composition): context mode against the anchor's; aligned mode, and aligned
across tokenizers, against the anchor's and the augment's times added (the augment then generates
the augment tokens of the same text). Each of `--reps` rounds runs every model once; the ratio is
printed of the best times, and as the median of the rounds' own ratios; and, for the same
compositions with a cross-attention of one head of one number, the median ratio: what the
composition costs besides the attention's own reads.
The prompt is a quarter of the total length, the context (context mode) is the prompt itself.
(c) and (d) recompute everything, so a step costs more the longer the sequence: their rates are
the mean over `--uncached-samples` steps timed at evenly spaced lengths (a full run at 1024 tokens
would take an hour on a CPU). Decoding is greedy. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import time
from contextlib import redirect_stderr
from io import StringIO

import torch
from torch import nn
from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams

NUM_TOKENS = 20000
MAX_SEQ_LEN = 1024

def anchor_model() -> TransformerWrapper:
    return TransformerWrapper(num_tokens = NUM_TOKENS, max_seq_len = MAX_SEQ_LEN, attn_layers = Decoder(dim = 512, depth = 12, heads = 8))

def augment_model() -> TransformerWrapper:
    return TransformerWrapper(num_tokens = NUM_TOKENS, max_seq_len = MAX_SEQ_LEN, attn_layers = Decoder(dim = 256, depth = 12, heads = 8))

def trained_away(calm: nn.Module) -> nn.Module:
    # a nonzero output projection: an untrained composition would still do all the work, but
    # this keeps the benchmark honest about the numbers flowing through
    for name, param in calm.named_parameters():
        if param.requires_grad and param.ndim == 2:
            nn.init.normal_(param, std = 0.02)

    return calm.eval()

def keep_freed_memory() -> str:
    # glibc hands freed heap memory back to the OS past a threshold it moves as it goes, and the
    # next generate faults it back in page by page: 10,000 to 37,000 minor faults per generate
    # on our 2-core VM, hitting the baselines and the compositions alike and most of the noise
    # between runs. Fixed thresholds keep freed memory in the process (as jemalloc or tcmalloc do)
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return "the platform's allocator"

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    fixed = libc.mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30)
    return 'glibc keeping freed memory' if fixed else "glibc's default"

def timed(fn, reps: int) -> float:
    best = float('inf')

    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)

    return best

def uncached_rate(step_at, prompt_len: int, total: int, samples: int, batch: int) -> float:
    # tokens / s of a generation from prompt_len to total when each step recomputes everything:
    # the mean step time over evenly spaced lengths
    lengths = torch.linspace(prompt_len, total - 1, samples).round().long().tolist()
    mean_step = sum(timed(lambda: step_at(length), 1) for length in lengths) / len(lengths)
    return batch / mean_step

def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action = 'store_true', help = '64 total tokens only')
    parser.add_argument('--totals', type = int, nargs = '+', default = None, help = 'total lengths, prompt included')
    parser.add_argument('--batch', type = int, default = 1)
    parser.add_argument('--threads', type = int, default = 1, help = 'torch threads (one is steadiest on a shared machine)')
    parser.add_argument('--reps', type = int, default = 1, help = 'best of this many runs for (a) and (b); the rounds of --hf')
    parser.add_argument('--uncached-samples', type = int, default = 3)
    parser.add_argument('--no-reference', action = 'store_true', help = 'skip CALM-Pytorch even when importable')
    parser.add_argument('--tokenizers', action = 'store_true', help = 'aligned mode with and without a cross-tokenizer augment')
    parser.add_argument('--hf', action = 'store_true', help = 'transformers models against their own generate')
    parser.add_argument('--batches', type = int, nargs = '+', default = (1, 8), help = 'batch sizes of --hf')
    parser.add_argument('--attn', type = int, nargs = 2, default = None, metavar = ('HEADS', 'DIM_HEAD'), help = "the cross-attention's shape in --hf (default: the library's)")
    parser.add_argument('--anchor', type = int, nargs = 2, default = (256, 6), metavar = ('WIDTH', 'DEPTH'), help = "the anchor's shape in --hf")
    parser.add_argument('--malloc-default', action = 'store_true', help = "keep glibc's default of returning freed memory to the OS (more page faults, noisier)")
    args = parser.parse_args()
    args.malloc = "glibc's default" if args.malloc_default else keep_freed_memory()

    if args.hf:
        torch.set_num_threads(args.threads)
        return hf_main(args)

    if args.tokenizers:
        torch.set_num_threads(args.threads)
        return tokenizers_main(args)

    totals = args.totals or ((64,) if args.quick else (64, 256, 1024))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    try:
        import CALM_pytorch as reference
    except ImportError:
        reference = None

    if args.no_reference:
        reference = None

    print(f'# torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), batch {args.batch}, greedy, {args.malloc}')
    header = '| mode | augments | total | (a) anchor, own cache | (b) CALM cached | (c) CALM uncached | ' + ('(d) CALM-Pytorch | ' if reference else '') + 'b / a | b / c |'
    print(header)
    print('|' + '---|' * (header.count('|') - 1))

    anchor = anchor_model()
    augments = [augment_model() for _ in range(3)]
    # the bare anchor is a copy without our hooks, so (a) pays for nothing of the composition
    bare_anchor = anchor_model()
    bare_anchor.load_state_dict(anchor.state_dict())
    bare = AutoregressiveWrapper(bare_anchor).eval()

    for num_augments in (1, 3):
        calm = trained_away(CALM(anchor, [AugmentParams(model = augment, connect_every_num_layers = 4) for augment in augments[:num_augments]]))

        ref = None
        if reference:
            # its own copies of the models: its hooks must not meet ours
            ref_anchor = anchor_model()
            ref_anchor.load_state_dict(anchor.state_dict())
            ref_augments = []
            for augment in augments[:num_augments]:
                copy = augment_model()
                copy.load_state_dict(augment.state_dict())
                ref_augments.append(reference.AugmentParams(model = copy, connect_every_num_layers = 4))
            ref = trained_away(reference.CALM(ref_anchor, ref_augments))

        for mode in ('aligned', 'context'):
            for total in totals:
                prompt_len = total // 4
                num_new = total - prompt_len
                seq = torch.randint(0, NUM_TOKENS, (args.batch, total))
                prompt = seq[:, :prompt_len]
                context = lambda length: dict(prompt = seq[:, :prompt_len]) if mode == 'context' else dict()

                # warm up once: allocators, kernels
                calm.generate(prompt, max_new_tokens = 2, temperature = 0., **context(prompt_len))

                a = args.batch * num_new / timed(lambda: bare.generate(prompt, num_new, temperature = 0., cache_kv = True), args.reps)
                b = args.batch * num_new / timed(lambda: calm.generate(prompt, max_new_tokens = num_new, temperature = 0., show_progress = False, **context(prompt_len)), args.reps)
                c = uncached_rate(
                    lambda length: calm.generate(seq[:, :length], max_new_tokens = 1, temperature = 0., use_cache = False, **context(length)),
                    prompt_len, total, args.uncached_samples, args.batch
                )

                row = f'| {mode} | {num_augments} | {total} | {a:.1f} | {b:.1f} | {c:.2f} | '

                if ref:
                    if mode == 'context':
                        # its augments read its prompt; one step from length L is generate(seq[:, :L], seq_len = L + 1)
                        with redirect_stderr(StringIO()):  # its progress bar
                            d = uncached_rate(lambda length: ref.generate(seq[:, :length], seq_len = length + 1), prompt_len, total, args.uncached_samples, args.batch)
                        row += f'{d:.2f} | '
                    else:
                        row += 'n/a | '

                print(row + f'{b / a:.2f} | {b / c:.0f} |', flush = True)

        calm.remove_hooks()

        if ref and hasattr(ref, 'remove_hooks'):
            ref.remove_hooks()

# aligned mode across tokenizers

WORDS = (
    'the of and to in is was for that with as on by at from his her they this which there their '
    'then other than when what where time year people way day man thing woman life child world '
    'school state family student group country problem hand part place case week company system '
    'program question work government number night point home water room mother area money story '
    'fact month lot right study book eye job word business issue side kind head house service friend '
    'father power hour game line end member law car city community name president team minute idea '
    'kid body information back parent face others level office door health person art war history '
    'party result change morning reason research girl guy moment air teacher force education '
    'naïve café über 12 345 2024 , . ; : ! ? ( ) "'
).split()

def english_like(num_words: int, seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (num_words,), generator = generator).tolist()
    return ' '.join(WORDS[i] for i in picks)

def trained_tokenizers():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [english_like(200, seed) for seed in range(50)]

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space = False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size = 2000, initial_alphabet = pre_tokenizers.ByteLevel.alphabet()))

    wordpiece = Tokenizer(models.WordPiece(unk_token = '[UNK]'))
    wordpiece.normalizer = normalizers.NFC()
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size = 1000, special_tokens = ['[PAD]', '[UNK]', '[CLS]', '[SEP]']))
    cls, sep = wordpiece.token_to_id('[CLS]'), wordpiece.token_to_id('[SEP]')
    wordpiece.post_processor = processors.TemplateProcessing(single = '[CLS] $A [SEP]', special_tokens = [('[CLS]', cls), ('[SEP]', sep)])

    return PreTrainedTokenizerFast(tokenizer_object = bpe), PreTrainedTokenizerFast(tokenizer_object = wordpiece, unk_token = '[UNK]')

def tokenizers_main(args):
    totals = args.totals or ((64,) if args.quick else (64, 256, 1024))
    anchor_tokenizer, augment_tokenizer = trained_tokenizers()

    print(f'# torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), batch {args.batch}, one augment, aligned mode, {args.malloc}')
    print('| total | same tokens: tok/s | cross-tokenizer: tok/s | text work per token (ms) | text work / step time |')
    print('|---|---|---|---|---|')

    anchor, augment = anchor_model(), augment_model()

    for total in totals:
        prompt_len = total // 4
        num_new = total - prompt_len

        # the text written: every step is made to choose the next token of an English-like text
        text = english_like(total * 2, seed = 1234 + total)
        tokens = torch.tensor([anchor_tokenizer(text)['input_ids'][:total]] * args.batch)
        prompt, forced = tokens[:, :prompt_len], tokens[:, prompt_len:]

        def write(logits, step = [0]):
            index = min(step[0], forced.shape[-1] - 1)
            step[0] += 1
            return torch.full_like(logits, float('-inf')).scatter(-1, forced[:, index:index + 1], 0.)

        rates = {}

        for name in ('same', 'cross'):
            params = AugmentParams(model = augment, tokenizer = augment_tokenizer if name == 'cross' else None)
            calm = trained_away(CALM(anchor, params, anchor_tokenizer = anchor_tokenizer if name == 'cross' else None))

            spent = [0.]
            if name == 'cross':
                # time in the tokenizers: decode_batch (the text of each prefix) and raw_encode (every encoding, whole or of what a text added)
                for reader, method in ((calm.anchor_text, 'decode_batch'), (calm.augment_texts[0], 'raw_encode')):
                    original = getattr(reader, method)

                    def clocked(*a, original = original, **kw):
                        start = time.perf_counter()
                        out = original(*a, **kw)
                        spent[0] += time.perf_counter() - start
                        return out

                    setattr(reader, method, clocked)

            def run():
                spent[0] = 0.
                calm.generate(prompt, max_new_tokens = num_new, temperature = 0., filter_fn = lambda logits, step = [0]: write(logits, step), show_progress = False)

            calm.generate(prompt, max_new_tokens = 2, temperature = 0.)  # warm up
            seconds = timed(run, args.reps)
            rates[name] = (args.batch * num_new / seconds, spent[0], seconds)
            calm.remove_hooks()

        cross_rate, text_seconds, cross_seconds = rates['cross']
        print(f"| {total} | {rates['same'][0]:.1f} | {cross_rate:.1f} | {1000 * text_seconds / num_new:.2f} | {text_seconds / cross_seconds:.1%} |", flush = True)

# transformers models: the composition against each model's own `generate`

def hf_llama(vocab: int, width: int, depth: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size = vocab, hidden_size = width, num_hidden_layers = depth, num_attention_heads = width // 32,
        num_key_value_heads = width // 64, intermediate_size = 8 * width // 3, max_position_embeddings = 1024
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # every run writes all its new tokens
    return model

def copied(model: nn.Module) -> nn.Module:
    # the own-generate baselines run on copies that carry none of the composition's hooks
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    copy.generation_config.eos_token_id = None
    return copy

def hf_main(args):
    prompt_len, num_new = 256, 64
    anchor_tokenizer, augment_tokenizer = trained_tokenizers()

    # the text written: the cross-tokenizer composition is made to write the next tokens of an
    # English-like text (its commit and re-tokenizing work depends on real words); the augment's
    # own generate writes as many tokens as that text has in its tokenizer
    text = english_like(1000, seed = 4321)
    anchor_ids = torch.tensor(anchor_tokenizer(text)['input_ids'][:prompt_len + num_new])
    prompt_text, new_text = (anchor_tokenizer.decode(ids) for ids in (anchor_ids[:prompt_len], anchor_ids[prompt_len:]))
    augment_prompt = torch.tensor(augment_tokenizer(prompt_text, add_special_tokens = False)['input_ids'])
    augment_new = len(augment_tokenizer(prompt_text + new_text, add_special_tokens = False)['input_ids']) - len(augment_prompt)

    torch.manual_seed(0)
    anchor = hf_llama(len(anchor_tokenizer), *args.anchor)
    augment = hf_llama(len(anchor_tokenizer), 128, 4)
    text_augment = hf_llama(len(augment_tokenizer), 128, 4)
    bare_anchor, bare_augment, bare_text_augment = copied(anchor), copied(augment), copied(text_augment)

    def compositions(anchor, augment, text_augment, **attn) -> dict[str, nn.Module]:
        return {
            'context': trained_away(CALM(anchor, AugmentParams(model = augment), **attn)),
            'aligned': trained_away(CALM(anchor, AugmentParams(model = augment), **attn)),
            'across tokenizers': trained_away(CALM(anchor, AugmentParams(model = text_augment, tokenizer = augment_tokenizer), anchor_tokenizer = anchor_tokenizer, **attn)),
        }

    calms = compositions(anchor, augment, text_augment, **(dict(attn_kwargs = dict(heads = args.attn[0], dim_head = args.attn[1])) if args.attn else dict()))

    # the same compositions, on copies of the models, with the smallest cross-attention (one head
    # of one number): all of the composition's work but the attention's own, which the
    # difference of the two ratios shows
    tiny_calms = compositions(copied(anchor), copied(augment), copied(text_augment), attn_kwargs = dict(heads = 1, dim_head = 1))

    print(f'# torch {torch.__version__}, transformers {__import__("transformers").__version__}, {platform.processor() or platform.machine()}, '
          f'{torch.get_num_threads()} thread(s), anchor width {args.anchor[0]} depth {args.anchor[1]}, {prompt_len} prompt + {num_new} new tokens, greedy, cross-attention {calms["context"].cross_attns[0][0].heads} heads of {calms["context"].cross_attns[0][0].to_q.out_features // calms["context"].cross_attns[0][0].heads}, {args.malloc}')
    print('| mode | batch | ratio of the bests | median ratio of the rounds | goal | median ratio, cross-attention of 1 head of 1 | CALM (tok/s) | anchor own generate (tok/s) | augment own generate (tok/s) | anchor own generate, static cache (tok/s) |')
    print('|---|---|---|---|---|---|---|---|---|---|')

    for batch in args.batches:
        prompt = anchor_ids[:prompt_len].expand(batch, -1)
        forced = anchor_ids[prompt_len:].expand(batch, -1)

        def own(model, ids, new, **kwargs):
            return lambda: model.generate(ids, attention_mask = torch.ones_like(ids), max_new_tokens = new, do_sample = False, **kwargs)

        def composed(mode, calm):
            def write(logits, step = [0]):
                index = min(step[0], num_new - 1)
                step[0] += 1
                return torch.full_like(logits, float('-inf')).scatter(-1, forced[:, index:index + 1], 0.)

            context = dict(prompt = prompt) if mode == 'context' else dict()
            calm.generate(prompt, max_new_tokens = 2, temperature = 0., **context)  # warm up
            return lambda: calm.generate(prompt, max_new_tokens = num_new, temperature = 0., filter_fn = lambda logits, step = [0]: write(logits, step), show_progress = False, **context)

        runs = {
            'anchor': own(bare_anchor, prompt, num_new),
            # for reference only: transformers' preallocated cache, which its generate does not use by default
            'anchor static': own(bare_anchor, prompt, num_new, cache_implementation = 'static'),
            'augment': own(bare_augment, prompt, num_new),
            'text augment': own(bare_text_augment, augment_prompt.expand(batch, -1), augment_new),
            **{mode: composed(mode, calm) for mode, calm in calms.items()},
            **{f'{mode}, tiny': composed(mode, calm) for mode, calm in tiny_calms.items()}
        }

        # interleaved, one run of each per round: drifting machine load hits the baselines and
        # the compositions alike. In an order rotated each round: a run after another model's
        # finds its own weights colder, measured 1 to 2% slower at batch 1. The ratio of the
        # bests, and the median of each round's ratio, which a single lucky run cannot move
        rounds = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.reps):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rounds[name].append(timed(runs[name], 1))

        seconds = {name: min(times) for name, times in rounds.items()}

        for mode in calms:
            baselines = ['anchor'] if mode == 'context' else ['anchor', 'augment' if mode == 'aligned' else 'text augment']
            goal = 0.8 if mode == 'across tokenizers' else 0.9
            ratio = sum(seconds[name] for name in baselines) / seconds[mode]

            def median_ratio(composition: str) -> float:
                per_round = sorted(sum(rounds[name][r] for name in baselines) / rounds[composition][r] for r in range(args.reps))
                return (per_round[(args.reps - 1) // 2] + per_round[args.reps // 2]) / 2

            augment_cell = '-'
            if mode != 'context':
                augment_cell = f'{batch * (num_new if mode == "aligned" else augment_new) / seconds[baselines[1]]:.1f}'

            print(f'| {mode} | {batch} | {ratio:.2f} | {median_ratio(mode):.2f} | >= {goal} | {median_ratio(mode + ", tiny"):.2f} | {batch * num_new / seconds[mode]:.1f} | {batch * num_new / seconds["anchor"]:.1f} | {augment_cell} | {batch * num_new / seconds["anchor static"]:.1f} |', flush = True)

if __name__ == '__main__':
    main()
