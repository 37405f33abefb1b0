"""robust_sft.evaluation: the measurements the demo, the examples, the benchmarks and `robust-sft eval` share.

- `answer_loss`: mean negative log-likelihood per completion token on held-out rows (any data-layer format);
- `multiple_choice_accuracy`: pick the option with the highest (length-normalised) log-likelihood;
- `refusal_rate`: the share of harmful prompts the model refuses (refusal keywords as in AdvBench / GCG);
- `format_compliance`: the share of answers that match a format (a regular expression, whole answer);
- `label_accuracy`: instruction classification scored by the log-likelihood of each label word;
- `perturbation_robustness`: the same task with the instruction perturbed by each noise operator, with the
  Performance Drop Rate PDR = 1 - perturbed / clean (PromptBench), per operator, per paraphrase and per distortion
  bucket;
- tasks: GSM8K exact match (`final_number`, `exact_match`, `load_gsm8k`), PIQA (`load_piqa`), SST-2 and AG News as
  instruction classification (`load_sst2`, `load_agnews`);
- `representation_rank`: effective rank of the hidden states per layer (TAIA's diagnostic);
- `write_results`: JSON, a markdown table and a PNG bar plot.

Files by concern: `scoring.py` (log-likelihood scoring), `robustness.py`, `metrics.py`, `tasks.py` (loaders over
local files), `reports.py`, `harness.py` (lm-eval's multiple-choice definitions, and lm-eval itself). Generation
lives in [`robust_sft.generation`], which the trainers use too.
"""

from ..generation import generate_answers, generate_batch
from .harness import (
    ChoiceResult,
    loglikelihoods,
    mean_and_stderr,
    multiple_choice_metrics,
    multiple_choice_scores,
    run_harness,
)
from .metrics import (
    REFUSAL_KEYWORDS,
    effective_rank,
    exact_match,
    final_number,
    format_compliance,
    is_refusal,
    refusal_rate,
    refusal_rate_of,
    representation_rank,
)
from .reports import write_results
from .robustness import DISTORTION_BUCKETS, distortion_bucket, performance_drop_rate, perturbation_robustness
from .scoring import (
    MultipleChoiceQuestion,
    answer_loss,
    label_accuracy,
    label_correctness,
    multiple_choice_accuracy,
    multiple_choice_predictions,
)
from .tasks import (
    AGNEWS_INSTRUCTION,
    AGNEWS_LABELS,
    SST2_INSTRUCTION,
    SST2_LABELS,
    load_agnews,
    load_gsm8k,
    load_piqa,
    load_sst2,
)

__all__ = [
    "ChoiceResult",
    "loglikelihoods",
    "mean_and_stderr",
    "multiple_choice_metrics",
    "multiple_choice_scores",
    "run_harness",
    "AGNEWS_INSTRUCTION",
    "AGNEWS_LABELS",
    "DISTORTION_BUCKETS",
    "REFUSAL_KEYWORDS",
    "SST2_INSTRUCTION",
    "SST2_LABELS",
    "MultipleChoiceQuestion",
    "answer_loss",
    "distortion_bucket",
    "effective_rank",
    "exact_match",
    "final_number",
    "format_compliance",
    "generate_answers",
    "generate_batch",
    "is_refusal",
    "label_accuracy",
    "label_correctness",
    "load_agnews",
    "load_gsm8k",
    "load_piqa",
    "load_sst2",
    "multiple_choice_accuracy",
    "multiple_choice_predictions",
    "performance_drop_rate",
    "perturbation_robustness",
    "refusal_rate",
    "refusal_rate_of",
    "representation_rank",
    "write_results",
]
