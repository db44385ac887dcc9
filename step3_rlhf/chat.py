"""Sample responses from any stage's causal-LM export (a quick look at a policy).

    python step3_rlhf/chat.py --model output/tiny/remax_abc --prompt "This movie" --prompt "I expected"
    python step3_rlhf/chat.py --model output/llama2_7b/remax_abc --prompts_file p.jsonl --max_new_tokens 256

Prints `[i.j] PROMPT -> RESPONSE` per sample i.j (repr'd: one line each), with `| gold +x.xxx` (the
gold scorer's logit, e.g. the IMDb task's sentiment) when one is loaded. Plain transformers
generation, no DeepSpeed; on the GPU when there is one. Errors: a message and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script

from common.errors import DensehfError


class HelpFormat(argparse.RawDescriptionHelpFormatter):  # the examples as written; useful defaults
    def _get_help_string(self, action):
        quiet = action.default in (None, [], argparse.SUPPRESS) or action.default is False
        return action.help + ("" if quiet else " (default: %(default)s)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormat)
    add = p.add_argument
    add("--model", required=True, metavar="MODEL", help="A stage output folder (its hf_export/ is used), "
        "an HF model folder, a preset ('tiny', 'smollm2') or a hub name.")
    add("--prompt", action="append", default=[], metavar="TEXT", help="A prompt; repeat for several.")
    add("--prompts_file", metavar="FILE", help="More prompts: .jsonl rows with a \"prompt\" field, or a "
        "text file with one prompt per line (blank lines skipped).")
    add("--prompt_format", default="raw", choices=("raw", "chat", "human_assistant"),
        help="Render prompts as in training (the --prompt_format the stages ran with).")
    add("--max_new_tokens", type=int, default=32, metavar="N", help="Tokens generated per response.")
    add("--temperature", type=float, default=1.0, metavar="T", help="Sampling temperature.")
    add("--top_p", type=float, default=0.9, metavar="P", help="Nucleus sampling (stage 3 samples with 0.9).")
    add("--greedy", action="store_true", help="Greedy decoding instead of sampling.")
    add("--num_samples", type=int, default=1, metavar="N", help="Sampled responses per prompt.")
    add("--seed", type=int, default=0, help="Sampling seed.")
    add("--gold_scorer", default="auto", metavar="auto|none|PATH", help="Score prompt + response with a "
        "gold_scorer.json: PATH, none, or auto (the embedded IMDb task's scorer, where it is built).")
    add("--trust_remote_code", action="store_true", help="Allow the model repo's own Python code.")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1 or (args.greedy and args.num_samples > 1):
        p.error("--num_samples and --max_new_tokens must be >= 1, and --greedy gives one response per prompt")
    return args


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise DensehfError(f"{path}: prompts file not found")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and path.suffix != ".jsonl":
                prompts.append(line)
            elif line.strip():
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (ValueError, KeyError, TypeError):
                    raise DensehfError(f"{path}:{n}: expected a JSON object with a 'prompt'") from None
    if not prompts:
        raise DensehfError("no prompts: give --prompt TEXT or --prompts_file FILE")
    return prompts


def load_gold(choice: str):
    if choice == "none":
        return None
    from common.gold import GoldScorer
    from common.presets import gold_scorer_path, task_dir
    path = gold_scorer_path(task_dir()) if choice == "auto" else Path(choice)  # auto: builds nothing
    if not path.is_file() and choice != "auto":
        raise DensehfError(f"{path}: gold scorer not found")
    return GoldScorer.load(path) if path.is_file() else None


def main(argv=None) -> None:
    args = parse_args(argv)
    prompts = read_prompts(args)
    import torch
    from transformers import AutoModelForCausalLM
    from common.data.encode import prompt_ids
    from common.models import check_kind, load_tokenizer, resolve_model_path
    path = resolve_model_path(args.model)
    check_kind(path, ("causal_lm",), "--model")
    try:
        tok = load_tokenizer(args, path)  # pad = EOS where the tokenizer has no pad token
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise DensehfError(f"--model {args.model}: not a model folder, a stage output nor a preset, and "
                           f"not loadable from the hub ({str(e).splitlines()[0]})") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    gold = load_gold(args.gold_scorer)
    torch.manual_seed(args.seed)  # generate() runs without gradients
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt_ids(tok, prompt, args.prompt_format)], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             num_return_sequences=args.num_samples, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **(dict(do_sample=False) if args.greedy else sampling))
        texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        scores = gold.logit([prompt + t for t in texts]) if gold is not None else [None] * len(texts)
        for j, (text, score) in enumerate(zip(texts, scores)):
            print(f"[{i}.{j}] {prompt!r} -> {text!r}" + ("" if score is None else f" | gold {score:+.3f}"), flush=True)


if __name__ == "__main__":
    from common.cli import run_main
    run_main(main)
