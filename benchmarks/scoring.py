"""Multiple-choice scoring time: robust_sft's lm-eval-compatible scoring against lm-evaluation-harness itself.

    python benchmarks/scoring.py                 # 300 PIQA items, the embedded model, both scorers in one run
    python benchmarks/scoring.py --items 1838    # full PIQA
    python benchmarks/scoring.py --quick         # a tiny model and 8 items (CI)

Both score the same items with the same prompt (`Question: ...\\nAnswer:`), one forward pass per option, batch 32;
the accuracy of each is recorded too, so the timing compares the same work. lm-eval runs through its own `HFLM` on
the already-loaded model (its task set-up time is inside its figure).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from common import (
    RESULTS,
    SHARED_DATA,
    add_profile_arguments,
    apply_profile,
    load_benchmark_model,
    machine,
    model_description,
    report_suffix,
    write_report,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default=str(RESULTS))
    add_profile_arguments(parser)
    args = parser.parse_args(argv)
    apply_profile(args)

    import torch

    from robust_sft.evaluation import load_piqa, multiple_choice_metrics, multiple_choice_scores, run_harness

    torch.set_num_threads(2)
    items = 8 if args.quick else args.items
    questions = load_piqa(SHARED_DATA / "piqa", items)
    model, tokenizer = load_benchmark_model(args.quick, seed=0)
    model.eval()
    started = time.perf_counter()
    ours = multiple_choice_metrics(multiple_choice_scores(model, tokenizer, questions, batch_size=args.batch_size))
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = run_harness(model, "piqa", questions, tokenizer=tokenizer, batch_size=args.batch_size)
    theirs_s = time.perf_counter() - started
    report = {
        "command": "python benchmarks/scoring.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "model": model_description(args.quick),
        "items": len(questions),
        "robust_sft": {"seconds": round(ours_s, 2), **{k: ours[k] for k in ("acc", "acc_norm")}},
        "lm_eval": {"seconds": round(theirs_s, 2), **{k: theirs[k] for k in ("acc", "acc_norm")}},
        "time_ratio_robust_sft_over_lm_eval": round(ours_s / theirs_s, 3),
    }
    write_report(args.output_dir, f"scoring{report_suffix(args.quick)}", report)
    print(report)
    return report


if __name__ == "__main__":
    main()
