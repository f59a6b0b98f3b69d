"""Held-out evaluation: base model vs adapter on assistant-token loss and perplexity, plus sample replies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .settings import EvaluationSettings


@dataclass
class ModelScore:
    loss: float
    perplexity: float
    tokens: int


@dataclass
class SampleReply:
    prompt: str  # the last user turn
    reference: str
    base_reply: str
    adapter_reply: str


@dataclass
class EvaluationResult:
    base: ModelScore
    adapter: ModelScore
    samples: list[SampleReply]

    @property
    def perplexity_ratio(self) -> float:
        """Adapter perplexity over base perplexity: below 1 means the adapter fits held-out data better."""
        return self.adapter.perplexity / self.base.perplexity

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["perplexity_ratio"] = self.perplexity_ratio
        return data

    def to_markdown(self) -> str:
        lines = [
            "| model | validation loss | perplexity | tokens |",
            "|---|---|---|---|",
            f"| base | {self.base.loss:.4f} | {self.base.perplexity:.2f} | {self.base.tokens} |",
            f"| adapter | {self.adapter.loss:.4f} | {self.adapter.perplexity:.2f} | {self.adapter.tokens} |",
            "",
            f"Perplexity ratio (adapter / base): **{self.perplexity_ratio:.3f}**",
        ]
        for number, sample in enumerate(self.samples, start=1):
            lines += [
                "",
                f"### Sample {number}",
                f"**Therapist:** {_one_line(sample.prompt)}",
                "",
                f"- reference: {_one_line(sample.reference)}",
                f"- base: {_one_line(sample.base_reply)}",
                f"- adapter: {_one_line(sample.adapter_reply)}",
            ]
        return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "_(empty)_"


def score(model: Any, batches: Sequence[dict[str, Any]]) -> ModelScore:
    import torch

    from .loss import summed_token_loss

    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            moved = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            batch_loss, batch_tokens = summed_token_loss(model, moved)  # no grad: chunks, no recomputation
            loss_sum += float(batch_loss)
            tokens += int(batch_tokens)
    if tokens == 0:
        raise ValueError(
            "no assistant tokens in the validation split: every assistant turn was cut off by "
            "max_seq_len; raise adapter_evaluation's max_seq_len"
        )
    loss = loss_sum / tokens
    # Capped so a bad model gives a huge but finite perplexity; NaN stays NaN (training_sanity reports it).
    return ModelScore(
        loss=loss, perplexity=math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan, tokens=tokens
    )


def generate_reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """Greedy reply to ``messages`` rendered with the chat template and a generation prompt, ending at the model's
    own end-of-turn token (not only EOS, which many chat models write only after it)."""
    import torch

    from .models import end_of_turn_token_ids

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=end_of_turn_token_ids(tokenizer, model),
            # A model whose generation config names a static or hybrid cache (Gemma 2/3) would otherwise be
            # compiled by generate on a GPU (Inductor + Triton, minutes, and a C compiler at run time) for a few
            # short sample replies.
            disable_compile=True,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def evaluate_adapter(
    base_snapshot_dir: Path,
    adapter_dir: Path,
    validation_conversations: Sequence[list[dict[str, str]]],
    settings: EvaluationSettings,
    device: str,
) -> EvaluationResult:
    from peft import PeftModel

    from .models import load_snapshot
    from .tokenization import fixed_batches, pack_rows, tokenize_conversations
    from .warning_filters import install_library_filters

    install_library_filters()
    model, tokenizer = load_snapshot(base_snapshot_dir, device=device, for_training=False)
    rows = pack_rows(
        tokenize_conversations(tokenizer, validation_conversations, settings.max_seq_len).conversations,
        settings.max_seq_len,
        pack=False,
    )
    batches = fixed_batches(rows, settings.batch_size, tokenizer.pad_token_id)
    prompts = [c[:-1] for c in validation_conversations[: settings.sample_replies]]

    base_score = score(model, batches)
    base_replies = [generate_reply(model, tokenizer, p, settings.max_new_tokens) for p in prompts]
    adapted = PeftModel.from_pretrained(model, adapter_dir)
    adapted.eval()
    adapter_score = score(adapted, batches)
    adapter_replies = [generate_reply(adapted, tokenizer, p, settings.max_new_tokens) for p in prompts]
    samples = [
        SampleReply(prompt=p[-1]["content"], reference=c[-1]["content"], base_reply=b, adapter_reply=a)
        for p, c, b, a in zip(prompts, validation_conversations, base_replies, adapter_replies, strict=False)
    ]
    return EvaluationResult(base=base_score, adapter=adapter_score, samples=samples)
