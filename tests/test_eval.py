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
    results = perturbation_robustness(
        favour_no, tokenizer, rows, ["yes", "no"], ["cut", "word_shuffle"], rate=0.5, instruction_variants=["Mood?"]
    )
    assert list(results)[:4] == ["clean", "cut", "word_shuffle", "paraphrase:0"]
    for name in ("clean", "paraphrase:0"):  # a context-free model: nothing changes
        assert results[name] == {"accuracy": 5 / 8, "pdr": 0.0}
    for name in ("cut", "word_shuffle"):  # every one-word instruction really changed (by characters)
        assert results[name] == {"accuracy": 5 / 8, "pdr": 0.0, "changed": 1.0}
    buckets = {name: entry for name, entry in results.items() if name.startswith("distortion:")}
    assert sum(entry["count"] for entry in buckets.values()) == 16  # 8 rows x 2 operators, each in one bucket
    unchanged = perturbation_robustness(favour_no, tokenizer, rows, ["yes", "no"], ["cut"], rate=0.0)
    assert unchanged["cut"]["changed"] == 0.0  # rate 0: no row changed, so no row is pooled as perturbed
    assert not any(name.startswith("distortion:") for name in unchanged)
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
    from robust_sft.evaluation.scoring import _classification_questions

    rows = Dataset.from_list(
        [{"instruction": "Say yes or no.", "input": f"text {i}", "output": "no"} for i in range(3)]
    )
    questions = _classification_questions(rows, ["yes", "no"], lambda text, index: f"{text.upper()} #{index}")
    assert [q.question for q in questions] == [f"SAY YES OR NO. #{i}\n\ntext {i}" for i in range(3)]
    assert [q.answer for q in questions] == [1, 1, 1]


def test_distortion_buckets():
    from robust_sft.evaluation import distortion_bucket

    assert distortion_bucket(0.0) == "[0, 0.1)"
    assert distortion_bucket(0.1) == "[0.1, 0.3)"
    assert distortion_bucket(0.29) == "[0.1, 0.3)"
    assert distortion_bucket(0.3) == distortion_bucket(1.0) == "[0.3, 1]"
    assert distortion_bucket(0.5, edges=(0.25, 0.5, 0.75)) == "[0.5, 0.75)"


def test_gsm8k_final_number_and_exact_match():
    from robust_sft.evaluation import exact_match, final_number

    assert final_number("3 + 4 = 7.\n#### 7") == "7"
    assert final_number("so the answer is #### 1,000.00 dollars") == "1000"
    assert final_number("It costs 12 then 18.50") == "18.5"  # no marker: the last number
    assert final_number("no digits here") is None
    assert final_number("#### -3") == "-3"
    predictions = ["... #### 18", "I think 20", "#### 5", "nothing"]
    references = ["#### 18", "#### 21", "#### 5.0", "#### 3"]
    assert exact_match(predictions, references) == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["c"])


def test_shared_task_loaders():
    from robust_sft.evaluation import AGNEWS_LABELS, SST2_LABELS, load_agnews, load_gsm8k, load_piqa, load_sst2

    from .conftest import SHARED_DATA

    piqa = load_piqa(f"{SHARED_DATA}/piqa")
    assert len(piqa) == 1838 and piqa[0].answer == 0 and len(piqa[0].options) == 2
    assert piqa[0].question.startswith("How do I ready a guinea pig cage")
    assert all(len(text.split()) >= 8 for text in load_sst2(f"{SHARED_DATA}/sst2/train.tsv", 30, min_words=8)["input"])
    sst2 = load_sst2(f"{SHARED_DATA}/sst2/dev.tsv", limit=20)
    assert len(sst2) == 20 and set(sst2["output"]) <= set(SST2_LABELS)
    assert sst2[0] == {
        "instruction": "Classify the sentiment of the review as positive or negative.",
        "input": "the expressive power of the camera",
        "output": "positive",
    }
    agnews = load_agnews(f"{SHARED_DATA}/agnews/dev.tsv", limit=50, seed=0)
    assert len(agnews) == 50 and set(agnews["output"]) <= set(AGNEWS_LABELS)
    gsm8k = load_gsm8k(f"{SHARED_DATA}/gsm8k/test.jsonl", limit=3)
    assert gsm8k.column_names == ["instruction", "input", "output"] and gsm8k[0]["output"].endswith("#### 18")


def test_effective_rank_on_known_matrices():
    from robust_sft.evaluation import effective_rank

    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert effective_rank(torch.ones(6, 4)) == pytest.approx(1.0)
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(2.0)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_representation_rank_has_one_value_per_layer(tiny_model, tokenizer):
    from robust_sft.evaluation import representation_rank

    texts = ["a b c d", "hello there", "x"]
    ranks = representation_rank(tiny_model, tokenizer, texts, batch_size=2)
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])  # padding is left out
    assert len(ranks) == tiny_model.config.num_hidden_layers + 1
    assert all(1.0 < rank <= tokens for rank in ranks)


def test_write_results(tmp_path):
    import json

    from robust_sft.evaluation import write_results

    results = {"clean": {"accuracy": 0.9, "pdr": 0.0}, "cut": {"accuracy": 0.6, "pdr": 1 / 3, "count": 4}}
    paths = write_results(results, tmp_path, "robustness", metric="pdr")
    assert json.loads(paths["json"].read_text()) == results
    assert paths["markdown"].read_text().splitlines() == [
        "| | accuracy | pdr | count |",
        "|---|---|---|---|",
        "| clean | 0.9 | 0 |  |",
        "| cut | 0.6 | 0.3333 | 4 |",
    ]
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("task", "data", "extra", "rows"),
    [
        ("piqa", "piqa", [], ["model"]),
        ("gsm8k", "gsm8k/test.jsonl", ["--max-new-tokens", "4"], ["model"]),
        (
            "sst2",
            "sst2/dev.tsv",
            ["--robustness", "--operators", "cut,word_shuffle"],
            ["clean", "cut", "word_shuffle"],
        ),
        ("rank", "gsm8k/test.jsonl", [], ["layer 0", "layer 1", "layer 2"]),
    ],
)
def test_cli_eval_tasks(tmp_path, task, data, extra, rows):
    import json

    from robust_sft.cli import main
    from robust_sft.testing import save_tiny_model

    from .conftest import SHARED_DATA

    model = save_tiny_model(str(tmp_path / "model"))
    command = ["eval", "--task", task, "--model", model, "--data", f"{SHARED_DATA}/{data}", "--limit", "4",
               "--output-dir", str(tmp_path / "out"), *extra]  # fmt: skip
    assert main(command) == 0
    results = json.loads((tmp_path / "out" / f"{task}.json").read_text())
    names = [name if name != model else "model" for name in results]
    assert names[: len(rows)] == rows
    assert (tmp_path / "out" / f"{task}.png").is_file() and (tmp_path / "out" / f"{task}.md").is_file()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_shared_prompt_scores_equal_each_option_scored_alone(architecture, tokenizer):
    """The prompt run once on the left-padded batch and each option's tail on its KV cache gives every option the
    log-probability a plain unpadded forward of that option's whole row gives (rotary and absolute positions)."""
    from robust_sft.evaluation.scoring import shared_prefix_log_probs
    from robust_sft.testing import make_tiny_model

    model = make_tiny_model(architecture, tokenizer).eval()
    questions = [("short?", ["yes", "no way at all"]), ("a much longer question with words?", ["a b", "c", "d e f"])]
    groups = []
    for question, options in questions:
        rows = [
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": option}]}
            for option in options
        ]
        groups.append(list(prepare_dataset(Dataset.from_list(rows), tokenizer)))
    shared = shared_prefix_log_probs(model, groups, tokenizer.pad_token_id)
    for group, scores in zip(groups, shared):
        for row, (log_prob, count) in zip(group, scores):
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            answer = labels != -100
            expected = log_probs[answer].gather(-1, labels[answer].unsqueeze(-1)).sum().item()
            assert count == int(answer.sum()) > 0
            assert log_prob == pytest.approx(expected, abs=1e-4)
