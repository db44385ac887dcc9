"""Stage 2: reward models from the stage-1 export.

--model_type sequence  Bradley-Terry reward model on prompt/chosen/rejected pairs
--model_type token     TLCR token discriminator on prompt/rejected/revised rows
--model_type vpl       personalised reward model (VPL, --vpl_variant) on user/prompt/chosen/rejected rows

    deepspeed --num_gpus 2 step2_reward/main.py --model_type sequence \\
        --model_name_or_path output/sft --data_path imdb --output_dir output/rm
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script

from common.cli import run_main
from common.config import SupervisedConfig, arg, parse_config
from common.data.prepare import prepare_tokenized
from common.models import check_kind, load_model, load_tokenizer, resolve_model_path
from common.strategy import DeepSpeedStrategy
from common.trainer import fit, plan_steps
from step2_reward import sequence_rm, token_discriminator, vpl

MODEL_TYPES = {"sequence": sequence_rm, "token": token_discriminator, "vpl": vpl}


@dataclass
class RewardArgs:
    model_type: str = arg("sequence", "What to train: 'sequence' (Bradley-Terry reward model), "
                          "'token' (TLCR token discriminator) or 'vpl' (personalised reward model; "
                          "--data_path pets, imdb_personal or PERSONAL-schema files).", choices=tuple(MODEL_TYPES))


@dataclass
class RewardConfig(SupervisedConfig, RewardArgs, vpl.VPLArgs):
    """Stage-2 flags."""


def main(argv=None) -> dict:
    cfg = parse_config(RewardConfig, argv, description=__doc__)
    kind = MODEL_TYPES[cfg.model_type]
    check_kind(resolve_model_path(cfg.model_name_or_path), ("causal_lm", kind.KIND), "--model_name_or_path")
    strategy = DeepSpeedStrategy(cfg)
    strategy.setup_distributed()
    tokenizer = load_tokenizer(cfg)
    if kind is vpl:
        return vpl.run(cfg, strategy, tokenizer)
    train, evaluation, _ = prepare_tokenized(cfg, kind.SCHEMA, tokenizer, kind.ENCODE, stage=2,
                                             strategy=strategy)
    total_steps = plan_steps(cfg, len(train), strategy.world_size)
    model = load_model(cfg, strategy, kind.model_class(), pad_token_id=tokenizer.pad_token_id,
                       **kind.MODEL_KWARGS)
    engine = strategy.prepare(model, total_steps)
    task = kind.build_task(cfg, strategy, tokenizer, evaluation)
    return fit(cfg, strategy, engine, train, task, tokenizer, total_steps)


if __name__ == "__main__":
    run_main(main, exit_process=True)
