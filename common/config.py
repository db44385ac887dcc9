"""One config system for every stage: typed dataclasses whose fields carry their help.

A stage's config is a dataclass composed of the groups below; `parse_config` turns
it into a command line (DeepSpeed-Chat flag names), reads `--config FILE.yaml` for any
field, and lets flags override the file. Values are checked against the field types,
so a bad value is an error that names the flag or the YAML key.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from common.errors import ConfigError


def arg(default: Any, help: str, choices: Optional[tuple] = None, **kw) -> Any:
    """A dataclass field with its help text (and choices) attached."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelArgs:
    model_name_or_path: str = arg("tiny", "HF hub name, local folder, a densehf stage output folder, or "
                                  "a preset: 'tiny' (the embedded task's CPU model), 'smollm2' "
                                  "(SmolLM2-135M-Instruct).")
    tokenizer_name_or_path: Optional[str] = arg(None, "Tokenizer, if not the model's own.")
    max_seq_len: int = arg(128, "Maximum tokens per sequence (prompt + response).")


@dataclass
class BackboneArgs:
    trust_remote_code: bool = arg(False, "Allow model repos to run their own Python code. "
                                  "Off by default: only pass it for repos you trust.")
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward to save memory.")
    lora_dim: int = arg(0, "LoRA rank; 0 trains all weights. LoRA is merged into the export.")
    lora_module_name: str = arg("all-linear", "Modules LoRA wraps: 'all-linear' or a "
                                "comma-separated list of name suffixes (e.g. q_proj,v_proj).")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator (scale = alpha / rank).")
    attn_implementation: str = arg("sdpa", "Attention kernel: sdpa, eager, flash_attention_2.")


@dataclass
class DataArgs:
    data_path: list[str] = arg(["imdb"], "One or more data sets: 'imdb' (the embedded task), a "
                               "hub name (Dahoas/rm-static, Dahoas/full-hh-rlhf, Anthropic/hh-rlhf, "
                               "HuggingFaceH4/ultrafeedback_binarized), "
                               "a .jsonl/.json/.parquet/.csv file, or a folder with train.* and eval.*")
    data_split: str = arg("", "Comma-separated weights splitting each data set between stages "
                          "1,2,3 (e.g. 2,4,4); this stage uses its own share. Empty: all rows.")
    data_output_path: str = arg(".cache/data_files", "Where tokenised data is cached.")
    eval_ratio: float = arg(0.05, "Share held out for evaluation when a data set has no eval split.")
    max_eval_samples: int = arg(512, "Cap on evaluation rows (0: all).")
    prompt_format: str = arg("raw", "How text prompts are rendered: raw (as stored), chat (the "
                             "tokenizer's chat template, Human/Assistant if it has none), "
                             "human_assistant. Conversational rows (message lists) always use the "
                             "chat template.", choices=("raw", "chat", "human_assistant"))
    chat_template: str = arg("", "A Jinja chat template file replacing the tokenizer's (for a tokenizer "
                             "without one, e.g. a base model's); saved with the exported model.")
    too_long: str = arg("truncate", "Rows longer than max_seq_len: truncate or skip (counted).",
                        choices=("truncate", "skip"))
    validate_only: bool = arg(False, "Read, check and tokenise the data, report what would be "
                              "trained on (rows kept, skipped and why), then exit without training.")
    prompt_key: str = arg("", "Column of a local file holding the prompt (empty: 'prompt').")
    response_key: str = arg("", "Column holding the SFT response (empty: 'response').")
    chosen_key: str = arg("", "Column holding the preferred answer (empty: 'chosen').")
    rejected_key: str = arg("", "Column holding the rejected answer (empty: 'rejected').")
    revised_key: str = arg("", "Column holding a discriminator's revised answer (empty: 'revised').")


@dataclass
class OptimArgs:
    learning_rate: float = arg(1e-3, "Peak learning rate.")
    weight_decay: float = arg(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.95, "AdamW beta2.")
    lr_scheduler_type: str = arg("cosine", "Learning-rate schedule after warm-up.",
                                 choices=("cosine", "linear", "constant", "constant_with_warmup"))
    num_warmup_steps: int = arg(0, "Linear warm-up steps.")
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm (0 disables).")


@dataclass
class ZeroArgs:
    zero_stage: int = arg(2, "ZeRO stage 0-3.", choices=(0, 1, 2, 3))


@dataclass
class DeepSpeedArgs:
    offload: bool = arg(False, "Offload optimizer state (and parameters under ZeRO-3) to CPU.")
    dtype: str = arg("fp32", "Training dtype (fp16 is GPU-only).", choices=("fp32", "bf16", "fp16"))
    local_rank: int = arg(-1, "Set by the deepspeed launcher.")
    dist_timeout_minutes: float = arg(30.0, "Collective timeout: a hung rank ends the job after this. It also "
                                      "bounds how long ranks wait for rank 0 to tokenise a new data set.")


@dataclass
class BatchArgs:
    per_device_train_batch_size: int = arg(8, "Micro-batch per process for training.")
    per_device_eval_batch_size: int = arg(16, "Batch per process for evaluation.")


@dataclass
class RunArgs:
    output_dir: str = arg("output/run", "Where checkpoints, logs and the HF export go.")
    seed: int = arg(1234, "Seed for model init, data order and sampling.")
    num_train_epochs: int = arg(1, "Passes over the training data.")
    max_steps: int = arg(0, "Stop after this many optimizer steps (0: run all epochs).")
    eval_steps: int = arg(0, "Evaluate every N steps (0: only at the end).")
    save_steps: int = arg(0, "Checkpoint every N steps (0: only at the end).")
    save_total_limit: int = arg(2, "Keep the last K checkpoints.")
    resume: bool = arg(False, "Continue from the latest complete checkpoint in output_dir.")
    enable_tensorboard: bool = arg(True, "Write TensorBoard event files.")
    tensorboard_path: str = arg("", "TensorBoard folder (default: OUTPUT_DIR/tensorboard).")
    log_steps: int = arg(10, "Log a line every N steps.")
    max_bad_steps: int = arg(3, "A step whose loss or reward is NaN/Inf is skipped on every rank, logged "
                             "and counted (summary.json: bad_steps); stop with an error after this many in a row.")


def parse_config(cls: type, argv: Optional[list[str]] = None, description: str = ""):
    """Build `cls` from `--config FILE.yaml` and flags; flags win over the file."""
    args = vars(build_parser(cls, description).parse_args(sys.argv[1:] if argv is None else argv))
    config_file = args.pop("config", None)
    values = load_yaml(cls, Path(config_file)) if config_file else {}
    values.update(args)  # only flags given on the command line are present (SUPPRESS)
    return cls(**values)


def build_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with any of the fields below; "
                        "flags given on the command line override it.")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, inner = _kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")  # argparse formats help
        kw: dict[str, Any] = {"help": text}
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
            continue
        if kind is list:
            kw["nargs"] = "+"
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        else:
            kw["metavar"] = inner.__name__.upper()
        parser.add_argument(f"--{f.name}", type=inner, **kw)
    return parser


def load_yaml(cls: type, path: Path) -> dict:
    """Read a YAML config, checking keys and value types against `cls`."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{path}: unknown key '{key}'{did_you_mean(str(key).replace('-', '_'), fields)}")
        out[key] = _coerce(value, hints[key], fields[key], f"{path}: key '{key}'")
    return out


def did_you_mean(name: str, names) -> str:
    """' (did you mean 'x'?)' for the closest of `names` to a misspelt `name`, else ''."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _kind(tp) -> tuple[type, Any]:
    """(container kind, element converter) for a field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _kind(args[0])
    if origin is list:
        return list, typing.get_args(tp)[0]
    if origin is Literal:
        return str, str
    return tp, tp


def _coerce(value: Any, tp, f: dataclasses.Field, where: str) -> Any:
    kind, inner = _kind(tp)
    if value is None and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return None
    if kind is list:
        items = value if isinstance(value, list) else [value]
        return [_scalar(v, inner, where) for v in items]
    out = _scalar(value, kind, where)
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"{where}: {out!r} is not one of {list(choices)}")
    return out


def _scalar(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
        try:
            return kind(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")


def dump_config(cfg, path: Path) -> None:
    """Write the resolved config next to the run so it can be reproduced with --config."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


@dataclass
class RewardCalcArgs:
    reward_calculator: str = arg("sparse", "How the sequence reward reaches the tokens: sparse, "
                                 "uniform, abc, abc_d, tlcr, composite (see common/rewards.py).")
    abc_beta: float = arg(0.8, "ABC mix: beta * attention share + (1 - beta) * sparse.")
    abc_attention_layer: int = arg(-1, "Which layer of the reward model ABC reads the attention of (-1: the last, "
                                   "as published; 0: the first). The experiments' diagnostics print how well each "
                                   "layer's attention agrees with the reward model's occlusion sensitivity.")
    tlcr_add_sequence_reward: bool = arg(False, "TLCR: add the sequence reward R at the last token.")
    composite_weights: str = arg("abc:0.5,tlcr:0.5", "composite: NAME:WEIGHT,... of other calculators.")
    reward_dropout: str = arg("none", "Reward dropout on per-sample policy-gradient weights.",
                              choices=("none", "random", "quantile"))
    reward_dropout_rate: float = arg(0.9, "Share of samples dropped (quantile 0.9 keeps the top 10%).")


@dataclass
class RLArgs:
    algo: str = arg("remax", "RL algorithm: remax (greedy baseline), ppo (critic, GAE), grpo (group-normalised), "
                    "rloo (leave-one-out baseline), reinforce_pp (REINFORCE++: batch-normalised returns); the "
                    "critic-free ones keep dense rewards per token (README, 'Estimators').",
                    choices=("remax", "ppo", "grpo", "rloo", "reinforce_pp"))
    num_generations: int = arg(1, "Answers sampled per prompt in one generate call; grpo and rloo take their "
                               "baselines from them (>= 2). Each counts in --per_device_generation_batch_size's "
                               "micro-batching: a step trains on prompts x num_generations answers.")
    actor_model_name_or_path: str = arg("output/sft", "Policy to tune (also the reference), "
                                        "e.g. the stage-1 output folder.")
    reward_model_name_or_path: str = arg("output/rm", "Sequence reward model (stage-2 output).")
    reward_model_type: str = arg("sequence", "What --reward_model_name_or_path holds: a sequence "
                                 "reward model or a personalised VPL model (stage 2 --model_type vpl); gold "
                                 "rewards with the task's own scorer (--gold_scorer) instead of a learned model: "
                                 "its logit of prompt + response, the score evaluation reports as gold_reward "
                                 "(experiments: the positive control, where the oracle calculator's credit "
                                 "splits R exactly).", choices=("sequence", "vpl", "gold"))
    vpl_context_path: str = arg("", "VPL: JSONL of one user's labelled pairs (prompt, chosen, "
                                "rejected[, user]) from which the user latent z is inferred.")
    vpl_user: str = arg("", "VPL: which user's rows of --vpl_context_path to use (empty: all rows); prompts "
                        "with a `user` field are scored for that user instead.")
    critic_model_name_or_path: str = arg("", "PPO critic init with --critic_init reward (default: the reward model).")
    critic_init: str = arg("reward", "PPO critic: 'reward' copies the reward model (DeepSpeed-Chat); 'policy' "
                           "puts a fresh value head on a copy of the SFT policy, the closest to TRL's value "
                           "head on the policy's trunk (the ABC paper's setting). A critic copied from the "
                           "reward model is calibrated to sparse returns, which handicaps dense calculators.",
                           choices=("reward", "policy"))
    discriminator_model_name_or_path: str = arg("", "TLCR token discriminator (stage-2 output).")
    per_device_generation_batch_size: int = arg(8, "Prompts per process per rollout.")
    per_device_training_batch_size: int = arg(8, "Rollout samples per process per micro-batch.")
    max_prompt_seq_len: int = arg(32, "Prompt tokens kept (left-truncated).")
    max_answer_seq_len: int = arg(16, "New tokens generated per response, at most.")
    min_answer_seq_len: int = arg(0, "New tokens before EOS may end a response (0: none); the ABC paper's "
                                  "IMDb setting generates 8-15.")
    actor_learning_rate: float = arg(1e-5, "Actor learning rate.")
    critic_learning_rate: float = arg(1e-5, "PPO critic learning rate.")
    kl_ctl: float = arg(0.05, "KL penalty coefficient (ReMax script 0.05, PPO 0.1).")
    adaptive_kl: bool = arg(False, "PPO: adapt kl_ctl towards --kl_target.")
    kl_target: float = arg(6.0, "Adaptive KL target (nats per sequence).")
    kl_horizon: int = arg(10000, "Adaptive KL horizon (samples).")
    gamma: float = arg(1.0, "Discount over response tokens.")
    dense_baseline: str = arg("total", "remax, grpo, rloo: what each token's return-to-go is compared with: the "
                              "baseline answers' total (the published forms) or their own return-to-go at the "
                              "same position (per_token: less variance with dense rewards; see README).",
                              choices=("total", "per_token"))
    lam: float = arg(0.95, "GAE lambda (PPO).")
    ppo_epochs: int = arg(1, "PPO passes over each rollout batch.")
    cliprange: float = arg(0.2, "PPO policy ratio clip.")
    cliprange_value: float = arg(0.2, "PPO value clip.")
    cliprange_reward: float = arg(5.0, "Clip of the sequence reward / ReMax advantage.")
    temperature: float = arg(1.0, "Sampling temperature.")
    top_p: float = arg(0.9, "Nucleus sampling.")
    enable_ema: bool = arg(False, "Keep an EMA of the actor; exported beside it.")
    ema_decay: float = arg(0.992, "EMA decay per step.")
    actor_zero_stage: int = arg(2, "ZeRO stage of the actor.", choices=(0, 1, 2, 3))
    critic_zero_stage: int = arg(2, "ZeRO stage of the critic.", choices=(0, 1, 2, 3))
    reference_zero_stage: int = arg(3, "ZeRO stage of the frozen reference.", choices=(0, 3))
    reward_zero_stage: int = arg(3, "ZeRO stage of the frozen reward model and discriminator.", choices=(0, 3))
    offload_reference_model: bool = arg(False, "Keep the reference model's weights on CPU (ZeRO-3).")
    offload_reward_model: bool = arg(False, "Keep the reward model's weights on CPU (ZeRO-3).")
    enable_hybrid_engine: bool = arg(False, "DeepSpeed hybrid engine for generation (GPUs only; "
                                     "on CPU the plain path runs, with a message).")
    rollout_engine: str = arg("hf", "What generates the rollouts (training and evaluation): hf (the actor's "
                              "own `generate`) or vllm (a colocated vLLM engine per rank, given the actor's "
                              "weights after every optimizer step; the actor's forward still gives the "
                              "training log-probs). vllm needs `pip install densehf[vllm]`.", choices=("hf", "vllm"))
    vllm_check_steps: int = arg(0, "vLLM: every N optimizer steps, greedy-decode the last rollout's prompts with "
                                "vLLM and with the actor's own generate, and log the share of answers that agree "
                                "(vllm_greedy_agreement: a weight-sync check, 1.0 expected in fp32). 0: never.")
    vllm_tensor_parallel_size: int = arg(1, "vLLM: ranks that share one engine by tensor parallelism, for a model "
                                         "one device cannot hold (it must divide the number of processes); the "
                                         "group's ranks generate all their prompts together, each keeps its own.")
    vllm_gpu_memory_utilization: float = arg(0.3, "vLLM on CUDA: share of the GPU the engine's weights and KV "
                                             "cache may take; the rest is DeepSpeed's. Ignored on CPU.")
    gold_scorer: str = arg("auto", "Held-out gold reward: a gold_scorer.json, 'auto' (the embedded "
                           "task's when --data_path imdb), or 'none'.")
    num_eval_samples: int = arg(3, "Sample responses printed at each evaluation.")


@dataclass
class SupervisedConfig(ModelArgs, BackboneArgs, BatchArgs, DataArgs, OptimArgs, ZeroArgs, DeepSpeedArgs, RunArgs):
    """The flags of the supervised stages (1 and 2)."""


@dataclass
class RLHFConfig(BackboneArgs, DataArgs, OptimArgs, DeepSpeedArgs, RunArgs, RLArgs, RewardCalcArgs):
    """The flags of stage 3."""
