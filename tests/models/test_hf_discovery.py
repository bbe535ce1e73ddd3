from __future__ import annotations

import pytest
import torch
from hf_models import DECODERS, ENCODERS, gpt2, llama, llava, module_name, t5_config, transformers
from torch import nn

from calm_pytorch import CALM, AugmentParams
from calm_pytorch.models.hf_adapter import HFAdapter
from calm_pytorch.models.hf_discovery import find_hf_blocks

FAMILIES = {**DECODERS, **ENCODERS}

@pytest.mark.parametrize('family', list(FAMILIES))
def test_discovery_finds_the_blocks_and_width(family):
    spec = FAMILIES[family]
    model = spec.build()

    name, blocks = find_hf_blocks(model)
    assert name == spec.blocks

    adapter = HFAdapter(model, name = family)
    assert [layer.output.module for layer in adapter.layers] == list(blocks)

    # widths from one dummy forward agree with the config
    dims = adapter.probe([layer.output for layer in adapter.layers]).dims
    assert set(dims.values()) == {spec.width} == {model.config.get_text_config().hidden_size}

def test_two_candidate_lists_pick_the_one_of_the_configured_depth():
    # Llava: a 3-layer vision tower of CLIP layers beside a 2-layer language model
    model = llava(vision_depth = 3)
    assert find_hf_blocks(model)[0] == 'model.language_model.layers'

    # a full T5 whose decoder (3 blocks) is deeper than its encoder (2): an augment reads the encoder
    t5 = transformers.T5ForConditionalGeneration(t5_config(num_decoder_layers = 3))
    assert find_hf_blocks(t5)[0] == 'encoder.block'

    # the anchor's blocks, not the vision tower's, get the injection hooks
    calm = CALM(model, gpt2())
    assert module_name(model, calm.anchor_adapter.layers[-1].output.module) == 'model.language_model.layers.1'

def test_llava_text_model_as_anchor_and_vision_model_as_augment():
    model = llava()
    calm = CALM(model, AugmentParams(model = transformers.CLIPVisionModel(model.config.vision_config)), attn_kwargs = dict(heads = 2, dim_head = 16))
    seq = torch.randint(0, 100, (2, 6))

    assert torch.equal(calm(seq, prompt = torch.randn(2, 3, 16, 16), return_loss = False), model(seq).logits)

def test_blocks_by_name_and_glob():
    anchor, augment = llama(depth = 4), gpt2(depth = 4)

    by_glob = CALM(anchor, AugmentParams(model = augment, transformer_blocks = 'transformer.h.*'), anchor_transformer_blocks = 'model.layers.*')
    assert [layer.output.module for layer in by_glob.anchor_adapter.layers] == list(anchor.model.layers)
    by_glob.remove_hooks()

    # a container by name means its entries; names may be mixed with modules, each block once
    by_name = CALM(anchor, AugmentParams(model = augment, transformer_blocks = ['transformer.h.3', augment.transformer.h[1], 'transformer.h.1']), anchor_transformer_blocks = 'model.layers')
    assert [layer.output.module for layer in by_name.augment_adapters[0].layers] == [augment.transformer.h[1], augment.transformer.h[3]]
    assert len(by_name.anchor_adapter.layers) == 4

    # a star stays within one dotted component: the blocks, not their submodules
    by_name.remove_hooks()
    with_brackets = CALM(anchor, AugmentParams(model = augment, transformer_blocks = 'transformer.h.[02]'), anchor_transformer_blocks = 'model.layers.*')
    assert with_brackets.num_augment_layers == [2]

def test_name_matching_nothing_lists_the_nearest_names():
    anchor, augment = llama(), gpt2()

    with pytest.raises(ValueError, match = r"no module of anchor_llm \(LlamaForCausalLM\) is named 'model.layer.\*'; nearest names: .*'model.layers.*Its module lists: 'model.layers' \(2 x LlamaDecoderLayer\)"):
        CALM(anchor, augment, anchor_transformer_blocks = 'model.layer.*')

    with pytest.raises(ValueError, match = r"augment_llms\[0\] \(GPT2LMHeadModel\) is named 'transformer.blocks.3'.*'transformer.h'"):
        CALM(anchor, AugmentParams(model = augment, transformer_blocks = ['transformer.blocks.3']))

def test_hf_model_without_a_recognisable_block_list():
    class Flat(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(32, 8)
            self.mixers = nn.ModuleList([nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)])

        def forward(self, input_ids, attention_mask = None):
            x = self.embed(input_ids)
            for mixer in self.mixers:
                x = mixer(x)
            return x

    model = Flat(transformers.PretrainedConfig(num_hidden_layers = 3))

    with pytest.raises(ValueError, match = r"could not find the transformer blocks of Flat.*'mixers' \(3 x Linear\).*transformer_blocks=\"model.layers.\*\"") as error:
        CALM(llama(), model)

    assert 'anchor_transformer_blocks=' in str(error.value) and 'extract_blocks_fn=' in str(error.value)

    # told where the blocks are, it composes
    calm = CALM(llama(), AugmentParams(model = model, transformer_blocks = ['mixers.0', 'mixers.2']))
    assert calm.num_augment_layers == [2]

def test_encoder_decoder_anchor_is_refused():
    with pytest.raises(ValueError, match = r'encoder-decoder model; an anchor must be a decoder-only'):
        CALM(transformers.T5ForConditionalGeneration(t5_config()), gpt2())

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.net(x).tanh()

def two_lists_model(draft_depth: int, num_hidden_layers: int = 2):
    class TwoLists(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig
        _no_split_modules = ['Block']

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(32, 8)
            self.draft = nn.ModuleList([Block() for _ in range(draft_depth)])
            self.layers = nn.ModuleList([Block() for _ in range(2)])

        def forward(self, input_ids, attention_mask = None):
            x = self.embed(input_ids)
            for block in [*self.draft, *self.layers]:
                x = block(x)
            return x

    return TwoLists(transformers.PretrainedConfig(num_hidden_layers = num_hidden_layers))

def test_the_list_of_the_configured_depth_wins():
    # two lists of the block class: the one whose length is the config's num_hidden_layers
    assert find_hf_blocks(two_lists_model(draft_depth = 3))[0] == 'layers'
    assert find_hf_blocks(two_lists_model(draft_depth = 3, num_hidden_layers = 3))[0] == 'draft'

    # two of the same depth: an error naming both, never a guess
    with pytest.raises(ValueError, match = r"several candidate block lists of depth 2: 'draft' \(2 x Block\), 'layers' \(2 x Block\)"):
        find_hf_blocks(two_lists_model(draft_depth = 2))
