"""Sequence classification: `python recipes/classify.py data.train_files=[...] [key=value ...]`.

Configs: conf/classify.yaml; eval reports loss, accuracy and macro-F1 (docs/training.md).
"""

from persimmon_train.cli import run_recipe


def main(cfg):
    from persimmon_train.training.run import print_summary, train

    print_summary(train(cfg, "classify"), "classify")


if __name__ == "__main__":
    run_recipe("classify", main)
