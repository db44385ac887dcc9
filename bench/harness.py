"""What every benchmark shares: random-weight Llama folders, stage 3 built by its own code,
and per-phase timers patched onto the real code path (nothing is re-implemented here).

Speed and memory do not depend on the weights, so models are random Llama configs saved
once under the densehf cache, with a synthetic word-level tokenizer (no downloads, and
the same folders work on a GPU machine that lacks the embedded task's packages).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

SHAPES = {  # LlamaConfig fields; `small` (~31M parameters) is the CPU benchmark model
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=8000),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1376, vocab_size=8000),
    # a 1.3B Llama (~1.35B parameters): the ReMax-vs-PPO memory ratio with every model on one GPU
    "llama_1b3": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                      intermediate_size=5504, vocab_size=32000),
    "llama2_7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000),
}
HEADS = {"causal": ("LlamaForCausalLM", {}), "reward": ("LlamaForSequenceClassification", {"num_labels": 1}),
         "token": ("LlamaForTokenClassification", {"num_labels": 2})}
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def ensure_deepspeed() -> None:
    """On the GPU machine (no deepspeed, no network) install the wheels bench/build_wheels.sh carried."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
                        str(REPO / "bench" / "wheels"), "deepspeed"], check=True)


def n_params(shape: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).parameters())


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer 'w4 w5 ...' over the model's whole vocabulary (pad != eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(len(SPECIALS), vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def model_folder(shape: str, head: str = "causal", device: str = "cpu", dtype=torch.float32) -> str:
    """A save_pretrained folder of a random-weight Llama `shape`, built once.

    Reward and token heads share the causal folder's weights (links): their heads start
    random, as stage 2 does from an SFT export.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.presets import atomic_folder, cache_dir, lock_for
    root = cache_dir() / "bench" / shape
    out = root / head
    with lock_for(out):
        if (out / "config.json").is_file():
            return str(out)
        arch, extra = HEADS[head]
        config = LlamaConfig(**SHAPES[shape], **extra, max_position_embeddings=4096, bos_token_id=1,
                             eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, architectures=[arch])
        with atomic_folder(out) as tmp:
            if head == "causal":
                torch.manual_seed(0)
                with torch.device(device):
                    model = LlamaForCausalLM(config).to(dtype)
                model.save_pretrained(tmp)
                del model
            else:
                src = Path(model_folder(shape, "causal", device, dtype))
                for f in src.glob("*.safetensors*"):  # relative: the cache stays valid when moved or linked
                    os.symlink(os.path.relpath(f, out), tmp / f.name)
                config.save_pretrained(tmp)
            synthetic_tokenizer(config.vocab_size).save_pretrained(tmp)
    return str(out)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhaseTimer:
    """Seconds per phase, accumulated by wrapping functions where the real code looks them up."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, owner, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.totals[phase] += time.perf_counter() - t0
        setattr(owner, attr, timed)


PROCESS_TIMER = PhaseTimer()  # for module-level functions, wrapped once per process
SCORING = ("reward_model", "discriminator", "policy_attention", "calculator")


class Stage3:
    """Stage 3's models and algorithm, built by `build_models` from stage-3 flags, with phase timers."""

    def __init__(self, flags: list[str], shape: str, strategy=None):
        from common.config import RLHFConfig, parse_config
        from common.guard import NonFiniteGuard
        from common.models import load_tokenizer
        from common.strategy import DeepSpeedStrategy
        from step3_rlhf import rollout as rollout_module
        from step3_rlhf.algorithms import ALGORITHMS
        from step3_rlhf.models import build_models
        gpu = torch.cuda.is_available()
        dtype = torch.bfloat16 if gpu else torch.float32
        paths = {h: model_folder(shape, h, "cuda" if gpu else "cpu", dtype) for h in ("causal", "reward", "token")}
        self.cfg = parse_config(RLHFConfig, [
            "--actor_model_name_or_path", paths["causal"], "--reward_model_name_or_path", paths["reward"],
            "--discriminator_model_name_or_path", paths["token"], "--gold_scorer", "none", *flags])
        self.strategy = strategy or DeepSpeedStrategy(self.cfg)
        if strategy is None:
            self.strategy.setup_distributed()
        self.tokenizer = load_tokenizer(self.cfg, paths["causal"])
        algo_cls = ALGORITHMS[self.cfg.algo]
        self.models = build_models(self.cfg, self.strategy, algo_cls, self.tokenizer, total_steps=10**6)
        self.algo = algo_cls(self.cfg, self.strategy, self.models.actor, self.models.critic)
        self.guard = NonFiniteGuard(self.strategy, self.cfg.max_bad_steps)
        self.timer = t = PhaseTimer()
        r = self.models.rollout
        # --rollout_engine vllm: `collect` calls the vLLM engine once, for the samples and the greedy answers
        # (in two request batches on CPU under top_p < 1)
        t.wrap(r if r.vllm is None else r.vllm, "generate", "generate")
        t.wrap(r, "policy_updated", "weight_sync")
        t.wrap(r, "reward_scorer", "reward_model")
        t.wrap(r, "_policy_attention", "policy_attention")
        if r.discriminator is not None:
            t.wrap(r, "discriminator", "discriminator")
        t.wrap(self.algo, "train", "train")
        if not getattr(rollout_module, "_bench_timed", False):
            rollout_module._bench_timed = True
            for attr, phase in (("response_logprobs", "logprob_forwards"), ("compute_rewards", "calculator"),
                                ("token_values", "critic_values")):
                PROCESS_TIMER.wrap(rollout_module, attr, phase)

    def prompts(self, batch: int, prompt_len: int, seed: int = 0) -> list[dict]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(len(SPECIALS), self.strategy.module(self.models.actor).config.vocab_size, (batch, prompt_len), generator=g)
        return [{"prompt": "", "input_ids": row.tolist()} for row in ids]

    def step(self, rows: list[dict], seed: int) -> dict:
        """One stage-3 step (collect, then train) on `rows`; seconds per phase and in all."""
        torch.manual_seed(seed)  # the same samples for every variant at a given repetition
        self.timer.totals.clear()
        PROCESS_TIMER.totals.clear()
        sync()
        t0 = time.perf_counter()
        k = self.cfg.num_generations
        rollout = self.models.rollout.collect(rows, with_greedy=self.algo.needs_greedy, generations=k)
        self.algo.train(rollout, torch.ones(len(rows) * k), self.guard)
        self.models.rollout.policy_updated(seed)  # the vLLM engine takes the new weights (hf: nothing)
        sync()
        out = {**self.timer.totals, **PROCESS_TIMER.totals, "step": time.perf_counter() - t0}
        out["scoring"] = sum(out.get(k, 0.0) for k in SCORING)
        out["answers"] = len(rows) * k
        out["response_tokens"] = int(rollout.sampled.response_mask.sum())
        out["generated_tokens"] = out["response_tokens"] + (int(rollout.greedy.response_mask.sum())
                                                            if rollout.greedy is not None else 0)
        return out


class ActorOnly:
    """Stage 3's actor alone (the engine `build_models` gives it, its `RolloutEngine.generate`):
    for timing generation without building the reference and reward models too."""

    def __init__(self, flags: list[str], shape: str):
        from transformers import AutoModelForCausalLM

        from common.config import RLHFConfig, parse_config
        from common.models import load_model, load_tokenizer
        from common.strategy import DeepSpeedStrategy
        from step3_rlhf.rollout import RolloutEngine
        gpu = torch.cuda.is_available()
        path = model_folder(shape, "causal", "cuda" if gpu else "cpu", torch.bfloat16 if gpu else torch.float32)
        self.cfg = parse_config(RLHFConfig, ["--actor_model_name_or_path", path, "--reward_model_name_or_path", path,
                                             "--gold_scorer", "none", *flags])
        self.strategy = DeepSpeedStrategy(self.cfg)
        self.strategy.setup_distributed()
        self.tokenizer = load_tokenizer(self.cfg, path)
        model = load_model(self.cfg, self.strategy, AutoModelForCausalLM, path, self.cfg.actor_zero_stage)
        self.actor = self.strategy.prepare(model, 10**6, self.cfg.actor_learning_rate, self.cfg.actor_zero_stage,
                                           self.cfg.offload, micro_batch=self.cfg.per_device_training_batch_size)
        self.actor.eval()
        self.rollout = RolloutEngine(self.cfg, self.strategy, self.tokenizer, self.actor, None, None)


def peak_memory() -> dict:
    """Process RSS high-water mark (bytes), and the CUDA allocator's peaks on GPUs."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()  # what the allocator held: what OOMs
    return out


def summarise(samples: list[float]) -> dict:
    """Median and spread (min, max, interquartile range) of repeated measurements."""
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "q1": q[0], "q3": q[2], "n": len(samples)}


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    out = {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def emit(result: dict) -> None:
    """A worker subprocess's answer to `spawn` (one line on stdout)."""
    print("RESULT " + json.dumps(result), flush=True)


def exit_after_result() -> None:
    """A worker's last call: end the process group and exit without interpreter finalisation,
    where NCCL/gloo teardown can abort a process after its result was printed."""
    from common.strategy import close_distributed
    close_distributed(skip_finalizers=True)


def spawn(script: str, argv: list[str], timeout: float | None = None) -> dict:
    """Run `script` in a fresh process (its own memory high-water mark) and read what it emits.

    The worker's stderr streams through (live progress). Its last RESULT line counts even if
    it then crashes or runs past `timeout` (killed with its process group): on a GPU machine
    with minutes of budget a number printed is a number kept. How such a worker ended is
    recorded under "worker_ended"; no RESULT line at all is an error.
    """
    cmd = [sys.executable, script, *map(str, argv)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            stdout, _ = proc.communicate(timeout=timeout)
            ended = {"exit_code": proc.returncode}
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()  # what it printed before the kill is kept
            ended = {"exit_code": proc.returncode, "timed_out_after_s": timeout}
    results = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        raise RuntimeError(f"{' '.join(cmd)}: no result ({ended}):\n{stdout[-3000:]}")
    result = json.loads(results[-1][len("RESULT "):])
    if ended != {"exit_code": 0}:
        result["worker_ended"] = ended
    return result


def worker_or_compare(parser, worker, compare, argv: list[str] | None = None) -> None:
    """The entry point of a script that compares variants in subprocesses: `--worker X` measures one
    (called back by `spawn`), anything else runs the comparison and writes it to `--out`."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.worker:
        worker(args)
    else:
        write_result(args.out, compare(argv))


def write_result(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**result, "machine": machine()}, indent=1))
    print(json.dumps(result, indent=1))


def timed_generate(rollout, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds and output of one greedy `RolloutEngine.generate` (the real stage-3 call)."""
    sync()
    t0 = time.perf_counter()
    out = rollout.generate(ids, mask, greedy=True)
    sync()
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def default_zero3_gathering(strategy):
    """DeepSpeed's own per-layer gathering during generate: `gathered` made a pass-through."""
    strategy.gathered = lambda engine: contextlib.nullcontext(engine.module)
    try:
        yield
    finally:
        del strategy.gathered
