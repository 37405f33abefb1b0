"""Evaluation helpers on fixed inputs with known answers: a hand-made unigram model whose log-probabilities are set by
hand, and the tiny model checked against the model's own per-row loss."""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch import nn

from robust_sft.data import prepare_dataset
from robust_sft.evaluation import (
    MultipleChoiceQuestion,
    answer_loss,
    label_accuracy,
    multiple_choice_accuracy,
    performance_drop_rate,
    perturbation_robustness,
)


class UnigramLM(nn.Module):
    """Every position predicts the same distribution: log p(token) = log_softmax(bias), whatever the context."""

    def __init__(self, vocab_size: int, favoured: dict[int, float]):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            for token, value in favoured.items():
                self.bias[token] = value

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))

    def log_prob(self, tokens):
        return torch.log_softmax(self.bias, -1)[tokens].sum().item()


def answer_tokens(tokenizer, question, option):
    row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": option}]}
    prepared = prepare_dataset(Dataset.from_list([row]), tokenizer)[0]
    return [token for token in prepared["labels"] if token != -100]


def test_performance_drop_rate():
    assert performance_drop_rate(0.8, 0.6) == pytest.approx(0.25)
    assert performance_drop_rate(0.5, 0.5) == 0.0
    assert performance_drop_rate(0.5, 0.6) == pytest.approx(-0.2)  # a perturbation can help
    assert performance_drop_rate(0.0, 0.3) == 0.0


def test_multiple_choice_with_hand_made_log_probabilities(tokenizer):
    short, long = "ab", "ab cd ef gh"
    tokens_short = answer_tokens(tokenizer, "q", short)
    tokens_long = answer_tokens(tokenizer, "q", long)
    # favour the long option's extra tokens so that its mean log-prob beats the short one's, but not its sum
    extra = [t for t in tokens_long if t not in tokens_short]
    model = UnigramLM(len(tokenizer), {token: 3.0 for token in extra})
    lp_short, lp_long = model.log_prob(tokens_short), model.log_prob(tokens_long)
    assert lp_long / len(tokens_long) > lp_short / len(tokens_short) and lp_long < lp_short  # the setting is real
    question = MultipleChoiceQuestion("q", [short, long], answer=1)
    assert multiple_choice_accuracy(model, tokenizer, [question], length_normalized=True) == 1.0
    assert multiple_choice_accuracy(model, tokenizer, [question], length_normalized=False) == 0.0


def test_label_accuracy_counts_the_labels_the_model_prefers(tokenizer):
    rows = Dataset.from_list(
        [{"instruction": "Sentiment?", "input": f"review {i}", "output": "yes" if i < 3 else "no"} for i in range(8)]
    )
    favour_no = UnigramLM(len(tokenizer), {token: 5.0 for token in answer_tokens(tokenizer, "q", "no")[:1]})
    assert label_accuracy(favour_no, tokenizer, rows, ["yes", "no"]) == 5 / 8
    results = perturbation_robustness(favour_no, tokenizer, rows, ["yes", "no"], ["cut", "word_shuffle"], rate=0.5)
    assert list(results) == ["clean", "cut", "word_shuffle"]
    assert all(entry == {"accuracy": 5 / 8, "pdr": 0.0} for entry in results.values())  # context-free model
    with pytest.raises(ValueError, match="Row 0: the answer 'maybe' is not one of the labels"):
        label_accuracy(favour_no, tokenizer, Dataset.from_list([{**rows[0], "output": "maybe"}]), ["yes", "no"])


def test_answer_loss_matches_the_models_own_loss_row_by_row(tiny_model, tokenizer):
    rows = Dataset.from_list(
        [{"instruction": f"Count to {i}.", "output": " ".join(str(n) for n in range(i + 1))} for i in range(1, 6)]
    )
    prepared = prepare_dataset(rows, tokenizer)
    total, count = 0.0, 0
    for row in prepared:
        labels = torch.tensor([row["labels"]])
        tokens = int((labels[:, 1:] != -100).sum())
        loss = tiny_model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item()
        total, count = total + loss * tokens, count + tokens
    assert answer_loss(tiny_model, tokenizer, rows, batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_perturbed_instruction_replaces_only_the_instruction(tokenizer):
    from robust_sft.evaluation import _classification_questions

    rows = Dataset.from_list(
        [{"instruction": "Say yes or no.", "input": f"text {i}", "output": "no"} for i in range(3)]
    )
    questions = _classification_questions(rows, ["yes", "no"], lambda text, index: f"{text.upper()} #{index}")
    assert [q.question for q in questions] == [f"SAY YES OR NO. #{i}\n\ntext {i}" for i in range(3)]
    assert [q.answer for q in questions] == [1, 1, 1]
