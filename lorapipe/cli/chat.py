"""Answer prompts with the base model plus an adapter, in the chat format it was trained on.

python -m lorapipe.cli.chat --adapter models/adapters/sentiment --tweet "Stuck in traffic again, love it"
python -m lorapipe.cli.chat --adapter models/adapters/mixed "Write a haiku about autumn."
python -m lorapipe.cli.chat --adapter models/adapters/mixed --file prompts.txt           # one prompt a line
python -m lorapipe.cli.chat --adapter models/adapters/mixed --records data/prepared/out_of_sample.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lorapipe.config import Params, load_params
from lorapipe.data.prompts import instruction_prompt, sentiment_prompt
from lorapipe.decoding import generate_answers
from lorapipe.errors import PipelineError
from lorapipe.models.adapters import load_adapted
from lorapipe.models.loading import load_tokenizer, tokenizer_dir
from lorapipe.records import Conversation, read_records


def conversations(texts: list[str], params: Params, tweets: bool) -> list[Conversation]:
    """Each text as the user turn the model was trained on: a tweet to classify, or an instruction."""
    if tweets:
        return [sentiment_prompt(text, params.prompt, params.data.labels) for text in texts]
    return [instruction_prompt(text, "", params.prompt) for text in texts]


def answer(
    base: Path,
    adapter: Path | None,
    prompts: list[Conversation],
    max_new_tokens: int = 128,
    allow_other_base: bool = False,
) -> list[str]:
    # As trained where that is possible: a QLoRA adapter on its 4-bit base on CUDA, merged in full precision on a CPU.
    model, _ = load_adapted(base, adapter, as_trained=torch.cuda.is_available(), allow_other_base=allow_other_base)
    tokenizer = load_tokenizer(tokenizer_dir(base, adapter), padding_side="left")
    return generate_answers(model, tokenizer, prompts, batch_size=8, max_new_tokens=max_new_tokens).texts


def read_prompts(args: argparse.Namespace, params: Params) -> tuple[list[str], list[Conversation]]:
    """What to show for each prompt, and the conversations to answer."""
    texts = list(args.prompts)
    if args.file is not None:
        try:
            texts += [line.strip() for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise PipelineError(f"{args.file}: cannot read prompts: {err}") from None
    shown, prompts = texts, conversations(texts, params, args.tweet)
    if args.records is not None:
        records = read_records(args.records, completion=False)
        shown = shown + [r["prompt"][-1]["content"] for r in records]
        prompts = prompts + [r["prompt"] for r in records]
    if not prompts:
        raise PipelineError("no prompt given: pass text arguments, --file or --records")
    return shown, prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="prompts (or tweets with --tweet)")
    parser.add_argument("--file", type=Path, help="a text file with one prompt a line")
    parser.add_argument("--records", type=Path, help="a JSONL file of prompt records (e.g. data/prepared/*.jsonl)")
    parser.add_argument("--adapter", type=Path, help="an adapter folder; none for the base model alone")
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--params", default="params.yaml", help="where the system prompt and templates come from")
    parser.add_argument("--tweet", action="store_true", help="wrap each prompt in the sentiment instruction")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="at least 1")
    parser.add_argument("--allow-other-base", action="store_true", help="use an adapter trained on another base")
    args = parser.parse_args()
    try:
        if args.max_new_tokens < 1:
            raise PipelineError(f"--max-new-tokens {args.max_new_tokens}: an answer needs at least 1 new token")
        shown, prompts = read_prompts(args, load_params(args.params))
        answers = answer(args.base, args.adapter, prompts, args.max_new_tokens, args.allow_other_base)
    except PipelineError as err:
        sys.exit(f"error: {err}")
    for text, reply in zip(shown, answers, strict=True):
        print(reply if len(shown) == 1 else f"> {text}\n{reply}\n")


if __name__ == "__main__":
    main()
