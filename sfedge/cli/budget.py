"""Token budget: frames, slow/fast frames and tokens, template text tokens, prompt tokens,
KV-cache bytes (fp32/fp16/int8), and whether it all fits the context."""
from __future__ import annotations

import argparse
import json

from sfedge.budget import DEFAULT_QUESTION, compute_budget, format_budget, template_text_tokens
from sfedge.cli.common import add_model_arguments, model_config, non_negative_int, positive_int, prompt_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", default=DEFAULT_QUESTION, type=prompt_text, help="question used to count template text tokens")
    parser.add_argument("--max-new-tokens", type=non_negative_int, default=0, help="tokens to reserve for the answer")
    parser.add_argument("--context", type=positive_int, help="context to check against (default: the model's)")
    parser.add_argument("--llm", metavar="DIR", help="take the tokenizer (and LLM shape) from this Hugging Face folder")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--profile", metavar="FILE", help="device profile (sfedge bench DIR --profile-out FILE): add predicted "
                                                          "stage times, TTFT, decode tok/s and peak RSS")


def run(args: argparse.Namespace) -> int:
    from sfedge.models import WeightsSource, resolve_config

    config = resolve_config(model_config(args), WeightsSource(llm_dir=args.llm))
    text_tokens = template_text_tokens(config, args.prompt, args.llm)
    budget = compute_budget(config, text_tokens, max_new_tokens=args.max_new_tokens, context=args.context)
    if args.profile:
        from sfedge.benchmarks.costmodel import budget_with_prediction

        print(budget_with_prediction(args.profile, config, budget, args.json))
        return 0
    print(json.dumps(budget.to_dict(), indent=2) if args.json else format_budget(budget))
    return 0
