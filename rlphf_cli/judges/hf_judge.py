"""The `hf` judge: a local transformers causal LM decides by log-probabilities, without sampling.

The judge prompt (the same templates as the `openai` judge) is rendered with the tokenizer's chat
template (the Tulu format when it has none); each answer option ("Output (a)", "Output (b)", and
"TIE" for evaluation) is scored by the sum of its tokens' log-probabilities after the prompt. The
verdict is the best option; the confidence is its softmax probability over the options. The model
is loaded on the first uncached request, so a fully cached rerun never loads it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlphf_cli.errors import InputError
from rlphf_cli.judges.base import OPTION_A, OPTION_B, OPTION_TIE, BaseJudge, JudgeRequest, Judgment

OPTIONS = {"annotate": (OPTION_A, OPTION_B), "evaluate": (OPTION_A, OPTION_B, OPTION_TIE)}
VERDICTS = {OPTION_A: "A", OPTION_B: "B", OPTION_TIE: "tie"}


class HFJudge(BaseJudge):
    name = "hf"

    def __init__(self, spec, cache_path=None):
        super().__init__(spec, cache_path)
        self.cfg = spec.settings
        name = self.cfg.model
        if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
            raise InputError(f"judge.hf.model: folder not found: {name}")
        self._model = None
        self._tokenizer = None
        self.truncated = 0

    def model_id(self) -> str:
        return self.cfg.model

    def describe(self) -> dict:
        # truncated: prompts cut from the left to fit the model's context
        return {"backend": self.name, "model": self.cfg.model, "truncated": self.truncated}

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlphf_cli.hub import require_model
        from rlphf_cli.specs import ModelSpec

        model = ModelSpec(self.cfg.model)
        path = model.path()
        require_model(path)
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModelForCausalLM.from_pretrained(path, dtype=model.torch_dtype()).to(self._device).eval()

    def _prompt_ids(self, request: JudgeRequest) -> list[int]:
        from rlphf_cli.prompting import render_prompt, text_ids

        text = render_prompt(self._tokenizer, self.templates.render(request), "chat")
        return text_ids(self._tokenizer, text, "chat")

    def _judge_uncached(self, items: list[tuple[int, JudgeRequest]], deliver) -> None:
        import torch

        self._load()
        tok, model = self._tokenizer, self._model
        option_ids = {o: tok(o, add_special_tokens=False).input_ids for opts in OPTIONS.values() for o in opts}
        limit = getattr(model.config, "max_position_embeddings", None)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for start in range(0, len(items), self.cfg.batch_size):
            batch = items[start:start + self.cfg.batch_size]
            rows: list[tuple[int, str, list[int], int]] = []  # (item, option, ids, prompt length)
            for k, (_, request) in enumerate(batch):
                prompt = self._prompt_ids(request)
                longest = max(len(option_ids[o]) for o in OPTIONS[request.use])
                if limit and len(prompt) + longest > limit:
                    # Keep the end: the responses and the question sit there.
                    prompt = prompt[len(prompt) + longest - limit:]
                    self.truncated += 1
                for option in OPTIONS[request.use]:
                    rows.append((k, option, prompt + option_ids[option], len(prompt)))
            width = max(len(ids) for _, _, ids, _ in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (_, _, ids, _) in enumerate(rows):
                input_ids[r, :len(ids)] = torch.tensor(ids)
                mask[r, :len(ids)] = 1
            with torch.no_grad():
                logits = model(input_ids=input_ids.to(self._device), attention_mask=mask.to(self._device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            scores: dict[int, dict[str, float]] = {}
            for r, (k, option, ids, plen) in enumerate(rows):
                # Token t is predicted by the position before it.
                positions = torch.arange(plen - 1, len(ids) - 1)
                targets = torch.tensor(ids[plen:])
                scores.setdefault(k, {})[option] = float(logprobs[r, positions, targets].sum())
            for k, (n, _) in enumerate(batch):
                deliver(n, _judgment(scores[k]))


def _judgment(scores: dict[str, float]) -> Judgment:
    best = max(scores, key=scores.get)
    top = max(scores.values())
    total = sum(math.exp(v - top) for v in scores.values())
    raw = json.dumps({"logprobs": {k: round(v, 4) for k, v in scores.items()}})
    return Judgment(verdict=VERDICTS[best], raw=raw, confidence=1.0 / total)  # type: ignore[arg-type]
