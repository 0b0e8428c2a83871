"""Writing Hugging Face folders from weights: full models, PEFT adapters, and LoRA merged into its base.

The folders match what training's ``save_model`` writes: full models go through the model class's own
``save_pretrained`` (built on the meta device, so no second copy of the weights is allocated), adapters
use PEFT's file layout, and every non-weight file (config, generation config, tokenizer, adapter config)
is the one the checkpoint recorded at save time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from openrl_ckpt.errors import UserError
from openrl_ckpt.utils.atomic import atomic_folder

log = logging.getLogger("openrl_ckpt")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


def quiet_progress_bars() -> None:
    """The tools print their own lines; transformers' loading/writing bars would only clutter them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def without_tied_copies(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` less the weights the model ties to another one (a tied ``lm_head.weight``), as
    ``save_pretrained`` writes a model of its own. Gathered or cloned weights no longer share memory, so
    ``save_pretrained`` cannot see the tie and would write the embedding twice."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    drop = {alias for alias, source in tied.items() if alias in state_dict and source in state_dict}
    return {k: v for k, v in state_dict.items() if k not in drop} if drop else state_dict


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def is_adapter(hf_dir: Path) -> bool:
    return (hf_dir / ADAPTER_CONFIG).exists()


def check_new_output(output: str | Path, flag: str = "--output") -> Path:
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{flag} {out} already exists and is not an empty folder; choose a new one")
    return out


@contextlib.contextmanager
def atomic_output(output: str | Path, flag: str = "--output") -> Iterator[Path]:
    """A temp folder next to ``output``, renamed to it when the block succeeds (removed otherwise).

    An existing non-empty ``output`` is refused: export never overwrites what a user already has.
    """
    out = check_new_output(output, flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot create its parent folder ({e.strerror or e})") from None
    try:
        with atomic_folder(out) as tmp:
            yield tmp
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot write ({e.strerror or e})") from None


def copy_non_weight_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Config, generation config, tokenizer and adapter files of a Hugging Face folder."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not is_weight_file(f.name) and f.name not in skip:
            shutil.copy2(f, dst / f.name)


def saved_dtype_of(hf_dir: str | Path) -> torch.dtype:
    """The dtype a Hugging Face folder's config records."""
    from transformers import AutoConfig

    try:
        return _saved_dtype(AutoConfig.from_pretrained(hf_dir))
    except (OSError, ValueError):
        return torch.float32


def copy_hf_folder(src: Path, out: Path, dtype: torch.dtype) -> None:
    """A Hugging Face folder (model or adapter) copied; its floating-point weights cast to ``dtype``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed = False
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            metadata = st.metadata()
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        if all(t.dtype == dtype or not t.is_floating_point() for t in tensors.values()):
            shutil.copy2(f, out / f.name)  # bitwise as trained
            continue
        changed = True
        save_file({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}, str(out / f.name),
                  metadata=metadata)
    copy_non_weight_files(src, out)
    for index in src.glob("*.safetensors.index.json"):
        shutil.copy2(index, out / index.name)  # tensor names and files are unchanged by a cast
    config = out / "config.json"
    if changed and config.exists():
        data = json.loads(config.read_text())
        data["dtype"] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _model_class(config: Any) -> Any:
    head = getattr(config, "value_head_prefix", None)
    if head:  # a reward model (or critic): the reward model loader's class
        from openrl_ckpt.models.reward import reward_model_class

        return reward_model_class(config, head)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def write_full_model(state_dict: dict[str, torch.Tensor], hf_dir: Path, out: Path, dtype: torch.dtype,
                     train_dtype: torch.dtype) -> None:
    """``state_dict`` as a Hugging Face model folder, with the checkpoint's config and tokenizer files."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    cls = _model_class(config)
    with torch.device("meta"):  # only the structure: save_pretrained writes the tensors we pass
        model = cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") else cls._from_config(
            config, dtype=dtype)
    try:
        model.save_pretrained(out, state_dict=without_tied_copies(model, state_dict), safe_serialization=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"cannot write the model from these weights ({str(e).splitlines()[0][:200]})") from None
    # the config is kept as recorded unless --dtype changed it (then save_pretrained's carries the new dtype)
    copy_non_weight_files(hf_dir, out, skip=() if dtype == train_dtype else ("config.json",))


def peft_adapter_state_dict(trainable: dict[str, torch.Tensor],
                            adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's saved names for a LoRA model's trainable weights (as the engine holds them).

    LoRA weights ``...q_proj.lora_A.default.weight`` are saved as ``...q_proj.lora_A.weight``, and
    fully trained modules (``modules_to_save``, e.g. a reward head) without their wrapper; the same
    renaming PEFT's ``save_pretrained`` does, checked against it in the unit tests.
    """
    out = {}
    for name, tensor in trainable.items():
        if "lora_" in name or ".modules_to_save." in name:
            out[name.replace("modules_to_save.", "").replace(f".{adapter_name}", "")] = tensor
    return out


def write_adapter(trainable: dict[str, torch.Tensor], hf_dir: Path, out: Path) -> None:
    """A PEFT adapter folder from the trainable weights, with the checkpoint's adapter config and tokenizer."""
    from safetensors.torch import save_file

    adapter = peft_adapter_state_dict(trainable)
    if not adapter:
        raise UserError(f"{hf_dir} describes a LoRA adapter but the engine holds no LoRA weights")
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    copy_non_weight_files(hf_dir, out)


def _load_base(base: str, is_rm: bool, head_prefix: str) -> torch.nn.Module:
    """The base model in fp32 (the merge is done in full precision and cast afterwards)."""
    from openrl_ckpt.models.actor import ModelConfig, check_pretrain

    check_pretrain(base)
    if is_rm:
        from openrl_ckpt.models.reward import load_reward_model

        return load_reward_model(ModelConfig(pretrain=base), head_prefix, require_head=False)
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"--base {base}: cannot load a causal LM ({str(e).splitlines()[0]})") from None


def merge_lora(base: str, adapter_dir: Path, out: Path, dtype: torch.dtype | None = None, is_rm: bool = False,
               head_prefix: str = "score") -> None:
    """``base`` with the LoRA adapter merged in, as a plain Hugging Face folder (no PEFT needed to load it).

    Merged in fp32, then cast to ``dtype`` (default: the dtype the base folder records). The tokenizer
    is the adapter folder's when it holds one (training saves the tokenizer it used), else the base's.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    if not (adapter_dir / ADAPTER_CONFIG).exists():
        raise UserError(f"--lora {adapter_dir}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    target = dtype or saved_dtype_of(Path(base))
    model = _load_base(base, is_rm, head_prefix)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"--lora {adapter_dir}: cannot apply it to {base} ({str(e).splitlines()[0]})") from None
    merged.to(target)
    merged.save_pretrained(out, safe_serialization=True)
    if (adapter_dir / "tokenizer_config.json").exists():
        copy_non_weight_files(adapter_dir, out, skip=(ADAPTER_CONFIG, "README.md", "config.json",
                                                      "generation_config.json"))
    else:
        try:
            AutoTokenizer.from_pretrained(base).save_pretrained(out)
        except (OSError, ValueError) as e:
            log.warning("no tokenizer in %s or %s (%s): the merged folder has none", adapter_dir, base,
                        str(e).splitlines()[0])


def _saved_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
