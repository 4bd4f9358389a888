"""Token classification (NER-style tags): `python recipes/tag.py data.train_files=[...] [key=value ...]`.

Configs: conf/tag.yaml; eval reports loss and entity-level precision / recall / F1.
"""

from persimmon_train.cli import run_recipe


def main(cfg):
    from persimmon_train.training.run import print_summary, train

    print_summary(train(cfg, "tag"), "tag")


if __name__ == "__main__":
    run_recipe("tag", main)
