"""DeepSpeedStrategy: the one object that knows about DeepSpeed and ZeRO.

Trainers ask it to set up processes, wrap a model, step, checkpoint and export; no
trainer touches a ZeRO detail. On a machine without GPUs it runs the same code over
gloo (DeepSpeed's CPU accelerator), which is how the tests exercise real sharding.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import random
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from common.errors import ConfigError
from common.startup import skip_unused_imports
from common.weights import ZeroWeights, engine_zero_stage


MAIN_ONLY_WORK_HOURS = 12


def _quiet_cpu_comm() -> None:
    """Skip DeepSpeed's shared-memory all-reduce JIT build on CPU (60 s per fresh cache).

    gloo is enough for the CPU runs this project does; DENSEHF_CPU_SHM=1 keeps the op.
    """
    import importlib

    from deepspeed.accelerator import get_accelerator
    # `import deepspeed.comm.torch as m` would bind the torch package (a name clash)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if get_accelerator().device_name() == "cpu" and os.environ.get("DENSEHF_CPU_SHM") != "1":
        ds_torch_comm.build_shm_op = lambda: None


_BEFORE_CLOSE: list[Callable[[], None]] = []
_NEEDS_TEARDOWN = [False]  # set by an owner whose resources are freed only by destructors


def before_close(shutdown: Callable[[], None], needs_teardown: bool = False) -> None:
    """Call `shutdown` in `close_distributed`, while the process group still exists: a colocated
    vLLM engine destroys its groups on shutdown, which raises once the world group is gone (left
    to vLLM, it shuts down at interpreter exit). `shutdown` must be safe to call twice.

    needs_teardown: the owner frees something only in destructors at interpreter exit (vLLM's CPU
    tensor-parallel shared memory: left behind, the next run on the machine finds the segment
    and fails), so `close_distributed` must not skip the teardown."""
    _BEFORE_CLOSE.append(shutdown)
    _NEEDS_TEARDOWN[0] |= needs_teardown


def close_distributed(skip_finalizers: bool = False) -> None:
    """End the process group before exit: left to interpreter shutdown, gloo's threads can
    abort the process ("terminate called without an active exception") after all work is done.

    skip_finalizers: end the process right here (exit status 0) once the atexit hooks have run
    (logging's flush among them), without the interpreter's teardown: that saves about 1.5 s of
    freeing modules per process, and scripts that run DeepSpeed's per-layer ZeRO-3 generation
    need it, since prefetches left in flight can abort the process at teardown even after the
    group is gone (seen once in about ten full test runs). Everything must be written and closed
    before the call. Ignored once an owner asked for the teardown (`before_close`).
    """
    if dist.is_initialized():
        dist.barrier()
    while _BEFORE_CLOSE:
        _BEFORE_CLOSE.pop()()
    if dist.is_initialized():  # (a vLLM engine's shutdown ends the world group itself)
        dist.destroy_process_group()
    if skip_finalizers and not _NEEDS_TEARDOWN[0]:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class DeepSpeedStrategy(ZeroWeights):
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self._slow_group = None

    # ---- processes -------------------------------------------------------------
    def setup_distributed(self) -> None:
        """Start the process group: nccl on GPUs, gloo on CPU (DeepSpeed picks)."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)  # a plain `python main.py` is a 1-process job
        _quiet_cpu_comm()
        skip_unused_imports()
        self.local_rank = int(os.environ["LOCAL_RANK"])
        accel = get_accelerator()
        if accel.device_name() != "cpu":
            accel.set_device(self.local_rank)
        timeout = timedelta(minutes=self.cfg.dist_timeout_minutes)
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(),
                                   timeout=timeout, verbose=False)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.cfg.dtype == "fp16" and accel.device_name() == "cpu":
            raise ConfigError("--dtype fp16 is not supported on CPU: use fp32 or bf16")
        seed_everything(self.cfg.seed)

    @property
    def device(self) -> torch.device:
        from deepspeed.accelerator import get_accelerator
        return torch.device(get_accelerator().device_name(self.local_rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def synchronize(self) -> None:
        """Wait for queued device work (timings); nothing to wait for on CPU."""
        from deepspeed.accelerator import get_accelerator
        get_accelerator().synchronize()

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def wait_for_main(self) -> None:
        """A barrier for work only rank 0 does (tokenising a data set), which may take far
        longer than --dist_timeout_minutes: it runs on its own gloo group with a long timeout,
        so the short timeout keeps catching dead ranks during training."""
        if not dist.is_initialized() or self.world_size == 1:
            return
        if self._slow_group is None:
            self._slow_group = dist.new_group(backend="gloo", timeout=timedelta(hours=MAIN_ONLY_WORK_HOURS))
        dist.barrier(group=self._slow_group)

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (one collective for all of them)."""
        if not values or self.world_size == 1:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every rank, in rank order."""
        if self.world_size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t

    # ---- configs ---------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.dtype]

    def ds_config(self, zero_stage: Optional[int] = None, offload: Optional[bool] = None,
                  train: bool = True, micro_batch: Optional[int] = None) -> dict:
        """The DeepSpeed config dict for one model (each model may use its own stage).

        Accumulation is the caller's (`common/update.py`): DeepSpeed's own counter is off
        (`managed_gradient_accumulation: false`), so every `step` is a boundary and a
        micro-batch the guard skips never touches the engine.
        """
        cfg = self.cfg
        stage = cfg.zero_stage if zero_stage is None else zero_stage
        offload = cfg.offload if offload is None else offload
        micro = micro_batch or getattr(cfg, "per_device_train_batch_size", 1)
        zero: dict = {"stage": stage, "stage3_param_persistence_threshold": 1e4,
                      "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7,
                      "stage3_gather_16bit_weights_on_model_save": True}
        if offload and stage > 0:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if offload and stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        out = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro * self.world_size,
            "zero_optimization": zero,
            "bf16": {"enabled": cfg.dtype == "bf16"},
            "fp16": {"enabled": cfg.dtype == "fp16", "loss_scale_window": 100},
            "gradient_clipping": cfg.max_grad_norm if train else 0.0,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if train:
            out["managed_gradient_accumulation"] = False
            out["optimizer"] = {"type": "AdamW", "params": {
                "lr": cfg.learning_rate, "betas": [cfg.adam_beta1, cfg.adam_beta2],
                "eps": 1e-8, "weight_decay": cfg.weight_decay, **_adamw_kind(offload)}}
        return out

    @contextlib.contextmanager
    def model_init(self, zero_stage: Optional[int] = None, train: bool = True):
        """Context for `from_pretrained`: under ZeRO-3 weights load already partitioned."""
        stage = self.cfg.zero_stage if zero_stage is None else zero_stage
        if stage != 3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig
        keep_alive = HfDeepSpeedConfig(self.ds_config(zero_stage=3, train=train))  # noqa: F841
        yield
        del keep_alive

    # ---- engines ---------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, total_steps: int, learning_rate: Optional[float] = None,
                zero_stage: Optional[int] = None, offload: Optional[bool] = None,
                micro_batch: Optional[int] = None, extra: Optional[dict] = None):
        """Wrap a trainable model: optimizer (no decay on biases/norms), schedule, ZeRO."""
        import deepspeed
        from transformers import get_scheduler
        cfg = self.cfg
        ds = {**self.ds_config(zero_stage, offload, train=True, micro_batch=micro_batch), **(extra or {})}
        if learning_rate is not None:
            ds["optimizer"]["params"]["lr"] = learning_rate
        groups = _param_groups(model, cfg.weight_decay)
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=groups, config=ds,
            lr_scheduler=lambda opt: get_scheduler(cfg.lr_scheduler_type, opt, cfg.num_warmup_steps,
                                                   max(total_steps, 1)))
        engine.checkpoint_engine.load = _weights_only_load
        return engine

    def prepare_frozen(self, model: torch.nn.Module, zero_stage: Optional[int] = None,
                       offload: Optional[bool] = None):
        """Wrap a model used only for inference (reference, reward): no optimizer."""
        import deepspeed
        model.eval()
        model.requires_grad_(False)
        ds = self.ds_config(zero_stage, offload, train=False)
        if ds["zero_optimization"]["stage"] != 3:
            ds["zero_optimization"] = {"stage": 0}  # ZeRO-1/2 shard optimizer state: none here
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        return engine

    @contextlib.contextmanager
    def training(self, *engines):
        """Train mode for the length of an update, eval mode again after it.

        transformers checkpoints activations only in training mode, so an update run in eval
        mode silently drops --gradient_checkpointing (7B: ~15 GB of activations per 4 x 512
        micro-batch instead of ~2); generation and scoring stay in eval mode, where the KV
        cache is kept. `None` engines (no critic) are skipped.
        """
        engines = [e for e in engines if e is not None]
        for e in engines:
            e.train()
        try:
            yield
        finally:
            for e in engines:
                e.eval()

    def backward(self, engine, loss: torch.Tensor, accumulation: int = 1) -> None:
        """Accumulate the gradient of `loss / accumulation` (one of that many micro-batches)."""
        engine.backward(loss / accumulation, scale_wrt_gas=False)

    def step(self, engine) -> None:
        """The accumulation boundary: reduce what was accumulated, clip, update, advance the schedule."""
        engine.step()

    # ---- what the loops may ask of an engine -------------------------------------
    @staticmethod
    def module(engine) -> torch.nn.Module:
        """The wrapped model (under ZeRO-3 its parameters are shards: gather before reading them)."""
        return engine.module

    @staticmethod
    def is_trainable(engine) -> bool:
        """Has an optimizer (checkpointed with its state), as opposed to a frozen model."""
        return engine.optimizer is not None

    @staticmethod
    def learning_rate(engine) -> float:
        return engine.get_lr()[0]

    @staticmethod
    def optimizer_steps(engine) -> int:
        """Optimizer updates taken so far (restored by a resume)."""
        return engine.global_steps

    def save_state(self, engine, folder: Path) -> None:
        """Weights, optimizer state and schedule of a trainable engine (every rank writes its shards)."""
        engine.save_checkpoint(str(folder), tag="state", save_latest=False)

    def load_state(self, engine, folder: Path) -> bool:
        loaded, _ = engine.load_checkpoint(str(folder), tag="state")
        return loaded is not None

    @torch.no_grad()
    def generate(self, engine, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """`generate` on the engine's model, on every rank together; the sequences on the CPU.

        Under ZeRO-3 with several ranks every rank must run the same number of forward
        passes (`synced_gpus`), since each one gathers layers from all of them."""
        device = engine.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        kwargs["synced_gpus"] = self.world_size > 1 and engine_zero_stage(engine) == 3
        if type(engine).__name__ == "DeepSpeedHybridEngine":  # --enable_hybrid_engine on GPUs
            return engine.generate(input_ids, attention_mask=attention_mask, **kwargs).cpu()
        with self.gathered(engine) as module:
            return module.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs).cpu()


def _adamw_kind(offload: bool) -> dict:
    """torch's AdamW, fused on GPUs: DeepSpeed's FusedAdam would compile with nvcc at first use
    (minutes, and untested against new CUDA), and on CPU any DeepSpeed Adam is a JIT build.
    Offload keeps DeepSpeed's CPUAdam, which the optimizer states on the host need."""
    if offload:
        return {}
    return {"torch_adam": True, **({"fused": True} if torch.cuda.is_available() else {})}


def _checkpoint_globals() -> list:
    """The DeepSpeed classes its optimizer-state files hold (found by loading ZeRO-2 and ZeRO-3
    checkpoints with weights_only=True); nothing else may be unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(path: str, map_location=None):
    """DeepSpeed's checkpoint files read with torch.load(weights_only=True) and an allow-list instead
    of a full unpickle (DeepSpeed's own engine passes weights_only=False: a tampered file would run code)."""
    with torch.serialization.safe_globals(_checkpoint_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
