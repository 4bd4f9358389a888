"""Evaluate a model folder or a training checkpoint:
`python recipes/evaluate.py model.path=DIR data.eval_files=[...] [task=...] [data=...]`.

Configs: conf/evaluate.yaml. Prints the metrics and writes output_dir/eval_metrics.json.
"""

from persimmon_train.cli import run_recipe


def main(cfg):
    from persimmon_train.training.run import evaluate

    evaluate(cfg, "evaluate")


if __name__ == "__main__":
    run_recipe("evaluate", main)
