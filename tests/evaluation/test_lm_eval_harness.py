from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from text_tokenizers import byte_bpe

from calm_pytorch import CALM
from calm_pytorch.evaluation.harness import CALMEvalModel

from conftest import ROOT

# a composition in lm-evaluation-harness, on local tasks (YAML over a JSON file written here):
# what lm_eval reports is what CALM computes, whatever the batch size

QUESTIONS = [
    dict(question = 'the cat sat on the', choices = [' mat', ' dog', ' other one'], answer = 0, document = 'the cat sat on the mat.'),
    dict(question = 'numbers like 12 and', choices = [' 345', ' words'], answer = 0, document = 'numbers like 12 and 345 are words too'),
    dict(question = 'then they went there', choices = [' together', ' home', ' it'], answer = 0, document = 'then they went there together'),
    dict(question = 'whitespace runs and new', choices = [' lines', ' quotes'], answer = 0, document = 'whitespace runs and new lines'),
    dict(question = 'café naïve', choices = [' über', ' straße'], answer = 1, document = 'café naïve über straße'),
]

TASK = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
{fields}
metric_list:
  - metric: {metric}
"""

TASKS = dict(
    calm_choice = ('multiple_choice', 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\ntarget_delimiter: ""', 'acc'),
    calm_rolling = ('loglikelihood_rolling', 'doc_to_text: ""\ndoc_to_target: "{{document}}"', 'word_perplexity'),
    calm_generate = ('generate_until', 'doc_to_text: "{{question}}"\ndoc_to_target: "{{document}}"\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 5\n  do_sample: false', 'exact_match'),
)

def write_tasks(folder) -> TaskManager:
    data = folder / 'questions.json'
    data.write_text(json.dumps(QUESTIONS))

    for name, (output_type, fields, metric) in TASKS.items():
        (folder / f'{name}.yaml').write_text(TASK.format(name = name, data = data, output_type = output_type, fields = fields, metric = metric))

    return TaskManager(include_path = str(folder), include_defaults = False)

def build(seed: int = 0) -> tuple[CALM, transformers.PreTrainedTokenizerFast]:
    tokenizer = byte_bpe()
    vocab = len(tokenizer)
    torch.manual_seed(seed)

    anchor = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size = vocab, hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 64, max_position_embeddings = 64, bos_token_id = 1, eos_token_id = 2, pad_token_id = 0))
    augment = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size = vocab, n_embd = 24, n_layer = 4, n_head = 2, n_positions = 64, bos_token_id = 1, eos_token_id = 2, pad_token_id = 0))
    calm = CALM(anchor, augment, attn_kwargs = dict(heads = 2, dim_head = 8))

    # untrained, the composition is the anchor: make the cross-attention count
    with torch.no_grad():
        for blocks in calm.cross_attns:
            for block in blocks:
                block.to_out.weight.normal_(std = 0.5)

    return calm.eval(), tokenizer

def direct_loglikelihood(calm: CALM, tokens: list[int], num_scored: int, **augment) -> float:
    # one unpadded sequence: the log-probabilities of its last `num_scored` tokens
    with torch.no_grad():
        logits = calm(torch.tensor([tokens[:-1]]), return_loss = False, **augment)

    logprobs = F.log_softmax(logits.float(), dim = -1)[0, -num_scored:]
    return float(logprobs.gather(-1, torch.tensor(tokens[-num_scored:])[:, None]).sum())

def evaluate(model: CALMEvalModel, task_manager: TaskManager) -> dict:
    results = simple_evaluate(model = model, tasks = list(TASKS), task_manager = task_manager, log_samples = True, bootstrap_iters = 0)
    return {name: sorted(results['samples'][name], key = lambda sample: sample['doc_id']) for name in TASKS}

@pytest.fixture(scope = 'module')
def composition():
    return build()

def test_lm_eval_reports_what_calm_computes_at_any_batch_size(tmp_path, composition):
    calm, tokenizer = composition
    tasks = write_tasks(tmp_path)

    one = evaluate(CALMEvalModel(calm, tokenizer = tokenizer, batch_size = 1), tasks)
    four = evaluate(CALMEvalModel(calm, tokenizer = tokenizer, batch_size = 4), tasks)

    # multiple choice: each choice's loglikelihood is CALM's own, computed on the unpadded sequence
    for sample in one['calm_choice']:
        doc = QUESTIONS[sample['doc_id']]
        assert len(sample['resps']) == len(doc['choices'])

        for choice, ((logprob, _),) in zip(doc['choices'], sample['resps']):
            context, whole = tokenizer.encode(doc['question']), tokenizer.encode(doc['question'] + choice)
            assert whole[:len(context)] == context
            assert logprob == pytest.approx(direct_loglikelihood(calm, whole, len(whole) - len(context)), abs = 1e-4)

    # rolling: the whole document after the BOS token
    for sample in one['calm_rolling']:
        tokens = [tokenizer.bos_token_id] + tokenizer.encode(QUESTIONS[sample['doc_id']]['document'])
        assert sample['resps'][0][0] == pytest.approx(direct_loglikelihood(calm, tokens, len(tokens) - 1), abs = 1e-4)

    # batch 1 and batch 4 agree: scores to float tolerance, generations (left-padded, greedy) exactly
    def scores(sample) -> list[float]:
        # a choice's response is (loglikelihood, is greedy), a rolling one the loglikelihood
        return [resp[0][0] if isinstance(resp[0], (tuple, list)) else resp[0] for resp in sample['resps']]

    for name in ('calm_choice', 'calm_rolling'):
        for a, b in zip(one[name], four[name]):
            assert scores(a) == pytest.approx(scores(b), abs = 1e-4)

    generations = [sample['resps'][0][0] for sample in one['calm_generate']]
    assert generations == [sample['resps'][0][0] for sample in four['calm_generate']]
    assert any(len(text) > 0 for text in generations)

def request(kind: str, args: tuple, doc: dict, index: int = 0) -> Instance:
    return Instance(request_type = kind, doc = doc, arguments = args, idx = index, metadata = ('calm_test', index, 1))

def test_generation_reads_the_left_padding_mask(composition):
    calm, tokenizer = composition
    model = CALMEvalModel(calm, tokenizer = tokenizer, batch_size = 4)
    settings = dict(until = ['\n'], max_gen_toks = 6, do_sample = False)
    prompts = [doc['question'] for doc in QUESTIONS[:4]]

    batched = model.generate_until([request('generate_until', (prompt, settings), {}, index) for index, prompt in enumerate(prompts)])

    for prompt, text in zip(prompts, batched):
        # the same continuation generated alone, directly through CALM
        ids = torch.tensor([tokenizer.encode(prompt)])
        new = calm.generate(ids, max_new_tokens = 6, temperature = 0., eos_id = tokenizer.eos_token_id).tolist()[0]
        new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        assert text == tokenizer.decode(new, skip_special_tokens = True).split('\n')[0]

def test_empty_and_too_long_requests(composition):
    calm, tokenizer = composition
    model = CALMEvalModel(calm, tokenizer = tokenizer, max_length = 32)

    # nothing to score: the log-probability of no tokens, and none of them missed
    assert model.loglikelihood([request('loglikelihood', ('the cat sat', ''), {}), request('loglikelihood', ('', ''), {}, 1)]) == [(0., True), (0., True)]

    with pytest.raises(ValueError, match = r'a continuation of \d+ tokens cannot be scored within max_length = 32'):
        model.loglikelihood([request('loglikelihood', ('the', ' cat' * 40), {})])

    # an empty context starts from the prefix token, as in loglikelihood
    settings = dict(until = ['\n'], max_gen_toks = 4, do_sample = False)
    text, = model.generate_until([request('generate_until', ('', settings), {})])
    new = calm.generate(torch.tensor([[model.prefix_token_id]]), max_new_tokens = 4, temperature = 0., eos_id = tokenizer.eos_token_id).tolist()[0]
    new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    assert text == tokenizer.decode(new, skip_special_tokens = True).split('\n')[0]

def test_sampling_without_a_temperature_draws_at_one(composition):
    # lm_eval leaves out a temperature the task does not set
    calm, tokenizer = composition
    model = CALMEvalModel(calm, tokenizer = tokenizer)
    prompt = QUESTIONS[0]['question']

    torch.manual_seed(3)
    text, = model.generate_until([request('generate_until', (prompt, dict(until = ['\n'], max_gen_toks = 6, do_sample = True)), {})])

    torch.manual_seed(3)
    new = calm.generate(torch.tensor([tokenizer.encode(prompt)]), max_new_tokens = 6, temperature = 1., eos_id = tokenizer.eos_token_id).tolist()[0]
    new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    assert text == tokenizer.decode(new, skip_special_tokens = True).split('\n')[0]

def test_context_mode_reads_the_document_field(composition):
    calm, tokenizer = composition
    docs = QUESTIONS[:3]
    requests = [request('loglikelihood', (doc['question'], doc['choices'][0]), doc, index) for index, doc in enumerate(docs)]

    for batch_size in (1, 3):
        model = CALMEvalModel(calm, tokenizer = tokenizer, mode = 'context', prompt_field = 'document', batch_size = batch_size)
        scores = model.loglikelihood(requests)

        for doc, (logprob, _) in zip(docs, scores):
            context, whole = tokenizer.encode(doc['question']), tokenizer.encode(doc['question'] + doc['choices'][0])
            expected = direct_loglikelihood(calm, whole, len(whole) - len(context), prompt = torch.tensor([tokenizer.encode(doc['document'])]))
            assert logprob == pytest.approx(expected, abs = 1e-4)

            # the document matters: aligned mode scores otherwise
            assert abs(expected - direct_loglikelihood(calm, whole, len(whole) - len(context))) > 1e-3

    # without a field, the augments read the request's context
    model = CALMEvalModel(calm, tokenizer = tokenizer, mode = 'context')
    doc = docs[0]
    (logprob, _), = model.loglikelihood(requests[:1])
    context, whole = tokenizer.encode(doc['question']), tokenizer.encode(doc['question'] + doc['choices'][0])
    assert logprob == pytest.approx(direct_loglikelihood(calm, whole, len(whole) - len(context), prompt = torch.tensor([context])), abs = 1e-4)

    # a rolling loglikelihood has no context to read: refused, naming the fix
    with pytest.raises(ValueError, match = 'prompt_field'):
        model.loglikelihood_rolling([request('loglikelihood_rolling', (doc['document'],), doc)])

    with pytest.raises(KeyError, match = 'no such field'):
        CALMEvalModel(calm, tokenizer = tokenizer, mode = 'context', prompt_field = 'missing').loglikelihood(requests[:1])

def test_context_mode_cuts_a_long_document_on_the_left(composition):
    # the augment reads at most 64 positions; a few-shot context is longer
    calm, tokenizer = composition
    doc = dict(question = 'the cat sat on the', document = ' '.join(['numbers like 12 and 345 are words too'] * 12))
    document = tokenizer.encode(doc['document'])
    assert len(document) > 64

    model = CALMEvalModel(calm, tokenizer = tokenizer, mode = 'context', prompt_field = 'document')
    (logprob, _), = model.loglikelihood([request('loglikelihood', (doc['question'], ' mat'), doc)])

    context, whole = tokenizer.encode(doc['question']), tokenizer.encode(doc['question'] + ' mat')
    assert logprob == pytest.approx(direct_loglikelihood(calm, whole, len(whole) - len(context), prompt = torch.tensor([document[-64:]])), abs = 1e-4)

def test_chat_templates_are_the_anchor_tokenizers(tmp_path, composition):
    calm, tokenizer = composition
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"

    results = simple_evaluate(model = CALMEvalModel(calm, tokenizer = tokenizer), tasks = ['calm_choice'], task_manager = write_tasks(tmp_path), log_samples = True, bootstrap_iters = 0, apply_chat_template = True)
    sample = min(results['samples']['calm_choice'], key = lambda sample: sample['doc_id'])
    context, continuation = sample['arguments'][0]

    assert context == f"user: {QUESTIONS[0]['question']}\nassistant:" and continuation == QUESTIONS[0]['choices'][0]

    with pytest.raises(ValueError, match = "the anchor's tokenizer has none"):
        CALMEvalModel(calm, tokenizer = byte_bpe()).chat_template(True)

def test_registered_and_clear_about_bad_arguments(composition):
    calm, tokenizer = composition
    assert get_model('calm') is CALMEvalModel

    with pytest.raises(ValueError, match = 'mode'):
        CALMEvalModel(calm, tokenizer = tokenizer, mode = 'both')

    with pytest.raises(ValueError, match = 'context mode'):
        CALMEvalModel(calm, tokenizer = tokenizer, prompt_field = 'document')

    with pytest.raises(ValueError, match = 'auto'):
        CALMEvalModel(calm, tokenizer = tokenizer, batch_size = 'auto')

    with pytest.raises(ValueError, match = 'tokenizer'):
        CALMEvalModel(calm)

    for wrong in (0, -1, 2.7, True, 'eight'):
        with pytest.raises(ValueError, match = rf'`batch_size` must be a positive integer, got {wrong!r}'):
            CALMEvalModel(calm, tokenizer = tokenizer, batch_size = wrong)

    # lm_eval's command line adds its own batch size (1 unless given) to the model arguments: theirs win
    model = CALMEvalModel.create_from_arg_obj(dict(pretrained = calm, tokenizer = tokenizer, batch_size = '8'), dict(batch_size = 1, max_batch_size = None, device = None))
    assert model.batch_size == 8
    assert CALMEvalModel.create_from_arg_obj(dict(pretrained = calm, tokenizer = tokenizer), dict(batch_size = '3', device = None)).batch_size == 3

def test_command_line_loads_a_saved_composition(tmp_path, composition):
    # frozen models saved where from_pretrained finds them again, the composition beside them
    built, tokenizer = composition
    built.anchor.save_pretrained(tmp_path / 'anchor')
    built.augments[0].save_pretrained(tmp_path / 'augment')

    anchor = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'anchor')
    augment = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'augment')
    calm = CALM(anchor, augment, attn_kwargs = dict(heads = 2, dim_head = 8))
    calm.cross_attns.load_state_dict(built.cross_attns.state_dict())
    calm.save_pretrained(tmp_path / 'calm', tokenizer = tokenizer)

    tasks = write_tasks(tmp_path)
    command = [
        sys.executable, '-m', 'calm_pytorch.evaluation', '--model', 'calm', '--model_args', f'pretrained={tmp_path / "calm"}',
        '--tasks', 'calm_choice', '--include_path', str(tmp_path), '--device', 'cpu', '--batch_size', '2',
        '--output_path', str(tmp_path / 'out'), '--log_samples'
    ]
    result = subprocess.run(command, cwd = ROOT, capture_output = True, text = True, env = {**os.environ, 'HF_DATASETS_OFFLINE': '1'})
    assert result.returncode == 0, result.stderr[-3000:]

    # as docs/ecosystem.md writes it: the batch size among the model arguments
    command[command.index('--model_args') + 1] += ',batch_size=2'
    del command[command.index('--batch_size'):command.index('--batch_size') + 2]
    command[command.index('--output_path') + 1] = str(tmp_path / 'out_docs')
    result = subprocess.run(command, cwd = ROOT, capture_output = True, text = True, env = {**os.environ, 'HF_DATASETS_OFFLINE': '1'})
    assert result.returncode == 0, result.stderr[-3000:]

    # a directory saved without a tokenizer, and a misspelt model argument, are named
    calm.save_pretrained(tmp_path / 'no_tokenizer')
    with pytest.raises(ValueError, match = r'nor was one saved with it: calm.save_pretrained\(dir, tokenizer = ...\)'):
        CALMEvalModel(str(tmp_path / 'no_tokenizer'))

    with pytest.raises(TypeError, match = r"The model arguments \['prompt_feild'\] are not CALMEvalModel's own.*misspelt"):
        CALMEvalModel(str(tmp_path / 'calm'), prompt_feild = 'document')

    samples_file, = (tmp_path / 'out').rglob('samples_calm_choice_*.jsonl')
    from_cli = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key = lambda sample: sample['doc_id'])
    in_process = evaluate(CALMEvalModel(built, tokenizer = tokenizer), tasks)['calm_choice']

    for one, other in zip(from_cli, in_process):
        assert [float(resp[0][0]) for resp in one['resps']] == pytest.approx([resp[0][0] for resp in other['resps']], abs = 1e-4)

def test_context_mode_tokenizes_for_each_augment_with_its_own_tokenizer():
    # an augment given its own tokenizer (AugmentParams(tokenizer = ...)) read the document in the
    # anchor's ids, silently where they fit its vocabulary; now in its own tokens, as in aligned mode
    from text_tokenizers import wordpiece

    from calm_pytorch import AugmentParams

    anchor_tokenizer, augment_tokenizer = byte_bpe(), wordpiece()
    torch.manual_seed(0)
    anchor = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size = len(anchor_tokenizer), hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 64, max_position_embeddings = 64))
    augment = transformers.BertModel(transformers.BertConfig(vocab_size = len(augment_tokenizer), hidden_size = 24, num_hidden_layers = 2, num_attention_heads = 2, intermediate_size = 48))
    calm = CALM(anchor, [AugmentParams(model = augment, tokenizer = augment_tokenizer), AugmentParams(model = copy.deepcopy(augment), tokenizer = augment_tokenizer)], anchor_tokenizer = anchor_tokenizer, attn_kwargs = dict(heads = 2, dim_head = 8))

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.5)

    doc = QUESTIONS[0]
    model = CALMEvalModel(calm.eval(), tokenizer = anchor_tokenizer, mode = 'context', prompt_field = 'document')
    (logprob, _), = model.loglikelihood([request('loglikelihood', (doc['question'], doc['choices'][0]), doc)])

    own = torch.tensor([[augment_tokenizer.convert_tokens_to_ids('[CLS]'), *augment_tokenizer(doc['document'], add_special_tokens = False).input_ids]])
    context, whole = anchor_tokenizer.encode(doc['question']), anchor_tokenizer.encode(doc['question'] + doc['choices'][0])
    assert logprob == pytest.approx(direct_loglikelihood(calm, whole, len(whole) - len(context), prompt = own), abs = 1e-4)
