from __future__ import annotations

# tiny transformers models built from configs (never a hub download), one per family, with the
# name of their block list and their width, as the discovery must find them

from collections.abc import Callable
from dataclasses import dataclass

import transformers
from torch.nn import Module

transformers.logging.set_verbosity_error()

VOCAB = 128
DIM = 32
DEPTH = 2

# small ids for the special tokens: the defaults of some configs lie outside a tiny vocabulary
TOKENS = dict(bos_token_id = 1, eos_token_id = 2, pad_token_id = 0)

LLAMA_LIKE = dict(vocab_size = VOCAB, hidden_size = DIM, num_hidden_layers = DEPTH, num_attention_heads = 2, intermediate_size = 64, max_position_embeddings = 64, **TOKENS)

@dataclass
class Family:
    build: Callable[[], Module]
    blocks: str   # the name of its block list
    width: int

def vision_config(depth: int = DEPTH, width: int = 16):
    return transformers.CLIPVisionConfig(hidden_size = width, num_hidden_layers = depth, num_attention_heads = 2, intermediate_size = 32, image_size = 16, patch_size = 8)

def llava(vision_depth: int = 3):
    # a vision tower deeper than the language model: two candidate block lists
    config = transformers.LlavaConfig(
        text_config = transformers.LlamaConfig(**LLAMA_LIKE),
        vision_config = vision_config(depth = vision_depth),
        image_token_index = VOCAB - 1,
        **TOKENS
    )
    return transformers.LlavaForConditionalGeneration(config)

def t5_config(**kwargs):
    return transformers.T5Config(vocab_size = VOCAB, d_model = 24, d_kv = 12, d_ff = 48, num_layers = DEPTH, num_heads = 2, **TOKENS, **kwargs)

DECODERS = {
    'gpt2': Family(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size = VOCAB, n_embd = DIM, n_layer = DEPTH, n_head = 2, n_positions = 64, **TOKENS)), 'transformer.h', DIM),
    'llama': Family(lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_LIKE, num_key_value_heads = 1)), 'model.layers', DIM),
    'qwen2': Family(lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLAMA_LIKE, num_key_value_heads = 1)), 'model.layers', DIM),
    'mistral': Family(lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**LLAMA_LIKE, num_key_value_heads = 1)), 'model.layers', DIM),
    'gpt_neox': Family(lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**LLAMA_LIKE)), 'gpt_neox.layers', DIM),
    'phi3': Family(lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**LLAMA_LIKE)), 'model.layers', DIM),
    'gemma': Family(lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**LLAMA_LIKE, head_dim = 16, num_key_value_heads = 1)), 'model.layers', DIM),
    'opt': Family(lambda: transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size = VOCAB, hidden_size = DIM, word_embed_proj_dim = DIM, num_hidden_layers = DEPTH, num_attention_heads = 2, ffn_dim = 64, max_position_embeddings = 64, **TOKENS)), 'model.decoder.layers', DIM),
    'falcon': Family(lambda: transformers.FalconForCausalLM(transformers.FalconConfig(vocab_size = VOCAB, hidden_size = DIM, num_hidden_layers = DEPTH, num_attention_heads = 2, **TOKENS)), 'transformer.h', DIM),
    'gptj': Family(lambda: transformers.GPTJForCausalLM(transformers.GPTJConfig(vocab_size = VOCAB, n_embd = DIM, n_layer = DEPTH, n_head = 2, rotary_dim = 8, n_positions = 64, **TOKENS)), 'transformer.h', DIM),
    'gpt_neo': Family(lambda: transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(vocab_size = VOCAB, hidden_size = DIM, num_layers = DEPTH, num_heads = 2, attention_types = [[['global', 'local'], 1]], window_size = 4, max_position_embeddings = 64, **TOKENS)), 'transformer.h', DIM),
    'bloom': Family(lambda: transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size = VOCAB, hidden_size = DIM, n_layer = DEPTH, n_head = 2, **TOKENS)), 'transformer.h', DIM),
    'llava': Family(llava, 'model.language_model.layers', DIM),
}

ENCODERS = {
    'bert': Family(lambda: transformers.BertModel(transformers.BertConfig(**{**LLAMA_LIKE, 'hidden_size': 16})), 'encoder.layer', 16),
    'roberta': Family(lambda: transformers.RobertaModel(transformers.RobertaConfig(**{**LLAMA_LIKE, 'hidden_size': 16, 'max_position_embeddings': 72})), 'encoder.layer', 16),
    'modernbert': Family(lambda: transformers.ModernBertModel(transformers.ModernBertConfig(vocab_size = VOCAB, hidden_size = 16, num_hidden_layers = DEPTH, num_attention_heads = 2, intermediate_size = 32, **TOKENS)), 'layers', 16),
    't5_encoder': Family(lambda: transformers.T5EncoderModel(t5_config()), 'encoder.block', 24),
    't5_full': Family(lambda: transformers.T5ForConditionalGeneration(t5_config(num_decoder_layers = 3)), 'encoder.block', 24),
    'vit': Family(lambda: transformers.ViTModel(transformers.ViTConfig(hidden_size = 16, num_hidden_layers = DEPTH, num_attention_heads = 2, intermediate_size = 32, image_size = 16, patch_size = 8)), 'layers', 16),
    'clip_vision': Family(lambda: transformers.CLIPVisionModel(vision_config()), 'encoder.layers', 16),
}

def gpt2(dim: int = 24, depth: int = 4):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size = VOCAB, n_embd = dim, n_layer = depth, n_head = 2, n_positions = 64, **TOKENS))

def llama(dim: int = DIM, depth: int = DEPTH):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_LIKE, 'hidden_size': dim, 'num_hidden_layers': depth}, num_key_value_heads = 1))

def module_name(model: Module, module: Module) -> str:
    return next(name for name, submodule in model.named_modules() if submodule is module)
