"""Technical diagnostics of a quantized DPO checkpoint: 4-bit vs full precision, fp16 vs bf16 compute,
merged vs unmerged adapter, and the tokenizer/template traps. Each check: pass, warn or fail, with
its numbers and a sentence a user can act on."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from dpo_eval.config import ModelSpec
from dpo_eval.data.pairs import prompt_turns
from dpo_eval.generation.logprobs import encode_pair, right_padded
from dpo_eval.generation.prompts import PromptFormatter, training_prompt
from dpo_eval.report.page import Section, add_section, render_page
from dpo_eval.stages import release_models  # between loads: a 7B base is never held twice

KL_WARN, KL_FAIL = 0.01, 0.1  # nats per token
MERGE_TOLERANCE = 1e-4


@dataclass
class Check:
    name: str
    status: str  # pass | warn | fail
    numbers: dict
    explanation: str


def _batch(tokenizer, pairs: pl.DataFrame, max_length: int):
    """Training-style sequences (prompt + chosen + EOS) and the mask of their answer tokens."""
    formatter = PromptFormatter(tokenizer)
    rows = []
    for row in pairs.iter_rows(named=True):
        p, c, _ = encode_pair(tokenizer, training_prompt(formatter, row["system"], prompt_turns(row)),
                              row["chosen"], row["rejected"])
        ids = (p[-(max_length // 2):] + c)[:max_length]
        rows.append((ids, min(len(p), max_length // 2)))
    return right_padded(rows, tokenizer.pad_token_id or 0)


def _logits(model, batch):
    import torch

    ids, mask, _ = batch
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()


def compare_logits(reference, other, batch) -> dict:
    """Mean per-token KL(reference || other), top-1 agreement, max |logit diff|, over answer positions."""
    import torch

    predicts = batch[2][:, 1:]  # logits positions that predict an answer token
    ref, oth = reference[:, :-1][predicts], other[:, :-1][predicts]
    finite = bool(torch.isfinite(oth).all())
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(oth, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"kl_mean": float(kl.mean()) if finite else float("nan"),
            "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).float().mean()),
            "max_abs_logit_diff": float((ref - oth).abs().max()) if finite else float("inf"),
            "finite": finite, "tokens": int(predicts.sum())}


def perplexity(logits, batch) -> float:
    import torch

    ids, _, answer = batch
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return float(torch.exp(-logp[answer[:, 1:]].mean()))


def _load(spec: ModelSpec, **update):
    from dpo_eval.generation.models import load_model

    if "adapter" in update and update["adapter"] is None:
        update.setdefault("reference_adapter", "none")  # the bare base: no reference adapter either
    return load_model(spec.model_copy(update=update))


def quantization_checks(spec: ModelSpec, pairs: pl.DataFrame) -> list[Check]:
    full = _load(spec, adapter=None, quantization="none", compute_dtype="float32")
    batch = _batch(full.tokenizer, pairs, full.context_length)
    ref = _logits(full.model, batch)
    del full
    release_models()
    four = _load(spec, adapter=None, quantization="4bit", compute_dtype="bfloat16")
    q = _logits(four.model, batch)
    del four
    release_models()
    numbers = compare_logits(ref, q, batch) | {"perplexity_full": perplexity(ref, batch),
                                               "perplexity_4bit": perplexity(q, batch)}
    status = "pass" if numbers["kl_mean"] < KL_WARN else "warn" if numbers["kl_mean"] < KL_FAIL else "fail"
    checks = [Check("quantization: 4-bit nf4 vs full precision", status, numbers,
                    f"Quantizing the base to nf4 moves next-token distributions by {numbers['kl_mean']:.3g} nats "
                    f"per answer token (top-1 agreement {numbers['top1_agreement']:.1%}); perplexity of the chosen "
                    f"answers {numbers['perplexity_full']:.3g} -> {numbers['perplexity_4bit']:.3g}.")]
    fp16 = _logits(_load(spec, adapter=None, quantization="4bit", compute_dtype="float16").model, batch)
    dtypes = {"float16": compare_logits(ref, fp16, batch), "bfloat16": numbers}  # bf16: the load above
    bad = [d for d, n in dtypes.items() if not n["finite"]]
    checks.append(Check("quantization: fp16 vs bf16 compute dtype", "fail" if bad else "pass",
                        {d: {k: n[k] for k in ("kl_mean", "finite")} for d, n in dtypes.items()},
                        f"{', '.join(bad)} compute gives inf or NaN logits: use bfloat16." if bad else
                        "Both compute dtypes give finite logits; bfloat16 is the safe default for QLoRA "
                        f"(KL vs full precision: fp16 {dtypes['float16']['kl_mean']:.3g}, "
                        f"bf16 {dtypes['bfloat16']['kl_mean']:.3g})."))
    return checks


def merge_checks(spec: ModelSpec, pairs: pl.DataFrame, greedy_tokens: int = 16) -> list[Check]:
    """Unmerged vs merge_and_unload onto the 4-bit base vs merge onto a full-precision base."""
    import warnings

    from dpo_eval.config import GenerationSpec
    from dpo_eval.generation.generate import generate_both

    results, answers = {}, {}
    gen = GenerationSpec(max_new_tokens=greedy_tokens, batch_size=8)
    for label, quantization in (("4bit", "4bit"), ("full", "none")):
        loaded = _load(spec, quantization=quantization, compute_dtype="float32")
        batch = _batch(loaded.tokenizer, pairs, loaded.context_length)
        unmerged = _logits(loaded.model, batch)
        before = generate_both(loaded, pairs, gen, models=("tuned",))["answer"].to_list()
        del loaded
        release_models()
        # A fresh load, merged before any forward pass: on an AVX512-BF16 CPU bitsandbytes repacks 4-bit
        # weights at the first inference call, and merging a repacked weight gives garbage.
        fresh = _load(spec, quantization=quantization, compute_dtype="float32")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns that merging into 4-bit rounds: we measure it
            fresh.model = fresh.model.merge_and_unload()
        fresh.spec = fresh.spec.model_copy(update={"adapter": None})  # now a plain (merged) model
        merged = _logits(fresh.model, batch)
        after = generate_both(fresh, pairs, gen, models=("base",))["answer"].to_list()
        del fresh
        release_models()
        results[label] = compare_logits(unmerged, merged, batch)
        answers[label] = sum(a != b for a, b in zip(before, after))
    checks = []
    for label, base in (("full", "a full-precision base"), ("4bit", "the 4-bit base")):
        n = results[label] | {"greedy_answers_changed": answers[label], "prompts": pairs.height}
        ok = n["max_abs_logit_diff"] <= MERGE_TOLERANCE and answers[label] == 0
        checks.append(Check(f"merging: merge_and_unload onto {base}", "pass" if ok else
                            ("fail" if label == "4bit" else "warn"), n,
                            f"Merging onto {base} {'matches' if ok else 'does not match'} the unmerged adapter "
                            f"(max |logit diff| {n['max_abs_logit_diff']:.3g}, top-1 agreement "
                            f"{n['top1_agreement']:.1%}, {answers[label]} of {pairs.height} greedy answers changed)."
                            + ("" if ok or label == "full" else " The merged weight is re-quantized: evaluate the "
                               "adapter unmerged, or merge onto a 16-bit base.")))
    return checks


def engine_checks(spec: ModelSpec, pairs: pl.DataFrame, greedy_tokens: int = 16) -> list[Check]:
    """The dequantized engine against the nf4 (hf) path on this checkpoint, base and tuned: max |logit
    diff|, top-1 agreement on the chosen answers, and greedy answers identical out of N."""
    from dpo_eval.config import GenerationSpec
    from dpo_eval.generation.generate import generate_both

    sides = ("tuned", "base") if spec.adapter is not None else ("base",)
    logits, answers = {}, {}
    for engine in ("hf", "dequantized"):  # fresh loads: dequantizing happens before any forward pass
        loaded = _load_engine(spec, engine)
        batch = _batch(loaded.tokenizer, pairs, loaded.context_length)
        for side in sides:
            with loaded.base_context() if side == "base" else loaded.tuned_context():
                logits[engine, side] = _logits(loaded.model, batch)
        gen = GenerationSpec(max_new_tokens=greedy_tokens, batch_size=8, engine=engine)
        frame = generate_both(loaded, pairs, gen, models=sides)
        answers.update({(engine, side): frame.filter(pl.col("model") == side)["answer"].to_list() for side in sides})
        del loaded
        release_models()
    checks = []
    for side in sides:
        n = compare_logits(logits["hf", side], logits["dequantized", side], batch)
        same = sum(a == b for a, b in zip(answers["hf", side], answers["dequantized", side]))
        n |= {"greedy_identical": same, "prompts": pairs.height, "greedy_tokens": greedy_tokens}
        status = "pass" if same == pairs.height and n["top1_agreement"] >= 0.99 else \
            "warn" if n["top1_agreement"] >= 0.9 else "fail"
        checks.append(Check(f"engine: dequantized vs nf4 ({side})", status, n,
                            f"The dequantized engine's {side} model gives logits within {n['max_abs_logit_diff']:.3g} "
                            f"of the nf4 path (top-1 agreement {n['top1_agreement']:.1%}); {same} of {pairs.height} "
                            f"greedy answers ({greedy_tokens} tokens) are identical."
                            + ("" if status == "pass" else " Kernels that compute 4-bit layers in another precision "
                               "(the CPU's) differ in rounding; a large gap means the weights were dequantized "
                               "after a forward pass (bitsandbytes repacks them).")))
    return checks


def _load_engine(spec: ModelSpec, engine: str):
    from dpo_eval.generation.models import load_model

    return load_model(spec.model_copy(update={"quantization": "4bit"}), engine=engine)


def tokenizer_checks(loaded, pairs: pl.DataFrame) -> list[Check]:
    tokenizer = loaded.tokenizer
    formatter = PromptFormatter(tokenizer, loaded.spec.prompt_template, [])
    bos_counts = []
    for row in pairs.iter_rows(named=True):
        ids = formatter.encode(formatter.render(row["system"], prompt_turns(row)), loaded.context_length).ids
        bos_counts.append(ids.count(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else 1)
    eos_ok = [encode_pair(tokenizer, training_prompt(formatter, r["system"], prompt_turns(r)), r["chosen"],
                          r["rejected"])[1][-1:] == [tokenizer.eos_token_id] for r in pairs.iter_rows(named=True)]
    system_ok = None
    if getattr(tokenizer, "chat_template", None):
        try:
            tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                          tokenize=False, add_generation_prompt=True)
            system_ok = True
        except Exception:  # noqa: BLE001 - any template error means "rejects the system role"
            system_ok = False
    once = all(c == 1 for c in bos_counts)
    return [
        Check("tokenizer: exactly one BOS per prompt", "pass" if once else "fail",
              {"prompts": len(bos_counts), "bos_counts": sorted(set(bos_counts))},
              "Every prompt starts with exactly one BOS." if once else "Some prompts lack a BOS or have two."),
        Check("tokenizer: EOS ends training-style answers", "pass" if all(eos_ok) else "fail",
              {"answers": len(eos_ok), "with_eos": int(sum(eos_ok))},
              "Answers end with EOS as DPO training saw them (the model learns to stop)."),
        Check("tokenizer: pad token and chat template", "pass" if not any("system role" in r for r in loaded.repairs)
              and system_ok is not False else "warn",
              {"pad_token": tokenizer.pad_token, "chat_template": bool(getattr(tokenizer, "chat_template", None)),
               "system_role_accepted": system_ok, "repairs": loaded.repairs},
              "Repairs the loader made: " + ("; ".join(loaded.repairs) or "none") + "."),
    ]


def diagnose(spec: ModelSpec, pairs: pl.DataFrame, out: Path | None = None) -> list[Check]:
    """Every check, written to out/diagnostics.json when `out` is given."""
    from dpo_eval.generation.models import load_model

    loaded = load_model(spec)
    checks = tokenizer_checks(loaded, pairs)
    del loaded
    release_models()
    checks += quantization_checks(spec, pairs)
    checks += engine_checks(spec, pairs)
    if spec.adapter is not None:
        checks += merge_checks(spec, pairs)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "diagnostics.json").write_text(json.dumps([asdict(c) for c in checks], indent=2, default=str))
        section = diagnostics_section(checks)
        (out / "diagnostics.html").write_text(render_page([section], title="dpo-eval diagnostics"))
        if (out / "report.html").is_file():  # a run directory: the checks become (or replace) a report section
            add_section(out, section)
    return checks


def diagnostics_section(checks: list[Check]) -> Section:
    """The checks as a report section (id "diagnostics": adding it again replaces it)."""
    return Section("diagnostics", "Diagnostics", columns=["status", "check", "what it means"],
                   rows=[[c.status, c.name, c.explanation] for c in checks])
