"""EleutherAI lm-evaluation-harness adapter (the `[eval]` extra): run standard suites on our checkpoints.

    minicpm-jax lm-eval --model RUN_OR_HF_DIR --tasks arc_easy,hellaswag --out results.json

or from Python (importing this module registers the model name "minicpm-jax" with lm_eval):

    import lm_eval, minicpm_jax.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="minicpm-jax", model_args="pretrained=RUN_DIR,batch_size=8", tasks=[...])

loglikelihood and loglikelihood_rolling score with `evaluate.LoglikelihoodScorer`, generate_until runs
`generate.generate` with the request's stop strings; both work on a run directory or an HF folder.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from minicpm_jax.eval.evaluate import LoglikelihoodScorer, encode_pair
from minicpm_jax.infer.generate import generate
from minicpm_jax.infer.inference import load_for_inference, require_tokenizer
from minicpm_jax.progress import Ticker

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


@register_model("minicpm-jax", "minicpm_jax")
class MiniCPMJaxLM(LM):
    """lm_eval's LM interface over a minicpm-jax model (run directory or HF folder)."""

    def __init__(self, pretrained: str, step: int | None = None, tokenizer: str | None = None,
                 batch_size: int | str | None = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, **ignored: Any):
        super().__init__()
        if ignored:  # lm_eval passes device/max_batch_size to every model; jax places arrays itself
            log.debug("ignoring lm_eval model arguments %s", sorted(ignored))
        self.model, loaded = load_for_inference(pretrained, None if step is None else int(step), tokenizer)
        self.tok = require_tokenizer(loaded, pretrained)
        batch = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.batch_size = batch
        self.scorer = LoglikelihoodScorer(self.model, batch_size=batch,
                                          max_length=None if max_length is None else int(max_length))
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, context, continuation) for context, continuation in (r.args for r in requests)]
        return self.scorer.loglikelihood(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Whole-text log-likelihood, in windows of max_length tokens that each score only new tokens."""
        pairs, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(token_list=self.tok.encode(text), prefix_token=self.tok.bos_id,
                                                max_seq_len=self.scorer.max_length, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (loglikelihood, _) in zip(owners, self.scorer.loglikelihood(pairs)):
            totals[owner] += loglikelihood
        return totals

    def generate_until(self, requests) -> list[str]:
        """Requests with equal generation settings run together in batches."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        outputs = [""] * len(requests)
        ticker = Ticker("generate_until", len(requests), "requests")
        for indices in groups.values():
            settings = self._generation_settings(requests[indices[0]].args[1])
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first:first + self.batch_size]
                texts = generate(self.model, self.tok, [requests[i].args[0] for i in chunk], **settings)
                for i, text in zip(chunk, texts):
                    outputs[i] = text
                ticker.update(len(chunk))
        return outputs

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = gen_kwargs.get("do_sample", False) and float(gen_kwargs.get("temperature", 1.0)) > 0
        return {"stop": until, "truncate_prompts": True,
                "max_new_tokens": int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                "temperature": float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
                "top_k": int(gen_kwargs.get("top_k", 0) or 0) if sample else 0,
                "top_p": float(gen_kwargs.get("top_p", 1.0) or 1.0) if sample else 1.0}
