"""Causal-LM fine-tuning, full or LoRA: `python recipes/finetune.py [key=value ...]`.

No overrides: the embedded default (LoRA, tiny model, demo chat data, CPU, about a minute).
Configs: conf/finetune.yaml and its groups; docs/training.md.
"""

from persimmon_train.cli import run_recipe


def main(cfg):
    from persimmon_train.training.run import print_summary, train

    print_summary(train(cfg, "finetune"), "finetune")


if __name__ == "__main__":
    run_recipe("finetune", main)
