"""The runs of an experiment grid: one RunSpec per stage-3 run, named by what it varies."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from common.rewards import REGISTRY

SETTINGS = ("main", "dropout", "long")
BASELINES = ("total", "per_token")          # stage 3's --dense_baseline
PER_TOKEN_ALGOS = ("remax", "grpo", "rloo")  # the algorithms that take --dense_baseline per_token
DROPOUT_MODES = ("random", "quantile")
REWARDS = ("model", "gold")                 # what the runs optimise (run.py --reward)
# what a gold reward cannot run: the reward model's attention (composite's default parts read it)
NEEDS_RM_ATTENTION = tuple(n for n, c in REGISTRY.items() if "rm_attention" in c.needs) + ("composite",)


@dataclass(frozen=True)
class RunSpec:
    setting: str        # main (calculators x algos), dropout (the sweep), long (long answers)
    algo: str
    calculator: str
    dropout: str
    rate: float
    answer_len: int
    seed: int
    min_answer_len: int = 0
    baseline: str = "total"  # --dense_baseline

    @property
    def run_id(self) -> str:
        name = f"{self.algo}-{self.calculator}"
        if self.dropout != "none":
            name += f"-{self.dropout}{self.rate:g}"
        if self.baseline != "total":
            name += f"-{self.baseline}"
        if self.setting == "long":
            name += f"-len{self.answer_len}"
        return f"{name}-s{self.seed}"

    def flags(self) -> list:
        """The stage-3 flags this run sets (the preset sets the rest)."""
        return ["--algo", self.algo, "--reward_calculator", self.calculator, "--reward_dropout", self.dropout,
                "--reward_dropout_rate", self.rate, "--max_answer_seq_len", self.answer_len, "--seed", self.seed,
                *(["--min_answer_seq_len", self.min_answer_len] if self.min_answer_len else []),
                *(["--dense_baseline", self.baseline] if self.baseline != "total" else [])]

    @property
    def variant(self) -> str:
        """What the report draws as one line: the calculator, with a baseline other than the published."""
        return self.calculator if self.baseline == "total" else f"{self.calculator}+{self.baseline}"

    def record(self, preset: str) -> dict:
        return {"run_id": self.run_id, "preset": preset, "variant": self.variant, **asdict(self)}


def build_grid(cfg, preset) -> list[RunSpec]:
    """Main grid first, then the dropout sweep, then long answers; seeds outermost in each, so a
    grid cut short still has every configuration at its first seeds."""
    first = getattr(cfg, "first_seed", 1)
    seeds = range(first, first + (cfg.seeds or preset.seeds))
    short, low, specs = preset.answer_len, preset.min_answer_len, []
    def runnable(calculators):
        return [c for c in calculators if getattr(cfg, "reward", "model") == "model" or c not in NEEDS_RM_ATTENTION]
    calculators = runnable(cfg.calculators)
    if "main" in cfg.settings:
        # a per-token baseline changes nothing for sparse rewards (every return-to-go is R): not run
        specs += [RunSpec("main", a, c, "none", 0.0, short, s, low, b)
                  for s in seeds for a in cfg.algos for c in calculators
                  for b in getattr(cfg, "dense_baselines", ["total"])
                  if b == "total" or (a in PER_TOKEN_ALGOS and c != "sparse")]
    if "dropout" in cfg.settings:
        for s in seeds:  # 'none' is the main grid's run of the same algo and calculator
            specs.append(RunSpec("main", cfg.dropout_algo, cfg.dropout_calculator, "none", 0.0, short, s, low))
            specs += [RunSpec("dropout", cfg.dropout_algo, cfg.dropout_calculator, m, r, short, s, low)
                      for m in DROPOUT_MODES for r in cfg.dropout_rates]
    if "long" in cfg.settings:
        specs += [RunSpec("long", cfg.long_algo, c, "none", 0.0, preset.long_answer_len, s,
                          preset.long_min_answer_len) for s in seeds for c in runnable(cfg.long_calculators)]
    return list(dict.fromkeys(specs))  # a spec in two settings runs once
