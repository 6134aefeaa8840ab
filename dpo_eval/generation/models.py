"""Load the base LLM once, quantized as asked, with the DPO adapter attached (unmerged).

The tuned model is the adapter on; the base model is the same object under `disable_adapter()`: one
load serves both. With a reference adapter (dpo_eval.reference) the 'base' side is base + that adapter,
attached beside the tuned one under its own name and switched to with `set_adapter`. Every check runs
before any generation; every repair is recorded in `repairs`.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from dpo_eval.config import ModelSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.engines import DEQUANTIZING, MergeSwitch, check_engine, dequantize_in_place
from dpo_eval.identity import ModelIdentity, model_identity
from dpo_eval.locations import is_local_path
from dpo_eval.reference import REFERENCE_NAME, reference_adapter, reference_option, use_adapter


@dataclass
class LoadedModel:
    """A loaded checkpoint: the model (peft-wrapped when an adapter is given) and its tokenizer."""

    model: object
    tokenizer: object
    spec: ModelSpec
    identity: ModelIdentity
    context_length: int
    repairs: list[str] = field(default_factory=list)
    reference: str | None = None  # the reference adapter attached as REFERENCE_NAME; None: the bare base
    engine: str = "hf"
    merge: bool = False
    merge_switch: object | None = None

    @property
    def base_fingerprint(self) -> str:
        return self.identity.base_key

    @property
    def fingerprint(self) -> str:
        return self.identity.tuned_key

    @property
    def has_adapter(self) -> bool:
        return self.spec.adapter is not None

    def base_context(self):
        """Context in which the model is the 'base' side: the reference adapter active where there is one,
        else the adapter disabled (no-op without an adapter); a merged adapter is unmerged first by
        restoring the original weights."""
        if self.merge_switch is not None:
            self.merge_switch.unmerge()
        if self.reference is not None:
            return use_adapter(self.model, REFERENCE_NAME)
        return self.model.disable_adapter() if self.has_adapter else nullcontext()

    def tuned_context(self):
        """Context in which the model is the tuned one: the adapter on (merged into the weights with merge)."""
        if self.merge_switch is not None:
            self.merge_switch.merge()
        return nullcontext()


def check_paths(spec: ModelSpec) -> None:
    """Fail before loading anything on a missing base, adapter or reference adapter folder."""
    if is_local_path(spec.base) and not Path(spec.base).expanduser().is_dir():
        raise DpoEvalError(f"--base {spec.base}: no such model folder (give a local folder or a hub id)")
    for adapter, option in ((spec.adapter, "--adapter"), (reference_adapter(spec), reference_option(spec))):
        if adapter is not None and is_local_path(adapter):
            folder = Path(adapter).expanduser()
            if not folder.is_dir():
                raise DpoEvalError(f"{option} {adapter}: no such adapter folder")
            if not (folder / "adapter_config.json").is_file():
                raise DpoEvalError(f"{option} {adapter}: no adapter_config.json; is this a peft adapter folder?")


def fingerprints(spec: ModelSpec) -> tuple[str, str]:
    """(base key, tuned key) of the complete model identity (dpo_eval.identity)."""
    from dpo_eval.identity import model_identity

    identity = model_identity(spec)
    return identity.base_key, identity.tuned_key


def quantization_config(spec: ModelSpec):
    """The BitsAndBytesConfig of `spec`, or None."""
    import torch
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, spec.compute_dtype)
    if spec.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(spec: ModelSpec, repairs: list[str], engine: str = "hf"):
    """The base model, quantized as asked, in eval mode; nf4 weights dequantized to the compute dtype
    right after loading (before any forward pass) for the dequantized and continuous engines."""
    import torch
    from transformers import AutoModelForCausalLM

    if spec.compute_dtype == "float16":
        message = "compute_dtype float16 is unstable for QLoRA (overflow to inf/NaN); prefer bfloat16"
        warnings.warn(message, stacklevel=2)
        repairs.append("warning: " + message)
    device_map = spec.device_map or ("auto" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.base, revision=spec.revision, dtype=getattr(torch, spec.compute_dtype),
            quantization_config=quantization_config(spec), device_map=device_map)
    except OSError as exc:
        raise DpoEvalError(f"--base {spec.base}: cannot load ({str(exc)[:300]}); a hub id needs network "
                           "access, or download the model and pass its folder") from None
    model.eval()
    if engine in DEQUANTIZING and spec.quantization == "4bit":
        dequantize_in_place(model, spec.compute_dtype)
        return model
    fixed = fix_cpu_4bit_layers(model)
    if fixed:
        repairs.append(f"bitsandbytes CPU packed 4-bit kernel needs out_features % 32 == 0 and in_features % "
                       f"blocksize == 0: generic 4-bit path for {fixed} layers")
    return model


def fix_cpu_4bit_layers(model) -> int:
    """Route 4-bit layers the CPU packed kernel cannot take to bitsandbytes' generic path; returns a count.

    bitsandbytes 0.50 on an AVX512-BF16 CPU repacks 4-bit weights at the first inference call and
    asserts out_features % 32 == 0 and in_features % blocksize == 0 (stories260k's 172-wide MLP fails).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            blocksize = getattr(module.weight.quant_state, "blocksize", 64)
            if module.out_features % 32 or module.in_features % blocksize:
                module.support_avx512bf16_for_cpu = False
                count += 1
    return count


def check_adapter(base_model, spec: ModelSpec, repairs: list[str], adapter: str | None = None,
                  option: str = "--adapter") -> None:
    """Fail when the adapter's (default: spec.adapter) shapes or vocabulary do not fit the base; warn when
    only names differ. `option` names the adapter in messages."""
    adapter = adapter or spec.adapter
    folder = Path(adapter).expanduser()
    config = read_adapter_config(folder)
    trained_on = config.get("base_model_name_or_path")
    shapes = _adapter_shapes(folder, option)
    modules = dict(base_model.named_modules())
    vocab = base_model.get_input_embeddings().weight.shape[0]
    problems = []
    for key, shape in shapes.items():
        name = re.sub(r"^base_model\.model\.", "", key.split(".lora_")[0])
        if ".lora_" in key:
            module = modules.get(name)
            if module is None:
                problems.append(f"{name} does not exist in the base")
                continue
            in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if ".lora_A" in key and in_f is not None and shape[-1] != in_f:
                problems.append(f"{name}: adapter expects {shape[-1]} inputs, base has {in_f}")
            if ".lora_B" in key and out_f is not None and shape[0] != out_f:
                problems.append(f"{name}: adapter gives {shape[0]} outputs, base has {out_f}")
        elif ("embed_tokens" in key or "lm_head" in key) and shape[0] != vocab:
            problems.append(f"{key}: vocabulary {shape[0]}, base vocabulary {vocab}")
    if problems:
        raise DpoEvalError(f"{option} {adapter} was trained for base '{trained_on}' and does not fit "
                           f"--base {spec.base}: " + "; ".join(problems[:5]))
    if trained_on and not _same_model(trained_on, spec.base):
        label = "adapter" if option == "--adapter" else f"reference adapter ({option})"
        message = (f"{label} {adapter} was trained on '{trained_on}', not '{spec.base}'; "
                   "the shapes fit, so it loads, but check that this is the base you meant")
        warnings.warn(message, stacklevel=2)
        repairs.append("warning: " + message)


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json of an adapter folder, or a DpoEvalError naming the file and the problem."""
    path = Path(folder).expanduser() / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DpoEvalError(f"{path}: not a readable adapter config ({exc}); re-save the adapter with peft's "
                           "save_pretrained") from None
    if not isinstance(config, dict):
        raise DpoEvalError(f"{path}: expected a JSON object (peft's LoraConfig), found {type(config).__name__}")
    return config


def _same_model(a: str, b: str) -> bool:
    """The same folder; or, where only one is a local folder (a copy of a hub model), the same name."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    if pa.exists() or pb.exists():
        return pa.name == pb.name
    return a == b


def _adapter_shapes(folder: Path, option: str = "--adapter") -> dict[str, tuple[int, ...]]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), "pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    bin_file = folder / "adapter_model.bin"
    if bin_file.is_file():
        import torch

        return {k: tuple(v.shape) for k, v in torch.load(bin_file, map_location="cpu", weights_only=True).items()}
    raise DpoEvalError(f"{option} {folder}: no adapter_model.safetensors or adapter_model.bin")


def load_tokenizer(spec: ModelSpec, repairs: list[str]):
    """The base's tokenizer with a pad token and left padding (each repair recorded)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.base, revision=spec.revision)
    if tokenizer.pad_token is None:
        substitute = "unk_token" if tokenizer.unk_token is not None else "eos_token"
        tokenizer.pad_token = getattr(tokenizer, substitute)
        repairs.append(f"tokenizer had no pad token: pad set to the {substitute.split('_')[0]} token "
                       f"{tokenizer.pad_token!r}")
    if tokenizer.padding_side != "left":
        repairs.append(f"padding side set to left for batched generation (was {tokenizer.padding_side})")
        tokenizer.padding_side = "left"
    return tokenizer


def load_model(spec: ModelSpec, identity: ModelIdentity | None = None, engine: str = "hf",
               merge: bool = False) -> LoadedModel:
    """Check, identify, load the base once, attach the adapter and any reference adapter (unmerged, by name:
    the adapter as peft's `default`, the reference as REFERENCE_NAME). See the module docstring;
    `engine` and `merge`: dpo_eval.generation.engines.

    The identity is taken again after loading: files rewritten during the load (a trainer saving over
    `checkpoint/latest`) would otherwise put new weights under the old key, so that is an error.
    """
    check_paths(spec)
    check_engine(spec, engine, merge)
    identity = identity or model_identity(spec)
    repairs: list[str] = []
    # what the identity names: a hub id at the commit it resolved to, not its branch as it is now
    pinned = spec.model_copy(update={"revision": identity.commit("base") or spec.revision})
    tokenizer = load_tokenizer(pinned, repairs)
    model = load_base(pinned, repairs, engine)
    reference = reference_adapter(spec)
    adapter_folder = hub_folder(spec.adapter, identity.commit("adapter"), "--adapter")
    reference_folder = hub_folder(reference, identity.commit("reference"), reference_option(spec))
    if spec.adapter is not None:
        check_adapter(model, spec, repairs, adapter_folder)
    if reference is not None:
        check_adapter(model, spec, repairs, reference_folder, reference_option(spec))
    model = attach_adapters(model, adapter_folder, reference_folder)
    if model_identity(spec, pinned=identity) != identity:
        raise DpoEvalError(f"the files of --base {spec.base}, --adapter {spec.adapter} or --reference-adapter "
                           f"{reference} changed while the run was using them (a checkpoint being rewritten?); "
                           "run again once they are complete")
    context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    switch = MergeSwitch(model) if merge and spec.adapter is not None else None
    return LoadedModel(model, tokenizer, spec, identity, context, repairs, reference, engine, merge, switch)


def hub_folder(adapter: str | None, commit: str | None, option: str = "--adapter") -> str | None:
    """The local folder of hub adapter `adapter` at `commit` (downloaded, or from the hub cache offline);
    `adapter` as it is where it is local or its commit is unknown (None)."""
    if adapter is None or commit is None:
        return adapter
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(adapter, revision=commit)
    except Exception as exc:  # noqa: BLE001 - no network and not in the hub cache, or no such commit
        raise DpoEvalError(f"{option} {adapter}: cannot fetch commit {commit} ({type(exc).__name__}: "
                           f"{str(exc)[:200]})") from None


def attach_adapters(model, adapter: str | None, reference: str | None):
    """`model` with the adapter (peft's `default`, active) and the reference (REFERENCE_NAME) attached,
    both frozen; `model` itself without either."""
    if adapter is None and reference is None:
        return model
    from peft import PeftModel

    first, name = (adapter, "default") if adapter is not None else (reference, REFERENCE_NAME)
    model = PeftModel.from_pretrained(model, first, adapter_name=name, is_trainable=False)
    if adapter is not None and reference is not None:
        model.load_adapter(reference, adapter_name=REFERENCE_NAME, is_trainable=False)
        model.set_adapter("default", inference_mode=True)
    model.eval()
    return model
